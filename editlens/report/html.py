"""Assemble a report (tables + figures) from a results store and write it as files or one HTML page.

:func:`build_report` computes everything once into a :class:`Report`; :meth:`Report.write_dir` writes
``<name>.md``/``<name>.csv`` per table, ``<name>.png`` per figure and an ``index.md``; :func:`write_html`
writes a single self-contained page (images embedded as base64 ``data:`` URIs, tables as HTML).

Contents (each only when the data allow it):

* ``methods`` — methods × metrics, mean ± SEM, columns grouped target / GT-based / GT-free.
* ``paired`` — every other system minus a reference over the same cases: mean difference, 95% bootstrap
  interval, sign-flip p-value, Holm-adjusted p (:mod:`editlens.report.paired`); rows whose interval excludes 0
  are marked (``*``, ``**`` when the Holm test agrees) and highlighted in the HTML page. The reference is
  ``ref=`` (``editlens report --ref``), else the pre-edit baseline when the run has one (else no paired table).
* ``sensitivity`` — per sweep axis, method and metric: Kendall's τ, coverage, std (Liu et al. Tables 2–3).
* ``rank_stability`` and ``rank_stability_groups`` — τ of method rankings across datasets (Table 4).
* ``cases`` — the per-case view (:mod:`editlens.report.cases`): for each unit every case with its prompt, subject,
  targets, per probe kind the base and edited greedy answers (when the run recorded them) and the metric values;
  filters (flipped, probe kind, metric below a threshold), search and sortable columns in the HTML page.
* figures: metric vs number of edits (sequential checkpoints or several batch sizes), the collapse diagnostics
  vs number of edits (``collapse``: ``hidden_rank@L`` per method, ``delta_spectrum``'s ‖ΔW‖_F per edited matrix and
  top singular values; its series also in ``collapse.csv`` and the PNG's ``editlens:series`` text chunk), metric
  vs each swept value (log x), teacher-forced vs autoregressive bars, EVK metrics vs σ. Curves carry 95% bootstrap bands over
  cases, resampled once per panel for every point (see :func:`editlens.report.plots.plot_lines`).

Runs are never pooled: a store's report shows its latest run by default, another with ``run_id``, or every run
side by side with ``all_runs``. When one run is shown, its spec's ``[report]`` options (title, ranges, groups,
reference) are the defaults. Markdown output (``write_dir``) escapes HTML in every string, as the HTML page does.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html as _html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from editlens.errors import MetricError, StoreError
from editlens.report import plots, tables

MAX_PANELS = 9


@dataclass
class ReportTable:
    name: str
    title: str
    df: pd.DataFrame
    note: str = ""


@dataclass
class ReportFigure:
    name: str
    title: str
    png: bytes
    note: str = ""
    #: the plotted series, when the figure has them as a table (written as ``<name>.csv`` beside the PNG)
    data: pd.DataFrame | None = None


@dataclass
class Report:
    """Tables and PNG figures of a report, in display order."""

    title: str
    tables: list[ReportTable] = field(default_factory=list)
    figures: list[ReportFigure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cases: list = field(default_factory=list)  #: per-case tables (:class:`editlens.report.cases.CaseUnit`)

    def table(self, name: str) -> pd.DataFrame:
        """A table by name (KeyError if absent)."""
        for t in self.tables:
            if t.name == name:
                return t.df
        raise KeyError(name)

    def write_dir(self, out_dir: str | Path, *, digits: int = 3) -> list[Path]:
        """Write every table as Markdown + CSV, every figure as PNG, the per-case view as ``cases_<n>.csv`` (one
        per unit) and an ``index.md``; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        md = tables.md_text  # every string is HTML-escaped, as in to_html (spec strings may hold markup)
        index = [f"# {md(self.title)}\n"]
        index += [f"_{md(n)}_\n" for n in self.notes]
        for t in self.tables:
            p = tables.write_table(t.df, out, t.name, digits=digits)
            written += [p["md"], p["csv"]]
            index.append(f"## {md(t.title)}\n")
            if t.note:
                index.append(md(t.note) + "\n")
            index.append(tables.to_markdown(t.df, digits=digits))
        for f in self.figures:
            p = out / f"{f.name}.png"
            p.write_bytes(f.png)
            written.append(p)
            alt = md(f.title).replace("[", "\\[").replace("]", "\\]")
            index.append(f"## {md(f.title)}\n\n![{alt}]({p.name})\n")
            if f.note:
                index.append(md(f.note) + "\n")
            if f.data is not None:
                c = out / f"{f.name}.csv"
                f.data.to_csv(c, index=False)
                written.append(c)
                index.append(f"Data: [{c.name}]({c.name})\n")
        if self.cases:  # the per-case view as one CSV per unit (the HTML page has the filters)
            index.append("## Cases\n")
            for n, u in enumerate(self.cases):
                p = out / f"cases_{n:03d}.csv"
                u.frame().to_csv(p, index=False)
                written.append(p)
                index.append(f"* [{md(u.title)}]({p.name}): {len(u.rows)} rows")
            index.append("")
        idx = out / "index.md"
        idx.write_text("\n".join(index), encoding="utf-8")
        written.append(idx)
        return written

    def to_html(self, *, digits: int = 3) -> str:
        """One self-contained HTML page."""
        parts = [f"<h1>{_e(self.title)}</h1>",
                 f"<p class='meta'>generated {_e(_dt.datetime.now().strftime('%Y-%m-%d %H:%M'))} by editlens</p>"]
        parts += [f"<p class='note'>{_e(n)}</p>" for n in self.notes]
        if self.tables:
            parts.append("<nav><ul>" + "".join(f"<li><a href='#{_e(t.name)}'>{_e(t.title)}</a></li>"
                                               for t in self.tables)
                         + "".join(f"<li><a href='#fig-{_e(f.name)}'>{_e(f.title)}</a></li>" for f in self.figures)
                         + ("<li><a href='#cases'>Cases</a></li>" if self.cases else "")
                         + "</ul></nav>")
        for t in self.tables:
            parts.append(f"<section id='{_e(t.name)}'><h2>{_e(t.title)}</h2>")
            if t.note:
                parts.append(f"<p class='note'>{_e(t.note)}</p>")
            parts.append(_table_html(t.df, digits, mark_col="mark" if t.name.startswith("paired") else None))
            parts.append("</section>")
        for f in self.figures:
            b64 = base64.b64encode(f.png).decode("ascii")
            parts.append(f"<section id='fig-{_e(f.name)}'><h2>{_e(f.title)}</h2>"
                         + (f"<p class='note'>{_e(f.note)}</p>" if f.note else "")
                         + f"<img alt='{_e(f.title)}' src='data:image/png;base64,{b64}'></section>")
        from editlens.report.cases import CASES_CSS, PAGE_JS, cases_html

        parts.append(cases_html(self.cases, digits=digits))
        return _PAGE.format(title=_e(self.title), body="\n".join(parts), css=CASES_CSS, js=PAGE_JS)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; border: 1px solid #eee; }} .note, .meta {{ color: #555; font-size: 0.9em; }}
tr.sig td {{ background: #fff3c4; font-weight: 600; }}
{css}
</style></head>
<body>
{body}
<script>{js}</script>
</body></html>
"""


def _e(s: Any) -> str:
    return _html.escape(str(s), quote=True)


def _table_html(df: pd.DataFrame, digits: int, mark_col: str | None = None) -> str:
    """An HTML table (cells escaped); with ``mark_col``, body rows whose mark is non-empty get ``class="sig"``."""
    shown = df.copy()
    for c in shown.columns:
        shown[c] = [tables._cell(v, digits) for v in shown[c]]
    # one header row: sortable by a click (a two-level header would misalign the column index)
    classes = None if isinstance(shown.columns, pd.MultiIndex) else "sortable"
    out = "<div class='scroll'>" + shown.to_html(index=False, escape=True, border=0, na_rep="–",
                                                 classes=classes) + "</div>"
    if mark_col is None or mark_col not in df.columns:
        return out
    flags = iter([bool(str(v).strip()) and str(v) != "nan" for v in df[mark_col]])
    head, sep, body = out.partition("<tbody>")
    body = re.sub(r"<tr>", lambda m: "<tr class=\"sig\">" if next(flags, False) else "<tr>", body)
    return head + sep + body


def _source_frames(source: Any, run_id: str | None, all_runs: bool = False
                   ) -> tuple[pd.DataFrame, pd.DataFrame | None, dict, list[str]]:
    """``(rows, diagnostics, report options, notes)`` of the selected run(s) (see :func:`build_report`)."""
    from editlens.runs.store import Store

    if run_id is not None and all_runs:
        raise StoreError("choose one run (run_id) or all runs side by side (all_runs), not both")
    if isinstance(source, pd.DataFrame):
        df = tables.results_frame(source, run_id)
        return df, None, {}, []
    own = not isinstance(source, Store)
    if own and not isinstance(source, (str, Path)):
        raise StoreError(f"cannot make a report from {type(source).__name__}; give a Store, a path or a DataFrame")
    st = Store(source, readonly=True) if own else source
    notes: list[str] = []
    try:
        ids = st.run_ids()  # oldest first
        if run_id is not None and run_id not in ids:
            raise StoreError(f"store {st.path}: no run {run_id!r}; runs: {', '.join(ids) or 'none'}")
        if all_runs or not ids:
            shown: list[str] = ids
        else:
            shown = [run_id if run_id is not None else ids[-1]]
            others = [r for r in ids if r not in shown]
            if others:
                notes.append(f"Run {shown[0]}" + (" (the latest)" if run_id is None else "")
                             + f"; the store holds {len(ids)} runs ({', '.join(ids)}): choose one with --run ID "
                               "(run_id=) or compare them side by side with --all-runs (all_runs=True). "
                               "Runs are never pooled.")
        sel = None if all_runs else (shown[0] if shown else None)
        rows = tables.results_frame(st, sel)
        diags = st.diagnostics(sel)
        opts: dict = {}
        if len(shown) == 1:
            spec = st.run_spec(shown[0]) or {}
            opts = dict(spec.get("report") or {})
            opts.setdefault("title", spec.get("name") or shown[0])
    finally:
        if own:
            st.close()
    return rows, diags, opts, notes


def build_report(source: Any, *, run_id: str | None = None, all_runs: bool = False, title: str | None = None,
                 ranges: Mapping[str, Sequence[float]] | None = None,
                 groups: Mapping[str, Sequence[str]] | None = None, reference: str | None = None,
                 unbounded: str = "nan", delta_k_key: str = "delta_k_mean", plots_enabled: bool = True,
                 ref: str | None = None, resamples: int = 2000, seed: int = 0, cases: bool = True,
                 cases_max_rows: int | None = None) -> Report:
    """Compute the report of a Store / store path / results DataFrame (see the module docstring).

    Runs are never pooled: a store's report shows its latest run, or ``run_id``, or with ``all_runs`` every run
    side by side (a ``run`` column in the tables, ``label [run]`` in the figures). A DataFrame holding several
    runs is shown side by side.

    ``ref`` names the reference system of the paired table (default: the spec's ``report.ref``, else the
    pre-edit baseline when the run has one); ``resamples`` and ``seed`` set its bootstrap. ``cases`` adds the
    per-case view (:mod:`editlens.report.cases`; ``cases_max_rows`` bounds its rows per unit). Unpaired cases are dropped
    there (and counted in a note); ``editlens compare`` refuses them.
    """
    df, diags, opts, run_notes = _source_frames(source, run_id, all_runs)
    ranges = ranges if ranges is not None else opts.get("ranges")
    groups = groups if groups is not None else opts.get("groups")
    reference = reference or opts.get("reference") or "auto"
    ref = ref if ref is not None else opts.get("ref")
    rep = Report(title=title or opts.get("title") or "editlens report")
    rep.notes += run_notes
    if df.empty:
        rep.notes.append("The store holds no result rows yet.")
        return rep
    n_units = df["unit"].nunique() if "unit" in df.columns else 0
    rep.notes.append(f"{len(df)} result rows" + (f" from {n_units} units" if n_units else "")
                     + (f"; runs: {', '.join(map(str, df['run_id'].unique()))}" if "run_id" in df.columns else ""))

    rep.tables.append(ReportTable("methods", "Methods × metrics (mean ± SEM over cases and seeds)",
                                  tables.methods_table(df, groups=groups),
                                  "Last evaluation step of each unit. Columns: probe kind / metric."))
    _add_paired(rep, df, ref, resamples, seed, all_runs)
    sens = tables.sensitivity_table(df, diagnostics=diags, reference=reference, ranges=ranges,
                                    unbounded=unbounded, delta_k_key=delta_k_key)
    if not sens.empty:
        rep.tables.append(ReportTable(
            "sensitivity", "Sensitivity to the swept regulariser",
            sens.drop(columns=["p_value"]),
            "Kendall's τ-b between the metric and the reference (delta_k = mean ||Δk_j|| when recorded, "
            "else the swept value; the pre-edit point is included when a baseline unit exists); "
            "coverage = (max − min) / theoretical range (– when unbounded); std with ddof = 1."))
    rs, rg = tables.rank_stability_table(df, groups=groups)
    if not rs.empty:
        rep.tables.append(ReportTable("rank_stability", "Rank stability of methods across datasets (Kendall's τ)",
                                      rs, "τ-b between method scores on each pair of datasets, averaged."))
        rep.tables.append(ReportTable("rank_stability_groups", "Rank stability, averaged per metric group", rg))

    if cases:
        from editlens.report.cases import build_case_units

        rep.cases, case_notes = build_case_units(df, diags, max_rows=cases_max_rows)
        rep.notes += case_notes
    if plots_enabled:
        if "run_id" in df.columns and df["run_id"].nunique() > 1:  # one curve per method and run
            df = df.assign(method_label=df["method_label"].astype(str) + " [" + df["run_id"].astype(str) + "]")
        _add_figures(rep, df)
    return rep


def _add_paired(rep: Report, df: pd.DataFrame, ref: str | None, resamples: int, seed: int, all_runs: bool) -> None:
    """The paired table vs ``ref`` (or the pre-edit baseline), one run at a time."""
    from editlens.report import paired

    runs = list(dict.fromkeys(df["run_id"])) if "run_id" in df.columns else [None]
    for r in runs:
        d = df if r is None else df[df["run_id"] == r]
        systems = list(dict.fromkeys(paired.system_ids(d)))
        if len(systems) < 2 or "case_id" not in d.columns:
            continue
        name = ref
        if name is None:
            base = [s for s in systems if s.lower() in tables.BASELINE_METHODS]
            if not base:
                continue
            name = base[0]
        try:
            t = paired.compare(d, name, resamples=resamples, seed=seed, unpaired="drop")
        except StoreError as e:
            if ref is not None and "--ref" in str(e):  # an explicit reference that is not in the run
                raise
            rep.notes.append(f"No paired table{f' for run {r}' if len(runs) > 1 else ''}: {e}")
            continue
        if t.empty:
            continue
        title = f"Paired differences vs {t.attrs['settings']['ref']}" + (f" [run {r}]" if len(runs) > 1 else "")
        note = " ".join([paired.describe(t), *t.attrs.get("notes", [])])
        rep.tables.append(ReportTable("paired" if len(runs) == 1 else f"paired_{_slug(str(r))}", title,
                                      paired.format_table(t), note))


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)] or [[]]


def _add_figures(rep: Report, df: pd.DataFrame) -> None:
    base_mask = df["method_label"].str.lower().isin(tables.BASELINE_METHODS)
    edited = df[~base_mask]
    sigma_mask = edited["metric"].astype(str).str.contains("@sigma=", regex=False)
    plain = edited[~sigma_mask]
    collapse = plots.collapse_series(plain)
    if not collapse.empty and collapse.groupby("method")["n_edits"].nunique().max() > 1:
        fig = plots.plot_collapse(collapse)
        rep.figures.append(ReportFigure(
            "collapse", "Collapse diagnostics vs number of edits",
            plots.figure_png(fig, metadata={"editlens:series": collapse.to_csv(index=False)}),
            "hidden_rank@L: effective rank of the block-L hidden states over the held-out text, edited / base (1: "
            "unchanged, below 1: collapse); delta_spectrum: ||dW||_F of each edited matrix and the top singular "
            "values of the most changed one, accumulated since the first edit. Means over datasets and seeds. The "
            "series are in the PNG's 'editlens:series' text chunk and in collapse.csv.", data=collapse))
    if "metric" in plain.columns:  # .loc with a bool mask: an empty object-dtype mask under [] selects columns
        plain = plain.loc[~plain["metric"].map(plots.is_collapse_metric).astype(bool)]
    if "n_edits" in plain.columns and pd.to_numeric(plain["n_edits"], errors="coerce").nunique() > 1:
        d = plain[plain["n_edits"].notna()].copy()
        d["n_edits"] = pd.to_numeric(d["n_edits"], errors="coerce")
        # only (method, metric) curves with at least two numbers of edits (sequential checkpoints or sizes)
        npts = d.groupby(["method_label", "column"])["n_edits"].transform("nunique")
        d = d[npts > 1]
        for i, cols in enumerate(_chunks(list(dict.fromkeys(d["column"])), MAX_PANELS)):
            fig = plots.plot_sequential(d, cols)
            rep.figures.append(ReportFigure(f"edits_curve_{i}", "Metrics vs number of edits", plots.figure_png(fig)))
    final = tables.final_rows(plain)
    base = tables.final_rows(df[base_mask])
    baseline = base.groupby("column")["value"].mean().to_dict() if len(base) else None
    for axis in tables.sweep_columns(final):
        d = final[final[axis].notna()]
        if d.empty:
            continue
        name = axis[len("sweep."):]
        for i, cols in enumerate(_chunks(list(dict.fromkeys(d["column"])), MAX_PANELS)):
            fig = plots.plot_sweep(d, axis, cols, baseline=baseline)
            rep.figures.append(ReportFigure(f"sweep_{_slug(name)}_{i}", f"Metrics vs {name}", plots.figure_png(fig)))
    pairs = plots.tf_ar_pairs(list(final["metric"].unique()))
    if pairs:
        fig = plots.plot_tf_vs_ar(final, pairs)
        rep.figures.append(ReportFigure("tf_vs_ar", "Teacher-forced vs autoregressive", plots.figure_png(fig)))
    sig = tables.final_rows(edited)
    has_sigma = sigma_mask.any() or ("sigma" in edited.columns and edited["sigma"].notna().any())
    if has_sigma:
        try:
            fig = plots.plot_sigma(sig)
            rep.figures.append(ReportFigure("sigma", "EVK metrics vs σ", plots.figure_png(fig)))
        except MetricError:
            pass


def _slug(s: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_-]+", "_", s).strip("_") or "x"


def write_html(source: Any, path: str | Path, **options: Any) -> Path:
    """Write a self-contained HTML report of ``source`` (Store, store path or results DataFrame).

    ``options`` go to :func:`build_report` (run_id, title, ranges, groups, reference, unbounded...).
    """
    path = Path(path)
    rep = build_report(source, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rep.to_html(), encoding="utf-8")
    return path


def write_report(source: Any, out_dir: str | Path, **options: Any) -> list[Path]:
    """Write the report's tables (Markdown + CSV), figures (PNG) and ``index.md`` into ``out_dir``."""
    return build_report(source, **options).write_dir(out_dir)
