"""SCR cost per query vs a weight-edited model (a plain ModelSystem: one forward row per query).

Figures (all per query, over a mix of edited, paraphrased and unrelated prompts):

* ``scr/next_token_ms_per_query`` vs ``base/next_token_ms_per_query`` and their ratio — next-token
  distributions with selection not cached (retrieval + confirmation + answering);
* ``scr/generate_ms_per_query`` vs ``base/generate_ms_per_query`` — greedy generation of 8 tokens (selection cached
  from the previous call, as within one evaluation);
* ``scr/forward_rows_per_query`` — sequences the model processed per query (a weight-edited model: 1), and
  ``scr/extra_forward_per_query`` = that minus 1; ``scr/confirmations_per_query``; ``scr/with_facts_share``;
* ``scr/retrieval_ms_per_query`` — sentence-encoder + cosine search alone;
* ``scr/add_fact_ms`` — appending one fact to a memory of ``n_facts`` (encodes only the new sentence).
"""
from __future__ import annotations

import time

import torch

from benchmarks.common import Figures, timer, load_bench_model


def _count_rows(lm):
    counter = {"rows": 0}

    def pre(_m, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        past = kwargs.get("past_key_values")
        filled = past is not None and getattr(past, "get_seq_length", lambda: 0)() > 0
        if ids is not None and not filled:  # count full passes, not cached decoding steps
            counter["rows"] += int(ids.shape[0])

    return counter, lm.model.register_forward_pre_hook(pre, with_kwargs=True)


def run(device: str = "cpu", model: str = "smollm2-135m", quick: bool = False, dtype: str | None = None,
        n_facts: int = 100, n_queries: int = 60, seed: int = 0) -> dict[str, float]:
    """Measure SCR latency and extra forward passes per query; prints and returns flat figures."""
    import editlens
    from editlens.data import synthetic_cases
    from editlens.edit.scr import SCRHParams, SCRSystem
    from editlens.system import ModelSystem

    if quick:
        n_facts, n_queries = min(n_facts, 12), min(n_queries, 12)
    figs = Figures()
    lm = load_bench_model(model, device=device, dtype=dtype)
    base = ModelSystem(lm)
    cases = synthetic_cases(n_facts, seed=seed)
    scr = SCRSystem(base, SCRHParams.for_model(lm))
    scr.add_cases(cases)
    third = max(1, n_queries // 3)
    queries = [c.rewrite.text for c in cases[:third]]
    queries += [p.prompt for c in cases for p in c.probes_of("paraphrase")][:third]
    queries += [p.prompt for c in cases for p in c.probes_of("neighborhood")][: n_queries - len(queries)]
    n = len(queries)

    base.next_token_logprobs(queries[:2])  # warm-up
    with timer(device) as tb:
        base.next_token_logprobs(queries)
    counter, h = _count_rows(lm)
    try:
        with timer(device) as ts:
            scr.next_token_logprobs(queries)
        rows = counter["rows"]
        with timer(device) as tbg:
            base.generate(queries, max_new_tokens=8)
        counter["rows"] = 0
        with timer(device) as tsg:
            scr.generate(queries, max_new_tokens=8)
    finally:
        h.remove()
    with timer(device) as tr:
        scr.memory.search(queries, scr.hparams.top_k)
    t0 = time.perf_counter()
    scr.add_facts(["A newly added fact about the benchmark."], ["bench-new"])
    add_ms = (time.perf_counter() - t0) * 1e3

    figs.add("scr/next_token_ms_per_query", ts["s"] / n * 1e3, f"{n} queries, {n_facts} facts, selection uncached")
    figs.add("base/next_token_ms_per_query", tb["s"] / n * 1e3, "plain ModelSystem (a weight-edited model)")
    figs.add("scr/next_token_slowdown", ts["s"] / max(tb["s"], 1e-9), "SCR / base")
    figs.add("scr/generate_ms_per_query", tsg["s"] / n * 1e3, "8 new tokens, selection cached")
    figs.add("base/generate_ms_per_query", tbg["s"] / n * 1e3, "8 new tokens")
    figs.add("scr/generate_slowdown", tsg["s"] / max(tbg["s"], 1e-9), "SCR / base")
    figs.add("scr/forward_rows_per_query", rows / n, "sequences forwarded per query (base: 1)")
    figs.add("scr/extra_forward_per_query", rows / n - 1.0, "confirmation (+ calibration) passes")
    figs.add("scr/confirmations_per_query", scr.stats["confirmations"] / n)
    figs.add("scr/with_facts_share", sum(1 for d in scr.select(queries) if d) / n, "queries answered with facts")
    figs.add("scr/retrieval_ms_per_query", tr["s"] / n * 1e3, "encoder + cosine search")
    figs.add("scr/add_fact_ms", add_ms, f"append 1 fact to {n_facts}")
    print(figs.table(), flush=True)
    return dict(figs.values)


if __name__ == "__main__":  # pragma: no cover
    torch.set_num_threads(2)
    run(quick=False)
