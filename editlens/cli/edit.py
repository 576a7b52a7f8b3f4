"""``editlens edit``: apply an editing method to a model and measure the edit."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from editlens.cli.progress_option import apply_quiet, quiet_option
from editlens.errors import EditlensError


def parse_overrides(items: tuple[str, ...]) -> dict[str, Any]:
    """``("layers=[4,5]", "lr=0.1")`` -> ``{"layers": [4, 5], "lr": 0.1}`` (values parsed as JSON when they can be)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise EditlensError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


@click.command("edit")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model name or path.")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Dataset file (any supported format; see `editlens data inspect`).")
@click.option("--method", default="memit", show_default=True, help="Editing method (e.g. rome, memit, alphaedit, scr).")
@click.option("--limit", type=int, default=None, help="Edit only the first N cases.")
@click.option("--sequential/--batch", default=False, show_default=True,
              help="Apply the cases one batch after another (sequential editing) instead of all at once.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Cases per step in sequential mode.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Hyperparameter override, repeatable (e.g. --set mom2_update_weight=15000).")
@click.option("--metrics", default="gt,gtfree", show_default=True, help="Comma-separated metrics or groups.")
@click.option("--prompt-format", type=click.Choice(["raw", "chat", "auto"]), default="raw", show_default=True,
              help="Pose prompts as raw text or inside the model's chat template (auto: chat when the model has "
                   "one); the edit is made and evaluated in this format.")
@click.option("--device", default=None, help="cpu / cuda (default: cuda when available).")
@click.option("--dtype", default=None, help="float32 / bfloat16 / float16.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write tidy rows to .csv / .parquet / .json.")
@click.option("--save", "save_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the edited model to this directory as a standard Hugging Face checkpoint "
                   "(safetensors, config, tokenizer, editlens.json); weight-editing methods only.")
@click.option("--force", is_flag=True, help="With --save: replace the checkpoint files of a non-empty directory.")
@click.option("--trained", "trained_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="For a trained method (mend, malmen, ke, serac): the editor saved by `editlens train --out`.")
@quiet_option
def edit_cmd(model: str, data_path: Path, method: str, limit: int | None, sequential: bool, batch_size: int,
             overrides: tuple[str, ...], metrics: str, prompt_format: str, device: str | None, dtype: str | None,
             out: Path | None, save_dir: Path | None, force: bool, quiet: bool = False,
             trained_dir: Path | None = None) -> None:
    """Edit MODEL with METHOD on the cases of DATA, evaluate the edited system against the base, then undo.

    Prints the summary (mean ± sem per probe kind and metric) and the edit's diagnostics. With --save DIR the
    edited weights are written to DIR before the undo (read it back with `editlens audit --base MODEL --model DIR`).
    """
    import editlens
    from editlens.edit import edit, edit_sequential, get_method
    from editlens.evaluate import ModelSystem, evaluate

    apply_quiet(quiet)
    if save_dir is not None:  # refuse before any work: a wrapper method, a non-empty directory
        from editlens.errors import MethodError
        from editlens.lm.checkpoint import check_save_target

        if get_method(method).edits_weights is False:
            raise MethodError(f"--save: {method} keeps its edit outside the model's weights (a codebook, side "
                              "memory, retrieved facts or a prompt consulted at call time), so a weights checkpoint "
                              "would be the unedited model; use a weight-editing method (ft, rome, memit, "
                              "alphaedit, emmet, rect, prune, pmet)")
        check_save_target(save_dir, force)
    if out is not None and out.suffix not in (".csv", ".parquet", ".json"):
        raise EditlensError(f"--out must end in .csv, .parquet or .json, got {out.name}")
    trained = None
    if trained_dir is not None:  # read and check the editor before loading the model
        from editlens.edit.trained import TrainedEditor

        trained = TrainedEditor.load(trained_dir)
    lm = editlens.load_model(model, device=device, dtype=dtype)
    cases = editlens.load_cases(data_path, limit=limit)
    hp = parse_overrides(overrides)
    base = ModelSystem(lm, prompt_format=prompt_format)
    metric_list = [m.strip() for m in metrics.split(",") if m.strip()]
    click.echo(f"editing {len(cases)} cases with {method} ...")
    if sequential:
        result = edit_sequential(lm, cases, method, batch_size=batch_size, hparams=hp or None, progress=True,
                                 prompt_format=prompt_format, trained=trained)
    else:
        result = edit(lm, cases, method=method, hparams=hp or None, progress=True, prompt_format=prompt_format,
                      trained=trained)
    try:
        if save_dir is not None:
            saved = result.save_pretrained(save_dir, force=force)
            click.echo(f"saved the edited model to {saved}")
        # `base` was created before the edit, so it keeps answering with the unedited weights
        res = evaluate(result.system, cases, base=base, metrics=metric_list, prompt_format=prompt_format)
    finally:
        result.undo()
    summary = res.summary()
    click.echo(summary.to_string(index=False))
    diag = {k: v for k, v in result.diagnostics.items() if isinstance(v, (int, float))}
    if diag:
        click.echo("\ndiagnostics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(diag.items())[:20]))
    if out:
        _write(res.to_pandas(), out)
        click.echo(f"wrote {out}")


def _write(df, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        df.to_csv(out, index=False)
    elif out.suffix == ".parquet":
        df.to_parquet(out, index=False)
    elif out.suffix == ".json":
        df.to_json(out, orient="records", indent=1)
    else:
        raise EditlensError(f"--out must end in .csv, .parquet or .json, got {out.name}")
