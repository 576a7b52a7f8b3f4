"""``[model] device_map / offload_dir / max_memory`` in specs and ``editlens bench --device-map``: validated with a
SpecError naming the key, passed to ``load_model`` by the executors, recorded with the run, and (on CPU, where
``device_map = "auto"`` keeps every module on the CPU behind accelerate's hooks) giving the rows of the same spec
without a map."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from editlens.errors import SpecError
from editlens.runs.runner import run_spec, with_device_map
from editlens.runs.spec import load_spec
from editlens.runs.store import Store

SPEC = """
    name = "dm"
    metrics = ["kl", "t_acc"]

    [model]
    name = "tiny-llama"
    {extra}

    [[datasets]]
    path = "synthetic:4"

    [[methods]]
    name = "ft"
    hparams = {{ layers = [0], steps = 3, lr = 0.01 }}

    [[methods]]
    name = "none"

    [regime]
    kind = "batch"
    sizes = [2]
"""


def write(d: Path, extra: str = "", name: str = "s.toml") -> Path:
    p = d / name
    p.write_text(textwrap.dedent(SPEC.format(extra=extra)).lstrip())
    return p


def rows(store: Path, rid: str) -> list[tuple]:
    with Store(store, readonly=True) as st:
        df = st.rows(rid)
        units = st.units(rid)
    meth = {u: m["method"] for u, m in zip(units["unit"], units["meta"])}
    # unit ids hash the model table (the map included): compare by method instead
    return sorted((meth[r.unit], int(r.step), int(r.n_edits), r.case_id, r.probe_kind, r.metric, float(r.value))
                  for r in df.itertuples(index=False))


def test_spec_keys_parsed_resolved_and_recorded(tmp_path):
    s = load_spec(write(tmp_path, 'device_map = "auto"\n    offload_dir = "off"\n'
                                  '    max_memory = { "0" = "1GiB", cpu = 1000000 }'))
    assert s.model.device_map == "auto"
    assert s.model.offload_dir == str((tmp_path / "off").resolve())  # relative to the spec file
    assert s.model.max_memory == {0: "1GiB", "cpu": 1000000}
    assert s.model.load_kwargs() == {"device_map": "auto", "offload_dir": str((tmp_path / "off").resolve()),
                                     "max_memory": {0: "1GiB", "cpu": 1000000}}
    d = s.to_dict()["model"]
    assert d["device_map"] == "auto" and d["max_memory"] == {"0": "1GiB", "cpu": 1000000}
    m = load_spec(write(tmp_path, '[model.device_map]\n    "model.embed_tokens" = "cpu"\n    "" = 0', "t.toml"))
    assert m.model.device_map == {"model.embed_tokens": "cpu", "": 0}
    # specs without the keys keep their fingerprint (run ids, unit ids): the keys are left out of to_dict
    plain = load_spec(write(tmp_path, "", "p.toml"))
    assert set(plain.to_dict()["model"]) == {"name", "device", "dtype", "prompt_format"}
    assert plain.model.load_kwargs() == {}


@pytest.mark.parametrize("extra, key, fragment", [
    ('device_map = "everywhere"', "model.device_map", "invalid device_map"),
    ("device_map = 3", "model.device_map", "must be a string"),
    ('[model.device_map]\n    "model.layers.0" = "gpu7"', "model.device_map", "is not a device"),
    ('device = "cpu"\n    device_map = "auto"', "model.device_map", "leave model.device unset"),
    ('device_map = "auto"\n    offload_dir = 5', "model.offload_dir", "non-empty string"),
    ('device_map = "auto"\n    max_memory = "10GiB"', "model.max_memory", "non-empty table"),
    ('device_map = "auto"\n    max_memory = { cpu = "lots" }', "model.max_memory.cpu", "size such as"),
    ('device_map = "auto"\n    max_memory = { cpu = -1 }', "model.max_memory.cpu", "bytes > 0"),
    ('device_map = "auto"\n    max_memory = { gpu = "1GiB" }', "model.max_memory.gpu", "not a device"),
    ('max_memory = { cpu = "1GiB" }', "model.max_memory", "only used with model.device_map"),
    ('offload_dir = "x"', "model.offload_dir", "only used with model.device_map"),
])
def test_bad_values_are_spec_errors_naming_the_key(tmp_path, extra, key, fragment):
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, extra))
    assert e.value.key == key and fragment in str(e.value) and e.value.line is not None


def test_dry_run_shows_the_map_and_cli_override(tmp_path):
    from editlens.cli.main import cli

    p = write(tmp_path, 'device_map = "auto"\n    max_memory = { cpu = "2GiB" }')
    r = CliRunner().invoke(cli, ["bench", str(p), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "device_map='auto'" in r.output and "max_memory={'cpu': '2GiB'}" in r.output
    q = write(tmp_path, "", "q.toml")
    r = CliRunner().invoke(cli, ["bench", str(q), "--dry-run", "--device-map", "sequential"])
    assert r.exit_code == 0, r.output
    assert "device_map='sequential'" in r.output
    r = CliRunner().invoke(cli, ["bench", str(q), "--dry-run", "--device-map", "bogus"])
    assert r.exit_code != 0 and "--device-map" in r.output and "invalid device_map" in r.output
    pinned = load_spec(write(tmp_path, 'device = "cpu"', "c.toml"))
    with pytest.raises(SpecError, match="--device-map: the spec sets model.device"):
        with_device_map(pinned, "auto")


def test_device_map_auto_on_cpu_gives_the_rows_without_it(tmp_path, monkeypatch):
    import editlens.lm.load as load_mod

    seen: list[dict] = []
    real = load_mod.load_model

    def spy(name, *a, **kw):
        seen.append(dict(kw))
        return real(name, *a, **kw)

    monkeypatch.setattr(load_mod, "load_model", spy)
    plain = run_spec(write(tmp_path, "", "plain.toml"), store=tmp_path / "plain.sqlite", progress=False)
    mapped = run_spec(write(tmp_path, 'device_map = "auto"', "mapped.toml"), store=tmp_path / "mapped.sqlite",
                      progress=False)
    assert [k.get("device_map") for k in seen] == [None, "auto"]  # the executor loaded it with the map
    a, b = rows(tmp_path / "plain.sqlite", plain), rows(tmp_path / "mapped.sqlite", mapped)
    assert len(a) > 8 and {r[0] for r in a} == {"ft", "none"}
    assert a == b
    with Store(tmp_path / "mapped.sqlite", readonly=True) as st:
        assert st.run_spec(mapped)["model"]["device_map"] == "auto"
        assert all(m.get("device_map") == "auto" for m in st.units(mapped)["meta"])
    with Store(tmp_path / "plain.sqlite", readonly=True) as st:
        assert "device_map" not in st.run_spec(plain)["model"]
        assert all("device_map" not in m for m in st.units(plain)["meta"])
