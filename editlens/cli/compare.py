"""``editlens compare STORE --ref METHOD``: paired differences with bootstrap intervals, tests and Holm.

\b
  editlens compare results.sqlite --ref pre-edit                     # every other system vs the pre-edit model
  editlens compare results.sqlite --ref memit --metrics kl,s_acc --probe-kinds neighborhood
  editlens compare results.sqlite --ref memit --format csv > paired.csv
"""
from __future__ import annotations

import sys
from pathlib import Path

import click


def _split(values: tuple[str, ...]) -> list[str] | None:
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return out or None


@click.command("compare")
@click.argument("store", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--ref", required=True, help="The reference system: a method label of the run (or 'label | "
                                           "param=value' for one sweep point).")
@click.option("--metrics", multiple=True, help="Metric names or kind/metric columns, comma-separated or repeated "
                                               "(default: all).")
@click.option("--probe-kinds", multiple=True, help="Probe kinds to keep, comma-separated or repeated (default: all).")
@click.option("--run", "run_id", default=None, help="The run to compare (default: the latest run of the store).")
@click.option("--resamples", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Bootstrap resamples of cases.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap and permutation draws.")
@click.option("--level", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.95, show_default=True,
              help="Confidence level of the intervals.")
@click.option("--test", type=click.Choice(["signflip", "wilcoxon"]), default="signflip", show_default=True,
              help="Paired test: sign-flip permutation (exact for n <= 13) or Wilcoxon signed-rank.")
@click.option("--permutations", type=click.IntRange(min=100), default=10_000, show_default=True,
              help="Random sign vectors of the sign-flip test when 2^n exceeds this.")
@click.option("--seeds", "seed_mode", type=click.Choice(["auto", "cases", "case-mean", "hierarchical"]),
              default="auto", show_default=True,
              help="How several seeds of a unit are aggregated (auto: case means when every seed holds the same "
                   "cases, else hierarchical: seeds then cases resampled; cases: every (seed, case) pair counted "
                   "as independent, which understates the uncertainty when seeds differ).")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True,
              help="Level of the Holm-corrected tests (mark **).")
@click.option("--drop-unpaired", is_flag=True, help="Drop cases present on one side only instead of refusing.")
@click.option("--all-steps", is_flag=True, help="Compare at every checkpoint of sequential units, not only the last.")
@click.option("--format", "fmt", type=click.Choice(["md", "csv"]), default="md", show_default=True,
              help="md: a readable Markdown table; csv: every column of the table.")
def compare_cmd(store: Path, ref: str, metrics: tuple[str, ...], probe_kinds: tuple[str, ...], run_id: str | None,
                resamples: int, seed: int, level: float, test: str, permutations: int, seed_mode: str, alpha: float,
                drop_unpaired: bool, all_steps: bool, fmt: str) -> None:
    """Paired comparison of every system of a run of STORE with --ref, over the same cases.

    For each other system (method / sweep point), dataset, number of edits and probe kind/metric: the mean of the
    per-case differences (system − ref), a bootstrap confidence interval (BCa; seeds then cases resampled when
    seeds hold different cases), a paired test p-value and its Holm correction across the whole table. Cases
    evaluated on one side only are refused (--drop-unpaired drops them). See docs/experiments.md, "Comparing
    methods"."""
    from editlens.report import paired
    from editlens.report.tables import md_text, to_markdown

    table = paired.compare(store, ref, metrics=_split(metrics), probe_kinds=_split(probe_kinds), run_id=run_id,
                           resamples=resamples, level=level, seed=seed, test=test, permutations=permutations,
                           seeds=seed_mode, unpaired="drop" if drop_unpaired else "error", alpha=alpha,
                           all_steps=all_steps)
    if fmt == "csv":
        table.to_csv(sys.stdout, index=False)
        return
    click.echo(md_text(paired.describe(table)) + "\n")
    for n in table.attrs.get("notes", []):
        click.echo(md_text(n) + "\n")
    if table.empty:
        click.echo("No comparison: the reference shares no dataset and metric with another system.")
        return
    click.echo(to_markdown(paired.format_table(table)))
