"""Every code example of README.md and docs/*.md runs, so that the docs cannot drift from the API unnoticed.

* ```python blocks are executed, the blocks of one page in order in one fresh module namespace (a page reads
  like a notebook: a later block may use what an earlier one defined), in a scratch folder holding the sample
  datasets under the file names the docs use, with the built-in model ``"smollm2-135m"`` replaced by the tiny
  random ``"tiny-llama"`` so that they stay fast and need no download; what the blocks register (methods,
  metrics) is unregistered afterwards;
* ```toml / ```yaml blocks are experiment specs: validated as ``editlens bench SPEC --dry-run`` validates them
  (:func:`editlens.runs.runner.load_validated_spec`: structure, metric and method registries, hyperparameter
  values, layers against the model's config). A fragment (no ``[model]``) is appended to a minimal spec whose
  last table is a ``[[methods]]`` entry, so ``[methods.evk_align]`` fragments are checked in place. A
  ``pyproject.toml`` snippet (``[project...]``, ``[tool...]`` tables) must parse as TOML;
* every ``examples/*.toml`` is dry-run through the CLI.

A block can be left out only with an HTML comment on the line right before its fence:
``<!-- no-test: reason -->``; :data:`OPTED_OUT` lists them (a new opt-out fails until it is listed here).
"""
from __future__ import annotations

import re
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXAMPLES = sorted((REPO / "examples").glob("*.toml"))
LANGS = ("python", "toml", "yaml")
_FENCE = re.compile(r"^([ \t]*)```([A-Za-z0-9_+-]*)[ \t]*$")
_NO_TEST = re.compile(r"<!--\s*no-test:\s*(.*?)\s*-->")

#: blocks left out (file, first line of the block's code), each with its reason in the doc itself
OPTED_OUT = {
    ("docs/experiments-running.md", "from editlens.runs.runner import run_spec, RunOptions"),
    ("docs/experiments.md", 'st = Store("results.sqlite")'),
    ("docs/methods.md", "from editlens.edit.stats import second_moment"),
    ("docs/trained-editors.md", "import editlens"),
    ("docs/methods-trained.md", "import editlens"),
    ("docs/trained-editors.md", "[[methods]]"),
    ("README.md", "te = editlens.train(\"serac\", lm, editlens.synthetic_cases(300))   # progress bar, validation, early stopping"),
    ("docs/metrics-autoregressive-portability-general.md", "from editlens.evaluate.general import run_lm_eval"),
}


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository
    line: int  # line of the opening fence
    lang: str
    code: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}:{self.lang}"


def doc_blocks() -> list[Block]:
    """The ```python / ```toml / ```yaml blocks of the README and docs (indented fences included)."""
    out: list[Block] = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            m = _FENCE.match(lines[i])
            if not m:
                i += 1
                continue
            indent, lang = m.group(1), m.group(2).lower()
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if lang in LANGS:
                prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
                skip = _NO_TEST.search(prev)
                code = textwrap.dedent("\n".join(lines[i + 1:j])) + "\n"
                out.append(Block(str(path.relative_to(REPO)), i + 1, lang, code, skip.group(1) if skip else None))
            i = j + 1
    return out


BLOCKS = doc_blocks()


def _first_line(b: Block) -> str:
    return next(ln for ln in b.code.splitlines() if ln.strip())


def test_blocks_found_and_opt_outs_listed():
    assert len([b for b in BLOCKS if b.lang == "python"]) >= 10
    assert any(b.lang == "toml" for b in BLOCKS)
    skipped = {(b.doc, _first_line(b)) for b in BLOCKS if b.skip_reason is not None}
    assert skipped == OPTED_OUT, "an opt-out must be listed in OPTED_OUT (and every listed one exist)"
    for b in BLOCKS:
        if b.skip_reason is not None:
            assert len(b.skip_reason) > 10, f"{b.id}: say why the block cannot run"


# ------------------------------------------------------------------------------------------------- specs
MINIMAL = """\
metrics = ["kl"]
[model]
name = "tiny-llama"
[[datasets]]
path = "synthetic:20"
[regime]
kind = "batch"
sizes = [10]
[[methods]]
name = "memit"
"""


def _spec_workdir(tmp_path: Path, shared_data_dir: Path) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    for f in shared_data_dir.glob("*.json"):
        shutil.copy(f, tmp_path / "data" / f.name)
    return tmp_path


def _validate_spec(path: Path):
    from editlens.runs.runner import load_validated_spec

    return load_validated_spec(path)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in ("toml", "yaml") and b.skip_reason is None],
                         ids=lambda b: b.id)
def test_spec_block_dry_runs(block, tmp_path, shared_data_dir):
    d = _spec_workdir(tmp_path, shared_data_dir)
    code = block.code
    if re.search(r"^\[(project|tool|build-system)\b", code, re.M):
        import tomllib

        assert tomllib.loads(code), block.id  # a pyproject.toml snippet, not a spec
        return
    full = re.search(r"^\[model\]|^model\s*=|^model:", code, re.M) is not None
    if not full:
        assert block.lang == "toml", f"{block.id}: a YAML fragment cannot be completed"
        code = MINIMAL + code
    p = d / f"spec.{block.lang}"
    p.write_text(code, encoding="utf-8")
    spec = _validate_spec(p)
    assert spec.plan(), block.id


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_spec_dry_runs(path, tmp_path):
    from click.testing import CliRunner

    from editlens.cli.main import cli

    text = path.read_text(encoding="utf-8")
    shared = (path.parent / "../../shared/data/pitfalls").resolve()
    if "../../shared/data/pitfalls/" in text and not shared.is_dir():
        # the paper-scale specs read the full public files beside the repository; a clone without them dry-runs
        # the same spec on the packaged samples of those files (same format, first records)
        sample = (REPO / "editlens" / "resources" / "data" / "pitfalls").resolve()
        text = re.sub(r'"\.\./\.\./shared/data/pitfalls/([a-z_]+)\.json"',
                      lambda m: f'"{(sample / (m.group(1) + "_sample.json")).as_posix()}"', text)
        path = tmp_path / path.name
        path.write_text(text, encoding="utf-8")
    r = CliRunner().invoke(cli, ["bench", str(path), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "units:" in r.output


# ------------------------------------------------------------------------------------------------- python
#: sample files under the names the docs use (the shipped samples: real schemas, a few records)
DATA_FILES = {
    "facts.json": "counterfact_sample.json",
    "counterfact.json": "counterfact_sample.json",
    "multi_counterfact.json": "counterfact_sample.json",
    "zsre_mend_eval.json": "zsre_mend_eval_sample.json",
    "MQuAKE-CF-3k.json": "mquake_cf_sample.json",
    "data.json": "knowedit_wiki_counterfact_sample.json",
}


PY_DOCS = sorted({b.doc for b in BLOCKS if b.lang == "python" and b.skip_reason is None})


@pytest.fixture()
def _registries():
    """Unregister what a doc example registers (methods, metrics, request types)."""
    from editlens.edit import base as edit_base
    from editlens.edit import registered_methods
    from editlens.evaluate import core, registered_metrics

    # discover first: a copy taken before discovery would be empty, and restoring it would leave the registries
    # empty for the next page (discovery does not run twice)
    registered_methods()
    registered_metrics()
    saved = [(d, dict(d)) for d in (edit_base._METHODS, core._REGISTRY, core._REQUEST_TYPES)]
    yield
    for d, old in saved:
        d.clear()
        d.update(old)


@pytest.mark.parametrize("doc", PY_DOCS)
def test_python_blocks_run(doc, tmp_path, monkeypatch, shared_data_dir, capsys, _registries):
    import sys
    import types

    for name, src in DATA_FILES.items():
        shutil.copy(shared_data_dir / src, tmp_path / name)
    (tmp_path / "spec.toml").write_text(MINIMAL, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    modname = "doc_example_" + re.sub(r"\W", "_", Path(doc).stem)
    mod = types.ModuleType(modname)
    monkeypatch.setitem(sys.modules, modname, mod)  # dataclasses and pickling look their module up
    for block in [b for b in BLOCKS if b.doc == doc and b.lang == "python" and b.skip_reason is None]:
        assert '"smollm2-135m"' in block.code or "load_model(" not in block.code, block.id
        code = block.code.replace('"smollm2-135m"', '"tiny-llama"')
        exec(compile(code, block.id, "exec"), mod.__dict__)
    out = capsys.readouterr().out
    if doc == "README.md":
        assert "probe_kind" in out and "wall_time_s" in out
