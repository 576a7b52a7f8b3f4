"""Meta-analysis: Kendall's tau, coverage, std and rank stability, checked by hand and against the
published numbers of Liu et al. (arXiv 2601.17343) Tables 2 and 4."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from editlens.errors import MetricError
from editlens.evaluate.meta import (group_average, kendall_tau, metric_range, rank_stability, rank_stability_wide,
                                    sensitivity, with_baseline)


def _sweep(values, regs=(1.0, 10.0, 100.0, 1000.0), metric="m", method="memit", **extra):
    return pd.DataFrame([dict(method=method, reg_value=r, metric=metric, value=v, **extra)
                         for r, v in zip(regs, values)])


def test_monotone_metric_gives_tau_one():
    r = sensitivity(_sweep([0.1, 0.2, 0.3, 0.9], metric="top1"))
    row = r.iloc[0]
    assert row.tau == pytest.approx(1.0) and row.abs_tau == pytest.approx(1.0)
    assert row.coverage == pytest.approx(0.8)  # (0.9 - 0.1) / (1 - 0)
    r = sensitivity(_sweep([4.0, 3.0, 2.0, 1.0], metric="kl"))
    assert r.iloc[0].tau == pytest.approx(-1.0) and math.isnan(r.iloc[0].coverage)  # KL: unbounded -> n/a


def test_small_hand_example():
    # x = 1..4, y = [1, 3, 2, 4]: pairs (6): discordant only (2,3) -> tau = (5 - 1) / 6
    r = sensitivity(_sweep([1.0, 3.0, 2.0, 4.0], metric="score_x"), ranges={"score_x": (0, 10)}).iloc[0]
    assert r.tau == pytest.approx(4 / 6)
    assert r.coverage == pytest.approx(0.3)
    assert r["std"] == pytest.approx(math.sqrt(((1 - 2.5) ** 2 + (3 - 2.5) ** 2 + (2 - 2.5) ** 2 + 1.5 ** 2) / 3))
    assert r.n_points == 4 and r["min"] == 1.0 and r["max"] == 4.0


def test_replicates_are_averaged_per_point():
    df = pd.concat([_sweep([0.1, 0.2, 0.3, 0.4]), _sweep([0.3, 0.3, 0.5, 0.6])])
    r = sensitivity(df, ranges={"m": (0, 1)}).iloc[0]
    assert r.n_points == 4 and r["min"] == pytest.approx(0.2) and r["max"] == pytest.approx(0.5)
    assert r.tau == pytest.approx(1.0)


def test_constant_metric_and_too_few_points():
    r = sensitivity(_sweep([0.5, 0.5, 0.5, 0.5], metric="acc")).iloc[0]
    assert math.isnan(r.tau) and r.coverage == 0.0 and r["std"] == 0.0
    r = sensitivity(_sweep([0.5], regs=(1.0,), metric="acc")).iloc[0]
    assert math.isnan(r.tau) and math.isnan(r["std"])


def test_observed_range_option_and_groups():
    df = pd.concat([_sweep([1.0, 2.0, 3.0, 4.0], metric="kl"), _sweep([1.0, 5.0, 7.0, 9.0], metric="kl", method="b")])
    r = sensitivity(df, unbounded="observed").set_index("method")
    assert r.loc["memit", "coverage"] == pytest.approx(3 / 8) and r.loc["b", "coverage"] == pytest.approx(1.0)
    with pytest.raises(MetricError, match="unbounded"):
        sensitivity(df, unbounded="bogus")
    with pytest.raises(MetricError, match="lacks columns"):
        sensitivity(df.drop(columns="reg_value"))


# Liu et al., Table 2 (Llama3-8B-Instruct, MCF): pre-edit row + lambda = 1.5e6 ... 1.5e2
LAMBDAS = [math.inf, 1.5e6, 1.5e5, 1.5e4, 1.5e3, 1.5e2]
DELTA_K = [[0] * 5, [2.9e-5, 4.7e-5, 8.6e-5, 1.7e-4, 5e-5], [0.001, 0.002, 0.003, 0.006, 0.017],
           [0.023, 0.033, 0.052, 0.096, 0.263], [0.068, 0.100, 0.163, 0.297, 0.650],
           [0.084, 0.121, 0.197, 0.356, 0.739]]
TABLE2 = {"s_acc": [21.3, 22.2, 23.8, 23.4, 23.1, 23.0], "c_acc": [89.3, 89.7, 89.2, 87.7, 87.2, 87.1],
          "kl": [0, 0.015, 0.127, 0.431, 0.539, 0.552], "top1": [100, 95.4, 86.5, 76.8, 74.3, 74.1],
          "top5": [100, 94.1, 84.0, 74.8, 72.3, 71.8], "top10": [100, 93.7, 83.2, 73.8, 71.2, 70.8]}
# published: |tau|, coverage (%), std
PUBLISHED2 = {"s_acc": (0.20, 2.5, 0.9), "c_acc": (0.87, 2.6, 1.2), "kl": (1.00, None, None),
              "top1": (1.00, 25.9, 11.3), "top5": (1.00, 28.2, 12.0), "top10": (1.00, 29.2, 12.4)}


def test_reproduces_paper_table2():
    rows = [dict(method="memit", reg_value=lam, delta_k=sum(dk) / 5, metric=m, value=v[i])
            for m, v in TABLE2.items() for i, (lam, dk) in enumerate(zip(LAMBDAS, DELTA_K))]
    pct = {m: (0, 100) for m in TABLE2 if m != "kl"}
    r = sensitivity(pd.DataFrame(rows), reference="delta_k", ranges=pct).set_index("metric")
    for m, (tau, cov, std) in PUBLISHED2.items():
        assert round(r.loc[m, "abs_tau"], 2) == tau, m
        if cov is not None:
            assert round(100 * r.loc[m, "coverage"], 1) == cov, m
            assert round(r.loc[m, "std"], 1) == std, m
    # against lambda itself the ordering is reversed (bigger lambda = smaller ||dk||), |tau| unchanged
    r2 = sensitivity(pd.DataFrame(rows), reference="reg_value", ranges=pct).set_index("metric")
    assert (r2["tau"] == -r["tau"]).all()


def test_with_baseline_adds_pre_edit_point():
    sweep = _sweep([0.5, 0.6, 0.7, 0.8], metric="top1")
    full = with_baseline(sweep, pd.DataFrame({"metric": ["top1"], "value": [1.0]}))
    assert len(full) == 5 and full["reg_value"].max() == math.inf
    r = sensitivity(full).iloc[0]
    assert r.tau == pytest.approx(1.0) and r["max"] == 1.0 and r.n_points == 5


def test_kendall_tau_edge_cases():
    assert kendall_tau([1, 2, 3], [3, 2, 1])[0] == pytest.approx(-1.0)
    assert math.isnan(kendall_tau([1], [2])[0])
    assert kendall_tau([1, 2, float("nan"), 4], [1, 2, 0, 4])[0] == pytest.approx(1.0)


def test_metric_range_defaults():
    assert metric_range("s_acc") == (0.0, 1.0) and metric_range("topk@5") == (0.0, 1.0)
    assert metric_range("kl") is None and metric_range("nkl") is None and metric_range("c_mag") is None
    assert metric_range("kl", {"kl": (0, 5)}) == (0.0, 5.0)


# Liu et al., Table 4 (Llama3-8B-Instruct): MCF and ZsRE scores of 11 rows incl. pre-edit
T4_COLS = ["efficacy", "generalization", "s_acc", "t_acc", "kl", "top1", "top5", "top10"]
T4_MCF = {"pre-edit": [7.6, 10.5, 21.3, 89.3, 0, 100, 100, 100], "WISE": [18.0, 11.8, 20.9, 83.4, 0.09, 97.7, 97.5, 97.4],
          "RLedit": [57.8, 51.5, 10.6, 49.2, 5.62, 2.57, 8.6, 9.8], "MEMIT": [97.4, 80.3, 23.4, 87.7, 0.43, 76.8, 74.8, 73.8],
          "Adaedit": [99.0, 91.6, 21.8, 84.1, 1.09, 62.4, 60.6, 59.7],
          "Alphaedit": [95.6, 77.2, 24.1, 87.2, 0.63, 71.2, 68.9, 67.9],
          "EMMET": [99.8, 89.7, 23.2, 87.3, 0.54, 74.4, 72.3, 71.3], "NAMET": [97.4, 80.4, 23.4, 87.7, 0.43, 76.8, 74.8, 73.8],
          "PMET": [99.2, 92.3, 21.9, 83.9, 1.15, 61.2, 59.8, 58.8], "PRUNE": [97.5, 80.2, 23.4, 87.8, 0.43, 76.8, 74.8, 73.8],
          "RECT": [96.8, 79.2, 23.5, 87.9, 0.42, 76.9, 75.1, 74.1]}
T4_ZSRE = {"pre-edit": [38.1, 37.6, 0.2, 38.6, 0, 100, 100, 100], "WISE": [40.6, 2.0, 0.1, 39.3, 1.75, 53.1, 57.8, 57.5],
           "RLedit": [71.0, 69.2, 5.0, 36.7, 3.51, 1.65, 8.5, 15.1], "MEMIT": [92.3, 88.4, 5.1, 43.3, 0.59, 46.0, 66.6, 71.6],
           "Adaedit": [92.7, 90.3, 10.0, 48.0, 2.19, 13.8, 34.5, 43.6],
           "Alphaedit": [90.8, 86.9, 6.8, 45.3, 0.92, 32.6, 56.9, 63.8],
           "EMMET": [97.0, 92.1, 4.3, 42.7, 0.69, 42.7, 63.8, 68.7], "NAMET": [92.5, 88.5, 5.6, 43.7, 0.61, 44.1, 66.1, 71.2],
           "PMET": [93.2, 90.6, 9.9, 47.8, 2.29, 13.1, 33.6, 42.2], "PRUNE": [92.5, 88.4, 5.2, 43.3, 0.59, 46.2, 66.9, 71.7],
           "RECT": [91.8, 88.0, 5.1, 43.3, 0.58, 46.6, 67.2, 71.8]}
PUBLISHED4 = [0.98, 0.88, 0.28, -0.09, 0.75, 0.97, 0.79, 0.75]


def test_reproduces_paper_table4_rank_stability():
    rows = [dict(method=m, dataset=ds, metric=c, value=vals[j])
            for ds, table in (("mcf", T4_MCF), ("zsre", T4_ZSRE)) for m, vals in table.items()
            for j, c in enumerate(T4_COLS)]
    r = rank_stability(pd.DataFrame(rows)).set_index("metric")
    assert [round(r.loc[c, "tau"], 2) for c in T4_COLS] == PUBLISHED4
    assert (r["n_pairs"] == 1).all() and (r["n_methods"] == 11).all()
    avg = group_average(r.reset_index(), {"target": T4_COLS[:2], "gt_based": T4_COLS[2:4],
                                          "gt_free": T4_COLS[4:]}).set_index("group")["value"]
    # paper's "Average" row (0.93, 0.10, 0.82) averages the rounded per-metric values
    assert [avg[g] for g in ("target", "gt_based", "gt_free")] == pytest.approx([0.93, 0.10, 0.82], abs=0.006)


def test_rank_stability_three_datasets_and_wide():
    wide = pd.DataFrame({"d1": [1, 2, 3], "d2": [1, 2, 3], "d3": [3, 2, 1]}, index=["a", "b", "c"])
    # pairs: (d1,d2)=1, (d1,d3)=-1, (d2,d3)=-1 -> mean -1/3
    assert rank_stability_wide(wide) == pytest.approx(-1 / 3)
    tidy = wide.stack().rename("value").rename_axis(["method", "dataset"]).reset_index().assign(metric="m")
    tidy = tidy[~((tidy.method == "a") & (tidy.dataset == "d3"))]  # a method missing on one dataset
    r = rank_stability(tidy).iloc[0]
    assert r.n_pairs == 3 and r.n_methods == 2
