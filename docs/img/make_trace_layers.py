"""Regenerate the figures of docs/localize.md, "Edit layers from the trace" (SmolLM2-135M, CPU):

    .venv/bin/python docs/img/make_trace_layers.py [--samples 3] [--window 10]

Traces the six known facts (``editlens.data.known_fact_cases()``) as ``layer="trace"`` / ``layers="trace"`` do
(:func:`editlens.localize.trace_layers`: average MLP indirect effect at the last subject token, default candidate
layers) and writes docs/img/trace_layers_smollm2.json: the per-layer scores (and each case's), the layer ROME's ``layer="trace"``
chooses, the window MEMIT's ``layers="trace"`` chooses (as many layers as its default for SmolLM2), and both
methods' default layers for comparison.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    a = ap.parse_args()
    import torch

    import editlens
    from editlens.data.known_facts import known_fact_cases
    from editlens.edit.base import get_method
    from editlens.localize import choose_layers, trace_layers

    torch.set_num_threads(a.threads)
    lm = editlens.load_model("smollm2-135m")
    cases = known_fact_cases()
    rome = get_method("rome").hparams_class.for_model(lm)
    memit = get_method("memit").hparams_class.for_model(lm)
    choice = trace_layers(lm, cases, 1, samples=a.samples, window=a.window, seed=a.seed, max_cases=len(cases))
    window = choose_layers(choice.scores, len(memit.layers), choice.candidates)
    out = {"model": "smollm2-135m", "cases": choice.case_ids, "samples": a.samples, "window": a.window,
           "seed": a.seed, "candidates": list(choice.candidates), "scores": [round(s, 6) for s in choice.scores],
           "per_case_scores": [[round(x, 6) for x in row] for row in choice.meta["per_case_scores"]],
           "p_clean": round(choice.p_clean, 6), "p_corrupt": round(choice.p_corrupt, 6),
           "rome_trace_layer": choice.layers[0], "rome_default_layer": rome.layer,
           "memit_trace_layers": window, "memit_default_layers": list(memit.layers)}
    path = HERE / "trace_layers_smollm2.json"
    path.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
