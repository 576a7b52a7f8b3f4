"""Editing speed: ROME s/edit, MEMIT 100-case batch, AlphaEdit s/sequential edit, statistics one-pass vs per-layer.

``python -m benchmarks.bench_edit [--device cpu|cuda] [--model NAME] [--quick]`` prints and returns flat figures:

* ``edit.stats_s_per_layer`` — second moments, all layers recorded in one forward pass per batch, per layer;
* ``edit.stats_per_layer_pass_s_per_layer`` — the naive baseline (one forward pass per layer), same corpus;
* ``edit.stats_one_pass_speedup`` — their ratio, measured in the same run;
* ``edit.rome_s_per_edit`` and its naive baseline ``edit.rome_naive_s_per_edit`` (one prefixed prompt per forward
  pass), ``edit.rome_speedup_vs_naive``;
* ``edit.memit_batch100_s`` (``batch10`` with ``quick``; also ``batch1000`` on CUDA) and
  ``..._speedup_vs_per_case_loop`` against one MEMIT edit per case (timed on the first 10 cases, scaled to the
  batch);
* ``edit.alphaedit_s_per_seq_edit``; peak memory (``*_peak_mib``) of the ROME and MEMIT runs.

Statistics are computed without the disk cache (``use_cache=False``) so that both modes do the same work; the
edits use a small model-sampled corpus cached once.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks.common import peak_memory, print_figures, sync, load_bench_model


def _cases(n: int):
    """The first ``n`` synthetic edit cases (seed 0): the same facts for every run and device."""
    from editlens.data import synthetic_cases

    cases = list(synthetic_cases(n, seed=0))
    if len(cases) < n:
        raise ValueError(f"the synthetic generator gave {len(cases)} cases, the benchmark needs {n}")
    return cases[:n]


def run(device: str = "cpu", model: str = "smollm2-135m", quick: bool = False, dtype: str | None = None
        ) -> dict[str, float]:
    """Run the editing benchmark; returns ``{figure: value}`` (seconds / ratios)."""
    import editlens
    from editlens.edit import edit, edit_sequential
    from editlens.edit.stats import second_moment

    lm = load_bench_model(model, device=device, dtype=dtype)
    out: dict[str, float] = {}
    tmp = tempfile.mkdtemp(prefix="editlens-bench-")
    os.environ.setdefault("EDITLENS_STATS_DIR", tmp)
    layers = list(range(min(4, lm.n_layers - 1), min(9, lm.n_layers)))
    docs = [f"Document {i}: the quick brown fox number {i} jumps over the lazy dog near river {i % 7}. " * 8
            for i in range(16 if quick else 64)]
    kw = dict(corpus=docs, n_samples=len(docs), max_length=128, use_cache=False, progress=False)
    sync(device)
    t0 = time.perf_counter()
    second_moment(lm, layers, one_pass=True, **kw)
    sync(device)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    second_moment(lm, layers, one_pass=False, **kw)
    sync(device)
    per = time.perf_counter() - t0
    out["edit.stats_s_per_layer"] = one / len(layers)
    out["edit.stats_per_layer_pass_s_per_layer"] = per / len(layers)
    out["edit.stats_one_pass_speedup"] = per / one
    fast = dict(stats_n_samples=32 if quick else 128, stats_max_length=64)
    # warm the statistics/prefix cache once so the timings below measure editing only
    edit(lm, _cases(1), "memit", **fast).undo()
    n_rome = 2 if quick else 5
    with peak_memory(device) as mem:
        t0 = time.perf_counter()
        for c in _cases(n_rome):
            e = edit(lm, [c], "rome", **fast)
            e.undo()
        sync(device)
    out["edit.rome_s_per_edit"] = (time.perf_counter() - t0) / n_rome
    out["edit.rome_peak_mib"] = mem["mib"]
    # naive baseline: the same edits with one prefixed prompt per forward pass (gradients accumulated), as a
    # per-prompt loop does; batch_tokens=1 puts every row in its own chunk (and misses the value memo)
    t0 = time.perf_counter()
    for c in _cases(n_rome):
        edit(lm, [c], "rome", batch_tokens=1, **fast).undo()
    sync(device)
    out["edit.rome_naive_s_per_edit"] = (time.perf_counter() - t0) / n_rome
    out["edit.rome_speedup_vs_naive"] = out["edit.rome_naive_s_per_edit"] / out["edit.rome_s_per_edit"]
    # MEMIT batches: 100 edits (10 with quick); on CUDA also 1,000 (the memory target) - on 2 CPU cores a
    # 1,000-fact value optimisation alone takes over an hour
    sizes = [10] if quick else ([100, 1000] if device.startswith("cuda") else [100])
    for n_batch in sizes:
        with peak_memory(device) as mem:
            t0 = time.perf_counter()
            e = edit(lm, _cases(n_batch), "memit", **fast)
            sync(device)
        out[f"edit.memit_batch{n_batch}_s"] = time.perf_counter() - t0
        out[f"edit.memit_batch{n_batch}_peak_mib"] = mem["mib"]
        e.undo()
    # naive baseline: one MEMIT edit per case (a per-case loop), timed on the first n_loop cases and scaled to
    # each batch size (the per-case cost does not depend on how many cases follow)
    n_loop = min(sizes[0], 3 if quick else 10)
    t0 = time.perf_counter()
    for c in _cases(sizes[0])[:n_loop]:
        edit(lm, [c], "memit", **fast).undo()  # a one-case request set: never served by the batch's value memo
    sync(device)
    out["edit.memit_naive_per_case_s"] = (time.perf_counter() - t0) / n_loop
    for n_batch in sizes:
        out[f"edit.memit_batch{n_batch}_speedup_vs_per_case_loop"] = (
            out["edit.memit_naive_per_case_s"] * n_batch / out[f"edit.memit_batch{n_batch}_s"])
    n_seq = 3 if quick else 20
    t0 = time.perf_counter()
    run_ = edit_sequential(lm, _cases(n_seq), "alphaedit", batch_size=1, **fast)
    sync(device)
    out["edit.alphaedit_s_per_seq_edit"] = (time.perf_counter() - t0) / n_seq
    run_.undo()
    print_figures(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    run(device=a.device, model=a.model, quick=a.quick, dtype=a.dtype)


if __name__ == "__main__":
    main()
