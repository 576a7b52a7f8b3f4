"""``editlens bench SPEC``: run an experiment spec into a resumable SQLite store, then write its report.

\b
  editlens bench examples/locality_sweep.toml              # store: examples/locality_sweep.sqlite
  editlens bench spec.toml --dry-run                       # the plan and its size, nothing runs
  editlens bench spec.toml --store runs/a.sqlite           # another store
  editlens bench spec.toml                                 # again: resumes, finished units are skipped
  editlens bench spec.toml --executor ray                  # one Ray task per unit (pip install editlens[ray])
  editlens bench spec.toml --executor ray --ray-address ray://head:10001   # on an existing cluster
  editlens bench spec.toml --device-map auto               # spread the model over devices (accelerate)
  editlens bench spec.toml --eval-chunk 100                # stream evaluations 100 cases at a time

The report (Markdown tables, CSV, PNG figures and one HTML page) goes to ``<store stem>_report/`` beside the
store unless ``--no-report``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from editlens.cli.progress_option import apply_quiet, quiet_option


@click.command("bench")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--store", "store_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Results store (SQLite). Default: the spec's `store` key, else <spec stem>.sqlite beside it.")
@click.option("--dry-run", is_flag=True, help="Validate the spec, print the plan and its size; run nothing.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: in this process; ray: one Ray task per unit (needs `pip install editlens[ray]`).")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="With --executor ray: the cluster to connect to (e.g. ray://head:10001, or 'auto' for the one "
                   "started on this machine by `ray start`). Default: $RAY_ADDRESS, else a local Ray instance.")
@click.option("--ray-cpus", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --executor ray: CPUs reserved by each unit's task (also its torch thread count).")
@click.option("--report/--no-report", default=True, show_default=True,
              help="Write the report (Markdown + CSV + PNG + HTML) beside the store at the end.")
@click.option("--run-id", default=None, help="Run id (default: the spec name + a hash of the spec, so re-running "
                                             "the same spec resumes it).")
@click.option("--eval-cases", type=int, default=None,
              help="Sequential regime: size K of the fixed evaluation sample (the first K cases; default: the "
                   "first checkpoint).")
@click.option("--eval-chunk", type=click.IntRange(min=1), default=None, metavar="N",
              help="Stream every evaluation over chunks of at most N cases, writing each chunk's rows to the store "
                   "at once (memory independent of the number of cases; overrides [regime] eval_chunk; local "
                   "executor only).")
@click.option("--no-baseline", is_flag=True, help="Sequential regime: do not evaluate the unedited model at step 0.")
@click.option("--truncate", type=click.Choice(["left"]), default=None,
              help="Let prompts longer than the model's context lose their oldest tokens (recorded with the run). "
                   "Default: such a prompt is an error naming the case and probe.")
@click.option("--device-map", default=None, metavar="MAP",
              help="Spread the model over devices with accelerate: auto, balanced, balanced_low_0 or sequential "
                   "(overrides the spec's [model] device_map; recorded with the run, so it is another run id).")
@click.option("--reuse-units", is_flag=True,
              help="Before running, copy into this run the units that other runs in the store finished with the "
                   "same work, model, versions and runner options (a spec that gained a method, dataset or seed "
                   "keeps what it had); each copied unit is printed.")
@quiet_option
def bench(spec: Path, store_path: Path | None, dry_run: bool, executor: str, ray_address: str | None, ray_cpus: int,
          report: bool, run_id: str | None, eval_cases: int | None, eval_chunk: int | None, no_baseline: bool,
          truncate: str | None, device_map: str | None, reuse_units: bool, quiet: bool) -> None:
    """Run the experiment SPEC (TOML or YAML) into a results store and write its report."""
    from editlens.errors import SpecError
    from editlens.runs.runner import (RunOptions, default_store_path, judge_endpoint_lines, load_validated_spec,
                                      run_spec, with_device_map)

    apply_quiet(quiet)
    if not spec.is_file():
        raise SpecError(f"spec {spec}: no such file")
    if executor != "ray" and (ray_address is not None or ray_cpus != 1):
        raise click.UsageError("--ray-address and --ray-cpus need --executor ray")
    s = load_validated_spec(spec)
    if device_map is not None:
        s = with_device_map(s, device_map)
    if eval_cases is not None and eval_cases < 1:
        raise click.BadParameter("must be >= 1", param_hint="--eval-cases")
    options = RunOptions(eval_cases=eval_cases, baseline=not no_baseline, truncate=truncate,
                         eval_chunk=eval_chunk).for_spec(s)
    store = store_path if store_path is not None else default_store_path(s)
    if dry_run:
        click.echo(s.describe_plan())
        if s.regime.kind == "sequential":
            k = options.eval_size(s.plan()[0])
            click.echo(f"sequential evaluation sample: the first {k} case(s) of each unit"
                       + (", plus the unedited model at step 0" if options.baseline else ""))
        if options.eval_chunk is not None:
            click.echo(f"evaluation streamed in chunks of {options.eval_chunk} case(s): each chunk's rows are written "
                       "to the store at once")
        for line in judge_endpoint_lines(s, s.plan(), options):
            click.echo(f"judge endpoint: {line}")
        click.echo(f"store: {store}")
        return
    ex: object = executor
    if executor == "ray":
        from editlens.runs.executors import RayExecutor

        ex = RayExecutor(address=ray_address, num_cpus=ray_cpus)
    t0 = time.perf_counter()
    try:
        rid = run_spec(s, store=store, executor=ex, progress=not quiet, run_id=run_id, options=options,
                       reuse_units=reuse_units)
    finally:
        if executor == "ray":
            ex.shutdown()  # only stops a Ray instance this command started
    elapsed = time.perf_counter() - t0
    click.echo(f"run {rid} complete in {elapsed:.1f}s: {store}")
    if report:
        out = write_bench_report(store, rid, title=s.report.get("title") if s.report else None)
        click.echo(f"report: {out / 'index.md'} and {out / 'report.html'}")


def write_bench_report(store: Path, run_id: str, title: str | None = None) -> Path:
    """Write the report of one run beside the store: ``<stem>_report/`` (tables, figures, index.md, report.html)."""
    from editlens.report import build_report

    out = Path(store).with_name(Path(store).stem + "_report")
    rep = build_report(Path(store), run_id=run_id, title=title)
    rep.write_dir(out)
    (out / "report.html").write_text(rep.to_html(), encoding="utf-8")
    return out


if __name__ == "__main__":  # pragma: no cover
    bench.main(args=sys.argv[1:], prog_name="editlens bench")
