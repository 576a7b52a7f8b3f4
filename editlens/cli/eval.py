"""``editlens eval``: evaluate a model (and optionally edited versions of it) on a dataset's probes."""
from __future__ import annotations

from pathlib import Path

import click

from editlens.cli.progress_option import apply_quiet, quiet_option
from editlens.errors import EditlensError


def _list_metrics() -> str:
    from editlens.evaluate import metric_groups, registered_metrics

    lines = []
    for name, cls in registered_metrics().items():
        doc = (cls.__doc__ or "").strip().splitlines()
        lines.append(f"  {name:<22} [{','.join(cls.groups) or '-'}] {cls.direction:<6} {doc[0] if doc else ''}")
    lines.append("groups: " + "; ".join(f"{g} = {','.join(m)}" for g, m in sorted(metric_groups().items())))
    from editlens.evaluate.core import metric_import_errors

    lines += [f"failed to import: {err}" for err in metric_import_errors()]
    return "\n".join(lines)


@click.command("eval")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Model name or path (with --base: the edited model evaluated against BASE).")
@click.option("--base", "base_model", default=None,
              help="Evaluate MODEL against this base model (a name, .gguf, directory or hub id): GT-free metrics "
                   "compare BASE's answers with MODEL's. The tokenizers must match.")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Dataset file (any supported format; see `editlens data inspect`).")
@click.option("--limit", type=int, default=None, help="Evaluate only the first N cases.")
@click.option("--metrics", default="gt,gtfree", show_default=True,
              help="Comma-separated metric names or groups (gt, gtfree, generation, all); e.g. kl,topk@5,t_acc.")
@click.option("--prompt-format", type=click.Choice(["raw", "chat", "auto"]), default="raw", show_default=True,
              help="Pose prompts as raw text or inside the model's chat template (auto: chat when the model has one; "
                   "recorded with the results). Edits made with --method are made in this format.")
@click.option("--method", "methods", multiple=True,
              help="Also edit the model with this method (repeatable) and evaluate the edited system against the "
                   "base; base outputs are computed once. Without it, the base model is evaluated against itself.")
@click.option("--batch-tokens", type=int, default=4096, show_default=True, help="Token budget of one padded batch.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Persist base-model outputs here (reused by later runs with the same model, format and probes).")
@click.option("--device", default=None, help="cpu / cuda (default: cuda when available).")
@click.option("--dtype", default=None, help="float32 / bfloat16 / float16.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write tidy rows (system, case_id, probe_kind, metric, value) to .csv / .parquet / .json.")
@click.option("--list-metrics", is_flag=True, help="List the registered metrics and groups, then exit.")
@quiet_option
def eval_cmd(model: str, base_model: str | None, data_path: Path | None, limit: int | None, metrics: str,
             prompt_format: str, methods: tuple[str, ...], batch_tokens: int, cache_dir: Path | None,
             device: str | None, dtype: str | None, out: Path | None, list_metrics: bool, quiet: bool = False) -> None:
    """Evaluate MODEL on the probes of DATA with METRICS; print mean ± sem per probe kind and metric.

    With --base BASE, MODEL is an edited checkpoint made anywhere and is evaluated against BASE (rows of both:
    system "base" is BASE against itself, system "edited" is MODEL against BASE)."""
    apply_quiet(quiet)
    if list_metrics:
        click.echo(_list_metrics())
        return
    if data_path is None:
        raise EditlensError("--data FILE is required (or use --list-metrics)")
    if base_model is not None and methods:
        raise EditlensError("--base evaluates MODEL (already edited) against BASE; --method edits a model here: "
                            "use one or the other")
    import pandas as pd

    import editlens
    from editlens.evaluate import BaseCache, ModelSystem, evaluate, resolve_metrics

    metric_objs = resolve_metrics(metrics)  # fail early on unknown names
    if out is not None and out.suffix.lower() not in (".csv", ".parquet", ".json"):
        raise EditlensError(f"--out must end in .csv, .parquet or .json, got {out.name}")
    edited_lm = None
    if base_model is not None:
        import warnings

        from editlens.audit import ArchitectureMismatchWarning, load_pair

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ArchitectureMismatchWarning)
            lm, edited_lm = load_pair(base_model, model, device=device, dtype=dtype, prompt_format=prompt_format)
        for w in caught:
            if issubclass(w.category, ArchitectureMismatchWarning):
                click.echo(f"warning: {w.message}", err=True)
    else:
        lm = editlens.load_model(model, device=device, dtype=dtype)
    cases = editlens.load_cases(data_path, limit=limit)
    base = ModelSystem(lm, prompt_format=prompt_format, batch_tokens=batch_tokens)
    cache = BaseCache(cache_dir)
    frames = []
    who = lm.name if edited_lm is None else f"{edited_lm.name} against {lm.name}"
    click.echo(f"evaluating {who} ({base.prompt_format}) on {len(cases)} cases: {', '.join(m.name for m in metric_objs)}")
    from editlens.evaluate.judge import remote_endpoints

    for line in remote_endpoints(metric_objs, [(cases, 1 + len(methods) + (edited_lm is not None))], control_each=False):
        click.echo(f"judge endpoint: {line}", err=True)
    res = evaluate(base, cases, base=base, metrics=metric_objs, batch_tokens=batch_tokens, cache=cache)
    frames.append(res.to_pandas().assign(system="base"))
    _show("base", res)
    if edited_lm is not None:
        edited = ModelSystem(edited_lm, prompt_format=prompt_format, batch_tokens=batch_tokens)
        r = evaluate(edited, cases, base=base, metrics=metric_objs, batch_tokens=batch_tokens, cache=cache)
        frames.append(r.to_pandas().assign(system="edited"))
        _show(f"edited: {edited_lm.name}", r)
    for method in methods:
        from editlens.edit import edit

        from editlens.data.formats.pitfalls import is_staged

        if any(is_staged(c) for c in cases):  # ConflictEdit / RoundEdit: each record alone, e1 then e2 (Li et al.)
            from editlens.drivers import evaluate_staged

            click.echo(f"\nediting each of {len(cases)} cases alone with {method} (two stages: e1, then e1+e2) ...")
            r = evaluate_staged(lm, cases, method, metric_objs, base=base, prompt_format=prompt_format,
                                batch_tokens=batch_tokens, cache=cache)
            frames.append(r.to_pandas().assign(system=method))
            _show(method, r)
            continue
        click.echo(f"\nediting {len(cases)} cases with {method} ...")
        result = edit(lm, cases, method=method, progress=True, prompt_format=prompt_format)
        try:
            r = evaluate(result.system, cases, base=base, metrics=metric_objs, batch_tokens=batch_tokens, cache=cache)
        finally:
            result.undo()
        frames.append(r.to_pandas().assign(system=method))
        _show(method, r)
    if out is not None:
        df = pd.concat(frames, ignore_index=True)[["system", "case_id", "probe_kind", "metric", "value"]]
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".csv":
            df.to_csv(out, index=False)
        elif out.suffix.lower() == ".parquet":
            df.to_parquet(out, index=False)
        else:
            df.to_json(out, orient="records", indent=1)
        click.echo(f"wrote {len(df)} rows to {out}")


def _show(label: str, res) -> None:
    s = res.summary()
    click.echo(f"\n[{label}] prompt_format={res.meta['prompt_format']} fingerprint={res.meta['system']['fingerprint']} "
               f"({res.meta['timings']['total_s']:.1f} s)")
    click.echo(s.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
