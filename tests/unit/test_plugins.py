"""Method and metric discovery: built-in packages are scanned, third-party packages plug in through entry points.

The throw-away plugin is a real installed distribution: a ``*.dist-info`` directory with ``METADATA`` and
``entry_points.txt`` next to its package, on ``sys.path`` (what ``pip install`` leaves in site-packages), so
``importlib.metadata`` finds it exactly as it finds an installed package; the shared virtualenv is not touched.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import editlens
import editlens.edit.base as edit_base
import editlens.evaluate.core as eval_core
from editlens.data.schema import Probe, Rewrite, make_case
from editlens.errors import MethodError, MetricError
from editlens.evaluate import ModelSystem, evaluate
from editlens.registry import Discovery, PluginImportWarning
from tests.conftest import shipped_methods, shipped_metrics

REPO = Path(__file__).resolve().parents[2]

PLUGIN_MODULE = '''
"""A throw-away editlens plugin: ROME under a new name, and a metric."""
from editlens.edit.base import register_method
from editlens.edit.rome import ROME


@register_method("rome-plugin")
class RomePlugin(ROME):
    """ROME, registered by a third-party package."""
'''

PLUGIN_METRIC = '''
from editlens.evaluate.core import EDITED, Metric, Row, Score


class TargetLogprob(Metric):
    """Teacher-forced log-probability of the rewrite target (a plugin metric)."""

    groups = ("plugin",)
    value_range = (float("-inf"), 0.0)

    def case_requests(self, case):
        yield EDITED, Score(case.rewrite.text, case.rewrite.target_new)

    def case_rows(self, case, answers):
        tf = answers.score(case.rewrite.text, case.rewrite.target_new)
        yield Row(case.case_id, "rewrite", self.name, float(tf.logprobs.sum()))
'''


def _install(root: Path, dist: str, files: dict[str, str], entry_points: dict[str, dict[str, str]]) -> Path:
    """Write a minimal installed distribution (package files + ``<dist>-0.0.dist-info``) under ``root``."""
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    info = root / f"{dist}-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for group, eps in entry_points.items()))
    return root


@pytest.fixture()
def plugin_dir(tmp_path, monkeypatch):
    root = _install(tmp_path / "site", "editlens_test_plugin",
                    {"mypkg/__init__.py": PLUGIN_MODULE, "mymetric.py": PLUGIN_METRIC},
                    {"editlens.methods": {"rome-plugin": "mypkg"},
                     "editlens.metrics": {"target_logprob": "mymetric:TargetLogprob"}})
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("EDITLENS_STATS_DIR", str(tmp_path / "stats"))
    yield root
    # forget the plugin again (other tests list the registries)
    edit_base._METHODS.pop("rome-plugin", None)
    eval_core._REGISTRY.pop("target_logprob", None)
    for disc in (edit_base._discovery(), eval_core._discovery()):
        disc._entry_points_done = {k for k in disc._entry_points_done if k[0] not in ("rome-plugin", "target_logprob")}
        disc.sources.pop("rome-plugin", None)
        disc.sources.pop("target_logprob", None)
    for mod in ("mypkg", "mymetric"):
        sys.modules.pop(mod, None)


def _cases(n=2):
    subjects = ["Alice Smith", "Bob Jones"]
    return [make_case(str(i), Rewrite("{} lives in the city of", subjects[i], "Paris", "Rome"),
                      {"neighborhood": [Probe("Carol White lives in the city of", "Oslo", "Paris")]})
            for i in range(n)]


def test_hand_kept_module_lists_are_gone():
    assert not hasattr(edit_base, "_BUILTIN_MODULES") and not hasattr(edit_base, "_load_builtin")
    assert not hasattr(eval_core, "METRIC_MODULES") and not hasattr(eval_core, "_load_metric_modules")


def test_builtin_modules_are_found_by_scanning():
    disc = edit_base._discovery()
    mods = disc.builtin_modules()
    # every module that registers a method, and none of the helpers that register nothing
    assert {"editlens.edit.rome", "editlens.edit.memit", "editlens.edit.scr", "editlens.edit.wise"} <= set(mods)
    assert "editlens.edit.locate" not in mods and "editlens.edit.base" not in mods
    assert {edit_base.get_method(m).__module__ for m in shipped_methods()} <= set(mods)
    mmods = eval_core._discovery().builtin_modules()
    assert "editlens.evaluate.gt" in mmods and "editlens.evaluate.meta" not in mmods  # meta registers nothing
    assert {eval_core.registered_metrics()[m].__module__ for m in shipped_metrics()} <= set(mmods)


def test_entry_point_plugins_are_usable_by_name(plugin_dir):
    assert "rome-plugin" in edit_base.registered_methods()
    assert "target_logprob" in eval_core.registered_metrics()
    lm = editlens.load_model("tiny-llama")
    base = ModelSystem(lm)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    e = editlens.edit(lm, _cases(), method="rome-plugin")
    assert e.method == "rome-plugin" and e.diagnostics["layers"]
    res = evaluate(e.system, _cases(), base=base, metrics="target_logprob,kl", progress=False, cache=False)
    df = res.to_pandas()
    assert set(df.metric) == {"target_logprob", "kl"} and len(df.query("metric == 'target_logprob'")) == 2
    assert (df.query("metric == 'target_logprob'").value < 0).all()
    e.undo()
    assert all((v == before[k]).all() for k, v in lm.model.state_dict().items())
    assert eval_core.metric_groups()["plugin"] == ["target_logprob"]
    assert edit_base._discovery().sources["rome-plugin"] == "editlens_test_plugin"
    # plugin authors run the same contract checks as editlens's own methods and metrics
    from editlens.testing import check_method, check_metric

    assert check_method("rome-plugin", lm)["evk_align"] == "applied"
    assert check_metric("target_logprob")["rows"] > 0


def test_plugin_installed_after_first_use_is_found(tmp_path, monkeypatch, plugin_dir):
    edit_base.registered_methods()  # first look (the plugin dir is already on sys.path)
    late = _install(tmp_path / "late", "late_plugin", {"lateplug.py": PLUGIN_MODULE.replace("rome-plugin", "rome-late")},
                    {"editlens.methods": {"rome-late": "lateplug"}})
    monkeypatch.syspath_prepend(str(late))
    try:
        assert edit_base.get_method("rome-late").name == "rome-late"
    finally:
        edit_base._METHODS.pop("rome-late", None)
        sys.modules.pop("lateplug", None)


def test_cli_lists_plugins(plugin_dir):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), str(REPO)])}
    out = subprocess.run([sys.executable, "-m", "editlens.cli.main", "methods"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.strip().startswith("rome-plugin"))
    assert "plugin editlens_test_plugin" in line and "ROME, registered by a third-party package" in line
    assert "rome " in out.stdout and "memit" in out.stdout
    out = subprocess.run([sys.executable, "-m", "editlens.cli.main", "eval", "--list-metrics"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert any(l.strip().startswith("target_logprob") for l in out.stdout.splitlines())


def test_broken_entry_point_is_reported_not_skipped(tmp_path, monkeypatch):
    root = _install(tmp_path / "site", "broken_plugin",
                    {"brokenplug.py": "import editlens_dependency_that_is_not_installed\n",
                     "emptyplug.py": "X = 1\n",
                     "shadowplug.py": "from editlens.edit.base import Editor, register_method\n\n"
                                      "@register_method('rome')\nclass Shadow(Editor):\n    pass\n"},
                    {"editlens.methods": {"broken-method": "brokenplug", "empty-method": "emptyplug",
                                          "rome": "shadowplug"},
                     "editlens.metrics": {"broken_metric": "brokenplug"}})
    monkeypatch.syspath_prepend(str(root))
    disc_m, disc_e = edit_base._discovery(), eval_core._discovery()
    try:
        with pytest.warns(PluginImportWarning, match="brokenplug.*ModuleNotFoundError"):
            names = edit_base.registered_methods()
        assert "broken-method" not in names
        with pytest.raises(MethodError) as err:
            edit_base.get_method("broken-method")
        msg = str(err.value)
        assert "unknown editing method 'broken-method'" in msg
        assert "note: method module entry point 'broken-method' = 'brokenplug'" in msg
        assert "ModuleNotFoundError: No module named 'editlens_dependency_that_is_not_installed'" in msg
        # a module that loads but registers nothing of the entry point's name is an error too
        assert "registered no method named 'empty-method'" in msg
        assert any("broken-method" in e for e in edit_base.method_import_errors())
        # a plugin cannot silently replace a method of another module
        assert "MethodError: method 'rome' is already registered by editlens.edit.rome.ROME" in msg
        assert edit_base.get_method("rome").__module__ == "editlens.edit.rome"
        with pytest.raises(MetricError, match="note: metric module entry point 'broken_metric'.*ModuleNotFoundError"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PluginImportWarning)
                eval_core.resolve_metrics("broken_metric")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(REPO)])}
        out = subprocess.run([sys.executable, "-m", "editlens.cli.main", "methods"], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "failed to import: entry point 'broken-method'" in out.stdout and "ModuleNotFoundError" in out.stdout
    finally:
        for disc in (disc_m, disc_e):
            disc.errors = {k: v for k, v in disc.errors.items() if "plug" not in k}
        for mod in ("brokenplug", "emptyplug", "shadowplug"):
            sys.modules.pop(mod, None)


def test_builtin_scan_reports_a_module_whose_dependency_is_missing(tmp_path, monkeypatch):
    """A package scan imports every registering module; one with a missing optional dependency is reported with
    its error while the others register; a module that registers nothing is not imported."""
    pkg = tmp_path / "fakemethods"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text("REGISTRY = {}\ndef register_method(name):\n    REGISTRY[name] = 1\n"
                                 "register_method('good')\n")
    (pkg / "bad.py").write_text("import optional_dependency_not_installed  # noqa\n"
                                "from fakemethods.good import register_method\nregister_method('bad')\n")
    (pkg / "helper.py").write_text("raise RuntimeError('helpers that register nothing are not imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    good = None
    disc = Discovery("method", "fakemethods", "register_method(", "editlens.test-unused-group",
                     lambda: good.REGISTRY if good else {}, lambda n, o: None)
    assert disc.builtin_modules() == ["fakemethods.bad", "fakemethods.good"]
    with pytest.warns(PluginImportWarning, match="fakemethods.bad failed to import: ModuleNotFoundError"):
        disc.ensure()
    good = importlib.import_module("fakemethods.good")
    assert good.REGISTRY == {"good": 1}
    assert "fakemethods.helper" not in sys.modules
    assert list(disc.errors) == ["fakemethods.bad"]
    assert "No module named 'optional_dependency_not_installed'" in disc.notes()
    for m in ("fakemethods", "fakemethods.good", "fakemethods.bad"):
        sys.modules.pop(m, None)
