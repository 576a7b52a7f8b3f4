"""Regenerate the causal-tracing figures of the README and docs/localize.md (SmolLM2-135M, CPU):

    .venv/bin/python docs/img/make_trace_figures.py [--samples 3] [--limit 8]

Traces the MLP outputs (window 10) of every fact of the shipped CounterFact sample and writes
docs/img/trace_smollm2_mlp_average.png, one per-case heatmap docs/img/trace_smollm2_mlp_case0.png and the figures
read in the text (docs/img/trace_smollm2_mlp.json: peak layers, per-case p_clean / p_corrupt / known).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "editlens" / "resources" / "data" / "counterfact_sample.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--kind", default="mlp")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    a = ap.parse_args()
    import torch

    import editlens
    from editlens.localize import average_trace

    torch.set_num_threads(a.threads)
    lm = editlens.load_model("smollm2-135m")
    cases = editlens.load_cases(DATA, limit=a.limit)
    t0 = time.perf_counter()
    avg = average_trace(lm, cases, kind=a.kind, samples=a.samples,
                        progress=lambda i, n, t: print(f"[{i + 1}/{n}] {t.prompt!r} -> {t.answer!r} "
                                                        f"p_clean {t.p_clean:.3f} p_corrupt {t.p_corrupt:.3f}",
                                                        flush=True))
    wall = time.perf_counter() - t0
    stem = f"trace_smollm2_{a.kind}"
    avg.plot(HERE / f"{stem}_average.png",
             title=f"SmolLM2-135M: average indirect effect of {a.kind.upper() if a.kind != 'hidden' else 'h'} "
                   f"over {avg.n_cases} CounterFact facts")
    avg.traces[0].plot(HERE / f"{stem}_case0.png")
    k_last_subj = avg.categories.index("last subject token")
    k_last = avg.categories.index("last token")
    eff = avg.effects[k_last_subj]
    top = [int(i) for i in np.argsort(-eff)[:5]]
    out = {
        "model": "smollm2-135m", "kind": a.kind, "window": avg.window, "samples": a.samples, "n_cases": avg.n_cases,
        "wall_s": round(wall, 1), "noise": avg.traces[0].noise,
        "p_clean_mean": avg.p_clean, "p_corrupt_mean": avg.p_corrupt, "total_effect_mean": avg.total_effect,
        "known": int(sum(t.known for t in avg.traces)),
        "peak_layer_last_subject_token": avg.peak("last subject token"),
        "top5_layers_last_subject_token": top,
        "effect_last_subject_token_by_layer": [round(float(x), 4) for x in eff],
        "peak_layer_last_token": avg.peak("last token"),
        "effect_last_token_by_layer": [round(float(x), 4) for x in avg.effects[k_last]],
        "cases": [{"prompt": t.prompt, "answer": t.answer, "p_clean": round(t.p_clean, 4),
                   "p_corrupt": round(t.p_corrupt, 4), "known": t.known,
                   "peak_layer_last_subject_token": int(t.indirect_effect[t.subject_range[1] - 1].argmax())}
                  for t in avg.traces],
    }
    (HERE / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "cases"}, indent=1))


if __name__ == "__main__":
    main()
