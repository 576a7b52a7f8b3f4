"""Run specs: TOML/YAML parsing, validation errors naming key and line, plan expansion."""
from __future__ import annotations

import textwrap

import pytest

from editlens.errors import SpecError
from editlens.runs.spec import load_spec, parse_spec, toml_lines, yaml_lines

GOOD_TOML = """\
name = "lambda-sweep"
metrics = ["efficacy", "kl", "topk@1"]
seeds = [0, 1]

[model]
name = "smollm2-135m"
dtype = "float32"

[[datasets]]
path = "cf.json"
format = "counterfact"
limit = 100

[[datasets]]
path = "synthetic:50"

[[methods]]
name = "memit"
hparams = { layers = [4, 5, 6], v_lr = 0.5 }

[[methods]]
name = "memit"
label = "memit_evk"
[methods.hparams]
layers = [4, 5]
[methods.evk_align]
weight = 0.1

[regime]
kind = "batch"
sizes = [10, 50]

[sweep]
"memit.mom2_update_weight" = [1.5e2, 1.5e3, 1.5e4]
"memit_evk.evk_align.alpha" = [
  0.1,
  0.2,
]

[report]
ranges = { s_acc = [0, 100] }
"""


@pytest.fixture()
def spec_dir(tmp_path):
    (tmp_path / "cf.json").write_text("[]")
    return tmp_path


def write(d, text, name="spec.toml"):
    p = d / name
    p.write_text(textwrap.dedent(text))
    return p


def err(d, text, name="spec.toml", **kw) -> SpecError:
    with pytest.raises(SpecError) as e:
        load_spec(write(d, text, name), **kw)
    return e.value


def test_good_toml_plan(spec_dir):
    s = load_spec(write(spec_dir, GOOD_TOML))
    assert s.model.dtype == "float32" and s.datasets[0].path == (spec_dir / "cf.json").resolve()
    assert s.datasets[1].synthetic == 50 and s.datasets[1].name == "synthetic-50"
    units = s.plan()
    # memit: 3 points, memit_evk: 2 points; x 2 datasets x 2 seeds x 2 sizes
    assert len(units) == (3 + 2) * 2 * 2 * 2
    assert len({u.id for u in units}) == len(units)
    u = [u for u in units if u.label == "memit_evk"][0]
    assert u.evk_align == {"weight": 0.1, "alpha": 0.1} and u.hparams == {"layers": [4, 5]}
    m = [u for u in units if u.label == "memit"][0]
    assert m.hparams["mom2_update_weight"] == 150.0 and m.sweep == {"memit.mom2_update_weight": 150.0}
    assert m.meta()["dataset"] == "cf" and m.meta()["n_edits"] == 10
    summary = s.plan_summary()
    assert summary["units"] == 40 and summary["edits"] == 20 * (10 + 50)
    assert "units: 40" in s.describe_plan()
    # ids are stable across loads and independent of key order
    again = load_spec(write(spec_dir, GOOD_TOML.replace('limit = 100\n', 'limit = 100\n'), "b.toml"))
    assert [u.id for u in again.plan()] == [u.id for u in units]
    assert s.to_dict()["sweep"]["memit.mom2_update_weight"] == [150.0, 1500.0, 15000.0]


def test_yaml_equivalent(spec_dir):
    y = """\
    model: {name: smollm2-135m}
    datasets:
      - path: synthetic:20
    methods:
      - name: rome
        hparams: {layer: 5}
    regime:
      kind: sequential
      checkpoints: [1, 10, 20]
      batch_size: 1
    metrics: [kl, s_acc]
    """
    s = load_spec(write(spec_dir, y, "s.yaml"))
    (u,) = s.plan()
    assert u.regime == "sequential" and u.checkpoints == (1, 10, 20) and u.n_edits == 20
    assert s.plan_summary()["evaluations"] == 3


def test_toml_line_finder():
    lines = toml_lines(GOOD_TOML)
    assert lines.exact(("metrics",)) == 2
    assert lines.exact(("datasets", 1, "path")) == 15
    assert lines.exact(("methods", 0, "hparams", "v_lr")) == 19
    assert lines.exact(("methods", 1, "hparams", "layers")) == 25
    assert lines.exact(("methods", 1, "evk_align", "weight")) == 27
    assert lines.exact(("sweep", "memit_evk.evk_align.alpha")) == 35
    assert lines.exact(("report", "ranges", "s_acc")) == 41
    assert lines.lookup(("regime", "sizes", 1)) == 31


def test_yaml_line_finder_and_duplicates():
    lines, dups = yaml_lines("a: 1\nb:\n  - x: 1\n  - y: 2\na: 3\n")
    assert lines.exact(("b", 1, "y")) == 4 and dups == [(("a",), 5)]


MINIMAL = """\
metrics = ["kl"]
[model]
name = "tiny-llama"
[[datasets]]
path = "synthetic:30"
[[methods]]
name = "memit"
[regime]
kind = "batch"
sizes = [10]
"""


@pytest.mark.parametrize("text,key,line,fragment", [
    # unknown top-level key, with a hint
    ("metrix = 1\n" + MINIMAL, "metrix", 1, "did you mean 'metrics'"),
    # metrics of the wrong type
    (MINIMAL.replace('metrics = ["kl"]', 'metrics = "kl"'), "metrics", 1, "non-empty list"),
    (MINIMAL.replace('metrics = ["kl"]', 'metrics = ["kl", "kl"]'), "metrics[1]", 1, "twice"),
    # model
    (MINIMAL.replace('name = "tiny-llama"', 'name = 3'), "model.name", 3, "non-empty string"),
    (MINIMAL.replace('name = "tiny-llama"', 'name = "x"\ndtype = "fp8"'), "model.dtype", 4, "one of"),
    # datasets
    (MINIMAL.replace('path = "synthetic:30"', 'path = "nope.json"'), "datasets[0].path", 5, "not found"),
    (MINIMAL.replace('path = "synthetic:30"', 'path = "synthetic:x"'), "datasets[0].path", 5, "positive integer"),
    (MINIMAL.replace('path = "synthetic:30"', 'path = "synthetic:30"\nlimit = 0'), "datasets[0].limit", 6, ">= 1"),
    (MINIMAL.replace('path = "synthetic:30"', 'path = "synthetic:30"\nlimit = 5\nsample = 9'),
     "datasets[0].sample", 7, "larger than limit"),
    (MINIMAL.replace('path = "synthetic:30"', 'paht = "x"'), "datasets[0].paht", 5, "unknown key"),
    # methods
    (MINIMAL.replace('name = "memit"', 'hparams = {}'), "methods[0].name", 6, "required"),
    (MINIMAL.replace('name = "memit"', 'name = "memit"\nhparams = 5'), "methods[0].hparams", 8, "table"),
    (MINIMAL.replace('name = "memit"', 'name = "memit"\n[[methods]]\nname = "memit"'), "methods[1]", 8,
     "used twice"),
    # regime
    (MINIMAL.replace('kind = "batch"', 'kind = "stream"'), "regime.kind", 9, "batch, sequential"),
    (MINIMAL.replace('sizes = [10]', 'sizes = [10, -1]'), "regime.sizes[1]", 10, ">= 1"),
    (MINIMAL.replace('sizes = [10]', 'sizes = [40]'), "regime.sizes", 10, "at most 30"),
    (MINIMAL.replace('sizes = [10]', 'sizes = [10]\nbatch_size = 2'), "regime.batch_size", 11, "sequential"),
    (MINIMAL.replace('kind = "batch"\nsizes = [10]', 'kind = "sequential"\ncheckpoints = [1, 10, 5]'),
     "regime.checkpoints", 10, "strictly increasing"),
    (MINIMAL.replace('kind = "batch"\nsizes = [10]', 'kind = "sequential"\ncheckpoints = [0, 10]'),
     "regime.checkpoints[0]", 10, ">= 1"),
    (MINIMAL.replace('kind = "batch"\nsizes = [10]', 'kind = "sequential"\ncheckpoints = [1.5, 10]'),
     "regime.checkpoints[0]", 10, "integer"),
    (MINIMAL.replace('kind = "batch"\nsizes = [10]', 'kind = "sequential"\ncheckpoints = [2, 5]\nbatch_size = 2'),
     "regime.checkpoints", 10, "multiples of batch_size"),
    (MINIMAL.replace('kind = "batch"\nsizes = [10]', 'kind = "sequential"'), "regime.checkpoints", 8, "required"),
    (MINIMAL.replace('kind = "batch"\nsizes = [10]', 'kind = "sequential"\ncheckpoints = [2, 5]\neval_cases = 6'),
     "regime.eval_cases", 11, "larger than the number of edits"),
    (MINIMAL.replace('kind = "batch"\nsizes = [10]', 'kind = "sequential"\ncheckpoints = [2, 5]\neval_cases = 0'),
     "regime.eval_cases", 11, ">= 1"),
    (MINIMAL.replace('sizes = [10]', 'sizes = [10]\neval_cases = 2'), "regime.eval_cases", 11, "sequential"),
    # sweep
    (MINIMAL + '[sweep]\n"rome.lr" = [1, 2]\n', 'sweep."rome.lr"', 12, "not in the spec's methods"),
    (MINIMAL + '[sweep]\nlr = [1, 2]\n', "sweep.lr", 12, "method.param"),
    (MINIMAL + '[sweep]\n"memit.lr" = []\n', 'sweep."memit.lr"', 12, "non-empty list"),
    (MINIMAL + '[sweep]\n"memit.lr" = 3\n', 'sweep."memit.lr"', 12, "non-empty list"),
    (MINIMAL + '[sweep]\n"memit.lr" = [1, "a"]\n', 'sweep."memit.lr"', 12, "mixes numbers and strings"),
    (MINIMAL + '[sweep]\n"memit.lr" = [true, false]\n', 'sweep."memit.lr"[0]', 12, "numbers or strings"),
    (MINIMAL + '[sweep]\n"memit.lr" = [1, 1]\n', 'sweep."memit.lr"', 12, "duplicate"),
    # seeds / report
    ('seeds = [0, -1]\n' + MINIMAL, "seeds[1]", 1, ">= 0"),
    (MINIMAL + '[report]\nranges = { kl = [1, 0] }\n', "report.ranges.kl", 12, "low < high"),
    (MINIMAL + '[report]\nreference = "lambda"\n', "report.reference", 12, "one of"),
    # a top-level key written after a table header lands in that table
    (MINIMAL + 'seeds = [1]\n', "regime.seeds", 11, "top-level key"),
])
def test_malformed_toml(spec_dir, text, key, line, fragment):
    e = err(spec_dir, text)
    msgs = [f"{i.key}@{i.line}: {i.message}" for i in e.issues]
    assert any(i.key == key and i.line == line and fragment in i.message for i in e.issues), msgs
    assert f"spec.toml:{line}: {key}: " in str(e)


def test_missing_required_keys(spec_dir):
    e = err(spec_dir, 'name = "x"\n')
    assert {i.key for i in e.issues} == {"model", "datasets", "methods", "regime", "metrics"}


def test_sweep_conflicts_with_hparams(spec_dir):
    e = err(spec_dir, MINIMAL.replace('name = "memit"', 'name = "memit"\nhparams = { lr = 1 }')
            + '[sweep]\n"memit.lr" = [1, 2]\n')
    assert e.issues[0].key == 'sweep."memit.lr"' and "set it in one place" in e.issues[0].message


def test_all_errors_reported_at_once(spec_dir):
    e = err(spec_dir, MINIMAL.replace('dtype', 'x').replace('sizes = [10]', 'sizes = [0]')
            .replace('metrics = ["kl"]', 'metrics = []'))
    assert len(e.issues) == 2 and str(e).startswith("2 problems")


def test_syntax_errors(spec_dir):
    e = err(spec_dir, "a = [1,\n")
    assert "invalid TOML" in str(e)
    e = err(spec_dir, "a: [1,\n b: c\n", name="s.yaml")
    assert "invalid YAML" in str(e) and "s.yaml:" in str(e)
    with pytest.raises(SpecError, match="unknown spec format"):
        load_spec(write(spec_dir, "{}", "s.json"))
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(spec_dir / "absent.toml")


@pytest.mark.parametrize("yaml_text,key,line,fragment", [
    ("model: {name: m}\ndatasets:\n  - path: synthetic:5\nmethods:\n  - name: rome\nregime:\n  kind: sequential\n"
     "  checkpoints: [1, 3, 2]\nmetrics: [kl]\n", "regime.checkpoints", 8, "strictly increasing"),
    ("model: {name: m}\ndatasets:\n  - path: nope.jsonl\nmethods:\n  - name: rome\nregime: {kind: batch, sizes: [1]}\n"
     "metrics: [kl]\n", "datasets[0].path", 3, "not found"),
    ("model: {name: m}\nmodel: {name: n}\ndatasets:\n  - path: synthetic:5\nmethods:\n  - name: rome\n"
     "regime: {kind: batch, sizes: [1]}\nmetrics: [kl]\n", "model", 2, "duplicate key"),
    ("model: {name: m}\ndatasets:\n  - path: synthetic:5\nmethods:\n  - name: rome\n"
     "regime: {kind: batch, sizes: [1]}\nmetrics: [kl]\nsweep:\n  rome.layer: [1, x]\n", 'sweep."rome.layer"', 9,
     "mixes"),
])
def test_malformed_yaml(spec_dir, yaml_text, key, line, fragment):
    e = err(spec_dir, yaml_text, name="s.yaml")
    assert any(i.key == key and i.line == line and fragment in i.message for i in e.issues), \
        [(i.key, i.line, i.message) for i in e.issues]


def test_registry_checks_live_in_one_place(spec_dir):
    """Metric, method/hyperparameter and layer checks are editlens.runs.spec's (the runner re-exports them): a
    loaded spec and a programmatic Spec get the same issues, each with its key and line; the old plugin hooks
    (``validator=`` / ``metric_validator=``) are gone."""
    from editlens.runs import runner
    from editlens.runs import spec as S

    text = MINIMAL.replace('metrics = ["kl"]', 'metrics = ["kl", "no_such_metric"]').replace(
        'name = "memit"', 'name = "memit"\nhparams = { layers = [1, 99] }') + \
        '[sweep]\n"memit.mom2_update_weight" = [10.0, -1.0]\n'
    path = write(spec_dir, text)
    plain = load_spec(path)  # the structure alone is valid
    with pytest.raises(SpecError) as loaded:
        S.load_validated_spec(path)
    with pytest.raises(SpecError) as built:
        S.validate_spec(plain)
    got = [(i.key, i.line) for i in loaded.value.issues]
    assert got == [(i.key, i.line) for i in built.value.issues]
    assert ("metrics[1]", 1) in got                                   # unknown metric
    assert ('sweep."memit.mom2_update_weight"', 13) in got            # λ < 0 at its sweep line
    assert ("methods[0].hparams.layers", 8) in got                    # layer 99 of a 2-layer model
    assert runner.check_methods is S.check_methods and runner.load_validated_spec is S.load_validated_spec
    with pytest.raises(TypeError):
        load_spec(path, validator=lambda *a: None)  # type: ignore[call-arg]


def test_parse_spec_from_string(spec_dir):
    s = parse_spec(MINIMAL, "toml", base_dir=spec_dir)
    assert s.plan()[0].n_edits == 10 and s.default_run_id().startswith("run-")
    with pytest.raises(SpecError, match="top level"):
        parse_spec("- 1\n- 2\n", "yaml")


# ---------------------------------------------------------------------------------------- issue 13, item 9
THREE = """\
metrics = ["kl"]
[model]
name = "tiny-llama"
device = "gpu7"
[[datasets]]
path = "synthetic:30"
[[methods]]
name = "memit"
hparams = { layers = [1, 99] }
[regime]
kind = "batch"
sizes = [10]
[sweep]
"memit.mom2_update_weight" = [nan, inf, 10.0]
"""


def _dry_run(path):
    from click.testing import CliRunner

    from editlens.cli.main import cli

    return CliRunner().invoke(cli, ["bench", str(path), "--dry-run"])


def _lines(out: str, path) -> set[tuple[int, str]]:
    """(line, key) of every problem printed as ``<path>:<line>: <key>: message``."""
    import re

    return {(int(m.group(1)), m.group(2)) for m in re.finditer(re.escape(str(path)) + r":(\d+): (\S+): ", out)}


def test_dry_run_reports_every_problem_at_once(spec_dir):
    from editlens.runs.runner import load_validated_spec

    p = write(spec_dir, THREE.replace('metrics = ["kl"]', 'metrics = ["efficacy", "kl"]')
              .replace('device = "gpu7"', 'device = "gpu7"\nprompt_format = "weird"'))
    with pytest.raises(SpecError) as e:
        load_validated_spec(p)
    got = {(i.line, i.key) for i in e.value.issues}
    want = {(1, "metrics[0]"), (4, "model.device"), (5, "model.prompt_format"), (10, "methods[0].hparams.layers"),
            (15, 'sweep."memit.mom2_update_weight"')}
    assert want <= got, got
    r = _dry_run(p)
    assert r.exit_code == 2, r.output
    assert want <= _lines(r.output, p), r.output
    assert "5 problems" in r.output or f"{len(got)} problems" in r.output
    assert "'gpu7'" in r.output and "'weird'" in r.output and "efficacy" in r.output
    assert "layer 99" in r.output and "4 layers" in r.output and "nan" in r.output


@pytest.mark.parametrize("old,new,line,key,fragment", [
    ('layers = [1, 99]', 'layers = [1, 99]', 9, "methods[0].hparams.layers", "layer 99"),
    ('device = "gpu7"', 'device = "gpu7"', 4, "model.device", "'gpu7'"),
    ('device = "gpu7"', 'device = "cuda:x"', 4, "model.device", "'cuda:x'"),
    ('device = "gpu7"', 'device = "meta"', 4, "model.device", "'meta'"),
    ('device = "gpu7"', 'prompt_format = "weird"', 4, "model.prompt_format", "'weird'"),
    ('"memit.mom2_update_weight" = [nan, inf, 10.0]', '"memit.mom2_update_weight" = [1.0, inf]', 14,
     'sweep."memit.mom2_update_weight"', "inf"),
    ('"memit.mom2_update_weight" = [nan, inf, 10.0]', '"memit.mom2_update_weight" = [nan]', 14,
     'sweep."memit.mom2_update_weight"', "nan"),
])
def test_each_problem_fails_dry_run(spec_dir, old, new, line, key, fragment):
    text = THREE
    for o, n in (('device = "gpu7"', ''), ('layers = [1, 99]', 'layers = [1, 2]'),
                 ('"memit.mom2_update_weight" = [nan, inf, 10.0]', '"memit.mom2_update_weight" = [10.0]')):
        if o != old:
            text = text.replace(o, n)
    text = text.replace(old, new)
    p = write(spec_dir, text)
    r = _dry_run(p)
    assert r.exit_code == 2, r.output
    assert (line, key) in _lines(r.output, p), r.output
    assert fragment in r.output


def test_dry_run_clean_spec_passes(spec_dir):
    text = THREE.replace('device = "gpu7"', 'device = "cpu"\nprompt_format = "raw"') \
        .replace('layers = [1, 99]', 'layers = [1, 3]').replace("[nan, inf, 10.0]", "[10.0, 100.0]")
    r = _dry_run(write(spec_dir, text))
    assert r.exit_code == 0, r.output
    assert "units: 2" in r.output


def test_negative_layers_where_the_method_counts_from_the_end(spec_dir):
    from editlens.runs.runner import load_validated_spec

    base = THREE.replace('device = "gpu7"', '').replace("[nan, inf, 10.0]", "[10.0]")
    ok = base.replace('hparams = { layers = [1, 99] }', '').replace('name = "memit"', 'name = "grace"\nhparams = { layer = -2 }') \
        .replace('"memit.mom2_update_weight" = [10.0]', '')
    load_validated_spec(write(spec_dir, ok))
    with pytest.raises(SpecError, match="layer -5"):
        load_validated_spec(write(spec_dir, ok.replace("layer = -2", "layer = -5")))
    with pytest.raises(SpecError, match="layer -1"):
        load_validated_spec(write(spec_dir, base.replace("layers = [1, 99]", "layers = [-1]")))
    rome = ok.replace('name = "grace"\nhparams = { layer = -2 }', 'name = "rome"') + '"rome.layer" = [1, 7]\n'
    with pytest.raises(SpecError) as e:
        load_validated_spec(write(spec_dir, rome))
    line = rome.splitlines().index('"rome.layer" = [1, 7]') + 1
    assert [(i.key, i.line) for i in e.value.issues] == [('sweep."rome.layer"', line)] and "layer 7" in str(e.value)


def test_model_layers_read_from_config_without_weights(tmp_path, monkeypatch):
    import time

    import editlens.lm.load as L

    def boom(*a, **k):
        raise AssertionError("the weights must not be read")

    monkeypatch.setattr(L, "_load_gguf", boom)
    monkeypatch.setattr(L, "_cached_gguf", boom)
    monkeypatch.setattr(L, "build_tiny", boom)
    assert L.model_n_layers("tiny-llama") == 4 and L.model_n_layers("tiny-gpt2") == 4
    if L.installed_models()["smollm2-135m"] == "installed":
        monkeypatch.setenv("EDITLENS_CACHE", str(tmp_path / "empty-cache"))  # no dequantised copy to look at
        t0 = time.perf_counter()
        assert L.model_n_layers("smollm2-135m") == 30
        assert time.perf_counter() - t0 < 10
    import transformers

    d = tmp_path / "ckpt"
    d.mkdir()
    transformers.LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                             vocab_size=100).save_pretrained(str(d))
    assert L.model_n_layers(str(d)) == 3
    assert L.model_n_layers("no-such-org-xyz/no-such-model") is None  # unknown without a download: not checked


def test_model_name_checked_at_dry_run(spec_dir):
    text = THREE.replace('device = "gpu7"', '').replace('layers = [1, 99]', 'layers = [1]').replace(
        "[nan, inf, 10.0]", "[10.0]")
    r = _dry_run(write(spec_dir, text.replace('name = "tiny-llama"', 'name = "tiny_llama"')))
    assert r.exit_code == 2 and "model.name" in r.output and "did you mean 'tiny-llama'" in r.output, r.output
    r = _dry_run(write(spec_dir, text.replace('name = "tiny-llama"', 'name = "./models/absent"')))
    assert r.exit_code == 2 and "no such file or directory" in r.output, r.output
    r = _dry_run(write(spec_dir, 'model = "tiny_lama"\n' + text.replace('[model]\nname = "tiny-llama"\n', '')))
    assert r.exit_code == 2 and "spec.toml:1: model:" in r.output and "tiny-llama" in r.output, r.output


def test_every_bad_hyperparameter_reported(spec_dir):
    from editlens.runs.runner import load_validated_spec

    text = THREE.replace('device = "gpu7"', '').replace("[nan, inf, 10.0]", "[10.0]").replace(
        'layers = [1, 99]', 'layers = [1], v_lr = -1.0, v_num_grad_steps = "many"')
    with pytest.raises(SpecError) as e:
        load_validated_spec(write(spec_dir, text))
    keys = {i.key for i in e.value.issues}
    assert {"methods[0].hparams.v_lr", "methods[0].hparams.v_num_grad_steps"} <= keys, str(e.value)
