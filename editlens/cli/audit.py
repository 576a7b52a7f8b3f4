"""``editlens audit``: audit an edited checkpoint against its base (weights, drift, and with a dataset the full
probe-kind × metric table)."""
from __future__ import annotations

from pathlib import Path

import click

from editlens.errors import EditlensError


@click.command("audit")
@click.option("--base", "base", required=True, help="The unedited model: built-in name, .gguf, directory or hub id.")
@click.option("--model", "model", required=True, help="The edited model (same kinds of names).")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Dataset file: adds the probe-kind × metric table of --metrics on its cases.")
@click.option("--limit", type=int, default=None, help="Use only the first N cases of --data.")
@click.option("--metrics", default="gt,gtfree", show_default=True,
              help="Metrics or groups for the --data table (e.g. kl,topk@5,t_acc,s_acc).")
@click.option("--prompt-format", type=click.Choice(["raw", "chat"]), default="raw", show_default=True,
              help="How the --data probes are posed (the drift audit always uses raw prompts).")
@click.option("--no-rank", is_flag=True, help="Skip the SVD of each changed matrix (faster on large models).")
@click.option("--no-drift", is_flag=True, help="Skip the drift audit on the shipped prompts.")
@click.option("--batch-tokens", type=int, default=4096, show_default=True, help="Token budget of one padded batch.")
@click.option("--device", default=None, help="cpu / cuda (default: cuda when available).")
@click.option("--dtype", default="float32", show_default=True,
              help="Dtype both models are loaded in (float32 keeps float32/bfloat16 weights exact for the weight "
                   "report).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the full report (every changed tensor, per-prompt KL) as JSON.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the Markdown report to this file.")
def audit_cmd(base: str, model: str, data_path: Path | None, limit: int | None, metrics: str, prompt_format: str,
              no_rank: bool, no_drift: bool, batch_tokens: int, device: str | None, dtype: str,
              json_path: Path | None, out: Path | None) -> None:
    """Audit MODEL (an edited checkpoint) against BASE and print a Markdown report.

    \b
    - tokenizers must match (refused otherwise, naming the difference); architecture differences are warned about;
    - which parameter tensors changed: ||ΔW||_F, ||ΔW||_F/||W||_F, numerical rank of ΔW (stated tolerance),
      computed one tensor at a time;
    - drift where no edit should reach: KL, JS and top-k overlap on shipped neutral prompts and factual-QA
      probes, perplexity and downstream accuracy of both models;
    - with --data: the probe-kind × metric table of the edited model against the base.
    """
    if limit is not None and data_path is None:
        raise EditlensError("--limit needs --data")
    from editlens.evaluate import resolve_metrics

    metric_objs = resolve_metrics(metrics) if data_path is not None else None  # fail early on unknown names
    import warnings

    import editlens
    from editlens.audit import ArchitectureMismatchWarning, audit

    cases = editlens.load_cases(data_path, limit=limit) if data_path is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ArchitectureMismatchWarning)
        report = audit(base, model, cases, metrics=metric_objs or (), data_label=None if data_path is None
                       else data_path.name, prompt_format=prompt_format, rank=not no_rank, drift_audit=not no_drift,
                       batch_tokens=batch_tokens, device=device, dtype=dtype)
    for w in caught:
        if issubclass(w.category, ArchitectureMismatchWarning):
            click.echo(f"warning: {w.message}", err=True)
    text = report.to_markdown()
    click.echo(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
        click.echo(f"wrote {out}", err=True)
    if json_path is not None:
        report.save_json(json_path)
        click.echo(f"wrote {json_path}", err=True)
