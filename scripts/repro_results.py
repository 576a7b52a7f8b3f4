"""The results of issue 17's reproductions: one folder per spec, a generated docs page and a README table.

    python scripts/repro_results.py                 # results/<spec>/summary.csv + report/, docs/reproductions.md
    python scripts/repro_results.py --readme        # also the table between <!-- repro:begin --> / <!-- repro:end -->

For every spec of :data:`EXPERIMENTS` (``examples/repro_*.toml`` and the reused ``examples/locality_sweep.toml``)
whose store exists, the latest run of the store (runs are never pooled) gives:

* ``results/<spec name>/summary.csv`` -- ``method, setting, metric, mean, sem, n``: ``method`` is the unit's label,
  ``setting`` the spec's point (``dataset=...; n_edits=...`` and the swept values, e.g. ``weight=10``),
  ``metric`` the ``probe_kind/metric`` column. Every evaluation point counts: each sequential checkpoint and the
  unedited model at step 0 (``n_edits=0``) are settings of their own. ``mean`` is over the rows (cases, and seeds
  pooled as the report pools them), ``sem`` = ``scipy.stats.sem`` (sample std with ddof 1 / sqrt(n); NaN for
  n = 1), ``n`` the number of non-NaN rows. NaN values (a metric undefined on a case) are left out.
* the Markdown report of the same run (``editlens.report.build_report(...).write_dir``) in
  ``results/<spec name>/report/`` (``index.md``, the tables as Markdown + CSV, the figures as PNG);
* for ``repro_specificity`` (the edit-locality paper, arXiv 2601.17343) two derived tables, also as rows of
  summary.csv: **Table 1** -- the pre-edit (``none``) units' neighbourhood / locality probes split by whether the
  unedited model's greedy answer contains the ground truth (``ar_contains`` = 1 for the case: ``base_agrees=yes``,
  = 0: ``no``; a case whose probes disagree among themselves is ``mixed``), with s_acc / t_acc / c_acc averaged on
  each part (``table1_split.csv``); **Table 4** -- rank stability: Kendall's tau-b of the methods' scores between
  each pair of datasets, per metric, neighbourhood (CounterFact) and locality (zsRE) probes taken as one
  ``specificity/<metric>`` column and C-acc (CounterFact) with T-acc (zsRE, not counterfactual) as one ``gt_acc``
  column, as the paper's table does (``rank_stability.csv``; ``editlens.evaluate.meta.rank_stability``).

``docs/reproductions.md`` is rendered from these files and from ``results/verdicts.toml`` (experiment key ->
``verdict`` = agree | partly | disagree, ``reason``, optionally a one-line ``summary`` that the overview tables
show instead of the full reason), written by a person after reading the figures; an experiment without a verdict
there reads "not run yet" when none of its stores exists, else "no verdict yet"; both tables add "(run
incomplete)" while a spec's run has fewer units done than it plans.
``--readme`` writes a compact table between the markers ``<!-- repro:begin -->`` and ``<!-- repro:end -->`` of
README.md (exit 1 when they are missing).
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
VERDICTS = ("agree", "partly", "disagree")
BEGIN, END = "<!-- repro:begin -->", "<!-- repro:end -->"
SUMMARY_COLUMNS = ["method", "setting", "metric", "mean", "sem", "n"]


@dataclass(frozen=True)
class Experiment:
    """One of the papers' headline experiments (issue 17) and the spec(s) that reproduce it."""

    key: str  #: the key of results/verdicts.toml
    number: int
    title: str
    paper: str
    claim: str
    specs: tuple[str, ...]  #: spec stems under examples/
    #: metric columns (fnmatch-style ``*`` allowed) shown in the docs' tables, in this order
    headline: tuple[str, ...]
    #: (metric column, setting substring or "") whose per-method means make the compact "our figure" cell
    figure: tuple[str, str] = ("", "")
    extra: tuple[str, ...] = field(default_factory=tuple)  #: derived CSVs shown too


EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(
        "sequential_collapse", 1, "Sequential collapse vs in-context stability",
        "Benchmarking and Rethinking Knowledge Editing for LLMs (arXiv 2505.18690)",
        "Parameter-modifying editors (ROME, MEMIT, AlphaEdit, FT-M, MEND) lose reliability, generalization, "
        "locality and portability within 100 sequential edits, and autoregressive evaluation shows much less than "
        "teacher forcing; memory methods and in-context SCR stay stable.",
        ("repro_sequential_collapse",),
        ("rewrite/t_acc", "rewrite/ar_em", "paraphrase/ar_em", "neighborhood/kl", "multihop/mh_acc", "*portability_ar",
         "*hidden_rank*"),
        ("rewrite/ar_em", "n_edits=100")),
    Experiment(
        "specificity", 2, "Specificity metrics and their sensitivity",
        "Are We Evaluating the Edit Locality of LLM Model Editing Properly? (arXiv 2601.17343)",
        "Ground truths of specificity probes often disagree with the unedited model, and GT-based metrics still "
        "credit that part (Table 1); GT-based specificity barely moves over a sweep of the regulariser while KL "
        "and top-k overlap follow it (Tables 2-3); method rankings are stable across datasets under GT-free "
        "metrics but near random under GT-based ones (Table 4: mean tau 0.82 vs 0.10).",
        ("repro_specificity", "locality_sweep"),
        ("neighborhood/s_acc", "neighborhood/c_acc", "locality/s_acc", "locality/t_acc", "*/ar_contains",
         "neighborhood/kl", "locality/kl", "neighborhood/topk@5", "locality/topk@5"),
        ("", ""), ("table1_split.csv", "rank_stability.csv")),
    Experiment(
        "general_abilities", 3, "General abilities after many sequential edits",
        "Should We Really Edit Language Models? (arXiv 2410.18785)",
        "General abilities hold for a few dozen sequential edits and fall sharply at hundreds; PMET and MEND are "
        "the most stable; instruction-tuned models decline more slowly than base models; safety suffers early; "
        "at large edit counts the model mutes.",
        ("repro_general_abilities", "repro_general_abilities_gemma"),
        ("*ppl", "*downstream_acc*", "*muting_rate", "*refusal_rate", "rewrite/t_acc"),
        ("*ppl", "n_edits=200")),
    Experiment(
        "pitfalls_conflict", 4, "Pitfalls: knowledge conflict (ConflictEdit)",
        "Unveiling the Pitfalls of Knowledge Editing (Li et al., ICLR 2024); survey Table 3",
        "Two conflicting edits leave the model inconsistent: reverse and composite edits give low conflict scores "
        "(CS) and large conflict magnitudes (CM) for FT, ROME, MEMIT; IKE and SERAC fare differently.",
        ("repro_pitfalls_conflict",),
        ("*conflict_score", "*conflict_magnitude", "*tied_fact_damage"),
        ("*conflict_score", "reverse")),
    Experiment(
        "pitfalls_distortion", 5, "Pitfalls: knowledge distortion (RoundEdit)",
        "Unveiling the Pitfalls of Knowledge Editing (Li et al., ICLR 2024); survey Table 4",
        "Editing a fact and editing it back does not restore the model: round-trip success is partial and the "
        "other true objects' distribution is distorted, more on hard cases than easy ones.",
        ("repro_pitfalls_distortion",),
        ("*round_success", "*distortion", "*ignore_rate", "*failure_rate"),
        ("*distortion", "hard")),
    Experiment(
        "evk_align", 6, "EVK-Align weight sweep",
        "Beyond Local Edits: Embedding-Virtualized Knowledge (arXiv 2602.01977)",
        "EVK-Align raises embedding and text stability of ROME, MEMIT and AlphaEdit (EVK-Bench) without costing "
        "edit efficacy.",
        ("repro_evk_align",),
        ("rewrite/c_acc", "paraphrase/c_acc", "rewrite/evk_kl@full", "neighborhood/evk_kl@full",
         "rewrite/evk_topk@full", "neighborhood/evk_text_kl", "neighborhood/evk_text_topk"),
        ("rewrite/c_acc", "weight=100")),
)


# ============================================================================================ reading a store
def spec_store(spec_path: Path) -> Path:
    """The store a spec writes to (its ``store`` key, else ``<spec stem>.sqlite`` beside it), as the runner."""
    from editlens.runs.runner import default_store_path
    from editlens.runs.spec import load_spec

    return default_store_path(load_spec(spec_path))


def _fmt_value(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v)) if abs(v) < 1e15 else f"{v:g}"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _setting_columns(df: pd.DataFrame) -> list[str]:
    """Columns that make a spec's point: the dataset, the swept values, the number of edits (every step)."""
    cols = ["dataset"] if "dataset" in df.columns else []
    cols += sorted(c for c in df.columns if c.startswith("sweep.") and df[c].notna().any())
    if "n_edits" in df.columns:
        cols.append("n_edits")
    return cols


def _settings(df: pd.DataFrame, cols: Sequence[str]) -> pd.Series:
    """``key=value; ...`` per row (a sweep column ``sweep.<label>.<param>`` is named by its last part)."""
    parts = []
    for c in cols:
        name = c.split(".")[-1]
        vals = df[c].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else
                         f"{name}={_fmt_value(v)}")
        parts.append(vals)
    if not parts:
        return pd.Series([""] * len(df), index=df.index)
    out = []
    for row in zip(*parts):
        out.append("; ".join(p for p in row if isinstance(p, str) and p))  # map() may turn None into NaN
    return pd.Series(out, index=df.index)


def summarize_rows(df: pd.DataFrame) -> pd.DataFrame:
    """``method, setting, metric, mean, sem, n`` from a results frame (:func:`editlens.report.tables.results_frame`
    of one run): one row per method label, setting and ``probe_kind/metric`` column."""
    if df.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    work = pd.DataFrame({"method": df["method_label"].astype(str), "setting": _settings(df, _setting_columns(df)),
                         "metric": df["column"].astype(str), "value": pd.to_numeric(df["value"], errors="coerce")})
    return _aggregate(work)


def _aggregate(work: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (m, s, c), g in work.groupby(["method", "setting", "metric"], sort=False):
        v = g["value"].to_numpy(dtype=float)
        v = v[~np.isnan(v)]
        n = int(v.size)
        mean = float(np.mean(v)) if n else math.nan
        sem = float(stats.sem(v)) if n > 1 else math.nan  # sample std (ddof 1) / sqrt(n)
        out.append({"method": m, "setting": s, "metric": c, "mean": mean, "sem": sem, "n": n})
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


SPEC_KINDS = ("neighborhood", "locality")  #: the specificity probe kinds (CounterFact / zsRE)


def table1_split(df: pd.DataFrame, *, judge: str = "ar_contains",
                 metrics: Sequence[str] = ("s_acc", "t_acc", "c_acc")) -> pd.DataFrame:
    """The edit-locality paper's Table 1 on the pre-edit units (method ``none``): per dataset and specificity probe
    kind, each case is ``yes`` when the unedited model's greedy answer agrees with the ground truth on all its
    probes of the kind (``judge`` = 1), ``no`` when on none (0), ``mixed`` otherwise; returns ``dataset,
    probe_kind, base_agrees, share, metric, mean, sem, n`` (``share``: fraction of the kind's cases in the part)."""
    cols = ["dataset", "probe_kind", "base_agrees", "share", "metric", "mean", "sem", "n"]
    pre = df[(df["method"].astype(str).str.lower() == "none") & df["probe_kind"].isin(SPEC_KINDS)]
    if pre.empty or "dataset" not in pre.columns:
        return pd.DataFrame(columns=cols)
    out = []
    for (ds, kind), g in pre.groupby(["dataset", "probe_kind"], sort=False):
        j = g[g["metric"] == judge].set_index("case_id")["value"].astype(float)
        j = j[~j.isna()]
        if j.empty:
            continue
        part = j.map(lambda v: "yes" if v == 1.0 else ("no" if v == 0.0 else "mixed"))
        for name in ("yes", "no", "mixed"):
            ids = set(part.index[part == name])
            if not ids:
                continue
            for m in metrics:
                v = g[(g["metric"] == m) & g["case_id"].isin(ids)]["value"].to_numpy(dtype=float)
                v = v[~np.isnan(v)]
                if not v.size:
                    continue
                out.append({"dataset": ds, "probe_kind": kind, "base_agrees": name, "share": len(ids) / len(j),
                            "metric": m, "mean": float(np.mean(v)),
                            "sem": float(stats.sem(v)) if v.size > 1 else math.nan, "n": int(v.size)})
    return pd.DataFrame(out, columns=cols)


def table1_summary_rows(split: pd.DataFrame) -> pd.DataFrame:
    """Table 1's parts as summary.csv rows (method ``none``, setting ``dataset=...; base_agrees=...``)."""
    if split.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    return pd.DataFrame({"method": "none",
                         "setting": "dataset=" + split["dataset"].astype(str) + "; base_agrees="
                                    + split["base_agrees"].astype(str),
                         "metric": split["probe_kind"].astype(str) + "/" + split["metric"].astype(str),
                         "mean": split["mean"], "sem": split["sem"], "n": split["n"]})[SUMMARY_COLUMNS]


#: Table 4's metric groups: target knowledge, GT-based and GT-free specificity
TABLE4_GROUPS = {
    "target knowledge": ["rewrite/t_acc", "paraphrase/t_acc"],
    "GT-based specificity": ["specificity/s_acc", "specificity/gt_acc"],
    "GT-free specificity": ["specificity/kl", "specificity/topk@1", "specificity/topk@5", "specificity/topk@10"],
}


def rank_stability_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Table 4 (bottom): ``metric, group, tau, n_pairs, n_methods`` plus one ``Average`` row per group; each unit's
    last step; the pre-edit row counts as a method, as in the paper."""
    from editlens.evaluate.meta import group_average, rank_stability
    from editlens.report.tables import final_rows

    cols = ["metric", "group", "tau", "n_pairs", "n_methods"]
    df = final_rows(df)
    if "dataset" not in df.columns or df["dataset"].nunique() < 2:
        return pd.DataFrame(columns=cols)
    kind = df["probe_kind"].where(~df["probe_kind"].isin(SPEC_KINDS), "specificity")
    metric = df["metric"].astype(str)
    # the paper's one GT-based accuracy column: C-acc where the data is counterfactual, T-acc on zsRE (no foil)
    is_zsre_t = (df["probe_kind"] == "locality") & (metric == "t_acc")
    is_cf_c = (df["probe_kind"] == "neighborhood") & (metric == "c_acc")
    metric = metric.where(~(is_zsre_t | is_cf_c), "gt_acc")
    tidy = pd.DataFrame({"method": df["method_label"].astype(str), "dataset": df["dataset"].astype(str),
                         "metric": kind.astype(str) + "/" + metric, "value": df["value"].astype(float)})
    wanted = [m for ms in TABLE4_GROUPS.values() for m in ms]
    tidy = tidy[tidy["metric"].isin(wanted)]
    if tidy.empty:
        return pd.DataFrame(columns=cols)
    per_case = tidy.groupby(["method", "dataset", "metric"], as_index=False)["value"].mean()
    res = rank_stability(per_case)
    group_of = {m: g for g, ms in TABLE4_GROUPS.items() for m in ms}
    res.insert(1, "group", res["metric"].map(group_of))
    res["order"] = res["metric"].map({m: i for i, m in enumerate(wanted)})
    res = res.sort_values("order").drop(columns="order")
    avg = group_average(res, {g: ms for g, ms in TABLE4_GROUPS.items()})
    avg_rows = pd.DataFrame({"metric": "Average", "group": avg["group"], "tau": avg["value"],
                             "n_pairs": np.nan, "n_methods": np.nan})
    return pd.concat([res[cols], avg_rows[cols]], ignore_index=True)


@dataclass
class SpecResult:
    """What :func:`process_spec` found and wrote for one spec."""

    spec: str
    store: Path
    exists: bool
    run_id: str | None = None
    summary: pd.DataFrame | None = None
    extras: dict[str, pd.DataFrame] = field(default_factory=dict)
    store_bytes: int = 0
    units_done: int = 0  #: units of the run marked done in the store
    units_planned: int = 0  #: units the spec plans now


def process_spec(spec_path: Path, results_dir: Path, *, report: bool = True,
                 store: Path | None = None) -> SpecResult:
    """Write ``results_dir/<spec name>/`` for one spec whose store exists (see the module docstring)."""
    from editlens.report.html import build_report
    from editlens.report.tables import results_frame
    from editlens.runs.spec import load_spec
    from editlens.runs.store import Store

    spec = load_spec(spec_path)
    name = spec.name or spec_path.stem
    store = Path(store) if store is not None else spec_store(spec_path)
    res = SpecResult(name, store, store.is_file())
    if not res.exists:
        return res
    res.store_bytes = store.stat().st_size
    with Store(store, readonly=True) as st:
        ids = st.run_ids()
        if not ids:
            res.exists = False
            return res
        res.run_id = ids[-1]  # the latest run, as the report shows it (runs are never pooled)
        units = st.units(res.run_id)
        res.units_done = int((units["status"] == "done").sum()) if len(units) else 0
        res.units_planned = len(spec.plan())
        df = results_frame(st, res.run_id)
        out = results_dir / name
        out.mkdir(parents=True, exist_ok=True)
        summary = summarize_rows(df)
        if name == "repro_specificity":
            split = table1_split(df)
            res.extras["table1_split.csv"] = split
            res.extras["rank_stability.csv"] = rank_stability_rows(df)
            summary = pd.concat([summary, table1_summary_rows(split)], ignore_index=True)
        res.summary = summary
        summary.to_csv(out / "summary.csv", index=False, float_format="%.6g")
        for fname, frame in res.extras.items():
            frame.to_csv(out / fname, index=False, float_format="%.6g")
        if report:
            build_report(st, run_id=res.run_id).write_dir(out / "report")
    return res


# ============================================================================================ rendering
def load_verdicts(path: Path) -> dict[str, dict[str, str]]:
    """``results/verdicts.toml``: ``[<experiment key>]`` tables with ``verdict`` (agree | partly | disagree) and
    ``reason``. A missing file is no verdicts; a bad entry is an error naming it."""
    if not path.is_file():
        return {}
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    keys = {e.key for e in EXPERIMENTS}
    out = {}
    for k, v in data.items():
        if k not in keys:
            raise SystemExit(f"{path}: [{k}]: unknown experiment; known: {', '.join(sorted(keys))}")
        if not isinstance(v, dict) or v.get("verdict") not in VERDICTS or not str(v.get("reason", "")).strip():
            raise SystemExit(f"{path}: [{k}]: needs verdict = one of {', '.join(VERDICTS)} and a non-empty reason")
        if "summary" in v and not (isinstance(v["summary"], str) and v["summary"].strip()):
            raise SystemExit(f"{path}: [{k}]: summary, when given, must be a non-empty string")
        out[k] = {"verdict": str(v["verdict"]), "reason": str(v["reason"]).strip()}
        if "summary" in v:
            out[k]["summary"] = v["summary"].strip()
    return out


def _short_reason(v: dict[str, str]) -> str:
    """The overview tables' reason: the verdict's one-line ``summary`` when it has one, else its ``reason`` (the
    full reason is always in the experiment's section of the docs)."""
    return v.get("summary") or v["reason"]


def _incomplete(ran: Sequence["SpecResult"]) -> bool:
    return any(r.units_done < r.units_planned for r in ran)


def _cell(mean: float, sem: float, n: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    s = f"{mean:.3g}"
    if sem is not None and not (isinstance(sem, float) and math.isnan(sem)):
        s += f" ± {sem:.2g}"
    return s + f" (n={int(n)})"


def _md_escape(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _match(pattern: str, metric: str) -> bool:
    return re.fullmatch(re.escape(pattern).replace("\\*", ".*"), metric) is not None


def _headline_table(summary: pd.DataFrame, patterns: Sequence[str]) -> str:
    cols = []
    for p in patterns:
        cols += [m for m in dict.fromkeys(summary["metric"]) if _match(p, m) and m not in cols]
    sub = summary[summary["metric"].isin(cols)]
    if sub.empty:
        return "_none of this experiment's headline metrics in the store_\n"
    rows = list(dict.fromkeys(zip(sub["method"], sub["setting"])))
    cols = [c for c in cols if (sub["metric"] == c).any()]
    idx = {(r.method, r.setting, r.metric): r for r in sub.itertuples(index=False)}
    lines = ["| method | setting | " + " | ".join(_md_escape(c) for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for m, s in rows:
        cells = []
        for c in cols:
            r = idx.get((m, s, c))
            cells.append(_cell(r.mean, r.sem, r.n) if r is not None else "")
        lines.append(f"| {_md_escape(m)} | {_md_escape(s)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _frame_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_empty_\n"
    lines = ["| " + " | ".join(_md_escape(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_md_escape(f"{v:.3g}" if isinstance(v, float) and not math.isnan(v)
                                                  else ("–" if isinstance(v, float) else v)) for v in row) + " |")
    return "\n".join(lines) + "\n"


def our_figure(exp: Experiment, found: Sequence[SpecResult]) -> str:
    """The compact "our figure" of an experiment (README and the docs' overview)."""
    summaries = [r.summary for r in found if r.summary is not None]
    if not summaries:
        return "not run yet"
    if exp.key == "specificity":
        for r in found:
            rs = r.extras.get("rank_stability.csv")
            if rs is not None and not rs.empty:
                avg = rs[rs["metric"] == "Average"]
                parts = [f"{g}: {t:.2f}" for g, t in zip(avg["group"], avg["tau"]) if not math.isnan(t)]
                if parts:
                    return "rank stability τ " + ", ".join(parts)
        return "see the tables"
    metric, setting = exp.figure
    s = pd.concat(summaries, ignore_index=True)
    # a boolean Series, not a list: an empty list would select no *columns* (a summary with no rows yet)
    s = s[s["metric"].map(lambda m: _match(metric, str(m))).astype(bool)]
    if setting:
        s = s[s["setting"].str.contains(re.escape(setting))]
    if s.empty:
        return "see the tables"
    per = s.groupby("method", sort=False)["mean"].mean()
    label = metric.replace("*", "")
    return f"{label}{' at ' + setting if setting else ''}: " + ", ".join(f"{m} {v:.2f}" for m, v in per.items())


def render_docs(found: dict[str, list[SpecResult]], verdicts: dict[str, dict[str, str]], *,
                results_rel: str = "../results", examples_rel: str = "../examples") -> str:
    """The text of docs/reproductions.md."""
    out = ["<!-- generated by scripts/repro_results.py from results/*/summary.csv and results/verdicts.toml; "
           "do not edit: edit the script or the verdicts and run it again -->",
           "# Reproducing the papers",
           "",
           "Each headline experiment of the five papers behind editlens as a spec anyone can run, our figures read "
           "from the committed `results/<spec>/summary.csv` (mean ± SEM over cases (and seeds), n = rows), and a "
           "verdict with its reason written by a person in `results/verdicts.toml`. Regenerate with "
           "`python scripts/repro_results.py` after a run; the full report of every run is in "
           "`results/<spec>/report/index.md`.",
           "",
           "| # | experiment | spec(s) | our figure | verdict | reason |",
           "|---|---|---|---|---|---|"]
    for e in EXPERIMENTS:
        ran = [r for r in found.get(e.key, []) if r.exists]
        v = verdicts.get(e.key)
        verdict = v["verdict"] if v else ("not run yet" if not ran else "no verdict yet")
        reason = _short_reason(v) if v else ""
        if _incomplete(ran):
            verdict += " (run incomplete)"
        specs = ", ".join(f"[{s}]({examples_rel}/{s}.toml)" for s in e.specs)
        out.append(f"| {e.number} | {_md_escape(e.title)} | {specs} | {_md_escape(our_figure(e, ran))} | "
                   f"{verdict} | {_md_escape(reason)} |")
    out.append("")
    for e in EXPERIMENTS:
        out += [f"## {e.number}. {e.title}", "", f"**Paper:** {e.paper}", "", f"**Claim:** {e.claim}", ""]
        v = verdicts.get(e.key)
        if v:
            out += [f"**Verdict:** {v['verdict']} — {v['reason']}", ""]
        for r in found.get(e.key, []):
            out.append(f"### `{r.spec}` ([spec]({examples_rel}/{r.spec}.toml))")
            out.append("")
            if not r.exists or r.summary is None:
                out += [f"Not run yet (no store at `{_rel(r.store)}`).", ""]
                continue
            done = (f"all {r.units_planned} units done" if r.units_done >= r.units_planned else
                    f"**incomplete: {r.units_done} of {r.units_planned} units done** (a partial unit's checkpoints "
                    "are shown)")
            out += [f"Run `{r.run_id}` ({done}); [summary.csv]({results_rel}/{r.spec}/summary.csv), "
                    f"[report]({results_rel}/{r.spec}/report/index.md).", ""]
            out.append(_headline_table(r.summary, e.headline))
            for fname, frame in r.extras.items():
                out += [f"`{fname}`:", "", _frame_table(frame)]
    return "\n".join(out).rstrip() + "\n"


def render_readme_table(found: dict[str, list[SpecResult]], verdicts: dict[str, dict[str, str]]) -> str:
    """The compact README table (between the markers)."""
    lines = ["| # | experiment | paper | spec | our figure | verdict |", "|---|---|---|---|---|---|"]
    for e in EXPERIMENTS:
        ran = [r for r in found.get(e.key, []) if r.exists]
        v = verdicts.get(e.key)
        verdict = (f"{v['verdict']}: {_short_reason(v)}" if v else ("not run yet" if not ran else "no verdict yet"))
        if _incomplete(ran):
            verdict += " (run incomplete)"
        specs = ", ".join(f"[{s}](examples/{s}.toml)" for s in e.specs)
        lines.append(f"| {e.number} | {_md_escape(e.title)} | {_md_escape(e.paper)} | {specs} | "
                     f"{_md_escape(our_figure(e, ran))} | {_md_escape(verdict)} |")
    return ("_Generated by `scripts/repro_results.py --readme` from `results/`; details in "
            "[docs/reproductions.md](docs/reproductions.md)._\n\n" + "\n".join(lines) + "\n")


def replace_between_markers(text: str, body: str) -> str | None:
    """``text`` with everything between the markers replaced by ``body``; ``None`` when a marker is missing."""
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < 0 or j < i:
        return None
    return text[:i + len(BEGIN)] + "\n" + body + text[j:]


def _rel(p: Path) -> str:
    try:
        return Path(p).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(p)


#: specs reused from the README's examples, whose committed store is the one scripts/example_results.py reads
#: (``results/examples/<stem>/store.sqlite``, run with ``--store``: docs/experiments.md) rather than the spec's
#: default store beside it; used when that file exists under the results folder
COMMITTED_STORES = {"locality_sweep": Path("examples") / "locality_sweep" / "store.sqlite"}


def collect(examples: Path, results: Path, *, report: bool = True,
            experiments: Sequence[Experiment] = EXPERIMENTS) -> dict[str, list[SpecResult]]:
    """Process every spec of ``experiments`` found under ``examples`` (a reused example spec's committed store,
    :data:`COMMITTED_STORES`, when it exists)."""
    found: dict[str, list[SpecResult]] = {}
    for e in experiments:
        for s in e.specs:
            path = examples / f"{s}.toml"
            if not path.is_file():
                found.setdefault(e.key, []).append(SpecResult(s, path, False))
                continue
            committed = results / COMMITTED_STORES[s] if s in COMMITTED_STORES else None
            store = committed if committed is not None and committed.is_file() else None
            found.setdefault(e.key, []).append(process_spec(path, results, report=report, store=store))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=Path, default=REPO / "examples")
    ap.add_argument("--results", type=Path, default=REPO / "results")
    ap.add_argument("--docs", type=Path, default=REPO / "docs" / "reproductions.md")
    ap.add_argument("--verdicts", type=Path, default=None, help="default: <results>/verdicts.toml")
    ap.add_argument("--readme", nargs="?", const=REPO / "README.md", type=Path, default=None,
                    help="also write the compact table between the repro markers of README.md (or this file)")
    ap.add_argument("--no-report", action="store_true", help="skip the Markdown reports (faster)")
    a = ap.parse_args(argv)
    verdicts = load_verdicts(a.verdicts or a.results / "verdicts.toml")
    readme_text = None
    if a.readme is not None:  # check the markers before any work
        readme_text = a.readme.read_text(encoding="utf-8") if a.readme.is_file() else ""
        if replace_between_markers(readme_text, "") is None:
            print(f"{a.readme}: the markers {BEGIN} and {END} are missing (add them where the table goes)",
                  file=sys.stderr)
            return 1
    found = collect(a.examples, a.results, report=not a.no_report)
    for key, rs in found.items():
        for r in rs:
            if r.exists:
                mb = r.store_bytes / 2**20
                print(f"{r.spec}: run {r.run_id}, {0 if r.summary is None else len(r.summary)} summary rows -> "
                      f"{_rel(a.results / r.spec)}; store {_rel(r.store)} {mb:.1f} MB"
                      + (" (small enough to commit)" if mb < 5 else " (too large to commit)"))
            else:
                print(f"{r.spec}: not run yet (no store at {_rel(r.store)})")
    a.docs.parent.mkdir(parents=True, exist_ok=True)
    a.docs.write_text(render_docs(found, verdicts), encoding="utf-8")
    print(f"wrote {_rel(a.docs)}")
    if readme_text is not None:
        a.readme.write_text(replace_between_markers(readme_text, render_readme_table(found, verdicts)),
                            encoding="utf-8")
        print(f"wrote the reproduction table into {_rel(a.readme)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
