"""Evaluation throughput: the bulk evaluator vs a naive per-case, per-probe loop, measured in the same run.

* **bulk** — :func:`editlens.evaluate.evaluate`: every request of every metric over all cases gathered,
  de-duplicated, answered with one System call per request type per system (large padded batches); a prompt's
  next-token distribution is read off the teacher-forced pass of the same prompt when there is one.
* **naive** — :func:`editlens.evaluate.evaluate_naive`: each metric walks the cases and probes and asks for
  one prompt at a time, when it needs it (no batching, no de-duplication across metrics, base outputs
  recomputed for every metric). This is the loop one writes first.

Both run on the same cases and systems (a base model and a perturbed copy standing in for an edited model).
Agreement is checked on every ``(case, probe kind, metric)`` row:

* continuous metrics (``c_mag, kl, js, nkl, nkl_code, cfplus_nm, cfplus_nkl``) must agree to 1e-4;
* discrete metrics (``t_acc, c_acc, cfplus_ns, topk@K``) threshold a continuous quantity, and a padded batch and a
  single-prompt forward differ by float32 rounding (~1e-6), so at an exact near-tie the decision can flip. A
  differing discrete row is accepted only when the check *verifies* the near-tie: it recomputes, prompt by prompt
  and on both systems, the quantity the metric thresholds (the gap between the K-th and (K+1)-th log-probability
  for ``topk@K``; the gap of mean target/foil log-probabilities for ``c_acc``/``cfplus_ns``; the top-1/top-2 gap
  at each target position for ``t_acc``) and requires it below 1e-4. Any other difference fails the run. The
  number of such flips is reported (``eval_discrete_flips``). The naive loop runs on the first
``n_naive`` cases (all of them unless ``quick``/CPU limits it), the bulk evaluator on the same subset for the
speedup, and on all ``n_cases`` for the throughput figure. A second bulk call against another edited system
shows the cached base outputs.

FLOP-bound fraction: ``2 × n_params × tokens / seconds / (measured matmul FLOP/s)``, with ``tokens`` the real
(unpadded) tokens of the unique forward passes of both systems.

Metrics: the teacher-forced and next-token ones (``t_acc, c_acc, c_mag, kl, js, topk, nkl, nkl_code,
cfplus_ns, cfplus_nm, cfplus_nkl``); greedy-generation metrics are left out because the naive loop would spend
its time in per-token decoding.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.common import Figures, forward_flops, matmul_flops_per_s, peak_memory, timer, load_bench_model

METRICS = ["t_acc", "c_acc", "c_mag", "kl", "js", "topk", "nkl", "nkl_code", "cfplus_ns", "cfplus_nm", "cfplus_nkl"]


def _perturbed_copy(name: str, device: str, dtype: Any, seed: int, scale: float = 0.02):
    """A second copy of the model with Gaussian noise on one MLP output matrix (an 'edited' model)."""
    import editlens

    lm = load_bench_model(name, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    mid = lm.n_layers // 2
    with torch.no_grad():
        w = lm.module(lm.arch.mlp_out_at(mid)).weight
        w.add_((scale * w.float().std() * torch.randn(w.shape, generator=g)).to(w.dtype).to(w.device))
    lm.push_state(f"bench-noise-{seed}")
    return lm


def _unique_tokens(lm, cases, metrics, systems: dict) -> int:
    """Real tokens of the unique forward passes the bulk evaluator runs for ``systems`` (``{role: System}``),
    grouped by the evaluator's own planner: a NextToken request riding on a Score pass costs nothing extra."""
    from editlens.evaluate.core import NextToken, Score, _groups_of, resolve_metrics
    from editlens.lm.ops import encode, target_token_ids

    wanted: dict[str, set] = {role: set() for role in systems}
    for m in resolve_metrics(metrics):
        for role, r in m.requests(cases):
            wanted[role].add(r)
    total = 0
    for role, reqs in wanted.items():
        for group in _groups_of(reqs, systems[role]):
            for r in group:
                if isinstance(r, Score):
                    p, t = target_token_ids(lm.tokenizer, r.prompt, r.target)
                    total += len(p) + len(t) - 1
                elif isinstance(r, NextToken) and isinstance(group[0], NextToken):
                    total += len(encode(lm.tokenizer, r.prompt))
    return total


CONTINUOUS_TOL = 1e-4
NEAR_TIE = 1e-4
DISCRETE = ("t_acc", "c_acc", "cfplus_ns", "topk")


def _is_discrete(metric: str) -> bool:
    return metric.split("@")[0] in DISCRETE


def _tacc_margin(system, prompt: str, target: str) -> float:
    """Smallest top-1/top-2 log-probability gap over the target positions (teacher forced, one prompt)."""
    from editlens.lm.ops import target_token_ids

    lm = system.lm
    p_ids, t_ids = target_token_ids(lm.tokenizer, system._inputs([prompt])[0], target)
    ids = torch.tensor([p_ids + t_ids], device=lm.device)
    with system.calling(), torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0, len(p_ids) - 1: len(p_ids) + len(t_ids) - 1].float()
    top2 = torch.topk(torch.log_softmax(logits, -1), 2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


def decision_margin(metric: str, case, kind: str, base, edited) -> float:
    """The smallest distance to the decision threshold of a discrete metric over the probes of ``(case, kind)``,
    recomputed one prompt at a time (see the module docstring). ``inf`` when the metric has no probe there."""
    from editlens.evaluate.gt import target_probes
    from editlens.evaluate.gtfree import cfplus_probes, prompt_probes

    name = metric.split("@")[0]
    margins = [float("inf")]
    if name == "topk":
        k = int(metric.split("@")[1])
        for _, prompts in prompt_probes(case, [kind]):
            for p in prompts:
                for system in (base, edited):
                    top = torch.topk(system.next_token_logprobs([p])[0].double(), k + 1).values
                    margins.append(float(top[k - 1] - top[k]))
    elif name in ("c_acc", "cfplus_ns"):
        pairs = ([(pr, p) for pr, p in cfplus_probes(case, True)] if name == "cfplus_ns" else
                 [(p.prompt, p) for kd, ps in target_probes(case, True) if kd == kind for p in ps])
        for prompt, p in pairs:
            t, f = edited.teacher_forced([prompt, prompt], [p.target, p.foil])
            margins.append(abs(float(t.logprobs.double().mean() - f.logprobs.double().mean())))
    elif name == "t_acc":
        for kd, ps in target_probes(case):
            if kd == kind:
                margins += [_tacc_margin(edited, p.prompt, p.target) for p in ps]
    else:
        raise ValueError(f"{metric} is not a discrete metric")
    return min(margins)


def check_agreement(bulk, naive, cases, base, edited) -> dict[str, float]:
    """Compare bulk and naive rows (see the module docstring); raises AssertionError naming the offending row."""
    key = ["case_id", "probe_kind", "metric"]
    a = bulk.to_pandas().set_index(key).sort_index()
    b = naive.to_pandas().set_index(key).sort_index()
    if list(a.index) != list(b.index):
        raise AssertionError("bulk and naive evaluation produced different rows")
    diff = (a.value - b.value).abs()
    discrete = [_is_discrete(m) for m in a.index.get_level_values("metric")]
    cont = diff[[not d for d in discrete]]
    max_cont = float(cont.max()) if len(cont) else 0.0
    if max_cont >= CONTINUOUS_TOL:
        worst = cont.idxmax()
        raise AssertionError(f"bulk and naive evaluation disagree on {worst}: {a.value[worst]!r} vs "
                             f"{b.value[worst]!r} (continuous metric, tolerance {CONTINUOUS_TOL})")
    by_id = {c.case_id: c for c in cases}
    flips = 0
    for (cid, kind, metric), d in diff[discrete].items():
        if d == 0:
            continue
        margin = decision_margin(metric, by_id[cid], kind, base, edited)
        if not margin < NEAR_TIE:
            raise AssertionError(f"bulk and naive evaluation disagree on {(cid, kind, metric)}: "
                                 f"{a.value[(cid, kind, metric)]!r} vs {b.value[(cid, kind, metric)]!r}, and the "
                                 f"decision is not at a near-tie (margin {margin:.3g} >= {NEAR_TIE})")
        flips += 1
        print(f"  near-tie flip accepted: {cid} {kind} {metric}: bulk {a.value[(cid, kind, metric)]:.4g} vs "
              f"naive {b.value[(cid, kind, metric)]:.4g} (decision margin {margin:.2g})")
    return {"max_continuous_diff": max_cont, "discrete_flips": flips, "discrete_rows": int(sum(discrete))}


def _n_probes(cases) -> int:
    return sum(len(c.probes_of(k)) for c in cases for k in c.kinds if k != "generation")


def run(device: str = "cpu", model: str = "smollm2-135m", n_cases: int = 200, quick: bool = False,
        dtype: str | None = None, n_naive: int | None = None, seed: int = 0) -> dict[str, float]:
    """Measure bulk vs naive evaluation; returns flat figures (also printed)."""
    import editlens
    from editlens.data import synthetic_cases
    from editlens.evaluate import BASE, EDITED, BaseCache, ModelSystem, evaluate, evaluate_naive

    if quick:
        n_cases = min(n_cases, 12)
    if n_naive is None:
        n_naive = n_cases if (device != "cpu" or n_cases <= 40) else 40
    n_naive = min(n_naive, n_cases)
    figs = Figures()
    lm = load_bench_model(model, device=device, dtype=dtype)
    base = ModelSystem(lm)
    edited = ModelSystem(_perturbed_copy(model, device, dtype, seed + 1))
    other = ModelSystem(_perturbed_copy(model, device, dtype, seed + 2))
    cases = synthetic_cases(n_cases, seed=seed)
    subset = cases[:n_naive]

    # ---- same subset: bulk vs naive, values must agree
    with timer(device) as tb:
        bulk_sub = evaluate(edited, subset, base=base, metrics=METRICS, cache=False, progress=False)
    with timer(device) as tn:
        naive_sub, n_calls = evaluate_naive(edited, subset, base=base, metrics=METRICS)
    agree = check_agreement(bulk_sub, naive_sub, subset, base, edited)
    max_diff = agree["max_continuous_diff"]
    probes_sub = _n_probes(subset)

    # ---- all cases: bulk throughput, then a second edited system with the base outputs cached
    cache = BaseCache()
    with peak_memory(device) as mem, timer(device) as tf:
        full = evaluate(edited, cases, base=base, metrics=METRICS, cache=cache, progress=not quick)
    with timer(device) as tc:
        evaluate(other, cases, base=base, metrics=METRICS, cache=cache, progress=False)
    tokens = _unique_tokens(lm, cases, METRICS, {BASE: base, EDITED: edited})
    probes = _n_probes(cases)
    flops = matmul_flops_per_s(device)
    frac = forward_flops(lm.n_params(), tokens) / tf["s"] / flops

    figs.add("eval_cases", n_cases)
    figs.add("eval_probes", probes, "non-generation probes × all metrics")
    figs.add("eval_bulk_s", tf["s"], f"{len(METRICS)} metric families, base + edited")
    figs.add("eval_bulk_probes_per_s", probes / tf["s"])
    figs.add("eval_bulk_tokens_per_s", tokens / tf["s"], "real tokens of unique forward passes")
    figs.add("eval_bulk_cached_base_s", tc["s"], "2nd edited system, base outputs from cache")
    figs.add("eval_cache_speedup", tf["s"] / tc["s"])
    figs.add("eval_naive_cases", n_naive)
    figs.add("eval_naive_calls", n_calls, "System calls of the naive loop")
    figs.add("eval_naive_probes_per_s", probes_sub / tn["s"])
    figs.add("eval_bulk_same_cases_probes_per_s", probes_sub / tb["s"])
    figs.add("eval_speedup_vs_naive", tn["s"] / tb["s"], "naive / bulk time, same cases (target >= 10x on CPU)")
    figs.add("eval_max_abs_diff", max_diff, "bulk vs naive, every continuous-metric row (tolerance 1e-4)")
    figs.add("eval_discrete_rows", agree["discrete_rows"], "rows of t_acc, c_acc, cfplus_ns, topk@K compared")
    figs.add("eval_discrete_flips", agree["discrete_flips"],
             f"discrete rows that differ, each at a verified near-tie (margin < {NEAR_TIE})")
    figs.add("eval_matmul_gflops", flops / 1e9)
    figs.add("eval_fraction_of_flop_bound", frac, "2·n_params·tokens / time / matmul FLOP/s")
    figs.add("eval_peak_mib", mem["mib"], "peak memory of the bulk evaluation (CUDA allocated / process RSS)")
    print(figs.table())
    print(f"bulk evaluation is {tn['s'] / tb['s']:.1f}x faster than the naive loop on {n_naive} cases "
          f"({probes_sub} probes); continuous values agree to {max_diff:.2g}, "
          f"{agree['discrete_flips']} of {agree['discrete_rows']} discrete rows flip at verified near-ties")
    return figs.values


if __name__ == "__main__":  # pragma: no cover
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-cases", type=int, default=200)
    ap.add_argument("--n-naive", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    run(device=args.device, model=args.model, n_cases=args.n_cases, quick=args.quick, n_naive=args.n_naive)
    print(f"total {time.perf_counter() - t0:.1f} s")
