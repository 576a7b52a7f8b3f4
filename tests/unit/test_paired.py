"""Paired statistics (editlens.report.paired, `editlens compare`): hand values, exact enumeration, a coverage
simulation, refusal of unpaired cases, seeds nested in cases, the CLI and the report."""
from __future__ import annotations

import itertools
import math
import textwrap

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

from editlens.errors import StoreError
from editlens.report import paired
from editlens.report.paired import (bootstrap_ci, bootstrap_means, compare, holm, paired_stats, sign_flip_test)
from editlens.runs.store import Store


# ----------------------------------------------------------------------------- building blocks, by hand
def test_holm_on_known_p_values():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max(0.06, 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1, monotone, NaN kept and not counted in m (m = 2 here)
    out = holm([0.6, np.nan, 0.2])
    assert out[0] == pytest.approx(0.6) and np.isnan(out[1]) and out[2] == pytest.approx(0.4)
    assert holm([0.5, 0.7]) == pytest.approx([1.0, 1.0])  # 0.5*2 = 1, then max(1, 0.7*1) = 1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.5, 1.5])


def test_sign_flip_exact_p_for_n5_by_enumeration():
    d = np.array([0.5, -0.2, 1.0, 0.3, 0.7])
    t = abs(d.mean())
    count = sum(abs(np.dot(s, d)) / 5 >= t - 1e-12 for s in itertools.product((-1, 1), repeat=5))
    p, exact = sign_flip_test(d)
    assert exact and p == count / 32 == 4 / 32   # flips of -0.2 alone, of 0.3 alone, of both, and none; x2 sign
    # all differences positive: only the all-plus and all-minus sign vectors reach |T| -> 2/32
    assert sign_flip_test(np.ones(5))[0] == pytest.approx(2 / 32)
    assert sign_flip_test(np.zeros(5)) == (1.0, True)
    # independent check: scipy's permutation test (exact for 32 sign vectors)
    r = stats.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                               n_resamples=10_000)
    assert r.pvalue == pytest.approx(p)


def test_sign_flip_monte_carlo_when_too_many_permutations():
    rng = np.random.default_rng(3)
    d = rng.normal(0.05, 1, 40)
    p, exact = sign_flip_test(d, permutations=20_000, rng=1)
    assert not exact and 1 / 20_001 <= p <= 1
    # 40 normal differences: the sign-flip p is close to the t-test's
    assert p == pytest.approx(stats.ttest_1samp(d, 0).pvalue, abs=0.03)


def test_mean_difference_and_ci_on_tiny_arrays():
    ref = np.array([0.2, 0.4, 0.4, 0.9, 0.1])
    other = np.array([0.5, 0.4, 0.7, 1.0, 0.3])   # differences 0.3, 0, 0.3, 0.1, 0.2: mean 0.18
    res = paired_stats([ref], [other], resamples=4000, rng=0)
    assert res.diff == pytest.approx(0.18) and res.mean_ref == pytest.approx(0.4) and res.mean_system == pytest.approx(0.58)
    assert res.n_seeds == 1 and res.n_pairs == 5 and res.seed_mode == "cases" and res.ci_method == "BCa"
    assert 0 <= res.ci_low < 0.18 < res.ci_high <= 0.3  # a mean of resampled differences stays within [0, 0.3]
    # exact sign-flip: T = 0.9/5; |T*| >= |T| only for all-plus / all-minus (the 0 can be flipped freely) -> 4/32
    assert res.p_value == pytest.approx(4 / 32) and res.test == "sign-flip (exact)"
    # constant differences: the interval collapses to the value
    c = paired_stats([np.zeros(6)], [np.full(6, 0.5)], rng=0)
    assert c.ci_low == c.ci_high == 0.5


def test_bca_matches_scipy():
    x = np.random.default_rng(1).exponential(size=25)
    lo, hi = bootstrap_ci(x, resamples=40_000, rng=0)
    ref = stats.bootstrap((x,), np.mean, n_resamples=40_000, method="BCa", random_state=0).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.02) and hi == pytest.approx(ref.high, abs=0.04)


def test_bootstrap_intervals_cover_the_true_difference():
    """200 simulated paired samples with a known effect (0.3): each case has its own difficulty shared by both
    systems (that is what pairing removes), plus noise. The 95% BCa intervals must cover 0.3 in >= 93%."""
    rng = np.random.default_rng(2024)
    k, n, effect = 200, 50, 0.3
    difficulty = rng.normal(0, 1.0, (k, n))
    ref = difficulty + rng.normal(0, 0.4, (k, n))
    other = difficulty + effect + rng.normal(0, 0.4, (k, n))
    lo, hi = bootstrap_ci(other - ref, resamples=2000, rng=7)
    coverage = float(np.mean((lo <= effect) & (effect <= hi)))
    print(f"\nbootstrap 95% BCa interval coverage: {coverage:.1%} of {k} simulated paired samples (n = {n})")
    assert coverage >= 0.93, f"coverage {coverage:.1%} < 93%"
    # the unpaired view (two separate means) would be far wider: the pairing is what makes the interval tight
    assert np.median(hi - lo) < 0.5 * 2 * 1.96 * np.sqrt(2 * (1 + 0.16) / n)


def test_hierarchical_bootstrap_replicates():
    # one seed: plain bootstrap means; their mean is the sample mean, their sd the plug-in standard error
    g = np.arange(10.0)
    reps = bootstrap_means([g], 20_000, np.random.default_rng(0))
    assert reps.mean() == pytest.approx(g.mean(), abs=0.02)
    assert reps.std() == pytest.approx(g.std() / np.sqrt(10), rel=0.03)
    # two seeds with a big between-seed shift: the seed-level resampling must show it (sd >> within-seed part)
    a, b = np.zeros(30), np.full(30, 10.0)
    reps = bootstrap_means([a, b], 20_000, np.random.default_rng(0))
    assert reps.mean() == pytest.approx(5.0, abs=0.1) and reps.std() == pytest.approx(5 / np.sqrt(2), rel=0.03)


# ----------------------------------------------------------------------------- from a store
def _store(path, *, seeds=(0,), same_cases=True, drop=None, n=12, effect=0.2):
    """A run with three systems on one dataset: ref (pre-edit-like), 'good' (+effect on kl) and 'same'."""
    rng = np.random.default_rng(0)
    st = Store(path)
    st.start_run("r", {"name": "paired"}, {}, "fp", list(seeds))
    base = {s: rng.normal(0.5, 0.3, n) for s in seeds}
    for label, shift in (("ref", 0.0), ("good", effect), ("same", 0.0)):
        for s in seeds:
            cases = [f"c{i}" for i in range(n)] if same_cases else [f"s{s}c{i}" for i in range(n)]
            rows = []
            for i, c in enumerate(cases):
                if drop and (label, c) in drop:
                    continue
                noise = 0.0 if label == "ref" else rng.normal(0, 0.05)
                rows.append((1, n, c, "neighborhood", "kl", float(base[s][i] + shift + noise)))
                rows.append((1, n, c, "rewrite", "s_acc", float(i % 2)))
            st.commit_unit("r", f"{label}-{s}", rows, meta={"method": label, "label": label, "dataset": "d",
                                                             "seed": s, "n_edits": n, "regime": "batch"})
    return st


def test_compare_table_from_store(tmp_path):
    with _store(tmp_path / "s.sqlite") as st:
        t = compare(st, "ref", resamples=2000, seed=0)
    assert set(t["system"]) == {"good", "same"} and set(t["column"]) == {"neighborhood/kl", "rewrite/s_acc"}
    good = t[(t.system == "good") & (t.column == "neighborhood/kl")].iloc[0]
    assert good["diff"] == pytest.approx(0.2, abs=0.03) and good["ci_low"] > 0 and good["mark"] == "**"
    assert good["n_pairs"] == 12 and good["n_seeds"] == 1 and good["n_cases"] == "12"
    # identical s_acc: differences all 0 -> diff 0, interval [0, 0], p = 1, nothing marked
    sacc = t[t.column == "rewrite/s_acc"]
    assert (sacc["diff"] == 0).all() and (sacc["p_value"] == 1).all() and (sacc["mark"] == "").all()
    assert t["p_holm"].to_numpy() == pytest.approx(holm(t["p_value"].to_numpy()))
    assert t.attrs["settings"]["m_tests"] == 4
    assert any("fewer than 20 pairs" in n for n in t.attrs["notes"])  # n = 12: the interval is too narrow
    # reproducible given the seed; another seed moves the interval a little
    with Store(tmp_path / "s.sqlite", readonly=True) as st:
        again = compare(st, "ref", resamples=2000, seed=0)
        other = compare(st, "ref", resamples=2000, seed=1)
    assert again[["ci_low", "ci_high"]].equals(t[["ci_low", "ci_high"]])
    assert not other[["ci_low", "ci_high"]].equals(t[["ci_low", "ci_high"]])


def test_unpaired_cases_refused_with_a_clear_error(tmp_path):
    with _store(tmp_path / "s.sqlite", drop={("good", "c3"), ("ref", "c7")}) as st:
        with pytest.raises(StoreError) as e:
            compare(st, "ref")
        msg = str(e.value)
        assert "good" in msg and "ref" in msg and "not evaluated on the same cases" in msg
        assert "c7 (seed 0)" in msg and "c3 (seed 0)" in msg and "--drop-unpaired" in msg
        t = compare(st, "ref", unpaired="drop")
    good = t[(t.system == "good") & (t.column == "neighborhood/kl")].iloc[0]
    assert good["n_pairs"] == 10 and good["n_unpaired"] == 2
    assert any("unpaired" in n for n in t.attrs["notes"])


def test_bad_reference_and_filters_named(tmp_path):
    with _store(tmp_path / "s.sqlite") as st:
        with pytest.raises(StoreError, match="'nope' is not a method of this run; systems: ref, good, same"):
            compare(st, "nope")
        with pytest.raises(StoreError, match="metrics not in this run: ppl"):
            compare(st, "ref", metrics=["ppl"])
        with pytest.raises(StoreError, match="probe kinds not in this run: locality"):
            compare(st, "ref", probe_kinds=["locality"])
        with pytest.raises(ValueError, match="resamples"):
            compare(st, "ref", resamples=10)
        t = compare(st, "ref", metrics=["kl"])
    assert set(t["column"]) == {"neighborhood/kl"}


def test_seeds_nested_in_cases(tmp_path):
    # several seeds with the same cases: per-case means over seeds, then a case bootstrap
    with _store(tmp_path / "a.sqlite", seeds=(0, 1, 2)) as st:
        t = compare(st, "ref", metrics=["kl"])
    assert set(t["seed_mode"]) == {"case-mean"} and (t["n_seeds"] == 3).all() and (t["n_pairs"] == 36).all()
    # several seeds with different cases: hierarchical bootstrap (percentile), seeds weigh the same
    with _store(tmp_path / "b.sqlite", seeds=(0, 1, 2), same_cases=False) as st:
        t = compare(st, "ref", metrics=["kl"])
        good = t[t.system == "good"].iloc[0]
        rows = st.rows_with_meta("r")
    assert good["seed_mode"] == "hierarchical" and good["ci_method"].startswith("percentile")
    kl = rows[rows.metric == "kl"]
    per_seed = [(kl[(kl.label == "good") & (kl.seed == s)]["value"].mean()
                 - kl[(kl.label == "ref") & (kl.seed == s)]["value"].mean()) for s in (0, 1, 2)]
    assert good["diff"] == pytest.approx(np.mean(per_seed))
    fmt = paired.format_table(t)
    assert fmt.loc[fmt.system == "good", "n"].iloc[0] == "3×12"


def test_cli_compare(tmp_path):
    from editlens.cli.main import cli

    _store(tmp_path / "s.sqlite").close()
    r = CliRunner().invoke(cli, ["compare", str(tmp_path / "s.sqlite"), "--ref", "ref", "--metrics", "kl",
                                 "--resamples", "2000", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert "| good | neighborhood/kl |" in r.output and "**" in r.output and "Holm" in r.output
    assert "BCa" in r.output and "sign-flip (exact)" in r.output  # 2^12 sign vectors <= 10,000: enumerated
    r = CliRunner().invoke(cli, ["compare", str(tmp_path / "s.sqlite"), "--ref", "ref", "--format", "csv"])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(__import__("io").StringIO(r.output))
    assert {"diff", "ci_low", "ci_high", "p_value", "p_holm", "n_pairs", "n_seeds"} <= set(df.columns)
    r = CliRunner().invoke(cli, ["compare", str(tmp_path / "s.sqlite"), "--ref", "nope"])
    assert r.exit_code == 2 and "not a method of this run" in r.output


def test_wilcoxon_option_and_duplicates_refused(tmp_path):
    ref = np.array([0.1, 0.5, 0.2, 0.9, 0.4, 0.3, 0.8])
    other = ref + np.array([0.2, 0.1, 0.3, -0.05, 0.25, 0.15, 0.4])
    res = paired_stats([ref], [other], test="wilcoxon")
    assert res.test == "wilcoxon" and res.p_value == pytest.approx(stats.wilcoxon(other - ref).pvalue)
    with _store(tmp_path / "s.sqlite") as st:  # a second unit with the same configuration: ambiguous pairing
        st.commit_unit("r", "good-dup", [(1, 12, "c0", "neighborhood", "kl", 0.3)],
                       meta={"method": "good", "label": "good", "dataset": "d", "seed": 0, "n_edits": 12})
        with pytest.raises(StoreError, match=r"good has several rows for the same \(seed, case_id\) \(c0 \(seed 0\)\)"):
            compare(st, "ref", metrics=["kl"])


# ----------------------------------------------------------------------------- report and plots
def test_report_has_paired_table_marks_and_rank_stability(tmp_path):
    from editlens.report import build_report

    st = _store(tmp_path / "s.sqlite")
    # a second dataset, so that the report also ranks methods across datasets (Table 4's rank stability)
    base = np.random.default_rng(1).normal(0.5, 0.3, 12)
    for label, shift in (("ref", 0.0), ("good", 0.2), ("same", 0.01)):
        rows = [(1, 12, f"c{i}", "neighborhood", "kl", float(v + shift + 0.01 * (i % 3))) for i, v in enumerate(base)]
        st.commit_unit("r", f"{label}-zsre", rows, meta={"method": label, "label": label, "dataset": "zsre",
                                                          "seed": 0, "n_edits": 12, "regime": "batch"})
    rep = build_report(st, ref="ref", plots_enabled=False)
    names = [t.name for t in rep.tables]
    assert "paired" in names and "rank_stability" in names
    t = rep.table("paired")
    assert set(t["dataset"]) == {"d", "zsre"} and "diff [95% CI]" in t.columns
    good = t[(t.system == "good") & (t.column == "neighborhood/kl")]
    assert len(good) == 2 and (good["mark"] == "**").all()
    html = rep.to_html()
    assert html.count('<tr class="sig">') == int((t["mark"] != "").sum()) > 0 and "tr.sig td" in html
    # no reference given and no pre-edit baseline: no paired table; an unknown --ref is an error
    assert "paired" not in [x.name for x in build_report(st, plots_enabled=False).tables]
    with pytest.raises(StoreError, match="not a method of this run"):
        build_report(st, ref="nope", plots_enabled=False)
    st.close()


def test_plot_band_is_a_paired_case_bootstrap():
    # two curves on the same 30 cases; curve b = curve a + 0.5 on every case: with the same resampled cases
    # for every point, b's band is a's band shifted by exactly 0.5 (independent resampling would not give that)
    rng = np.random.default_rng(0)
    vals = rng.exponential(1.0, 30)
    df = pd.concat([pd.DataFrame({"x": 1.0, "hue": h, "case_id": [f"c{i}" for i in range(30)], "value": vals + s})
                    for h, s in (("a", 0.0), ("b", 0.5))], ignore_index=True)
    band = paired.bootstrap_band(df, "x", "hue", resamples=4000, seed=0).set_index("hue")
    assert band.loc["b", "low"] - band.loc["a", "low"] == pytest.approx(0.5)
    assert band.loc["b", "high"] - band.loc["a", "high"] == pytest.approx(0.5)
    assert band.loc["a", "mean"] == pytest.approx(vals.mean())
    # the band is the percentile interval of the case bootstrap of the mean (checked against scipy)
    ref = stats.bootstrap((vals,), np.mean, n_resamples=40_000, method="percentile", random_state=0).confidence_interval
    assert band.loc["a", "low"] == pytest.approx(ref.low, abs=0.03) and band.loc["a", "high"] == pytest.approx(ref.high, abs=0.05)
    # plot_lines draws it (the band polygon spans [low, high]); without case ids it falls back to ±SEM
    from editlens.report import plots

    fig = plots.plot_lines(df[df.hue == "a"].assign(x=[1.0] * 15 + [2.0] * 15), "x", "value", "hue")
    assert len(fig.axes[0].collections) == 1
    fig = plots.plot_lines(df.drop(columns="case_id"), "x", "value", "hue")
    assert len(fig.axes[0].lines) == 2


def test_sequential_checkpoints_compared_with_all_steps(tmp_path):
    with Store(tmp_path / "s.sqlite") as st:
        st.start_run("r", {"name": "seq"}, {}, "fp", [0])
        for label, slope in (("a", 0.1), ("b", 0.3)):
            meta = {"method": label, "label": label, "dataset": "d", "regime": "sequential", "n_edits": 4,
                    "checkpoints": [2, 4], "seed": 0}
            for step, n in ((0, 0), (1, 2), (2, 4)):
                st.commit_step("r", label, step, [(step, n, f"c{i}", "neighborhood", "kl", slope * n + 0.01 * i)
                                                  for i in range(6)], meta=meta)
            st.commit_unit("r", label, [], meta=meta)
        last = compare(st, "a")
        every = compare(st, "a", all_steps=True)
    assert list(last["n_edits"]) == [4] and last["diff"].iloc[0] == pytest.approx(0.2 * 4)
    assert sorted(every["n_edits"]) == [0, 2, 4]
    assert every.set_index("n_edits")["diff"].to_dict() == pytest.approx({0: 0.0, 2: 0.4, 4: 0.8})


def test_compare_on_a_store_written_by_the_runner(tmp_path):
    """Real runner semantics on tiny-llama: the pre-edit unit (step 0, n_edits 0) pairs with the edited units of
    the same planned size; seed 1 edits another shuffle of the cases, so the seeds hold different cases and are
    aggregated hierarchically."""
    from editlens.cli.main import cli
    from editlens.runs.runner import run_spec

    spec = tmp_path / "p.toml"
    spec.write_text(textwrap.dedent("""
        name = "paired"
        model = "tiny-llama"
        metrics = ["kl", "t_acc"]
        seeds = [0, 1]
        [[datasets]]
        path = "synthetic:6"
        [[methods]]
        name = "none"
        [[methods]]
        name = "ft-m"
        hparams = { steps = 2 }
        [regime]
        kind = "batch"
        sizes = [4]
        """).lstrip())
    run_spec(spec, store=tmp_path / "p.sqlite", progress=False)
    t = compare(tmp_path / "p.sqlite", "none")
    assert len(t) and set(t["system"]) == {"ft-m"} and (t["n_seeds"] == 2).all()
    # 4 edited cases per seed (fewer for probe kinds only some synthetic cases have), both seeds counted
    assert set(t["seed_mode"]) == {"hierarchical"} and t["n_cases"].isin(["1", "2", "3", "4"]).all()
    assert (t["n_pairs"] == 2 * t["n_cases"].astype(int)).all() and (t["n_cases"] == "4").any()
    kl = t[t.column.str.endswith("/kl")]
    assert len(kl) and (kl["mean_ref"] == 0).all() and (kl["diff"] > 0).all()  # the base has KL 0 to itself
    r = CliRunner().invoke(cli, ["compare", str(tmp_path / "p.sqlite"), "--ref", "none", "--metrics", "kl"])
    assert r.exit_code == 0, r.output
    assert "2×4" in r.output and "percentile (seeds, then cases)" in r.output


def test_cli_report_ref(tmp_path):
    from editlens.cli.main import cli

    _store(tmp_path / "s.sqlite").close()
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "s.sqlite"), "--ref", "good", "--no-plots"])
    assert r.exit_code == 0, r.output
    assert "## Paired differences vs good" in r.output and "| ref | neighborhood/kl |" in r.output
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "s.sqlite"), "--ref", "nope", "--no-plots"])
    assert r.exit_code == 2 and "not a method of this run" in r.output
