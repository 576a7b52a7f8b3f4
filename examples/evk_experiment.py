"""EVK experiment: MEMIT vs MEMIT + EVK-Align on the embedded SmolLM2 (CPU, a few minutes).

    python examples/evk_experiment.py --cases 50 --weights 0,1,4 --out evk_results.json

Edits ``--cases`` synthetic CounterFact-style cases in one batch per configuration, then evaluates efficacy
(``c_acc``: P(new) > P(true) on the rewrite and paraphrase prompts), EVK-Bench (all spans, default σ ladder and
samples) and text stability, with standard errors over cases. Prints a table and writes the summaries as JSON.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cases", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="memit")
    ap.add_argument("--weights", default="0,1", help="EVK-Align weights (0 = plain method)")
    ap.add_argument("--sigmas", default="0.2,0.4", help="EVK-Align σ ladder")
    ap.add_argument("--spans", default="relation", help="EVK-Align spans")
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stats-n", type=int, default=64, help="MEMIT second-moment documents (stats_n_samples)")
    ap.add_argument("--stats-len", type=int, default=64, help="tokens per statistics document")
    ap.add_argument("--out", default="evk_results.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import editlens
    from editlens.data import synthetic_cases
    from editlens.edit import edit
    from editlens.edit.evk_align import EvkAlign
    from editlens.evaluate.core import evaluate
    from editlens.evaluate.evk import evk_metrics
    from editlens.system import ModelSystem

    lm = editlens.load_model(args.model)
    cases = synthetic_cases(args.cases, seed=args.seed)
    base = ModelSystem(lm)
    metrics = ["c_acc", *evk_metrics()]
    out = {}
    for method in args.methods.split(","):
        for w in [float(x) for x in args.weights.split(",")]:
            label = f"{method}" if w == 0 else f"{method}+evk(w={w:g})"
            al = None if w == 0 else EvkAlign(weight=w, sigmas=tuple(float(s) for s in args.sigmas.split(",")),
                                               spans=tuple(args.spans.split(",")), n_samples=args.n_samples)
            t0 = time.perf_counter()
            e = edit(lm, cases, method, evk_align=al, stats_n_samples=args.stats_n,
                     stats_max_length=args.stats_len)
            t_edit = time.perf_counter() - t0
            try:
                res = evaluate(e.system, cases, base=base, metrics=metrics, progress=False)
            finally:
                e.undo()
            df = res.summary()
            out[label] = {"edit_s": t_edit, "diagnostics": {k: v for k, v in e.diagnostics.items()
                                                            if isinstance(v, (int, float, dict, type(None)))},
                          "summary": df.to_dict(orient="records")}
            print(f"\n== {label} (edit {t_edit:.0f} s, loss/extra={e.diagnostics.get('loss/extra')})")
            keep = df[df.metric.isin(["c_acc", "evk_kl@relation", "evk_topk@relation", "evk_kl@subject",
                                      "evk_topk@subject", "evk_kl@full", "evk_topk@full", "evk_text_kl",
                                      "evk_text_topk"])]
            print(keep.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
