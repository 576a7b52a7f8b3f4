"""Report tables from a results store: methods × metrics, sensitivity to a sweep, rank stability.

Inputs are the store's rows joined with unit metadata (:meth:`editlens.runs.store.Store.rows_with_meta`)
or any DataFrame with at least ``metric, value`` (plus ``method``/``label``, ``probe_kind``, ``dataset``,
``n_edits``, ``sweep.<label>.<param>`` columns when available). Every function returns a DataFrame;
:func:`to_markdown` and :func:`write_table` render them.

Column naming: a metric column is ``probe_kind/metric`` (``neighborhood/kl``) or just ``metric`` when a
row has no probe kind. Columns are grouped, in this order, as ``target`` (probes of the edited fact:
rewrite, paraphrase, portability, multihop...), ``gt_based`` and ``gt_free`` specificity (see
:func:`metric_group`), then ``other``.
"""
from __future__ import annotations

import html as _html
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from editlens.errors import StoreError
from editlens.evaluate import meta

#: probe kinds whose metrics measure the edit itself (efficacy / generalization / portability).
TARGET_KINDS = frozenset({"rewrite", "paraphrase", "portability", "multihop"})
#: generation-quality metrics, reported under "other".
OTHER_METRICS = frozenset({"fluency", "consistency"})
#: metric-name pattern of ground-truth-free metrics (compare the edited model with the base model).
GT_FREE_PATTERN = re.compile(r"(^|[^a-z])(n?kl|js|top[-_]?\d+|topk|overlap|evk|stability|drift|rank_corr)",
                             re.IGNORECASE)
GROUP_ORDER = ("target", "gt_based", "gt_free", "other")
GROUP_TITLES = {"target": "Target knowledge", "gt_based": "GT-based specificity", "gt_free": "GT-free specificity",
                "other": "Other"}
BASELINE_METHODS = frozenset({"pre-edit", "pre_edit", "base", "unedited", "none"})


def metric_group(metric: str, probe_kind: str | None = None,
                 groups: Mapping[str, Sequence[str]] | None = None) -> str:
    """Classify a metric column as ``target``, ``gt_based``, ``gt_free`` or ``other``.

    ``groups`` (e.g. the spec's ``report.groups``) maps a group name to metric names or ``kind/metric``
    columns and wins over the defaults: probes of the edited fact are ``target``; otherwise names matching
    :data:`GT_FREE_PATTERN` (kl, top-k overlap, EVK stability...) are ``gt_free`` and the rest, when the
    row has a probe kind, ``gt_based``.
    """
    col = metric_column(metric, probe_kind)
    if groups:
        for g, names in groups.items():
            if col in names or metric in names:
                return g
    if metric in OTHER_METRICS:
        return "other"
    if probe_kind in TARGET_KINDS:
        return "target"
    if GT_FREE_PATTERN.search(metric):
        return "gt_free"
    if probe_kind:
        return "gt_based"
    return "other"


def metric_column(metric: str, probe_kind: Any = None) -> str:
    """``kind/metric`` or ``metric`` when there is no probe kind."""
    if probe_kind is None or (isinstance(probe_kind, float) and math.isnan(probe_kind)) or probe_kind == "":
        return str(metric)
    return f"{probe_kind}/{metric}"


# ============================================================================ input normalisation
def results_frame(source: Any, run_id: str | None = None) -> pd.DataFrame:
    """Rows joined with unit metadata from a Store, a store path or a DataFrame (copied).

    Adds ``method_label`` (the unit's label, else method, else unit, else ``"all"``) and ``column``
    (``kind/metric``).
    """
    from editlens.runs.store import Store

    if isinstance(source, pd.DataFrame):
        df = source.copy()
    elif isinstance(source, Store):
        df = source.rows_with_meta(run_id)
    elif isinstance(source, (str, Path)):
        with Store(source, readonly=True) as st:
            df = st.rows_with_meta(run_id)
    else:
        raise StoreError(f"cannot make a report from {type(source).__name__}; give a Store, a path or a DataFrame")
    if run_id is not None and "run_id" in df.columns:
        df = df[df["run_id"] == run_id]
    missing = {"metric", "value"} - set(df.columns)
    if missing:
        raise StoreError(f"results frame lacks columns {sorted(missing)}")
    for c in ("label", "method", "unit"):
        if c in df.columns and df[c].notna().any():
            df["method_label"] = df[c].astype(object).where(df[c].notna(), "?").astype(str)
            break
    else:
        df["method_label"] = "all"
    pk = df["probe_kind"] if "probe_kind" in df.columns else pd.Series([None] * len(df), index=df.index)
    df["column"] = [metric_column(m, k) for m, k in zip(df["metric"], pk)]
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype(float)
    return df


def _runs_of(df: pd.DataFrame) -> list[Any]:
    """The run ids of a frame, in order of appearance (``[]`` without a ``run_id`` column)."""
    if "run_id" not in df.columns:
        return []
    return list(dict.fromkeys(df["run_id"].dropna()))


def sweep_columns(df: pd.DataFrame) -> list[str]:
    """The ``sweep.<label>.<param>`` columns of a results frame that have values."""
    return [c for c in df.columns if c.startswith("sweep.") and df[c].notna().any()]


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Keep, per unit, only the rows of its last evaluation step (sequential units have several)."""
    if "step" not in df.columns or "unit" not in df.columns or df["step"].isna().all():
        return df
    step = pd.to_numeric(df["step"], errors="coerce")
    keys = [df["run_id"], df["unit"]] if "run_id" in df.columns else [df["unit"]]  # unit ids repeat across runs
    last = step.groupby(keys, dropna=False).transform("max")
    return df[(step == last) | step.isna()]


def _config_cols(df: pd.DataFrame, extra: Sequence[str] = ()) -> list[str]:
    """Columns that separate configurations: the run (when the frame holds several: runs are never pooled),
    label, then dataset / sweep values / size when they vary."""
    cols = ["run_id"] if "run_id" in df.columns and df["run_id"].nunique(dropna=True) > 1 else []
    cols.append("method_label")
    for c in ["dataset", *sweep_columns(df), "n_edits", *extra]:
        if c in df.columns and c not in cols and df[c].nunique(dropna=True) > 1:
            cols.append(c)
    return cols


# ============================================================================ tables
def summarize(df: pd.DataFrame, by: Sequence[str] | None = None, *, final: bool = True,
              groups: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """Mean and standard error of every metric column per configuration (tidy).

    ``by`` defaults to :func:`_config_cols` (label + dataset / sweep point / number of edits when they vary).
    With ``final`` only each unit's last step is used. SEM = sample std / sqrt(n) over the rows (cases ×
    seeds), NaN for n = 1. Returns ``by..., group, column, n, mean, sem``.
    """
    if "method_label" not in df.columns or "column" not in df.columns:
        df = results_frame(df)
    if final:
        df = final_rows(df)
    by = list(by) if by is not None else _config_cols(df)
    kind_of = (df.drop_duplicates("column").set_index("column")["probe_kind"]
               if "probe_kind" in df.columns else pd.Series(dtype=object))
    g = df.groupby(by + ["column"], dropna=False, sort=False)["value"]
    out = g.agg(n="count", mean="mean", std="std").reset_index()
    out["sem"] = out["std"] / np.sqrt(out["n"].where(out["n"] > 0))
    out = out.drop(columns="std")
    metric_of = df.drop_duplicates("column").set_index("column")["metric"]
    out["group"] = [metric_group(str(metric_of[c]), _nz(kind_of.get(c)), groups) for c in out["column"]]
    order = {g: i for i, g in enumerate(GROUP_ORDER)}
    out["_o"] = out["group"].map(lambda x: order.get(x, len(order)))
    out = out.sort_values(["_o"], kind="stable").drop(columns="_o")
    return out[by + ["group", "column", "n", "mean", "sem"]].reset_index(drop=True)


def _text(v: Any) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v)) if abs(v) < 1e4 else f"{v:g}"
    return str(v)


def _nz(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def fmt_mean_sem(mean: float, sem: float, digits: int = 3) -> str:
    """``0.812 ± 0.013`` (just the mean when the SEM is NaN)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if sem is None or (isinstance(sem, float) and math.isnan(sem)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sem:.{digits}f}"


def methods_table(df: pd.DataFrame, by: Sequence[str] | None = None, *, digits: int = 3,
                  groups: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """Wide methods × metrics table of ``mean ± sem`` strings, columns ordered target / GT-based / GT-free.

    Columns form a two-level index ``(group title, kind/metric)`` after the configuration columns
    (``method``, then dataset / sweep values / n_edits when they vary); :func:`flatten_columns` joins them.
    """
    s = summarize(df, by, groups=groups)
    by = [c for c in s.columns if c not in ("group", "column", "n", "mean", "sem")]
    s["cell"] = [fmt_mean_sem(m, e, digits) for m, e in zip(s["mean"], s["sem"])]
    for c in by:  # NaN keys (e.g. no sweep value for an unswept method) must survive the pivot
        s[c] = s[c].map(_text)
    cols = list(dict.fromkeys(zip(s["group"], s["column"])))
    wide = s.pivot_table(index=by, columns=["group", "column"], values="cell", aggfunc="first", sort=False)
    wide = wide.reindex(columns=pd.MultiIndex.from_tuples(cols))
    wide.columns = pd.MultiIndex.from_tuples([(GROUP_TITLES.get(g, g), c) for g, c in cols],
                                             names=["group", "metric"])
    wide = wide.fillna("–")
    wide = wide.reset_index()
    wide.columns = pd.MultiIndex.from_tuples(
        [("", "method") if c[0] == "method_label" else ("", "run") if c[0] == "run_id"
         else ("", c[0][len("sweep."):]) if str(c[0]).startswith("sweep.") else c for c in wide.columns])
    return wide


def flatten_columns(df: pd.DataFrame, sep: str = ": ") -> pd.DataFrame:
    """Join a two-level column index into strings (``"GT-free specificity: neighborhood/kl"``)."""
    if not isinstance(df.columns, pd.MultiIndex):
        return df
    out = df.copy()
    out.columns = [sep.join(str(p) for p in c if str(p)) if isinstance(c, tuple) else str(c) for c in df.columns]
    return out


def sweep_frame(df: pd.DataFrame, axis: str, *, diagnostics: pd.DataFrame | None = None,
                delta_k_key: str = "delta_k_mean") -> pd.DataFrame:
    """The tidy frame :func:`editlens.evaluate.meta.sensitivity` needs, for one sweep column ``axis``.

    Rows of units with a value on ``axis`` become ``method, dataset, reg_value, metric (= kind/metric),
    value``; ``delta_k`` (mean over the unit's diagnostics rows with key ``delta_k_key``) is added when
    diagnostics are given and contain it. Baseline units (method ``pre-edit``/``base``/``unedited``) are
    added to every sweep as the pre-edit point (reg_value = +inf, delta_k = 0), as in the paper.
    """
    df = final_rows(df if "column" in df.columns else results_frame(df))
    on = df[df[axis].notna()].copy() if axis in df.columns else df.iloc[0:0].copy()
    on["reg_value"] = pd.to_numeric(on[axis], errors="coerce")
    cols = ["method_label", "reg_value", "column", "value"] + (["dataset"] if "dataset" in on.columns else [])
    if "unit" in on.columns:
        cols.append("unit")
    out = on[cols].rename(columns={"method_label": "method", "column": "metric"})
    if diagnostics is not None and len(diagnostics) and "unit" in out.columns:
        d = diagnostics[diagnostics["key"] == delta_k_key]
        if len(d):
            dk = pd.to_numeric(d["value"], errors="coerce").groupby(d["unit"]).mean()
            out["delta_k"] = out["unit"].map(dk)
    base_mask = df["method_label"].str.lower().isin(BASELINE_METHODS)
    if "method" in df.columns:
        base_mask |= df["method"].astype(str).str.lower().isin(BASELINE_METHODS)
    if base_mask.any() and len(out):
        b = df[base_mask].rename(columns={"column": "metric_col"})
        bcols = ["metric_col", "value"] + (["dataset"] if "dataset" in b.columns and "dataset" in out.columns else [])
        b = b[bcols].rename(columns={"metric_col": "metric"})
        gb = ["method"] + (["dataset"] if "dataset" in b.columns else [])
        out = meta.with_baseline(out.drop(columns=[c for c in ("unit",) if c in out.columns]), b, group_by=gb)
    return out.drop(columns=[c for c in ("unit",) if c in out.columns])


def sensitivity_table(df: pd.DataFrame, *, diagnostics: pd.DataFrame | None = None,
                      reference: str = "auto", ranges: Mapping[str, Sequence[float]] | None = None,
                      unbounded: str = "nan", delta_k_key: str = "delta_k_mean") -> pd.DataFrame:
    """Sensitivity table (the paper's Tables 2–3) for every sweep axis of the results.

    ``reference``: ``"reg_value"``, ``"delta_k"`` (needs the ``delta_k_key`` diagnostic) or ``"auto"``
    (delta_k when available, as in the paper, else the swept value). Returns ``axis, method, [dataset],
    metric, reference, n_points, tau, abs_tau, p_value, min, max, range_low, range_high, coverage, std``;
    empty when there is no sweep.
    """
    if "column" not in df.columns:
        df = results_frame(df)
    runs = _runs_of(df)
    if len(runs) > 1:  # one table per run, side by side (runs are never pooled)
        parts = []
        for r in runs:
            d = diagnostics
            if d is not None and "run_id" in d.columns:
                d = d[d["run_id"] == r]
            res = sensitivity_table(df[df["run_id"] == r], diagnostics=d, reference=reference, ranges=ranges,
                                    unbounded=unbounded, delta_k_key=delta_k_key)
            res.insert(0, "run", r)
            parts.append(res)
        return pd.concat(parts, ignore_index=True)
    frames = []
    for axis in sweep_columns(df):
        sf = sweep_frame(df, axis, diagnostics=diagnostics, delta_k_key=delta_k_key)
        if sf.empty:
            continue
        ref = reference
        if ref == "auto":
            ref = "delta_k" if "delta_k" in sf.columns and sf["delta_k"].notna().any() else "reg_value"
        gb = ("method", "dataset") if "dataset" in sf.columns and sf["dataset"].notna().any() else ("method",)
        res = meta.sensitivity(sf, reference=ref, ranges=_ranges_for(sf, ranges), unbounded=unbounded, group_by=gb)
        res.insert(0, "axis", axis[len("sweep."):] if axis.startswith("sweep.") else axis)
        res.insert(len(gb) + 2, "reference", ref)
        frames.append(res)
    if not frames:
        return pd.DataFrame(columns=["axis", "method", "metric", "reference", "n_points", "tau", "abs_tau",
                                     "p_value", "min", "max", "range_low", "range_high", "coverage", "std"])
    return pd.concat(frames, ignore_index=True)


def _ranges_for(sf: pd.DataFrame, ranges: Mapping[str, Sequence[float]] | None) -> dict[str, Sequence[float]]:
    """Ranges keyed by ``kind/metric`` columns: explicit ranges may be given for the bare metric name."""
    out: dict[str, Sequence[float]] = {}
    for col in sf["metric"].unique():
        bare = str(col).split("/")[-1]
        if ranges and col in ranges:
            out[col] = ranges[col]
        elif ranges and bare in ranges:
            out[col] = ranges[bare]
        else:
            rng = meta.metric_range(bare)
            if rng is not None:
                out[col] = rng
    return out


def rank_stability_table(df: pd.DataFrame, *, groups: Mapping[str, Sequence[str]] | None = None
                         ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rank stability of methods across datasets (Table 4 bottom) and its per-group averages.

    A "method" is a configuration: label plus sweep point and number of edits when those vary. Returns
    ``(per_metric, per_group)``: ``metric, group, tau, n_pairs, n_methods`` and ``group, value, n_metrics``.
    Both are empty with fewer than two datasets.
    """
    if "column" not in df.columns:
        df = results_frame(df)
    runs = _runs_of(df)
    if len(runs) > 1:  # per run, side by side (runs are never pooled)
        per_metric, per_group = [], []
        for r in runs:
            a, b = rank_stability_table(df[df["run_id"] == r], groups=groups)
            a.insert(0, "run", r)
            b.insert(0, "run", r)
            per_metric.append(a)
            per_group.append(b)
        return pd.concat(per_metric, ignore_index=True), pd.concat(per_group, ignore_index=True)
    df = final_rows(df)
    if "dataset" not in df.columns or df["dataset"].nunique() < 2:
        return (pd.DataFrame(columns=["metric", "group", "tau", "n_pairs", "n_methods"]),
                pd.DataFrame(columns=["group", "value", "n_metrics"]))
    cfg = [c for c in _config_cols(df) if c != "dataset"]
    ident = df[cfg[0]].map(_text)
    for c in cfg[1:]:
        ident = ident + f" | {c.split('.')[-1]}=" + df[c].map(_text)
    tidy = pd.DataFrame({"method": ident, "dataset": df["dataset"], "metric": df["column"], "value": df["value"]})
    res = meta.rank_stability(tidy)
    kinds = df.drop_duplicates("column").set_index("column")
    res.insert(1, "group", [metric_group(str(kinds.loc[c, "metric"]),
                                         _nz(kinds.loc[c, "probe_kind"]) if "probe_kind" in kinds.columns else None,
                                         groups) for c in res["metric"]])
    by_group = {GROUP_TITLES.get(g, g): list(res.loc[res["group"] == g, "metric"])
                for g in GROUP_ORDER if (res["group"] == g).any()}
    return res, meta.group_average(res, by_group)


# ============================================================================ rendering
def _cell(v: Any, digits: int) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 10 ** -digits):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}"
    if v is pd.NA:
        return "–"
    return str(v)


def md_text(s: Any) -> str:
    """Text for Markdown output: HTML-escaped (as the HTML report escapes it: Markdown renderers pass raw HTML
    through, so a ``<script>`` in a spec's title or a method label must not reach the page) and on one line."""
    return _html.escape(" ".join(str(s).splitlines()), quote=False)


def _md_cell(s: Any) -> str:
    return md_text(s).replace("|", "\\|")


def to_markdown(df: pd.DataFrame, *, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table (two-level columns are joined with ': '); cells are HTML-escaped."""
    df = flatten_columns(df)
    header = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(_cell(v, digits)) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_table(df: pd.DataFrame, out_dir: str | Path, name: str, *, digits: int = 3) -> dict[str, Path]:
    """Write ``<name>.md`` and ``<name>.csv`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, csv = out / f"{name}.md", out / f"{name}.csv"
    md.write_text(to_markdown(df, digits=digits), encoding="utf-8")
    flat = flatten_columns(df)
    for c in flat.columns:
        if flat[c].dtype == object and flat[c].map(lambda v: isinstance(v, (dict, list))).any():
            flat[c] = flat[c].map(lambda v: json.dumps(v) if isinstance(v, (dict, list)) else v)
    flat.to_csv(csv, index=False)
    return {"md": md, "csv": csv}
