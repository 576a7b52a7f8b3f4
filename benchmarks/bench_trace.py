"""Causal tracing: the bulk path (:func:`editlens.localize.causal_trace`) vs the paper's loop (one forward pass
of the noise draws per restored state, :func:`editlens.localize.causal_trace_reference`), same run, same prompt.

``python -m benchmarks trace [--device cpu] [--model NAME] [--quick]`` prints and returns:

* ``trace.bulk_s`` — one full trace (every token × layer) with reuse (restorations join the batch at the layer
  where they start to differ from the corrupted run) in token-budget batches;
* ``trace.flat_s`` — the same batches without reuse (every row runs every layer): what batching alone buys;
* ``trace.loop_s`` — one restoration per forward pass (``samples`` rows each), the reference loop;
* ``trace.speedup_vs_loop`` = loop / bulk (target ≥ 5), ``trace.flat_speedup_vs_loop`` = loop / flat;
* ``trace.forward_passes_bulk`` / ``trace.forward_passes_loop``; ``trace.row_layers_ratio`` — row × layer
  computations of the loop over those of the bulk path (the compute the reuse saves);
* ``trace.max_abs_diff`` — largest difference between the bulk and loop scores (0 when bit-identical).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from benchmarks.common import Figures, print_figures, timer

PROMPT = "The capital of Japan is"
SUBJECT = "Japan"


def _count_forwards(lm):
    box = {"n": 0}
    h = lm.model.register_forward_pre_hook(lambda *a: box.__setitem__("n", box["n"] + 1))
    return box, h


def run(device: str = "cpu", model: str = "smollm2-135m", quick: bool = False, dtype: str | None = None,
        samples: int = 2, kind: str = "hidden", batch_tokens: int = 4096) -> dict[str, float]:
    import editlens
    from editlens.localize import causal_trace, causal_trace_reference
    from editlens.localize.trace import _plan

    lm = editlens.load_model(model, device=device, dtype=dtype)
    if quick:
        samples = 1
    kw = dict(subject=SUBJECT, kind=kind, samples=samples, seed=0)
    causal_trace(lm, "Paris is in", subject="Paris", samples=1)  # warm-up
    figs = Figures()
    box, h = _count_forwards(lm)
    try:
        with timer(device) as tb:
            bulk = causal_trace(lm, PROMPT, batch_tokens=batch_tokens, **kw)
        n_bulk, box["n"] = box["n"], 0
        with timer(device) as tf:
            flat = causal_trace(lm, PROMPT, batch_tokens=batch_tokens, reuse=False, **kw)
        box["n"] = 0
        with timer(device) as tl:
            loop = causal_trace_reference(lm, PROMPT, **kw)
        n_loop = box["n"]
    finally:
        h.remove()
    T, L = bulk.scores.shape
    rests = _plan(T, L, kind, 10, True)
    bulk_row_layers = sum(L - 1 - r.join for r in rests) + L  # + the corrupted rows, once (per batch: ignored)
    vals = {
        "trace.tokens": float(T), "trace.layers": float(L), "trace.samples": float(samples),
        "trace.bulk_s": tb["s"], "trace.flat_s": tf["s"], "trace.loop_s": tl["s"],
        "trace.speedup_vs_loop": tl["s"] / tb["s"], "trace.flat_speedup_vs_loop": tl["s"] / tf["s"],
        "trace.forward_passes_bulk": float(n_bulk), "trace.forward_passes_loop": float(n_loop),
        "trace.row_layers_ratio": (T * L * L) / bulk_row_layers,
        "trace.max_abs_diff": float(np.abs(bulk.scores - loop.scores).max()),
        "trace.flat_max_abs_diff": float(np.abs(flat.scores - loop.scores).max()),
    }
    print_figures(vals)
    figs.values.update(vals)
    return figs.values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_trace", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--kind", default="hidden", choices=["hidden", "mlp", "attn"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    vals = run(device=a.device, model=a.model, quick=a.quick, samples=a.samples, kind=a.kind)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(vals, f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
