"""``editlens trace``: causal tracing (Meng et al. 2022) of a dataset's facts: per-case heatmaps, the average
indirect-effect figure and CSV tables."""
from __future__ import annotations

import re
from pathlib import Path

import click

from editlens.cli.progress_option import apply_quiet, quiet_option


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60] or "case"


@click.command("trace")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model name or path.")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Dataset file (CounterFact, ZsRE, ... any format load_cases reads).")
@click.option("--limit", type=int, default=None, help="Trace only the first N cases.")
@click.option("--kind", type=click.Choice(["hidden", "mlp", "attn"]), default="hidden", show_default=True,
              help="State restored: block outputs (hidden), or MLP / attention outputs in a window of layers.")
@click.option("--samples", type=int, default=10, show_default=True, help="Noise draws per restoration.")
@click.option("--window", type=int, default=10, show_default=True, help="Layers restored together (mlp/attn).")
@click.option("--noise", type=float, default=None,
              help="Noise standard deviation (default: 3 x the std of the input embeddings).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise draws.")
@click.option("--known-only", is_flag=True, help="Average only the facts the model predicts (greedy first token).")
@click.option("--batch-tokens", type=int, default=4096, show_default=True,
              help="Peak rows x tokens of one forward pass.")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda when available).")
@click.option("--dtype", default=None, help="Model dtype.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: trace_<i>_<case>.png, average_<kind>.png, traces.csv, average.csv, cases.csv.")
@quiet_option
def trace(model: str, data_path: Path, limit: int | None, kind: str, samples: int, window: int, noise: float | None,
          seed: int, known_only: bool, batch_tokens: int, device: str | None, dtype: str | None,
          out_dir: Path, quiet: bool = False) -> None:
    """Causal-trace every case of DATA (its rewrite prompt, subject and true object) and write the heatmaps.

    \b
    Writes into OUT:
      trace_<n>_<case>.png   one heatmap per case (tokens down, layers across, subject tokens marked *)
      average_<kind>.png     the average indirect effect by token category (the paper's Figure 2)
      traces.csv             tidy rows: case_id, token_index, token, category, layer, score, indirect_effect, ...
      average.csv            category, layer, mean_indirect_effect, sem, n
      cases.csv              per case: prompt, subject, answer, p_clean, p_corrupt, known, peak layer
    """
    import pandas as pd

    from editlens import load_cases, load_model
    from editlens.localize import average_trace
    from editlens.localize.trace import _check_args

    apply_quiet(quiet)
    if limit is not None and limit < 1:
        raise click.BadParameter("must be >= 1", param_hint="--limit")
    _check_args(kind, samples, window, noise, seed, batch_tokens)  # before loading anything
    cases = load_cases(data_path, limit=limit)
    lm = load_model(model, device=device, dtype=dtype)
    out_dir.mkdir(parents=True, exist_ok=True)

    import time

    from editlens import progress as _progress

    started = time.monotonic()

    def progress(i: int, n: int, t) -> None:  # one line per traced fact, with the time left (stderr; --quiet: none)
        _progress.echo(f"[{i + 1}/{n}] {t.case_id}: {t.prompt!r} -> {t.answer!r}  p_clean {t.p_clean:.3f}  "
                       f"p_corrupt {t.p_corrupt:.3f}  ({_progress.eta(i + 1, n, started)})")

    avg = average_trace(lm, cases, kind=kind, noise=noise, samples=samples, window=window, seed=seed,
                        known_only=known_only, batch_tokens=batch_tokens, progress=progress)
    rows, summary = [], []
    traces = avg.traces_all
    for n, t in enumerate(traces):
        t.plot(out_dir / f"trace_{n:03d}_{_slug(str(t.case_id))}.png")
        rows.append(t.to_pandas())
        a, b = t.subject_range
        ie = t.indirect_effect
        summary.append({"case_id": t.case_id, "prompt": t.prompt, "subject": t.subject, "answer": t.answer,
                        "p_clean": t.p_clean, "p_corrupt": t.p_corrupt, "known": t.known,
                        "averaged": t in avg.traces, "noise": t.noise,
                        "peak_layer_last_subject_token": int(ie[b - 1].argmax()),
                        "peak_layer_last_token": int(ie[-1].argmax())})
    pd.concat(rows, ignore_index=True).to_csv(out_dir / "traces.csv", index=False)
    pd.DataFrame(summary).to_csv(out_dir / "cases.csv", index=False)
    avg.to_pandas().to_csv(out_dir / "average.csv", index=False)
    avg.plot(out_dir / f"average_{kind}.png", title=f"{model}: average indirect effect ({kind}) over "
                                                      f"{avg.n_cases} facts")
    click.echo(f"{len(traces)} traces ({avg.n_cases} averaged); peak layer of the average indirect effect at the "
               f"last subject token: {avg.peak('last subject token')}, at the last token: {avg.peak('last token')}")
    click.echo(f"wrote {out_dir}")
