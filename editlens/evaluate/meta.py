"""Meta-analysis of metrics: sensitivity to a regulariser sweep and rank stability across datasets.

Liu et al., "Are We Evaluating the Edit Locality of LLM Model Editing Properly?" (arXiv 2601.17343),
Tables 2–4 (and 6–11). For a sweep of a specificity regulariser (MEMIT's λ = ``mom2_update_weight``)
they report, per metric:

* **Kendall's τ** between the metric and the regulariser. The metric columns are correlated with the
  mean ||Δk_j|| over the edited layers (§4.2 "Using the average ||Δk_j|| of the edited layers as a
  reference"); the table reports |τ| ("we report the absolute value of Kendall's τ"). We return both the
  signed ``tau`` and ``abs_tau``. τ is ``scipy.stats.kendalltau`` (τ-b, tie-corrected).
* **Coverage proportion** = (max − min) / range, where range is the metric's *theoretical* range
  ("Range: 0 ~ 100" for accuracies and top-k overlaps); for unbounded metrics (D_KL) the paper prints
  "n/a". We follow that by default (coverage NaN when no range is known); ``unbounded="observed"`` instead
  divides by the range observed across all groups (methods/datasets) of that metric — a relative figure,
  not the paper's.
* **std** of the metric over the sweep points: the sample standard deviation (ddof = 1). This is what
  reproduces the paper's numbers (Table 2, S-acc: 0.9, C-acc: 1.2; ddof = 0 would give 0.8 / 1.1).

The paper's sweep tables include the **pre-edit** row (λ → ∞, ||Δk_j|| = 0) among the points: the
published τ = 0.87 for C-acc (Table 2) and 0.60 for layer 8 (Table 9) and the coverages (25.9 % for
Top-1 = 100 − 74.1) are only obtained with it. Add the pre-edit point as a row with ``reg_value = inf``
and ``delta_k = 0`` (see :func:`with_baseline`).

**Rank stability** (Table 4 bottom): for each metric, Kendall's τ between the methods' scores on two
datasets (τ of scores equals τ of rankings), averaged over all dataset pairs. The paper's Table 4 values
(Efficacy 0.98, Generalization 0.88, S-acc 0.28, T-acc −0.09, D_KL 0.75, Top-1 0.97, Top-5 0.79, Top-10
0.75) are reproduced exactly with τ-b over all 11 rows *including pre-edit*; :func:`group_average`
gives the "Average" row (mean τ of the metrics of a group).

All functions take tidy pandas DataFrames and are pure.
"""
from __future__ import annotations

import itertools
import math
import re
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import kendalltau as _kendalltau

from editlens.errors import MetricError

#: theoretical ranges of metrics by name pattern (fractions in [0, 1]); unbounded metrics (kl, nkl, ...)
#: are absent. Patterns are matched with ``re.search`` on the lower-cased metric name, first match wins.
DEFAULT_RANGES: tuple[tuple[str, tuple[float, float]], ...] = (
    (r"(^|[^a-z])(n?kl|js|ppl|perplexity|nll|loss|delta|norm)([^a-z]|$)", (math.nan, math.nan)),
    (r"acc|accuracy|efficacy|generali[sz]ation|locality|portability|reliability|specificity|top[-_]?\d+"
     r"|topk|overlap|success|rate|(^|_)(ns|es|ps)$", (0.0, 1.0)),
)


def metric_range(metric: str, ranges: Mapping[str, Sequence[float]] | None = None) -> tuple[float, float] | None:
    """The theoretical (low, high) range of ``metric``: ``ranges[metric]`` if given, else by name pattern
    (:data:`DEFAULT_RANGES`, fractions in [0, 1]); ``None`` when unbounded / unknown."""
    if ranges and metric in ranges:
        lo, hi = ranges[metric]
        return float(lo), float(hi)
    name = metric.lower().split("@")[0]
    for pat, rng in DEFAULT_RANGES:
        if re.search(pat, name):
            return None if math.isnan(rng[0]) else rng
    return None


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Kendall's τ-b and its p-value; NaN when fewer than 2 finite pairs or a constant side."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(xa) | np.isnan(ya))
    xa, ya = xa[keep], ya[keep]
    if len(xa) < 2 or np.all(xa == xa[0]) or np.all(ya == ya[0]):
        return math.nan, math.nan
    # rank first so that +inf (the pre-edit point, λ -> ∞) is handled like any other value
    res = _kendalltau(pd.Series(xa).rank().to_numpy(), pd.Series(ya).rank().to_numpy())
    return float(res.statistic), float(res.pvalue)


def with_baseline(df: pd.DataFrame, baseline: pd.DataFrame, *, reg_value: float = math.inf,
                  delta_k: float = 0.0, group_by: Sequence[str] = ("method",)) -> pd.DataFrame:
    """Add the pre-edit point to every group of a sweep frame.

    ``baseline`` has columns ``metric, value`` (plus any of ``group_by`` other than ``method`` to match,
    e.g. ``dataset``); its rows are copied into every group with ``reg_value`` (default +inf: λ → ∞ means
    no edit) and ``delta_k`` (default 0).
    """
    out = [df]
    groups = [g for g in group_by if g in df.columns]
    match = [g for g in groups if g in baseline.columns]
    for key, _ in df.groupby(groups, dropna=False) if groups else [((), df)]:
        key = key if isinstance(key, tuple) else (key,)
        gd = dict(zip(groups, key))
        b = baseline
        for g in match:
            b = b[b[g] == gd[g]]
        b = b[["metric", "value"]].copy()
        for g, v in gd.items():
            b[g] = v
        b["reg_value"] = reg_value
        if "delta_k" in df.columns:
            b["delta_k"] = delta_k
        out.append(b)
    return pd.concat(out, ignore_index=True)


def sensitivity(df: pd.DataFrame, *, reference: str = "reg_value", ranges: Mapping[str, Sequence[float]] | None = None,
                unbounded: str = "nan", group_by: Sequence[str] = ("method",)) -> pd.DataFrame:
    """Sensitivity of each metric to a regulariser sweep (the paper's Tables 2, 3, 6–9).

    Args:
        df: tidy frame with columns ``reg_value, metric, value`` (+ ``group_by`` columns, default
            ``method``; + ``delta_k`` = mean ||Δk_j|| when measured). Several rows per (group, reg_value,
            metric) are averaged first (e.g. per-case rows or seeds).
        reference: column the metric is correlated with: ``"reg_value"`` (λ) or ``"delta_k"`` (the paper).
        ranges: theoretical ``{metric: (low, high)}``; others come from :func:`metric_range`.
        unbounded: ``"nan"`` (paper: coverage n/a when no range is known) or ``"observed"`` (divide by the
            max − min observed for that metric across all groups).
        group_by: columns identifying one sweep (default ``("method",)``; add ``"dataset"``...).

    Returns:
        one row per group and metric: ``n_points, tau, abs_tau, p_value, min, max, range_low, range_high,
        coverage, std`` (``std`` with ddof = 1).
    """
    need = {"metric", "value", reference}
    missing = need - set(df.columns)
    if missing:
        raise MetricError(f"sensitivity: the frame lacks columns {sorted(missing)} (has {list(df.columns)})")
    if unbounded not in ("nan", "observed"):
        raise MetricError(f"sensitivity: unbounded must be 'nan' or 'observed', not {unbounded!r}")
    groups = [g for g in group_by if g in df.columns]
    point_cols = groups + ["reg_value"] if "reg_value" in df.columns else groups + [reference]
    point_cols = list(dict.fromkeys(point_cols + ["metric"]))
    agg = {"value": "mean"}
    if reference not in point_cols:
        agg[reference] = "mean"
    pts = df.groupby(point_cols, dropna=False, sort=True).agg(agg).reset_index()
    observed = pts.groupby("metric")["value"].agg(lambda v: float(np.nanmax(v) - np.nanmin(v)))
    out = []
    for key, g in pts.groupby(groups + ["metric"], dropna=False, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        rec = dict(zip(groups + ["metric"], key))
        metric = rec["metric"]
        vals = g["value"].to_numpy(dtype=float)
        tau, p = kendall_tau(g[reference].to_numpy(dtype=float), vals)
        finite = vals[~np.isnan(vals)]
        vmin = float(finite.min()) if len(finite) else math.nan
        vmax = float(finite.max()) if len(finite) else math.nan
        rng = metric_range(metric, ranges)
        if rng is not None:
            lo, hi = rng
            coverage = (vmax - vmin) / (hi - lo)
        elif unbounded == "observed" and observed.get(metric, 0) > 0:
            lo, hi = math.nan, math.nan
            coverage = (vmax - vmin) / float(observed[metric])
        else:
            lo, hi, coverage = math.nan, math.nan, math.nan
        std = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
        rec.update(n_points=len(finite), tau=tau, abs_tau=abs(tau) if not math.isnan(tau) else math.nan,
                   p_value=p, min=vmin, max=vmax, range_low=lo, range_high=hi, coverage=coverage, std=std)
        out.append(rec)
    cols = groups + ["metric", "n_points", "tau", "abs_tau", "p_value", "min", "max", "range_low", "range_high",
                     "coverage", "std"]
    return pd.DataFrame(out, columns=cols)


def rank_stability(df: pd.DataFrame, *, method_col: str = "method", dataset_col: str = "dataset",
                   metric_col: str = "metric", value_col: str = "value") -> pd.DataFrame:
    """Rank stability of each metric across datasets (the paper's Table 4, bottom).

    ``df`` is tidy: one (mean) score per method, dataset and metric (duplicates are averaged). For each
    metric and each pair of datasets, Kendall's τ-b between the scores of the methods present in both;
    the result is averaged over pairs. Returns columns ``metric, tau, n_pairs, n_methods`` (``n_methods``:
    the fewest methods shared by a pair).
    """
    missing = {method_col, dataset_col, metric_col, value_col} - set(df.columns)
    if missing:
        raise MetricError(f"rank_stability: the frame lacks columns {sorted(missing)}")
    out = []
    for metric, g in df.groupby(metric_col, sort=False):
        wide = g.pivot_table(index=method_col, columns=dataset_col, values=value_col, aggfunc="mean")
        taus, ns = [], []
        for a, b in itertools.combinations(list(wide.columns), 2):
            pair = wide[[a, b]].dropna()
            t, _ = kendall_tau(pair[a], pair[b])
            taus.append(t)
            ns.append(len(pair))
        finite = [t for t in taus if not math.isnan(t)]
        out.append({"metric": metric, "tau": float(np.mean(finite)) if finite else math.nan,
                    "n_pairs": len(taus), "n_methods": min(ns) if ns else 0})
    return pd.DataFrame(out, columns=["metric", "tau", "n_pairs", "n_methods"])


def rank_stability_wide(scores: pd.DataFrame) -> float:
    """Rank stability of one metric from a wide frame (index: methods, columns: datasets)."""
    tidy = scores.rename_axis(index="method", columns="dataset").stack().rename("value").reset_index()
    tidy["metric"] = "m"
    return float(rank_stability(tidy)["tau"].iloc[0])


def group_average(table: pd.DataFrame, groups: Mapping[str, Sequence[str]], *, value_col: str = "tau",
                  metric_col: str = "metric") -> pd.DataFrame:
    """Average a per-metric column over named groups of metrics (Table 4's "Average" row).

    Returns columns ``group, value, n_metrics`` (metrics of a group that are absent are ignored).
    """
    out = []
    for name, metrics in groups.items():
        vals = table.loc[table[metric_col].isin(list(metrics)), value_col].astype(float)
        vals = vals[~vals.isna()]
        out.append({"group": name, "value": float(vals.mean()) if len(vals) else math.nan, "n_metrics": len(vals)})
    return pd.DataFrame(out, columns=["group", "value", "n_metrics"])
