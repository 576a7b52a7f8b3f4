"""scripts/repro_results.py: summary.csv (mean, SEM, n) checked against hand computations on a store built through
the Store API, the pre-edit Table 1 split, Table 4's rank stability, the generated docs page and the README markers;
and the issue 17 specs dry-run with the plans they promise."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

from editlens.runs.store import Store

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def R():
    spec = importlib.util.spec_from_file_location("repro_results", REPO / "scripts" / "repro_results.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["repro_results"] = mod  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules["repro_results"]
        raise
    yield mod
    sys.modules.pop("repro_results", None)


SPEC = """name = "repro_specificity"
model = "tiny-llama"
metrics = ["t_acc"]
store = "store.sqlite"
[[datasets]]
name = "cf"
path = "synthetic:4"
[[datasets]]
name = "zs"
path = "synthetic:4"
[[methods]]
name = "none"
[[methods]]
name = "memit"
[[methods]]
name = "ft-m"
[regime]
kind = "batch"
sizes = [4]
"""

NAN = float("nan")


def _meta(method, dataset, n, label=None, sweep=None):
    return {"method": method, "label": label or method, "dataset": dataset, "n_edits": n, "sweep": sweep or {}}


def _build(tmp_path: Path) -> Path:
    ex = tmp_path / "examples"
    ex.mkdir()
    (ex / "repro_specificity.toml").write_text(SPEC)
    with Store(ex / "store.sqlite") as st:
        st.start_run("old", {"name": "repro_specificity"}, {}, "fp", [0])  # an older run: must not be pooled
        st.commit_unit("old", "memit-cf", [(1, 4, "c0", "rewrite", "t_acc", 99.0)], meta=_meta("memit", "cf", 4))
        st.start_run("r", {"name": "repro_specificity", "x": 1}, {}, "fp", [0])
        # pre-edit, dataset cf: neighbourhood probes; ar_contains 1 / 1 / 0 / 0.5 -> yes, yes, no, mixed
        pre = []
        for cid, agree, t, s, kl in (("c0", 1.0, 0.5, 1.0, 0.0), ("c1", 1.0, 1.0, 0.0, 0.0),
                                     ("c2", 0.0, 0.25, 0.0, 0.0), ("c3", 0.5, 0.0, 0.0, 0.0)):
            pre += [(0, 0, cid, "neighborhood", "ar_contains", agree), (0, 0, cid, "neighborhood", "t_acc", t),
                    (0, 0, cid, "neighborhood", "s_acc", s), (0, 0, cid, "neighborhood", "kl", kl)]
        st.commit_unit("r", "none-cf", pre, meta=_meta("none", "cf", 0))
        # pre-edit, dataset zs: one locality probe per case; the base agrees on none
        st.commit_unit("r", "none-zs", [(0, 0, f"z{i}", "locality", m, v) for i in range(3)
                                        for m, v in (("ar_contains", 0.0), ("t_acc", 0.5 * i), ("s_acc", 0.0),
                                                     ("kl", 0.0))], meta=_meta("none", "zs", 0))
        # memit: rewrite t_acc 1, .5, 1, 0 and a NaN (left out), neighbourhood KL per dataset
        rows = [(1, 4, f"c{i}", "rewrite", "t_acc", v) for i, v in enumerate((1.0, 0.5, 1.0, 0.0, NAN))]
        rows += [(1, 4, "c0", "neighborhood", "kl", 0.2), (1, 4, "c0", "neighborhood", "s_acc", 1.0)]
        st.commit_unit("r", "memit-cf", rows, meta=_meta("memit", "cf", 4))
        st.commit_unit("r", "memit-zs", [(1, 4, "z0", "locality", "kl", 0.4), (1, 4, "z0", "locality", "s_acc", 0.0)],
                       meta=_meta("memit", "zs", 4))
        # a third system with the largest KL on both datasets; s_acc ranks memit/ft-m in opposite orders
        st.commit_unit("r", "ft-cf", [(1, 4, "c0", "neighborhood", "kl", 0.9), (1, 4, "c0", "neighborhood", "s_acc", 0.0)],
                       meta=_meta("ft-m", "cf", 4))
        st.commit_unit("r", "ft-zs", [(1, 4, "z0", "locality", "kl", 1.5), (1, 4, "z0", "locality", "s_acc", 1.0)],
                       meta=_meta("ft-m", "zs", 4))
    return ex


def test_summary_csv_matches_hand_computation(R, tmp_path):
    ex = _build(tmp_path)
    res = R.process_spec(ex / "repro_specificity.toml", tmp_path / "results", report=True)
    assert res.exists and res.run_id == "r"  # the latest run only
    index = (tmp_path / "results" / "repro_specificity" / "report" / "index.md").read_text()
    assert "_Run r; the store holds 2 runs" in index  # the report of the same run, made by editlens's report API
    df = pd.read_csv(tmp_path / "results" / "repro_specificity" / "summary.csv")
    assert list(df.columns) == ["method", "setting", "metric", "mean", "sem", "n"]
    row = df[(df.method == "memit") & (df.setting == "dataset=cf; n_edits=4") & (df.metric == "rewrite/t_acc")]
    assert len(row) == 1
    # by hand: mean of 1, .5, 1, 0 = .625; squared deviations .140625 + .015625 + .140625 + .390625 = .6875;
    # sample variance .6875 / 3; SEM = sqrt(.6875 / 3) / sqrt(4) = 0.2393568
    assert row["mean"].item() == pytest.approx(0.625)
    assert row["sem"].item() == pytest.approx(math.sqrt(0.6875 / 3) / 2, rel=1e-5)
    assert row["n"].item() == 4  # the NaN row is left out
    assert not (df["mean"] == 99.0).any()  # the older run is not pooled
    one = df[(df.method == "memit") & (df.setting == "dataset=zs; n_edits=4") & (df.metric == "locality/kl")]
    assert one["mean"].item() == pytest.approx(0.4) and one["n"].item() == 1 and math.isnan(one["sem"].item())
    pre = df[(df.method == "none") & (df.setting == "dataset=zs; n_edits=0") & (df.metric == "locality/t_acc")]
    assert pre["mean"].item() == pytest.approx(0.5)  # (0 + .5 + 1) / 3


def test_table1_split_and_rank_stability(R, tmp_path):
    ex = _build(tmp_path)
    res = R.process_spec(ex / "repro_specificity.toml", tmp_path / "results", report=False)
    split = pd.read_csv(tmp_path / "results" / "repro_specificity" / "table1_split.csv")
    t = split[(split.dataset == "cf") & (split.metric == "t_acc")].set_index("base_agrees")
    assert t.loc["yes", "mean"] == pytest.approx(0.75) and t.loc["yes", "n"] == 2  # c0, c1: (.5 + 1) / 2
    assert t.loc["no", "mean"] == pytest.approx(0.25) and t.loc["no", "n"] == 1  # c2
    assert t.loc["mixed", "n"] == 1 and t.loc["yes", "share"] == pytest.approx(0.5)
    zs = split[(split.dataset == "zs") & (split.metric == "t_acc")]
    assert list(zs.base_agrees) == ["no"] and zs["mean"].item() == pytest.approx(0.5)  # never agrees; T-acc .5
    summ = res.summary
    yes = summ[(summ.setting == "dataset=cf; base_agrees=yes") & (summ.metric == "neighborhood/t_acc")]
    assert yes["mean"].item() == pytest.approx(0.75)
    rs = pd.read_csv(tmp_path / "results" / "repro_specificity" / "rank_stability.csv").set_index("metric")
    # KL orders none < memit < ft-m on both datasets: tau 1; s_acc: memit > ft-m on cf, < on zs (none 0.25 / 0)
    from scipy.stats import kendalltau

    want_s = kendalltau([0.25, 1.0, 0.0], [0.0, 0.0, 1.0]).statistic  # none, memit, ft-m: cf vs zs
    assert rs.loc["specificity/kl", "tau"] == pytest.approx(1.0)
    assert rs.loc["specificity/s_acc", "tau"] == pytest.approx(want_s)
    assert rs.loc["specificity/kl", "n_methods"] == 3


def test_docs_and_readme_rendering(R, tmp_path, capsys):
    ex = _build(tmp_path)
    verdicts = tmp_path / "verdicts.toml"
    verdicts.write_text('[specificity]\nverdict = "partly"\nreason = "tiny data: the direction only"\n')
    docs = tmp_path / "reproductions.md"
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nno markers here\n")
    argv = ["--examples", str(ex), "--results", str(tmp_path / "results"), "--docs", str(docs),
            "--verdicts", str(verdicts), "--no-report"]
    assert R.main(argv + ["--readme", str(readme)]) == 1  # markers missing: says so, does nothing
    assert "markers" in capsys.readouterr().err and not docs.exists()
    readme.write_text(f"# x\n\nbefore\n{R.BEGIN}\nold table\n{R.END}\nafter\n")
    assert R.main(argv + ["--readme", str(readme)]) == 0
    text = docs.read_text()
    assert text.startswith("<!-- generated by scripts/repro_results.py")
    assert "0.625 ± 0.24 (n=4)" in text  # the memit rewrite/t_acc figure from summary.csv
    assert "| 2 | Specificity metrics and their sensitivity |" in text and "| partly | tiny data" in text
    row1 = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert row1.count("not run yet") == 2  # no store for experiment 1: figure and verdict
    assert "rank stability τ" in text and "table1_split.csv" in text
    assert "all 6 units done" in text  # 3 methods x 2 datasets planned, 6 units done in the store
    found = R.collect(ex, tmp_path / "results", report=False)
    found["specificity"][0].units_done = 5  # as while a run is still going
    partial = R.render_docs(found, {})
    assert "incomplete: 5 of 6 units done" in partial and "no verdict yet (run incomplete)" in partial
    out = readme.read_text()
    assert out.startswith("# x\n\nbefore\n" + R.BEGIN) and out.endswith(R.END + "\nafter\n")
    assert "old table" not in out and "partly: tiny data" in out


def test_bad_verdicts_are_refused_naming_the_entry(R, tmp_path):
    p = tmp_path / "verdicts.toml"
    p.write_text('[specificity]\nverdict = "maybe"\nreason = "x"\n')
    with pytest.raises(SystemExit, match=r"\[specificity\].*agree, partly, disagree"):
        R.load_verdicts(p)
    p.write_text('[nonsense]\nverdict = "agree"\nreason = "x"\n')
    with pytest.raises(SystemExit, match=r"\[nonsense\]: unknown experiment"):
        R.load_verdicts(p)


def test_committed_verdicts_parse(R):
    R.load_verdicts(REPO / "results" / "verdicts.toml")


@pytest.mark.parametrize("name,units,methods", [
    ("repro_sequential_collapse", 24, {"rome", "memit", "alphaedit", "ft-m", "mend", "grace", "wise", "scr"}),
    ("repro_specificity", 30, {"none", "rome", "r-rome", "memit", "alphaedit", "emmet", "rect", "prune", "pmet",
                               "wise"}),
    ("repro_general_abilities", 12, {"ke", "kn", "mend", "malmen", "lora", "serac", "melo", "ft-l", "rome", "memit",
                                     "pmet", "alphaedit"}),
    ("repro_general_abilities_gemma", 12, {"ke", "kn", "mend", "malmen", "lora", "serac", "melo", "ft-l", "rome",
                                           "memit", "pmet", "alphaedit"}),
    ("repro_evk_align", 24, {"rome", "memit", "alphaedit"}),
])
def test_issue17_specs_dry_run(R, name, units, methods):
    """The specs validate against the registries, plan what their comments promise and store where the script
    reads (results/<name>/store.sqlite)."""
    from click.testing import CliRunner

    from editlens.cli.main import cli
    from editlens.runs.runner import load_validated_spec

    path = REPO / "examples" / f"{name}.toml"
    r = CliRunner().invoke(cli, ["bench", str(path), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert f"units: {units} = " in r.output
    spec = load_validated_spec(path)
    assert spec.name == name and {m.name for m in spec.methods} == methods
    assert R.spec_store(path).resolve() == (REPO / "results" / name / "store.sqlite").resolve()
    assert any(name in e.specs for e in R.EXPERIMENTS)
    if spec.regime.kind == "sequential":
        assert max(spec.regime.checkpoints) >= (200 if "general" in name else 100)


def test_our_figure_with_a_run_that_has_no_rows_yet(R):
    """A spec whose store holds a started run with no committed row yet (a long run's first unit still going) has
    an empty summary: the compact figure must say so, not fail (an empty list used as a mask selects no columns)."""
    exp = next(e for e in R.EXPERIMENTS if e.key == "pitfalls_distortion")
    empty = R.SpecResult("repro_pitfalls_distortion", Path("s.sqlite"), True, run_id="r",
                         summary=pd.DataFrame(columns=R.SUMMARY_COLUMNS), units_done=0, units_planned=8)
    assert R.our_figure(exp, [empty]) == "see the tables"
    some = R.SpecResult("repro_pitfalls_distortion", Path("s.sqlite"), True, run_id="r", units_done=1,
                        units_planned=8, summary=pd.DataFrame(
                            [{"method": "ft", "setting": "dataset=hard; n_edits=20", "metric": "rewrite/distortion",
                              "mean": 0.25, "sem": 0.1, "n": 20},
                             {"method": "ft", "setting": "dataset=easy; n_edits=20", "metric": "rewrite/distortion",
                              "mean": 0.75, "sem": 0.1, "n": 20}]))
    assert R.our_figure(exp, [some]) == "distortion at hard: ft 0.25"


def test_reused_example_reads_its_committed_store(R, tmp_path):
    """locality_sweep (experiment 2's Tables 2-3) is an example spec whose committed store is
    results/examples/locality_sweep/store.sqlite (written with --store, read by scripts/example_results.py): the
    reproduction script reads it from there, and says 'not run yet' when neither it nor the default store exists."""
    ex = tmp_path / "examples"
    ex.mkdir()
    (ex / "locality_sweep.toml").write_text(SPEC.replace('"repro_specificity"', '"locality_sweep"')
                                            .replace('store = "store.sqlite"\n', ""))
    exp = next(e for e in R.EXPERIMENTS if e.key == "specificity")
    results = tmp_path / "results"
    found = R.collect(ex, results, report=False, experiments=[exp])
    assert [r.exists for r in found["specificity"]] == [False, False]
    committed = results / "examples" / "locality_sweep" / "store.sqlite"
    committed.parent.mkdir(parents=True)
    with Store(committed) as st:
        st.start_run("r", {"name": "locality_sweep"}, {}, "fp", [0])
        st.commit_unit("r", "memit-cf", [(1, 4, "c0", "neighborhood", "kl", 0.5)], meta=_meta("memit", "cf", 4))
    found = R.collect(ex, results, report=False, experiments=[exp])
    sweep = found["specificity"][1]
    assert sweep.exists and sweep.store == committed and sweep.run_id == "r"
    assert (results / "locality_sweep" / "summary.csv").is_file()
    assert sweep.summary.loc[sweep.summary["metric"] == "neighborhood/kl", "mean"].tolist() == [0.5]


def test_verdict_summary_and_incomplete_runs_in_both_tables(R, tmp_path):
    """The overview tables (README and docs) show a verdict's one-line summary when it has one, the docs section
    its full reason, and both say '(run incomplete)' while a run has fewer units done than planned."""
    ex = _build(tmp_path)
    verdicts = tmp_path / "verdicts.toml"
    verdicts.write_text('[specificity]\nverdict = "partly"\nreason = "the long reason, with every caveat"\n'
                        'summary = "the direction only"\n')
    v = R.load_verdicts(verdicts)
    found = R.collect(ex, tmp_path / "results", report=False)
    found["specificity"][0].units_done = 5
    readme = R.render_readme_table(found, v)
    row2 = next(line for line in readme.splitlines() if line.startswith("| 2 |"))
    assert "partly: the direction only (run incomplete)" in row2 and "long reason" not in row2
    docs = R.render_docs(found, v)
    over = next(line for line in docs.splitlines() if line.startswith("| 2 |"))
    assert "partly (run incomplete) | the direction only |" in over
    assert "**Verdict:** partly — the long reason, with every caveat" in docs
    verdicts.write_text('[specificity]\nverdict = "partly"\nreason = "r"\nsummary = "  "\n')
    with pytest.raises(SystemExit, match=r"\[specificity\]: summary"):
        R.load_verdicts(verdicts)
