"""The README's example tables ("What the examples show"), generated from the stores of the three example specs.

    python scripts/example_results.py            # results/examples/<stem>/summary.csv, table.md (+ sensitivity.csv)
    python scripts/example_results.py --readme   # also the tables between the example markers of README.md

The lead runs the specs into ``results/examples/<stem>/store.sqlite``::

    editlens bench examples/locality_sweep.toml --store results/examples/locality_sweep/store.sqlite
    editlens bench examples/tf_vs_ar.toml --store results/examples/tf_vs_ar/store.sqlite
    editlens bench examples/sequential.toml --store results/examples/sequential/store.sqlite

For every one of :data:`EXAMPLES` whose store exists, the latest run of the store (runs are never pooled) gives:

* ``summary.csv`` -- ``method, setting, metric, mean, sem, n`` exactly as ``scripts/repro_results.py`` writes it
  (its :func:`summarize_rows`: ``setting`` = dataset, swept values and number of edits, every sequential
  checkpoint and the unedited step 0 a setting of its own; ``sem`` = ``scipy.stats.sem``, NaN for n = 1; NaN
  values left out);
* ``table.md`` -- the README's table (the block that goes between ``<!-- example-<x>:begin -->`` and
  ``<!-- example-<x>:end -->``), cells ``mean ± s.e.`` over the rows (cases, seeds) formatted ``.312 ± .162``
  (two decimals from 10 on: perplexity), the mean alone when n = 1, "—" when the store has no such value:

  (a) ``locality_sweep``: dataset × swept value (+ ``unedited`` when the run has a ``none`` unit); neighbourhood
      ``s_acc``, ``c_acc``, ``kl``, ``topk@5`` and rewrite ``c_acc``. Under it, the sensitivity to the regulariser:
      per dataset and neighbourhood metric Kendall's τ-b of the metric's mean against the mean ‖Δk‖ (diagnostic
      ``delta_k_mean`` of the units) over the sweep points and coverage = (max − min) / the metric's theoretical
      range (none for KL), computed by the report's :func:`editlens.report.tables.sensitivity_table`
      (:func:`editlens.evaluate.meta.sensitivity`): as in the edit-locality paper the unedited model is one more
      point (‖Δk‖ = 0) when the run has a ``none`` unit. Also written to ``sensitivity.csv``.
  (b) ``tf_vs_ar``: dataset × method; rewrite ``t_acc``, ``ar_em``, paraphrase ``t_acc``, ``ar_em``,
      ``tf_ar_gap``.
  (c) ``sequential``: the unedited model at step 0 (one row when every unit's step 0 gives the same cells, else
      one per method), then per method its checkpoints (read from the store) with the means at each joined by
      " / "; rewrite ``t_acc``, ``ar_em``, paraphrase ``t_acc``, neighbourhood ``kl``, ``ppl``, factual QA
      (``downstream_acc@factual_qa``); a line under it gives the range of the checkpoint cells' s.e.

``--readme`` (README.md, or ``--readme-path``) first checks that every marker pair is there (exit 1 naming the
missing one, nothing written), then replaces what is between the markers of each example whose store exists;
nothing else in the file changes.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repro_results import _aggregate, summarize_rows  # noqa: E402  (the same summary.csv as the reproductions)

REPO = Path(__file__).resolve().parents[1]

#: display names of the methods and datasets of the example specs (others are shown as stored)
METHOD_NAMES = {"rome": "ROME", "r-rome": "R-ROME", "memit": "MEMIT", "alphaedit": "AlphaEdit", "ft-m": "FT-M",
                "ft-l": "FT-L", "scr": "SCR", "none": "unedited", "pre-edit": "unedited"}
DATASET_NAMES = {"counterfact": "CounterFact", "zsre": "zsRE"}
MISSING = "—"


@dataclass(frozen=True)
class Example:
    key: str  #: the README markers: <!-- example-<key>:begin --> / <!-- example-<key>:end -->
    stem: str  #: examples/<stem>.toml, results/examples/<stem>/

    @property
    def begin(self) -> str:
        return f"<!-- example-{self.key}:begin -->"

    @property
    def end(self) -> str:
        return f"<!-- example-{self.key}:end -->"


EXAMPLES = (Example("a", "locality_sweep"), Example("b", "tf_vs_ar"), Example("c", "sequential"))

#: (header, ``probe_kind/metric`` column) of each table
COLUMNS_A = (("`s_acc`", "neighborhood/s_acc"), ("`c_acc`", "neighborhood/c_acc"), ("`kl`", "neighborhood/kl"),
             ("`topk@5`", "neighborhood/topk@5"), ("rewrite `c_acc`", "rewrite/c_acc"))
COLUMNS_B = (("rewrite `t_acc`", "rewrite/t_acc"), ("rewrite `ar_em`", "rewrite/ar_em"),
             ("paraphrase `t_acc`", "paraphrase/t_acc"), ("paraphrase `ar_em`", "paraphrase/ar_em"),
             ("paraphrase `tf_ar_gap`", "paraphrase/tf_ar_gap"))
COLUMNS_C = (("rewrite `t_acc`", "rewrite/t_acc"), ("rewrite `ar_em`", "rewrite/ar_em"),
             ("paraphrase `t_acc`", "paraphrase/t_acc"), ("neighbourhood `kl`", "neighborhood/kl"),
             ("`ppl`", "general/ppl"), ("factual QA", "general/downstream_acc@factual_qa"))
SENSITIVITY_COLUMNS = ["dataset", "method", "axis", "metric", "reference", "n_points", "tau", "p_value", "min", "max",
                       "coverage"]


# ============================================================================================ formatting
def fmt_num(x: float, digits: int = 3) -> str:
    """``.312``, ``1.000``, ``−.056`` (``digits`` decimals, no leading zero); two decimals from 10 on (``34.85``);
    "—" for NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    x = float(x)
    s = f"{abs(x):.2f}" if abs(x) >= 10 else f"{abs(x):.{digits}f}"
    if s.startswith("0."):
        s = s[1:]
    return ("−" if x < 0 and s.strip("0.") else "") + s


def fmt_cell(mean: float, sem: float, n: int) -> str:
    """``mean ± sem``; the mean alone when the s.e. is undefined (n = 1); "—" when there is no value."""
    if not n or math.isnan(mean):
        return MISSING
    if sem is None or math.isnan(sem):
        return fmt_num(mean)
    return f"{fmt_num(mean)} ± {fmt_num(sem)}"


def fmt_sci(v: float) -> str:
    """``1.5e2`` for 150.0, ``1e4`` for 10000.0; small plain numbers as they are (``0.5``, ``10``)."""
    v = float(v)
    if v == 0 or 0.01 <= abs(v) < 100:
        return f"{v:g}"
    m, e = f"{v:e}".split("e")
    m = m.rstrip("0").rstrip(".")
    return f"{m}e{int(e)}"


def _name(v: Any, names: dict[str, str]) -> str:
    s = str(v)
    return names.get(s.lower(), s)


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return "\n".join([_md_row(header), "|" + "---|" * len(header)] + [_md_row(r) for r in rows]) + "\n"


# ============================================================================================ cells
def stat(df: pd.DataFrame, column: str) -> tuple[float, float, int]:
    """Mean, s.e. and n of one ``probe_kind/metric`` column over the rows of ``df`` (NaN rows left out), the
    aggregation of summary.csv (:func:`repro_results._aggregate`)."""
    sub = df[df["column"] == column]
    if sub.empty:
        return math.nan, math.nan, 0
    r = _aggregate(pd.DataFrame({"method": "", "setting": "", "metric": column, "value": sub["value"]})).iloc[0]
    return float(r["mean"]), float(r["sem"]), int(r["n"])


def _cell(df: pd.DataFrame, column: str) -> str:
    return fmt_cell(*stat(df, column))


def _in_order(s: pd.Series) -> list[Any]:
    return list(dict.fromkeys(s.dropna().tolist()))


def _is_baseline(df: pd.DataFrame) -> pd.Series:
    from editlens.report.tables import BASELINE_METHODS

    mask = df["method_label"].astype(str).str.lower().isin(BASELINE_METHODS)
    if "method" in df.columns:
        mask |= df["method"].astype(str).str.lower().isin(BASELINE_METHODS)
    return mask


def _datasets(df: pd.DataFrame) -> list[Any]:
    return _in_order(df["dataset"]) if "dataset" in df.columns else [None]


def _of_dataset(df: pd.DataFrame, ds: Any) -> pd.DataFrame:
    return df if ds is None else df[df["dataset"] == ds]


def _sweep_cols(df: pd.DataFrame) -> list[str]:
    from editlens.report.tables import sweep_columns

    return sweep_columns(df)


def _default_of(axis: str) -> Any:
    """The default of a swept hyperparameter ``<method>.<param>`` (its HParams class field), or ``None``."""
    try:
        from editlens.edit.base import get_method

        method, param = axis.split(".", 1)
        for f in dataclasses.fields(get_method(method).hparams_class):
            if f.name == param and f.default is not dataclasses.MISSING:
                return f.default
    except Exception:  # an unknown method or parameter: no annotation
        return None
    return None


def _axis_header(axis: str) -> str:
    return "λ" if axis.endswith("mom2_update_weight") else f"`{axis.split('.')[-1]}`"


# ============================================================================================ tables
def table_a(df: pd.DataFrame, sens: pd.DataFrame | None = None) -> str:
    """(a) dataset × swept value (+ unedited), then the sensitivity line."""
    from editlens.report.tables import final_rows

    df = final_rows(df)
    axes = _sweep_cols(df)
    base = _is_baseline(df)
    labels = _in_order(df.loc[~base, "method_label"])
    head = ["dataset", " / ".join(_axis_header(a[len("sweep."):]) for a in axes) or "setting"]
    rows = []
    for ds in _datasets(df):
        d = _of_dataset(df, ds)
        dname = _name(ds, DATASET_NAMES) if ds is not None else "all"
        for lab in labels:
            dl = d[(d["method_label"] == lab) & ~base.loc[d.index]]
            points = dl[axes].drop_duplicates() if axes else pd.DataFrame(index=[0])
            if axes:
                points = points.sort_values(axes, kind="stable", na_position="last")
            for _, p in points.iterrows():
                sel = dl
                parts = []
                for a in axes:
                    v = p[a]
                    sel = sel[sel[a].isna()] if pd.isna(v) else sel[sel[a] == v]
                    if pd.isna(v):
                        parts.append("(unswept)")
                        continue
                    txt = fmt_sci(v) if isinstance(v, (int, float)) else str(v)
                    dflt = _default_of(a[len("sweep."):])
                    if dflt is not None and isinstance(v, (int, float)) and float(v) == float(dflt):
                        txt += " (papers' default)"
                    parts.append(txt)
                setting = ", ".join(parts) or "—"
                if len(labels) > 1:
                    setting = f"{_name(lab, METHOD_NAMES)} {setting}"
                rows.append([dname, setting] + [_cell(sel, c) for _, c in COLUMNS_A])
        ub = d[base.loc[d.index]]
        if len(ub):
            rows.append([dname, "unedited"] + [_cell(ub, c) for _, c in COLUMNS_A])
    out = _md_table(head + [h for h, _ in COLUMNS_A], rows)
    if sens is not None:
        out += "\n" + sensitivity_text(sens) + "\n"
    return out


def sensitivity_rows(df: pd.DataFrame, diagnostics: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and neighbourhood metric: τ of the metric's mean against the mean ‖Δk‖ over the sweep points
    (the report's :func:`~editlens.report.tables.sensitivity_table`; the swept value when no unit recorded
    ``delta_k_mean``), with the coverage of the metric's range."""
    from editlens.report.tables import sensitivity_table

    s = sensitivity_table(df, diagnostics=diagnostics, reference="auto")
    if s.empty:
        return pd.DataFrame(columns=SENSITIVITY_COLUMNS)
    s = s[s["metric"].astype(str).str.startswith("neighborhood/")].copy()
    if "dataset" not in s.columns:
        s["dataset"] = None
    return s[SENSITIVITY_COLUMNS].reset_index(drop=True)


def sensitivity_text(sens: pd.DataFrame) -> str:
    """The line under table (a): τ (and coverage) of the table's neighbourhood columns per dataset."""
    if sens is None or sens.empty:
        return "_Sensitivity to the regulariser: the run has no sweep to correlate with._"
    shown = [c for _, c in COLUMNS_A if c.startswith("neighborhood/")]
    ref = "the mean ‖Δk‖ (diagnostic `delta_k_mean`)" if (sens["reference"] == "delta_k").all() else \
        "the swept value (no `delta_k_mean` diagnostic in the store)"
    parts = []
    for ds in _in_order(sens["dataset"]) or [None]:
        g = sens if ds is None else sens[sens["dataset"] == ds]
        cells = []
        for c in shown:
            r = g[g["metric"] == c]
            if r.empty:
                cells.append(f"`{c.split('/')[1]}` {MISSING}")
                continue
            r = r.iloc[0]
            tau = "τ n/a (constant)" if math.isnan(r["tau"]) else f"τ = {fmt_num(r['tau'], 2)}"
            cov = "" if math.isnan(r["coverage"]) else f" (coverage {fmt_num(r['coverage'], 2)})"
            cells.append(f"`{c.split('/')[1]}` {tau}{cov}")
        n = int(g["n_points"].max()) if len(g) else 0
        parts.append(f"{_name(ds, DATASET_NAMES) if ds is not None else 'all'} ({n} points): " + ", ".join(cells))
    return ("Sensitivity to the regulariser (Kendall's τ-b of the neighbourhood mean against " + ref +
            " over the sweep points, the unedited model included as ‖Δk‖ = 0 where the run has it; coverage = "
            "share of the metric's range the sweep spans): " + "; ".join(parts) + ".")


def table_b(df: pd.DataFrame) -> str:
    """(b) dataset × method (each unit's final step; the number of edits is shown when it varies)."""
    from editlens.report.tables import final_rows

    df = final_rows(df)
    sizes = _in_order(df["n_edits"]) if "n_edits" in df.columns else []
    rows = []
    for ds in _datasets(df):
        d = _of_dataset(df, ds)
        for lab in _in_order(d["method_label"]):
            dl = d[d["method_label"] == lab]
            for size in (_in_order(dl["n_edits"]) if len(sizes) > 1 else [None]):
                sel = dl if size is None else dl[dl["n_edits"] == size]
                dname = _name(ds, DATASET_NAMES) if ds is not None else "all"
                if size is not None:
                    dname += f" ({size} edits)"
                rows.append([_name(lab, METHOD_NAMES), dname] + [_cell(sel, c) for _, c in COLUMNS_B])
    return _md_table(["method", "dataset"] + [h for h, _ in COLUMNS_B], rows)


def table_c(df: pd.DataFrame) -> str:
    """(c) the unedited step 0, then per method (and dataset, when several) its checkpoints joined by " / "."""
    n_edits = pd.to_numeric(df["n_edits"], errors="coerce")
    datasets = _datasets(df)
    rows = []
    # step 0: the unedited model, evaluated by every unit; one row when they all give the same cells
    zero = df[n_edits == 0]
    per_unit = []
    for ds in datasets:
        z = _of_dataset(zero, ds)
        for lab in _in_order(z["method_label"]):
            cells = [_cell(z[z["method_label"] == lab], c) for _, c in COLUMNS_C]
            per_unit.append((ds, lab, cells))
    if per_unit and len({tuple(c) for _, _, c in per_unit}) == 1:
        lab = "(all, unedited)" if len(datasets) == 1 else f"(all, unedited; {len(datasets)} datasets)"
        rows.append([lab, "0"] + per_unit[0][2])
    else:
        for ds, lab, cells in per_unit:
            where = f", {_name(ds, DATASET_NAMES)}" if len(datasets) > 1 else ""
            name = _name(lab, METHOD_NAMES)
            name = f"unedited{where}" if name == "unedited" else f"{name} (unedited{where})"
            rows.append([name, "0"] + cells)
    sems: dict[str, list[float]] = {c: [] for _, c in COLUMNS_C}
    for ds in datasets:
        d = _of_dataset(df, ds)
        ne = pd.to_numeric(d["n_edits"], errors="coerce")
        for lab in _in_order(d["method_label"]):
            dl = d[(d["method_label"] == lab) & (ne > 0)]
            cps = sorted(int(v) for v in pd.to_numeric(dl["n_edits"], errors="coerce").dropna().unique())
            if not cps:
                continue  # e.g. the `none` unit: step 0 only
            cells = []
            for _, c in COLUMNS_C:
                parts = []
                for k in cps:
                    mean, sem, n = stat(dl[pd.to_numeric(dl["n_edits"], errors="coerce") == k], c)
                    parts.append(fmt_num(mean) if n else MISSING)
                    if n and not math.isnan(sem):
                        sems[c].append(sem)
                cells.append(" / ".join(parts))
            name = _name(lab, METHOD_NAMES) + (f" ({_name(ds, DATASET_NAMES)})" if len(datasets) > 1 else "")
            rows.append([name, " / ".join(str(k) for k in cps)] + cells)
    out = _md_table(["method", "edits"] + [h for h, _ in COLUMNS_C], rows)
    ranges = [f"{h} {fmt_num(min(v))}–{fmt_num(max(v))}" for h, c in COLUMNS_C if (v := sems[c])]
    if ranges:
        out += "\n_Checkpoint cells are means; their s.e. over the evaluated cases: " + ", ".join(ranges) + "._\n"
    return out


TABLES: dict[str, Callable[..., str]] = {"locality_sweep": table_a, "tf_vs_ar": table_b, "sequential": table_c}


# ============================================================================================ one store
@dataclass
class ExampleResult:
    example: Example
    store: Path
    exists: bool
    run_id: str | None = None
    summary: pd.DataFrame | None = None
    sensitivity: pd.DataFrame | None = None
    table: str = ""


def process_example(ex: Example, results: Path) -> ExampleResult:
    """Read the latest run of ``results/<stem>/store.sqlite`` and write summary.csv, table.md (and
    sensitivity.csv for (a)) beside it. A missing store (or one without a run) is reported, not an error."""
    from editlens.report.tables import results_frame
    from editlens.runs.store import Store

    folder = results / ex.stem
    store = folder / "store.sqlite"
    res = ExampleResult(ex, store, store.is_file())
    if not res.exists:
        return res
    with Store(store, readonly=True) as st:
        ids = st.run_ids()
        if not ids:
            res.exists = False
            return res
        res.run_id = ids[-1]  # the latest run (runs are never pooled)
        df = results_frame(st, res.run_id)
        diags = st.diagnostics(res.run_id)
    res.summary = summarize_rows(df)
    if ex.stem == "locality_sweep":
        res.sensitivity = sensitivity_rows(df, diags)
        body = table_a(df, res.sensitivity)
    else:
        body = TABLES[ex.stem](df)
    res.table = (body + f"\n_Generated by `scripts/example_results.py` from `results/examples/{ex.stem}/` "
                 f"(run `{res.run_id}`)._\n")
    res.summary.to_csv(folder / "summary.csv", index=False, float_format="%.6g")
    if res.sensitivity is not None:
        res.sensitivity.to_csv(folder / "sensitivity.csv", index=False, float_format="%.6g")
    (folder / "table.md").write_text(res.table, encoding="utf-8")
    return res


# ============================================================================================ README
def replace_between(text: str, begin: str, end: str, body: str) -> str | None:
    """``text`` with what lies between ``begin`` and ``end`` replaced by ``body``; ``None`` when a marker is
    missing, repeated or out of order."""
    if text.count(begin) != 1 or text.count(end) != 1:
        return None
    i, j = text.find(begin), text.find(end)
    if j < i:
        return None
    return text[:i + len(begin)] + "\n" + body.rstrip("\n") + "\n" + text[j:]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=REPO / "results" / "examples",
                    help="folder holding <stem>/store.sqlite; the outputs go beside each store")
    ap.add_argument("--readme", action="store_true", help="also write the tables between the README's markers")
    ap.add_argument("--readme-path", type=Path, default=REPO / "README.md")
    a = ap.parse_args(argv)
    text = None
    if a.readme:  # check every marker pair before any work
        if not a.readme_path.is_file():
            print(f"{a.readme_path}: not found", file=sys.stderr)
            return 1
        text = a.readme_path.read_text(encoding="utf-8")
        for ex in EXAMPLES:
            if replace_between(text, ex.begin, ex.end, "") is None:
                print(f"{a.readme_path}: the markers {ex.begin} and {ex.end} must each appear once, in this order "
                      f"(around the table of examples/{ex.stem}.toml)", file=sys.stderr)
                return 1
    done = []
    for ex in EXAMPLES:
        r = process_example(ex, a.results)
        if r.exists:
            print(f"{ex.stem}: run {r.run_id}, {len(r.summary)} summary rows -> {a.results / ex.stem}")
            done.append(r)
        else:
            print(f"{ex.stem}: not run yet (no store at {r.store}); its README table is left as it is")
    if text is not None:
        for r in done:
            text = replace_between(text, r.example.begin, r.example.end, r.table)
        a.readme_path.write_text(text, encoding="utf-8")
        print(f"wrote {len(done)} table(s) into {a.readme_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
