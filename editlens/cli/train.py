"""``editlens train``: train the editor of a trained method (MEND, MALMEN, KE, SERAC) and save it."""
from __future__ import annotations

from pathlib import Path

import click

from editlens.errors import EditlensError


@click.command("train")
@click.option("--method", required=True, help="A trained method (see `editlens methods`): mend, malmen, ke, serac.")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model name or path.")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Training cases (any supported format, with paraphrase and neighbourhood probes).")
@click.option("--synthetic", type=int, default=None,
              help="Train on N synthetic cases (editlens.synthetic_cases) instead of --data.")
@click.option("--val", "val_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Validation cases (default: the method holds out part of the training cases).")
@click.option("--limit", type=int, default=None, help="Use only the first N training cases.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write the editor to (editor.safetensors + editor.json).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Training hyperparameter override, repeatable (e.g. --set steps=500).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu / cuda (default: cuda when available).")
@click.option("--dtype", default=None, help="float32 / bfloat16 / float16.")
@click.option("--force", is_flag=True, help="Replace an editor already saved in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_cmd(method: str, model: str, data_path: Path | None, synthetic: int | None, val_path: Path | None,
              limit: int | None, out: Path, overrides: tuple[str, ...], seed: int, device: str | None,
              dtype: str | None, force: bool, quiet: bool) -> None:
    """Train METHOD's editor for MODEL on --data (or --synthetic N) and save it to --out.

    Edit with it afterwards: `editlens edit --method METHOD --trained OUT ...`, in Python
    editlens.edit(lm, cases, method=METHOD, trained=OUT), or in a spec with `trained = "OUT"`.
    """
    import editlens
    from editlens.cli.edit import parse_overrides
    from editlens.edit.trained import _trainable, check_training_cases

    if (data_path is None) == (synthetic is None):
        raise EditlensError("give either --data FILE or --synthetic N (training cases)")
    editor = _trainable(method)  # an untrained method is refused before the model is loaded
    if out.exists() and not out.is_dir():
        raise EditlensError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise EditlensError(f"--out {out} is not empty; choose a new directory or pass --force")
    cases = (editlens.load_cases(data_path, limit=limit) if data_path is not None
             else editlens.synthetic_cases(synthetic, seed=seed))
    check_training_cases(editor.name, cases, editor.train_needs)
    val = editlens.load_cases(val_path) if val_path is not None else None
    if val is not None:
        check_training_cases(editor.name, val, editor.train_needs, what="validation")
    hp = parse_overrides(overrides)
    lm = editlens.load_model(model, device=device, dtype=dtype)
    click.echo(f"training {editor.name} for {lm.name} on {len(cases)} cases"
               + (f" (validation: {len(val)})" if val is not None else "") + " ...")
    te = editlens.train(editor.name, lm, cases, val_cases=val, progress=not quiet, seed=seed, **hp)
    saved = te.save(out, force=force)
    meta = te.meta
    click.echo(f"trained in {meta.get('train_wall_time_s', float('nan')):.1f} s; saved to {saved}")
    curve = meta.get("loss_curve")
    if isinstance(curve, list) and curve:
        pick = sorted({0, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4, len(curve) - 1})
        click.echo("loss curve: " + ", ".join(f"step {i}: {float(curve[i]):.4g}" for i in pick))
    val_fig = {k: v for k, v in meta.items() if k.startswith("val") and isinstance(v, (int, float))}
    if val_fig:
        click.echo("validation: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(val_fig.items())))
