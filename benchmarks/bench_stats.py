"""Second-moment statistics on a cold cache: editlens's default against the settings before issue 19, same run.

``python -m benchmarks stats [--device cpu] [--model NAME] [--quick]`` computes ``C = E[k kᵀ]`` of ROME's layer
(:func:`editlens.edit.stats.second_moment`, corpus sampled from the model) twice, each time in a new, empty cache
directory (so the corpus is sampled and the products accumulated, as on the first edit of a new model):

* ``stats.default_*`` — ``DEFAULT_N_SAMPLES`` documents × ``DEFAULT_MAX_LENGTH`` tokens (the default);
* ``stats.previous_*`` — ``PREVIOUS_N_SAMPLES`` × ``PREVIOUS_MAX_LENGTH`` (256 × 128, the default before);

each with ``_s`` (wall, end to end), ``_cpu_s`` (process CPU time), ``_sampling_s`` and ``_accumulation_s`` (the
split), ``_tokens``; ``stats.speedup_vs_previous`` = previous_s / default_s; ``stats.default_within_target`` = 1
when the default took at most ``stats.target_s`` (180 s: issue 19's bound for SmolLM2 on 2 idle cores; the figure
means something only for that model on such a machine). ``--quick`` shrinks both settings, keeping their ratio of
tokens (8 × 16 against 16 × 16), so that CI checks that every row prints.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

import torch

from benchmarks.common import load_bench_model, print_figures, sync

TARGET_S = 180.0


def _cold(lm, layer: int, n_samples: int, max_length: int, device: str) -> dict[str, float]:
    from editlens.edit.stats import second_moment

    tmp = tempfile.mkdtemp(prefix="editlens-bench-stats-")
    info: dict = {}
    try:
        sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        second_moment(lm, [layer], n_samples=n_samples, max_length=max_length, cache_dir=tmp, progress=True,
                      info=info)
        sync(device)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert info["computed"] == [layer], info  # a cold cache: computed, not read
    return {"s": wall, "cpu_s": cpu, "sampling_s": info["sampling_s"], "accumulation_s": info["accumulation_s"],
            "tokens": float(info["tokens"]), "documents": float(info["documents"])}


def run(device: str = "cpu", model: str = "smollm2-135m", quick: bool = False, dtype: str | None = None
        ) -> dict[str, float]:
    """Run the statistics benchmark; returns ``{figure: value}``."""
    from editlens.edit import stats as st
    from editlens.edit.stats import sampled_corpus

    lm = load_bench_model(model, device=device, dtype=dtype)
    layer = min(4, lm.n_layers - 1)  # ROME's SmolLM2 layer
    settings = {"default": (st.DEFAULT_N_SAMPLES, st.DEFAULT_MAX_LENGTH),
                "previous": (st.PREVIOUS_N_SAMPLES, st.PREVIOUS_MAX_LENGTH)}
    if quick:
        settings = {"default": (8, 16), "previous": (16, 16)}
    sampled_corpus(lm, 2, 4, seed=99, cache=None)  # warm-up (first generate call), not timed
    vals: dict[str, float] = {}
    for name, (n, t) in settings.items():
        print(f"{name}: {n} documents x {t} tokens, cold cache", flush=True)
        got = _cold(lm, layer, n, t, device)
        for k, v in got.items():
            vals[f"stats.{name}_{k}"] = v
    vals["stats.speedup_vs_previous"] = vals["stats.previous_s"] / vals["stats.default_s"]
    vals["stats.target_s"] = TARGET_S
    vals["stats.default_within_target"] = float(vals["stats.default_s"] <= TARGET_S)
    print_figures(vals)
    return vals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_stats", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    vals = run(device=a.device, model=a.model, quick=a.quick, dtype=a.dtype)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(vals, f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
