"""``editlens models`` and ``editlens demo``."""
from __future__ import annotations

import time
from pathlib import Path

import click


def sample_data_path(name: str = "counterfact_sample.json") -> Path:
    """Path of a sample dataset shipped with the package (same files as the project's shared samples)."""
    return Path(__file__).resolve().parents[1] / "resources" / "data" / name


@click.command("models")
def models() -> None:
    """List built-in model names and whether each is installed here."""
    from editlens.lm import installed_models

    click.echo("Built-in models (any hub id, local checkpoint directory or .gguf file also works):")
    for name, status in installed_models().items():
        click.echo(f"  {name:<14} {status}")


@click.command("demo")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model name or path.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("editlens-demo"), show_default=True,
              help="Directory for the demo's store, tables and HTML report.")
@click.option("--quick/--full", default=True, show_default=True, help="Quick: 3 values of λ; full: 5 (1.5e2 .. 1.5e6).")
def demo(model: str, out: Path, quick: bool) -> None:
    """Run the offline demo on the embedded model.

    Loads the model and shows its greedy answers to 8 facts of a shipped CounterFact-style sample, then runs
    the experiment spec editlens/resources/demo.toml: MEMIT edits the 8 facts at once for each λ
    (mom2_update_weight) of a sweep, plus the unedited model. It prints (a) locality on the neighbourhood
    prompts, ground-truth-based (s_acc, t_acc, c_acc) beside ground-truth-free (KL, top-k overlap), with each
    metric's sensitivity to λ (Kendall's τ), and (c) teacher-forced beside autoregressive efficacy; the store,
    tables, PNG plots and an HTML report go to OUT. About 2 minutes on 2 CPU cores; re-running resumes.
    """
    from editlens.cli.demo import run_demo

    t0 = time.time()
    run_demo(model=model, out=out, quick=quick)
    click.echo(f"\ndemo finished in {time.time() - t0:.1f} s")
