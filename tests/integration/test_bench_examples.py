"""The shipped example specs validate and plan as documented; a shrunken locality sweep on SmolLM2 shows the
paper's effect (GT-free metrics move with MEMIT's λ, the regulariser ||Δk_j|| too).

Running the full examples takes minutes (see docs/experiments-running.md); these tests only dry-run them, and
run a reduced copy of ``locality_sweep.toml`` (3 cases, 2 λ values, small statistics) end to end.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from editlens.runs.runner import load_validated_spec, run_spec
from editlens.runs.store import Store

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def _needs(*methods: str) -> None:
    from editlens.edit.base import get_method
    from editlens.errors import MethodError

    for m in methods:
        try:
            get_method(m)
        except MethodError:
            pytest.skip(f"method {m!r} is not available in this build")


@pytest.mark.parametrize("name,units,methods", [
    ("locality_sweep.toml", 12, ("memit",)),
    ("sequential.toml", 4, ("memit", "rome", "alphaedit", "scr")),
    ("tf_vs_ar.toml", 8, ("rome", "memit", "ft-m", "scr")),   # 4 methods x (CounterFact, zsRE)
    ("evk.toml", 2, ("memit",)),                               # MEMIT with and without EVK-Align
])
def test_example_validates_and_plans(name, units, methods):
    _needs(*methods)
    spec = load_validated_spec(EXAMPLES / name)
    assert len(spec.plan()) == units
    assert spec.model.name == "smollm2-135m"
    from editlens.cli.main import cli

    res = CliRunner().invoke(cli, ["bench", str(EXAMPLES / name), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert f"units: {units} = " in res.output


def test_evk_example_is_memit_with_and_without_evk_align_on_50_cases():
    _needs("memit")
    spec = load_validated_spec(EXAMPLES / "evk.toml")
    units = spec.plan()
    assert {u.n_edits for u in units} == {50}
    assert sorted(u.evk_align is not None for u in units) == [False, True]
    assert "evk" in spec.metrics and "c_acc" in spec.metrics


def test_locality_sweep_is_the_paper_grid():
    _needs("memit")
    spec = load_validated_spec(EXAMPLES / "locality_sweep.toml")
    assert spec.sweep["memit.mom2_update_weight"] == [1.5e2, 1.5e3, 1.5e4, 1.5e5, 1.5e6]
    assert {"s_acc", "c_acc", "kl", "topk"} <= set(spec.metrics)


@pytest.mark.integration
def test_reduced_locality_sweep_on_smollm(tmp_path, smollm):
    _needs("memit")
    text = (EXAMPLES / "locality_sweep.toml").read_text()
    text = text.replace("[150.0, 1500.0, 15000.0, 150000.0, 1500000.0]", "[150.0, 1500000.0]")
    text = text.replace('sizes = [8]', 'sizes = [3]')
    text = text.replace("hparams = { stats_n_samples = 64, stats_max_length = 64 }",
                        "hparams = { stats_n_samples = 64, stats_max_length = 64, v_num_grad_steps = 8 }")
    text = text.replace('metrics = ["s_acc", "c_acc", "kl", "topk"]', 'metrics = ["c_acc", "kl", "topk@5"]')
    text = text.replace('"../editlens/resources/data/counterfact_sample.json"',
                        f'"{(REPO / "editlens/resources/data/counterfact_sample.json").as_posix()}"')
    # one dataset only
    text = text.replace('[[datasets]]\nname = "synthetic"\npath = "synthetic:8"\n', "")
    spec = tmp_path / "sweep.toml"
    spec.write_text(text)
    rid = run_spec(spec, store=tmp_path / "s.sqlite", lm=smollm, progress=False)
    assert smollm.fingerprint == smollm.base_fingerprint
    with Store(tmp_path / "s.sqlite", readonly=True) as st:
        df = st.rows_with_meta(rid)
        diags = st.diagnostics(rid)
    nb = df[df["probe_kind"] == "neighborhood"]
    lam = "sweep.memit.mom2_update_weight"
    kl = nb[nb["metric"] == "kl"].groupby(lam)["value"].mean()
    top = nb[nb["metric"] == "topk@5"].groupby(lam)["value"].mean()
    assert kl[150.0] > kl[1500000.0] >= 0  # weaker regulariser, larger drift on unrelated prompts
    assert top[150.0] <= top[1500000.0]
    units = df.drop_duplicates("unit").set_index("unit")[lam]
    dk = diags[diags["key"] == "delta_k_mean"].set_index("unit")["value"]
    strong, weak = units[units == 1500000.0].index[0], units[units == 150.0].index[0]
    assert dk[weak] > dk[strong]
    base = df[df["method"] == "none"]
    assert (base[base["metric"] == "kl"]["value"].abs() < 1e-6).all()
