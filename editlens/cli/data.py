"""``editlens data``: inspect, convert and generate editing datasets.

\b
  editlens data inspect FILE [--format F] [--limit N] [--case I]   # format, counts, one normalised case
  editlens data convert FILE OUT.jsonl [--format F] [--limit N] [--sample N --seed S]
  editlens data synth N OUT.jsonl [--seed S]                       # fictional cases (editlens.data.synthetic)
"""
from __future__ import annotations

import json
from collections import Counter

import click

from editlens.errors import EditlensError

_FORMAT_HELP = ("dataset format (default: detected from the content); one of counterfact, zsre, mquake, ripple, knowedit, "
                "jsonl, conflictedit, roundedit")


def _fail(e: EditlensError) -> None:
    raise click.ClickException(str(e))


@click.group("data", help="Inspect, convert and generate editing datasets.")
def data() -> None:
    pass


@data.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", default=None, help=_FORMAT_HELP)
@click.option("--limit", type=click.IntRange(min=0), default=None, help="read only the first N records")
@click.option("--case", "case_index", type=click.IntRange(min=0), default=0, show_default=True,
              help="which loaded case to print")
def inspect_cmd(file: str, fmt: str | None, limit: int | None, case_index: int) -> None:
    """Print the detected format, the number of cases, probe counts per kind and one normalised case."""
    from editlens.data.formats import detect_format, get_format, parse_records, select_indices
    from editlens.data.formats.jsonl import dump_case
    from editlens.data.io import open_records

    try:
        src = open_records(file)  # read and decode once for detection and loading
        name = get_format(fmt).name if fmt else detect_format(src)
        cases = parse_records(src, get_format(name), select_indices(len(src), limit, path=src.path), path=src.path)
    except EditlensError as e:
        _fail(e)
    click.echo(f"file:    {file}")
    click.echo(f"format:  {name}" + ("" if fmt else " (detected)"))
    click.echo(f"cases:   {len(cases)}")
    probes: Counter[str] = Counter()
    having: Counter[str] = Counter()
    for c in cases:
        for kind, items in c.probes.items():
            if items:
                probes[kind] += len(items)
                having[kind] += 1
    extra = sum(len(c.extra_rewrites) for c in cases)
    if extra:
        click.echo(f"extra rewrites: {extra}")
    if name in ("conflictedit", "roundedit"):  # the pitfalls datasets: what the conflict/distortion metrics read
        from editlens.data.formats.pitfalls import summary

        for key, value in summary(cases).items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}: {v}" for k, v in sorted(value.items(), key=lambda kv: (-kv[1], str(kv[0]))))
            click.echo(f"{key}: {value}")
    click.echo("probe kinds:")
    from editlens.data.schema import ProbeKind

    for kind in [k.value for k in ProbeKind] + sorted(set(probes) - {k.value for k in ProbeKind}):
        if probes[kind]:
            click.echo(f"  {kind:<18} {probes[kind]:>8} probes in {having[kind]:>6} cases")
    if cases:
        i = min(case_index, len(cases) - 1)
        click.echo(f"case {i} (normalised):")
        click.echo(json.dumps(dump_case(cases[i]), indent=2, ensure_ascii=False))


@data.command("convert")
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", default=None, help=_FORMAT_HELP)
@click.option("--limit", type=click.IntRange(min=0), default=None, help="keep the first N records")
@click.option("--sample", type=click.IntRange(min=0), default=None, help="keep a seeded random sample of N records")
@click.option("--seed", type=int, default=0, show_default=True)
def convert_cmd(file: str, out: str, fmt: str | None, limit: int | None, sample: int | None, seed: int) -> None:
    """Convert a dataset file to editlens JSON Lines."""
    from editlens.data import load_cases, save_cases

    try:
        cases = load_cases(file, format=fmt, limit=limit, sample=sample, seed=seed)
        save_cases(cases, out)
    except EditlensError as e:
        _fail(e)
    click.echo(f"wrote {len(cases)} cases to {out}")


@data.command("synth")
@click.argument("n", type=click.IntRange(min=0))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
def synth_cmd(n: int, out: str, seed: int) -> None:
    """Write N fictional edit cases (deterministic for --seed) as editlens JSON Lines."""
    from editlens.data import save_cases, synthetic_cases

    save_cases(synthetic_cases(n, seed=seed), out)
    click.echo(f"wrote {n} synthetic cases to {out}")
