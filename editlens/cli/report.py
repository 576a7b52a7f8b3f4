"""``editlens report STORE [--html out.html] [--out DIR]``: tables, plots and an HTML page from a results store.

\b
  editlens report results.sqlite                      # print the tables of the latest run (Markdown)
  editlens report results.sqlite --run ID             # another run; --all-runs: every run side by side
  editlens report results.sqlite --html report.html   # one self-contained page (plots embedded, per-case view)
  editlens report results.sqlite --out report/        # <table>.md/.csv, <figure>.png, index.md
  editlens report results.sqlite --export rows.parquet  # the rows joined with unit metadata (.csv/.parquet/.json)
  editlens report results.sqlite --ref memit          # the paired table against memit (default: the pre-edit row)
"""
from __future__ import annotations

from pathlib import Path

import click


def _parse_ranges(items: tuple[str, ...]) -> dict[str, tuple[float, float]] | None:
    out: dict[str, tuple[float, float]] = {}
    for it in items:
        try:
            name, rng = it.split("=", 1)
            lo, hi = (float(x) for x in rng.split(":", 1))
        except ValueError:
            raise click.BadParameter(f"{it!r}: expected METRIC=LOW:HIGH, e.g. s_acc=0:1", param_hint="--range")
        if not lo < hi:
            raise click.BadParameter(f"{it!r}: LOW must be below HIGH", param_hint="--range")
        out[name] = (lo, hi)
    return out or None


@click.command("report")
@click.argument("store", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a self-contained HTML report here.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write tables (Markdown + CSV), figures (PNG) and index.md into this folder.")
@click.option("--run", "run_id", default=None, help="Report this run (default: the latest run in the store).")
@click.option("--all-runs", is_flag=True, help="Every run of the store side by side (a run column); runs are "
                                              "never pooled.")
@click.option("--title", default=None, help="Report title (default: the run spec's report.title or name).")
@click.option("--reference", type=click.Choice(["auto", "reg_value", "delta_k"]), default=None,
              help="What Kendall's tau correlates metrics with in the sensitivity table (default: auto = "
                   "mean ||Δk_j|| when recorded, else the swept value).")
@click.option("--range", "ranges", multiple=True, metavar="METRIC=LOW:HIGH",
              help="Theoretical range of a metric for the coverage proportion (repeatable).")
@click.option("--export", "export_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also export the rows joined with unit metadata (.csv, .parquet or .json).")
@click.option("--ref", default=None, help="Reference system of the paired table (a method label; default: the "
                                        "pre-edit baseline when the run has one). See also `editlens compare`.")
@click.option("--no-plots", is_flag=True, help="Tables only.")
@click.option("--cases/--no-cases", "cases", default=True, show_default=True,
              help="The HTML page's per-case view (every case with base/edited answers and metric values; "
                   "filters, search, sorting).")
@click.option("--cases-max-rows", type=click.IntRange(min=1), default=None, metavar="N",
              help="At most N rows per unit in the per-case view (default: every row).")
@click.option("--quiet", "-q", is_flag=True, help="Do not print the tables.")
def report(store: Path, html_path: Path | None, out_dir: Path | None, run_id: str | None, all_runs: bool,
           title: str | None, reference: str | None, ranges: tuple[str, ...], export_path: Path | None,
           no_plots: bool, quiet: bool, ref: str | None = None, cases: bool = True,
           cases_max_rows: int | None = None) -> None:
    """Make tables, plots and an HTML page from the results STORE (an editlens SQLite file).

    The report shows one run -- the latest, or --run ID -- or, with --all-runs, every run side by side; results
    of different runs are never pooled."""
    from editlens.report import build_report
    from editlens.report.tables import md_text, to_markdown
    from editlens.runs.store import Store

    if run_id is not None and all_runs:
        raise click.UsageError("--run and --all-runs exclude each other: report one run, or all side by side")
    with Store(store, readonly=True) as st:
        ids = st.run_ids()
        if run_id is not None and run_id not in ids:
            raise click.BadParameter(f"no run {run_id!r} in {store}; runs: {', '.join(ids) or 'none'}",
                                     param_hint="--run")
        rep = build_report(st, run_id=run_id, all_runs=all_runs, title=title, reference=reference,
                           ranges=_parse_ranges(ranges), ref=ref, cases=cases and html_path is not None,
                           cases_max_rows=cases_max_rows,
                           plots_enabled=not no_plots and (html_path is not None or out_dir is not None))
        if export_path is not None:
            # the rows of the run(s) the report shows
            shown = None if all_runs else (run_id if run_id is not None else (ids[-1] if ids else None))
            st.export(export_path, run_id=shown)
            click.echo(f"exported rows to {export_path}")
    if not quiet:  # Markdown: strings from the spec are HTML-escaped, as in index.md and the HTML page
        click.echo(f"# {md_text(rep.title)}\n")
        for n in rep.notes:
            click.echo(md_text(n) + "\n")
        for t in rep.tables:
            click.echo(f"## {md_text(t.title)}\n")
            click.echo(to_markdown(t.df))
    if out_dir is not None:
        paths = rep.write_dir(out_dir)
        click.echo(f"wrote {len(paths)} files to {out_dir}")
    if html_path is not None:
        html_path.parent.mkdir(parents=True, exist_ok=True)
        html_path.write_text(rep.to_html(), encoding="utf-8")
        click.echo(f"wrote {html_path}")
