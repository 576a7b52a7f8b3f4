"""SERAC cost per query against the plain model (as ``bench_scr`` measures SCR).

Figures (per query, over a mix of edited, paraphrased and unrelated prompts of ``n_facts`` edits in memory):

* ``serac/next_token_ms_per_query`` vs ``base/next_token_ms_per_query`` and ``serac/next_token_slowdown`` —
  next-token distributions, routing not cached (encoder + classifier + the base and/or counterfactual batches);
* ``serac/next_token_cached_ms_per_query`` — the same call again (routing cached per prompt, as within one
  evaluation after the first request type);
* ``serac/generate_ms_per_query`` vs ``base/generate_ms_per_query`` — greedy generation of 8 tokens;
* ``serac/route_ms_per_query`` — encoder + scope classifier alone; ``serac/in_scope_share``;
* ``serac/forward_rows_per_query`` — sequences the model processed per query (the plain model: 1);
* ``serac/adapter_swap_ms`` — injecting and removing the counterfactual model's LoRA adapters (once per call with
  in-scope prompts).

The editor: ``editor=<directory>`` (a saved SERAC editor for the model), else one is trained here on
``synthetic_cases(300)`` with the defaults (``--quick``: 40 cases, short training; the per-query cost does not depend
on how well it was trained, only on the share routed in scope, which is printed).
"""
from __future__ import annotations

import os
import time

import torch

from benchmarks.common import Figures, load_bench_model, timer


def _count_rows(lm):
    counter = {"rows": 0}

    def pre(_m, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        past = kwargs.get("past_key_values") or kwargs.get("cache")
        filled = past is not None and getattr(past, "get_seq_length", lambda: 0)() > 0
        if ids is not None and not filled:
            counter["rows"] += int(ids.shape[0])

    return counter, lm.model.register_forward_pre_hook(pre, with_kwargs=True)


def run(device: str = "cpu", model: str = "smollm2-135m", quick: bool = False, dtype: str | None = None,
        n_facts: int = 100, n_queries: int = 60, editor: str | None = None, seed: int = 0) -> dict[str, float]:
    """Measure SERAC latency per query against the plain model; prints and returns flat figures."""
    import editlens
    from editlens.edit.serac import SeracModel
    from editlens.edit.trained import TrainedEditor, train
    from editlens.system import ModelSystem

    if quick:
        n_facts, n_queries = min(n_facts, 12), min(n_queries, 12)
    figs = Figures()
    lm = load_bench_model(model, device=device, dtype=dtype)
    base = ModelSystem(lm)
    editor = editor or os.environ.get("EDITLENS_SERAC_EDITOR")
    if editor:
        te = TrainedEditor.load(editor)
    else:
        n_train = 40 if quick else 300
        over = {"clf_epochs": 10, "cf_epochs": 1} if quick else {}
        t0, c0 = time.perf_counter(), time.process_time()
        te = train("serac", lm, editlens.synthetic_cases(n_train), progress=False, **over)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        m = te.meta
        figs.add("serac/train_s", wall, f"{n_train} cases, defaults" + (" (quick)" if quick else "")
                 + f", load average {os.getloadavg()[0]:.1f}")
        figs.add("serac/train_cpu_s", cpu, "CPU seconds of this process (load-independent)")
        figs.add("serac/train_cases_per_s", n_train / max(wall, 1e-9))
        figs.add("serac/cf_examples_per_s", m.get("cf_examples_per_s") or 0.0, "counterfactual model training")
        for key in ("val_clf_in_scope_acc", "val_clf_out_scope_acc", "val_cf_nll_before", "val_cf_nll",
                    "val_cf_token_acc_before", "val_cf_token_acc"):
            if m.get(key) is not None:
                figs.add(f"serac/{key}", m[key])
        print("serac classifier loss curve:", [round(v, 4) for v in m["clf_loss_curve"]], flush=True)
        print("serac classifier validation BCE:", [round(v, 4) for v in m["clf_val_bce_curve"]], flush=True)
        print("serac counterfactual loss curve:", [round(v, 4) for v in m["cf_loss_curve"]],
              "validation NLL:", [round(v, 4) for v in m["cf_val_nll_curve"]], flush=True)
    cases = editlens.synthetic_cases(n_facts, seed=seed + 1)  # facts the editor was not trained on
    e = editlens.edit(lm, cases, method="serac", trained=te)
    s = e.system
    third = max(1, n_queries // 3)
    queries = [c.rewrite.text for c in cases[:third]]
    queries += [p.prompt for c in cases for p in c.probes_of("paraphrase")][:third]
    queries += [p.prompt for c in cases for p in c.probes_of("neighborhood")][: n_queries - len(queries)]
    n = len(queries)
    try:
        base.next_token_logprobs(queries[:2])  # warm-up
        with timer(device) as tb:
            base.next_token_logprobs(queries)
        s.refresh()  # routing not cached
        counter, h = _count_rows(lm)
        try:
            with timer(device) as ts:
                s.next_token_logprobs(queries)
            rows = counter["rows"]
        finally:
            h.remove()
        with timer(device) as tsc:
            s.next_token_logprobs(queries)
        with timer(device) as tbg:
            base.generate(queries, max_new_tokens=8)
        with timer(device) as tsg:
            s.generate(queries, max_new_tokens=8)
        s.refresh()
        with timer(device) as tr:
            idx, _ = s.scope(queries)
        tfs = s.teacher_forced([c.rewrite.text for c in cases], [c.rewrite.target_new for c in cases])
        t_acc = sum(tf.token_accuracy for tf in tfs) / len(tfs)
        model_obj: SeracModel = s.serac
        with timer(device) as ta:
            for _ in range(3):
                with model_obj.adapters(lm):
                    pass
    finally:
        e.undo()
    figs.add("serac/next_token_ms_per_query", ts["s"] / n * 1e3, f"{n} queries, {n_facts} edits, routing uncached")
    figs.add("base/next_token_ms_per_query", tb["s"] / n * 1e3, "plain ModelSystem")
    figs.add("serac/next_token_slowdown", ts["s"] / max(tb["s"], 1e-9), "SERAC / base")
    figs.add("serac/next_token_cached_ms_per_query", tsc["s"] / n * 1e3, "routing cached")
    figs.add("serac/generate_ms_per_query", tsg["s"] / n * 1e3, "8 new tokens, routing cached")
    figs.add("base/generate_ms_per_query", tbg["s"] / n * 1e3, "8 new tokens")
    figs.add("serac/generate_slowdown", tsg["s"] / max(tbg["s"], 1e-9), "SERAC / base")
    figs.add("serac/route_ms_per_query", tr["s"] / n * 1e3, "encoder + scope classifier")
    figs.add("serac/in_scope_share", float((idx >= 0).float().mean()), "queries answered by the counterfactual model")
    figs.add("serac/forward_rows_per_query", rows / n, "sequences forwarded per query (base: 1)")
    figs.add("serac/heldout_rewrite_t_acc", t_acc, f"{len(cases)} held-out facts in memory (target >= 0.75)")
    figs.add("serac/adapter_swap_ms", ta["s"] / 3 * 1e3, f"inject + remove {len(model_obj.paths)} LoRA adapters")
    print(figs.table(), flush=True)
    return dict(figs.values)


if __name__ == "__main__":  # pragma: no cover
    import sys

    torch.set_num_threads(2)
    run(quick="--quick" in sys.argv, editor=next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--editor=")),
                                                   None))
