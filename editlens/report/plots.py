"""Report plots (matplotlib, Agg canvas, PNG). No pyplot: every figure is a standalone
:class:`matplotlib.figure.Figure`, so nothing touches global state and no display is needed.

* :func:`plot_lines` — the generic one: mean of ``y`` against ``x``, one line per ``hue``, with a 95% paired
  bootstrap band over cases when the rows have case ids (±SEM otherwise).
* :func:`plot_sequential` — metric vs number of edits per method (the sequential-editing curves of
  Xu et al., "Benchmarking and Rethinking Knowledge Editing", 1/10/100 edits; log x for wide ranges).
* :func:`plot_sweep` — metric vs regulariser value (log x), per method (Liu et al.'s λ sweeps).
* :func:`plot_tf_vs_ar` — teacher-forced vs autoregressive scores as paired bars per method
  (``t_acc`` vs ``s_acc``, or ``<m>_tf`` vs ``<m>_ar``).
* :func:`plot_sigma` — EVK metrics over the perturbation scale σ (metric names ``name@sigma=0.5`` or a
  ``sigma`` column).
* :func:`plot_collapse` — the collapse diagnostics (``hidden_rank@L``, ``delta_spectrum``: ‖ΔW‖_F per edited
  matrix and the top singular values) over the number of edits, from :func:`collapse_series`.

Each returns a Figure; :func:`figure_png` renders it to PNG bytes and :func:`save_png` writes a file.
"""
from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from editlens.errors import MetricError

SIGMA_RE = re.compile(r"^(?P<base>.*?)@sigma=(?P<sigma>[-+0-9.eE]+)(?P<rest>.*)$")


def _new_figure(n_panels: int = 1, *, width: float = 5.0, height: float = 3.6, ncols: int | None = None
                ) -> tuple[Figure, list[Any]]:
    ncols = ncols or min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=90)
    FigureCanvasAgg(fig)
    # fixed margins instead of tight_layout (which measures every label and is several times slower)
    w, h = width * ncols, height * nrows
    fig.subplots_adjust(left=0.75 / w, right=1 - 0.2 / w, bottom=0.75 / h, top=1 - 0.4 / h, wspace=0.35, hspace=0.55)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def figure_png(fig: Figure, metadata: Mapping[str, str] | None = None) -> bytes:
    """Render a figure to PNG bytes; ``metadata`` (keyword → text) is stored in the PNG's text chunks."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata=dict(metadata) if metadata else None)
    return buf.getvalue()


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG (parent folder created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(fig))
    return path


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise MetricError(f"{what}: the frame lacks columns {missing} (has {list(df.columns)})")


def _wide_range(x: np.ndarray) -> bool:
    pos = x[np.isfinite(x) & (x > 0)]
    return len(pos) >= 2 and pos.min() > 0 and pos.max() / pos.min() >= 50 and (x[np.isfinite(x)] > 0).all()


def plot_lines(df: pd.DataFrame, x: str, y: str, hue: str | None = None, *, ax: Any = None, logx: bool | None = None,
               title: str | None = None, xlabel: str | None = None, ylabel: str | None = None,
               band: bool | str = True, resamples: int = 1000, seed: int = 0) -> Figure:
    """Mean of ``y`` against ``x`` per ``hue`` value (one line each), with a confidence band.

    ``band=True`` (or ``"bootstrap"``): when the frame has ``case_id`` s, a 95% bootstrap band of each point's mean
    from :func:`editlens.report.paired.bootstrap_band` — cases (seeds first, when there are several) are resampled
    once for the whole panel, so every point and line is recomputed on the same resampled cases (paired: points
    that share cases, e.g. the checkpoints of one sequential sample or methods on one dataset, move together);
    ``resamples`` and ``seed`` set the draws. Without case ids, or with ``band="sem"``, ±SEM of the rows.
    ``band=False``: no band. ``logx=None`` picks a log axis when all x are positive and span ≥ 50×. Non-finite x
    (e.g. +inf for a pre-edit point) are dropped. Draws into ``ax`` when given, else a new figure.
    """
    _need(df, [x, y] + ([hue] if hue else []), "plot_lines")
    if band not in (True, False, "bootstrap", "sem"):
        raise MetricError(f"plot_lines: band must be True, False, 'bootstrap' or 'sem', not {band!r}")
    if ax is None:
        fig, (ax,) = _new_figure(1)
    else:
        fig = ax.figure
    extra = [c for c in ("case_id", "seed", "dataset") if c in df.columns and c not in (x, y, hue)]
    d = df[[x, y] + ([hue] if hue else []) + extra].copy()
    d[x] = pd.to_numeric(d[x], errors="coerce")
    d[y] = pd.to_numeric(d[y], errors="coerce")
    d = d[np.isfinite(d[x]) & d[y].notna()]
    boot = None
    if band in (True, "bootstrap") and len(d):
        from editlens.report.paired import bootstrap_band

        boot = bootstrap_band(d, x, hue, y=y, resamples=resamples, seed=seed)
    groups = d.groupby(hue, sort=True) if hue else [(None, d)]
    for name, g in groups:
        s = g.groupby(x)[y].agg(["mean", "std", "count"]).sort_index()
        xs = s.index.to_numpy(dtype=float)
        if boot is not None:
            b = boot[boot["hue"] == ("" if name is None else str(name))].set_index("x").reindex(s.index)
            ax.plot(xs, b["mean"], marker="o", label=None if name is None else str(name))
            if (s["count"] > 1).any():
                ax.fill_between(xs, b["low"], b["high"], alpha=0.2)
            continue
        ax.plot(xs, s["mean"], marker="o", label=None if name is None else str(name))
        if band and (s["count"] > 1).any():
            sem = (s["std"] / np.sqrt(s["count"])).fillna(0).to_numpy()
            ax.fill_between(xs, s["mean"] - sem, s["mean"] + sem, alpha=0.2)
    if logx is None:
        logx = _wide_range(d[x].to_numpy(dtype=float))
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    if hue and d[hue].nunique() > 0:
        ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return fig


def _panels(df: pd.DataFrame, metrics: Sequence[str] | None, col: str = "column") -> list[str]:
    cols = list(dict.fromkeys(df[col])) if metrics is None else list(metrics)
    return cols


def plot_sequential(df: pd.DataFrame, metrics: Sequence[str] | None = None, *, hue: str = "method_label",
                    metric_col: str = "column") -> Figure:
    """Metric vs number of edits (``n_edits``), one panel per metric, one line per method."""
    _need(df, ["n_edits", metric_col, "value", hue], "plot_sequential")
    cols = _panels(df, metrics, metric_col)
    fig, axes = _new_figure(max(1, len(cols)))
    for ax, c in zip(axes, cols):
        plot_lines(df[df[metric_col] == c], "n_edits", "value", hue, ax=ax, title=c, xlabel="number of edits",
                   ylabel=c)
    return fig


def plot_sweep(df: pd.DataFrame, axis: str, metrics: Sequence[str] | None = None, *, hue: str = "method_label",
               metric_col: str = "column", baseline: Mapping[str, float] | None = None) -> Figure:
    """Metric vs swept regulariser value (log x), one panel per metric, one line per method.

    ``baseline`` (metric column -> pre-edit value) is drawn as a dashed horizontal line."""
    _need(df, [axis, metric_col, "value", hue], "plot_sweep")
    d = df[df[axis].notna()]
    cols = _panels(d, metrics, metric_col)
    fig, axes = _new_figure(max(1, len(cols)))
    label = axis[len("sweep."):] if axis.startswith("sweep.") else axis
    for ax, c in zip(axes, cols):
        sub = d[d[metric_col] == c]
        xs = pd.to_numeric(sub[axis], errors="coerce").to_numpy(dtype=float)
        if baseline and c in baseline and np.isfinite(baseline[c]):
            ax.axhline(baseline[c], color="grey", linestyle="--", linewidth=1, label="pre-edit")
        plot_lines(sub, axis, "value", hue, ax=ax, title=c, xlabel=label, ylabel=c,
                   logx=bool(len(xs)) and bool((xs[np.isfinite(xs)] > 0).all()))
    return fig


def tf_ar_pairs(metrics: Sequence[str]) -> list[tuple[str, str, str]]:
    """Find (name, teacher-forced metric, autoregressive metric) pairs among metric names:
    ``t_X``/``s_X`` (token accuracy under teacher forcing vs sample accuracy of greedy generation),
    ``X_tf``/``X_ar`` and ``tf_X``/``ar_X``."""
    ms = set(metrics)
    out = []
    for m in sorted(ms):
        for tf, ar, name in ((m, "s_" + m[2:], m[2:]) if m.startswith("t_") else (None, None, None),
                             (m, m[:-3] + "_ar", m[:-3]) if m.endswith("_tf") else (None, None, None),
                             (m, "ar_" + m[3:], m[3:]) if m.startswith("tf_") else (None, None, None)):
            if tf and ar in ms:
                out.append((name, tf, ar))
    return out


def plot_tf_vs_ar(df: pd.DataFrame, pairs: Sequence[tuple[str, str, str]] | None = None, *,
                  hue: str = "method_label") -> Figure:
    """Paired bars per method: teacher-forced vs autoregressive score, one panel per (probe kind, pair).

    ``pairs`` defaults to :func:`tf_ar_pairs` of the frame's metric names. Bar height = mean, error bar = SEM.
    """
    _need(df, ["metric", "value", hue], "plot_tf_vs_ar")
    pairs = list(pairs) if pairs is not None else tf_ar_pairs(list(df["metric"].unique()))
    if not pairs:
        raise MetricError("plot_tf_vs_ar: no teacher-forced / autoregressive metric pairs (t_X/s_X, X_tf/X_ar)")
    kinds = (list(dict.fromkeys(df["probe_kind"].dropna())) if "probe_kind" in df.columns else []) or [None]
    panels = []
    for p in pairs:
        for k in kinds:
            sub = df if k is None else df[df["probe_kind"] == k]
            if sub["metric"].eq(p[1]).any() and sub["metric"].eq(p[2]).any():
                panels.append((k, p))
    fig, axes = _new_figure(max(1, len(panels)))
    for ax, (kind, (name, tf, ar)) in zip(axes, panels):
        sub = df if kind is None else df[df["probe_kind"] == kind]
        methods = sorted(sub.loc[sub["metric"].isin([tf, ar]), hue].dropna().unique())
        xs = np.arange(len(methods))
        for j, (metric, lab) in enumerate(((tf, "teacher-forced"), (ar, "autoregressive"))):
            s = sub[sub["metric"] == metric].groupby(hue)["value"].agg(["mean", "std", "count"]).reindex(methods)
            sem = (s["std"] / np.sqrt(s["count"])).fillna(0)
            ax.bar(xs + (j - 0.5) * 0.38, s["mean"].fillna(0), 0.38, yerr=sem, capsize=3,
                   label=f"{lab} ({metric})")
        ax.set_xticks(xs)
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize="small")
        ax.set_title(f"{kind}/{name}" if kind else name)
        ax.set_ylabel(name)
        ax.legend(fontsize="small")
        ax.grid(True, axis="y", alpha=0.3)
    return fig


def split_sigma(df: pd.DataFrame, metric_col: str = "metric") -> pd.DataFrame:
    """Rows whose metric looks like ``name@sigma=0.5`` get ``sigma`` (float) and ``metric_base`` columns;
    rows that already have a numeric ``sigma`` column keep it. Returns only rows with a sigma."""
    d = df.copy()
    parsed = d[metric_col].astype(str).str.extract(SIGMA_RE)
    sig = pd.to_numeric(parsed["sigma"], errors="coerce")
    base = parsed["base"].fillna("") + parsed["rest"].fillna("")
    if "sigma" in d.columns:
        have = pd.to_numeric(d["sigma"], errors="coerce")
        sig = sig.where(sig.notna(), have)
        base = base.where(parsed["sigma"].notna(), d[metric_col].astype(str))
    d["sigma"] = sig
    d["metric_base"] = base
    if "probe_kind" in d.columns:
        d["metric_base"] = [f"{k}/{b}" if isinstance(k, str) and k else b for k, b in zip(d["probe_kind"], base)]
    return d[d["sigma"].notna()]


def plot_sigma(df: pd.DataFrame, *, hue: str = "method_label", metric_col: str = "metric") -> Figure:
    """EVK metrics against σ, one panel per base metric, one line per method (see :func:`split_sigma`)."""
    _need(df, [metric_col, "value", hue], "plot_sigma")
    d = split_sigma(df, metric_col)
    if d.empty:
        raise MetricError("plot_sigma: no rows with a sigma (metric 'name@sigma=<s>' or a 'sigma' column)")
    cols = list(dict.fromkeys(d["metric_base"]))
    fig, axes = _new_figure(len(cols))
    for ax, c in zip(axes, cols):
        plot_lines(d[d["metric_base"] == c], "sigma", "value", hue, ax=ax, title=c, xlabel="σ", ylabel=c,
                   logx=False)
    return fig


# ------------------------------------------------------------------------------------------------ collapse
#: metric names of the collapse diagnostics (:mod:`editlens.evaluate.collapse`): ``hidden_rank@L``,
#: ``delta_spectrum[@M]`` (‖ΔW‖_F per matrix) and ``delta_spectrum[@M]_s<i>`` (its i-th singular value)
COLLAPSE_RE = re.compile(r"^(?:(?P<rank>hidden_rank@\d+)|(?P<delta>delta_spectrum(?:@[a-z_]+)?)(?:_s(?P<sv>\d+))?)$")


def is_collapse_metric(metric: Any) -> bool:
    """Whether ``metric`` is ``hidden_rank@L``, ``delta_spectrum[@M]`` or one of its ``_s<i>`` singular values."""
    return isinstance(metric, str) and COLLAPSE_RE.match(metric) is not None


def collapse_series(df: pd.DataFrame, *, hue: str = "method_label") -> pd.DataFrame:
    """The collapse diagnostics of a results frame as tidy series over the number of edits.

    Columns: ``method``, ``metric`` (``hidden_rank@L`` or ``delta_spectrum[@M]``), ``matrix`` (the row's
    ``case_id``, e.g. ``mlp_out:4``; empty for ``hidden_rank``), ``quantity`` (``ratio`` = erank(edited) /
    erank(base); ``norm`` = ‖ΔW‖_F; ``s1``..``s4`` = the top singular values of ΔW), ``n_edits``, ``value`` (mean
    over the rows of that point, e.g. over datasets or seeds) and ``n`` (their number). Matrices whose ‖ΔW‖ is 0 at
    every checkpoint of a method (not edited) are left out. Empty when the frame holds no collapse metric."""
    cols = ["method", "metric", "matrix", "quantity", "n_edits", "value", "n"]
    if df.empty or "metric" not in df.columns or "n_edits" not in df.columns:
        return pd.DataFrame(columns=cols)
    d = df[df["metric"].map(is_collapse_metric)].copy()
    d["n_edits"] = pd.to_numeric(d["n_edits"], errors="coerce")
    d = d[d["n_edits"].notna() & d["value"].notna()]
    if d.empty:
        return pd.DataFrame(columns=cols)
    parts = d["metric"].map(lambda m: COLLAPSE_RE.match(m).groupdict())
    d["base"] = [p["rank"] or p["delta"] for p in parts]
    d["quantity"] = ["ratio" if p["rank"] else ("norm" if p["sv"] is None else f"s{p['sv']}") for p in parts]
    cid = d["case_id"].astype(str) if "case_id" in d.columns else pd.Series("", index=d.index)
    d["matrix"] = np.where(d["quantity"] == "ratio", "", cid)
    out = (d.groupby([hue, "base", "matrix", "quantity", "n_edits"], sort=True)["value"].agg(["mean", "count"])
           .reset_index().rename(columns={hue: "method", "base": "metric", "mean": "value", "count": "n"}))
    # drop matrices the method never changed (‖ΔW‖ = 0 at every checkpoint)
    norms = out[out["quantity"] == "norm"].groupby(["method", "metric", "matrix"])["value"].apply(
        lambda v: bool((v.abs() > 0).any()))
    untouched = {k for k, changed in norms.items() if not changed}
    keep = [not (m.startswith("delta_spectrum") and (me, m, mx) in untouched)
            for me, m, mx in zip(out["method"], out["metric"], out["matrix"])]
    out = out[keep]
    return out[cols].reset_index(drop=True)


def plot_collapse(series: pd.DataFrame, *, max_matrices: int = 8) -> Figure:
    """Collapse diagnostics vs number of edits from :func:`collapse_series`.

    Panels: one per ``hidden_rank@L`` (erank(edited) / erank(base), one line per method, the unchanged model's 1
    dashed); then per method and ``delta_spectrum[@M]`` two panels: ‖ΔW‖_F of each edited matrix (the
    ``max_matrices`` with the largest last value when more were edited), and σ₁…σ₄ of the matrix with the largest
    last ‖ΔW‖_F. Each line is one series of the frame (``Line2D.get_xdata`` / ``get_ydata`` give it back)."""
    _need(series, ["method", "metric", "matrix", "quantity", "n_edits", "value"], "plot_collapse")
    if series.empty:
        raise MetricError("plot_collapse: no collapse diagnostics (hidden_rank@L, delta_spectrum) to plot")
    ranks = sorted(m for m in series["metric"].unique() if m.startswith("hidden_rank@"))
    delta = series[series["metric"].str.startswith("delta_spectrum")]
    groups = list(delta.groupby(["method", "metric"], sort=True).groups) if len(delta) else []
    fig, axes = _new_figure(len(ranks) + 2 * len(groups))
    it = iter(axes)
    for m in ranks:
        ax = next(it)
        sub = series[series["metric"] == m]
        for method, g in sub.groupby("method", sort=True):
            g = g.sort_values("n_edits")
            ax.plot(g["n_edits"].to_numpy(float), g["value"].to_numpy(float), marker="o", label=str(method))
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        _collapse_axes(ax, sub, m, "erank(edited) / erank(base)")
    for method, m in groups:
        g = delta[(delta["method"] == method) & (delta["metric"] == m)]
        norms = g[g["quantity"] == "norm"]
        last = norms.sort_values("n_edits").groupby("matrix")["value"].last().sort_values(ascending=False)
        ax = next(it)
        for mx in last.index[:max_matrices]:
            s = norms[norms["matrix"] == mx].sort_values("n_edits")
            ax.plot(s["n_edits"].to_numpy(float), s["value"].to_numpy(float), marker="o", label=str(mx))
        shown = f" ({max_matrices} of {len(last)} largest)" if len(last) > max_matrices else ""
        _collapse_axes(ax, g, f"{m}: ||dW||_F, {method}{shown}", "||dW||_F")
        ax = next(it)
        if len(last):
            top = last.index[0]
            sv = g[(g["matrix"] == top) & (g["quantity"].str.match(r"^s\d+$"))]
            for q, s in sorted(sv.groupby("quantity"), key=lambda kv: int(kv[0][1:])):
                s = s.sort_values("n_edits")
                ax.plot(s["n_edits"].to_numpy(float), s["value"].to_numpy(float), marker="o",
                        label=f"sigma_{q[1:]}")
            _collapse_axes(ax, sv, f"{m}: top singular values of {top}, {method}", "singular value of dW")
    return fig


def _collapse_axes(ax: Any, sub: pd.DataFrame, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize="small")
    ax.set_xlabel("number of edits")
    ax.set_ylabel(ylabel)
    if _wide_range(pd.to_numeric(sub["n_edits"], errors="coerce").to_numpy(dtype=float)):
        ax.set_xscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
