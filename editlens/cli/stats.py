"""``editlens stats``: precompute the second-moment statistics used by ROME/MEMIT/AlphaEdit/EMMET."""
from __future__ import annotations

import time
from pathlib import Path

import click


def _layers(value: str) -> list[int]:
    out: list[int] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


@click.command("stats")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model name or path.")
@click.option("--layers", required=True, help="Layers, e.g. 4,5,6,7,8 or 4-8.")
@click.option("--corpus", type=click.Path(path_type=Path), default=None,
              help=".txt (blank-line-separated documents) or .jsonl (field 'text'); default: text sampled from the model.")
@click.option("--n-samples", type=int, default=None,
              help="Number of documents (default: editlens.edit.stats.DEFAULT_N_SAMPLES).")
@click.option("--max-length", type=int, default=None,
              help="Tokens per document (default: editlens.edit.stats.DEFAULT_MAX_LENGTH).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Statistics cache (default $EDITLENS_STATS_DIR or the editlens cache).")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda when available).")
@click.option("--dtype", default=None, help="Model dtype (default float32 on cpu, bfloat16 on cuda).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampled corpus.")
def stats(model: str, layers: str, corpus: Path | None, n_samples: int | None, max_length: int | None,
          cache_dir: Path | None, device: str | None, dtype: str | None, seed: int) -> None:
    """Compute and cache C = E[k kᵀ] of the MLP output projection inputs at LAYERS (one forward pass per batch).

    Edits with the same settings (stats_corpus, stats_n_samples, stats_max_length, seed) then load them from the
    cache instead of computing them. Prints, per layer, the matrix's trace and eigenvalue range, then the wall
    time with its split (sampling the corpus, accumulating the products) and the number of tokens.
    """
    from editlens import load_model
    from editlens.edit import stats as st

    try:
        layer_list = _layers(layers)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers or ranges, got {layers!r}", param_hint="--layers")
    if not layer_list:
        raise click.BadParameter("no layer given", param_hint="--layers")
    n_samples = st.DEFAULT_N_SAMPLES if n_samples is None else n_samples
    max_length = st.DEFAULT_MAX_LENGTH if max_length is None else max_length
    for opt, v in (("--n-samples", n_samples), ("--max-length", max_length)):
        if v < 1:
            raise click.BadParameter(f"must be >= 1, got {v}", param_hint=opt)
    lm = load_model(model, device=device, dtype=dtype)
    t0 = time.perf_counter()
    info: dict = {}
    got = st.second_moment(lm, layer_list, corpus=corpus, n_samples=n_samples, max_length=max_length,
                           cache_dir=cache_dir, progress=True, seed=seed, info=info)
    dt = time.perf_counter() - t0
    where = st.stats_dir(cache_dir)
    for l, c in got.items():
        ev = __import__("torch").linalg.eigvalsh(c.double())
        click.echo(f"layer {l}: C {tuple(c.shape)}  trace {float(ev.sum()):.4g}  eigenvalues "
                   f"[{float(ev.min()):.3g}, {float(ev.max()):.3g}]  below 1e-2: {int((ev < 1e-2).sum())}")
    source = f"{n_samples} documents x {max_length} tokens sampled from the model" if corpus is None else str(corpus)
    if info.get("computed"):
        click.echo(f"computed layers {', '.join(map(str, info['computed']))} over {info['tokens']} tokens of "
                   f"{info['documents']} documents ({source})")
        click.echo(f"time: {dt:.1f} s wall (sampling {info['sampling_s']:.1f} s, accumulation "
                   f"{info['accumulation_s']:.1f} s)")
    else:
        click.echo(f"all layers read from the cache ({source}); time: {dt:.1f} s wall")
    click.echo(f"cached in {where}")
