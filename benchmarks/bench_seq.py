"""Sequential editing: time per edit early in a run vs late in a run (no growth), against a naive baseline.

``python -m benchmarks.bench_seq [--device cpu|cuda] [--model NAME] [--quick] [--edits N]`` prints and returns:

* ``seq.alphaedit_s_per_edit_at_10`` — mean seconds per edit over edits 1..10 of a sequential AlphaEdit run;
* ``seq.alphaedit_s_per_edit_at_N`` — the same over the last 10 edits of an N-edit run (N = 1000 full on GPU,
  ``--edits`` to choose; 30 with ``--quick``), and ``seq.alphaedit_growth`` = their ratio (target ≤ 1.5);
* ``seq.naive_growth`` — the same ratio for the naive bookkeeping of earlier edits (every step re-stacks all
  earlier keys ``K_p`` and recomputes ``K_p K_pᵀ``, as a straightforward implementation of AlphaEdit eq. 14
  does), timed on the same keys in the same run; editlens keeps ``K_p K_pᵀ`` accumulated (fixed size);
* ``seq.peak_mib``.

Editing cost per step is dominated by the value optimisation, which does not depend on the step; to keep the
benchmark affordable on CPU it runs with ``v_num_grad_steps=5`` and two context prefixes (growth, not absolute
speed, is what this suite measures; ``edit.rome_s_per_edit`` measures a full edit).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from benchmarks.common import peak_memory, print_figures, sync, load_bench_model


def _cases(n: int):
    from editlens.data import synthetic_cases

    return list(synthetic_cases(n, seed=1))[:n]


def _naive_growth(d_in: int, n_total: int, device: str, layers: int) -> float:
    """Seconds per step of the naive K_p bookkeeping at the end vs at step 10 (ratio), same shapes."""
    g = torch.Generator(device="cpu").manual_seed(0)
    keys = torch.randn(d_in, n_total, generator=g, dtype=torch.float64).to(device)

    def step_cost(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(layers):
            kp = keys[:, :n].clone()  # re-stacked history
            (kp @ kp.T).sum()
        sync(device)
        return time.perf_counter() - t0

    early = min(step_cost(10) for _ in range(3))
    late = min(step_cost(n_total) for _ in range(3))
    return late / max(early, 1e-9)


def run(device: str = "cpu", model: str = "smollm2-135m", quick: bool = False, dtype: str | None = None,
        edits: int | None = None) -> dict[str, float]:
    """Run the sequential-editing benchmark; returns ``{figure: value}``."""
    import editlens
    from editlens.edit import edit_sequential

    n_total = edits or int(os.environ.get("EDITLENS_BENCH_SEQ_EDITS", 0)) or (
        30 if quick else (1000 if torch.device(device).type == "cuda" else 200))
    n_total = max(n_total, 20)
    lm = load_bench_model(model, device=device, dtype=dtype)
    os.environ.setdefault("EDITLENS_STATS_DIR", tempfile.mkdtemp(prefix="editlens-bench-"))
    fast = dict(stats_n_samples=32 if quick else 128, stats_max_length=64, v_num_grad_steps=5, n_prefixes=2)
    stamps: list[float] = []

    def cb(step: int, n_edits: int, e) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    cases = _cases(n_total)
    # statistics and prefixes are computed (and cached) before the clock starts
    edit_sequential(lm, cases[:1], "alphaedit", **fast).undo()
    with peak_memory(device) as mem:
        sync(device)
        t0 = time.perf_counter()
        run_ = edit_sequential(lm, cases, "alphaedit", batch_size=1, callback=cb, progress=not quick, **fast)
    run_.undo()
    per = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    early = sum(per[:10]) / 10
    late = sum(per[-10:]) / 10
    from editlens.lm.arch import weight_view

    d_in = weight_view(lm.module(lm.arch.mlp_out_at(0))).shape[1]  # MLP output projection: [d_model, d_in]
    out = {
        "seq.alphaedit_s_per_edit_at_10": early,
        f"seq.alphaedit_s_per_edit_at_{n_total}": late,
        "seq.alphaedit_growth": late / early,
        "seq.naive_growth": _naive_growth(int(d_in), n_total, device, 5),
        "seq.n_edits": float(n_total),
        "seq.peak_mib": mem["mib"],
    }
    print_figures(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--edits", type=int, default=None)
    a = ap.parse_args()
    run(device=a.device, model=a.model, quick=a.quick, dtype=a.dtype, edits=a.edits)


if __name__ == "__main__":
    main()
