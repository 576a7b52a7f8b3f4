"""Trained editors (MEND, MALMEN): training cost, edit speed against ROME, MALMEN's batch against single MEND edits.

Figures:

* ``mend/train_s``, ``mend/train_cases_per_s``, ``mend/train_steps`` — training with the defaults on ``n_train``
  synthetic cases (the loss curve, as means of 10 steps, and the validation figures are printed);
  ``malmen/train_s``, ``malmen/train_cases_per_s`` likewise;
* ``mend/heldout_rewrite_t_acc`` — rewrite token accuracy of ``target_new`` after editing held-out synthetic facts
  (another seed: facts never seen in training), one edit at a time;
* ``mend/edit_s`` vs ``rome/edit_s`` (the same facts, measured in this run, ROME's second-moment statistics computed
  before timing) and ``mend/speedup_vs_rome``; ``malmen/edit_s`` and ``malmen/speedup_vs_rome`` likewise;
* ``malmen/batch_edit_s`` (one MALMEN edit of ``n_batch`` facts) vs ``mend/single_edits_s`` (``n_batch`` single MEND
  edits, each undone) and their ratio ``malmen/batch_vs_singles``.
"""
from __future__ import annotations

import time

import torch

from benchmarks.common import Figures, load_bench_model, timer


def _curve(values: list[float], every: int = 10) -> list[float]:
    return [round(sum(values[i:i + every]) / len(values[i:i + every]), 4) for i in range(0, len(values), every)]


def _train(method: str, lm, cases, figs: Figures, overrides: dict) -> object:
    import editlens

    t0 = time.perf_counter()
    te = editlens.train(method, lm, cases, progress=False, **overrides)
    wall = time.perf_counter() - t0
    m = te.meta
    figs.add(f"{method}/train_s", wall, f"{len(cases)} cases, {m['n_steps']} steps, prefix cache: {m['prefix_cache']}")
    figs.add(f"{method}/train_cases_per_s", m["n_steps"] * te.hparams["batch_size"] / max(wall, 1e-9))
    figs.add(f"{method}/train_steps", m["n_steps"], "stopped early" if m["stopped_early"] else "")
    print(f"{method} loss curve (means of 10 steps): {_curve(m['loss_curve']['loss'])}", flush=True)
    for v in m["validation"]:
        print(f"{method} validation {v}", flush=True)
    return te


def _rewrite_t_acc(lm, case) -> float:
    from editlens.lm.ops import teacher_forced

    return teacher_forced(lm, [case.rewrite.text], [case.rewrite.target_new])[0].token_accuracy


def run(device: str = "cpu", model: str = "smollm2-135m", quick: bool = False, dtype: str | None = None,
        n_train: int = 300, n_batch: int = 100, n_speed: int = 3, n_heldout: int = 20, seed: int = 0
        ) -> dict[str, float]:
    """Train MEND and MALMEN on ``model`` and measure; prints and returns flat figures."""
    import editlens

    overrides: dict = {}
    if quick:
        n_train, n_batch, n_speed, n_heldout = 16, 8, 1, 4
        overrides = dict(max_steps=8, val_every=4, max_val=2)
    figs = Figures()
    lm = load_bench_model(model, device=device, dtype=dtype)
    cases = editlens.synthetic_cases(n_train, seed=seed)
    held = editlens.synthetic_cases(max(n_batch, n_heldout, n_speed), seed=seed + 1)
    mend = _train("mend", lm, cases, figs, overrides)
    malmen = _train("malmen", lm, cases, figs, overrides)

    accs = []
    for c in held[:n_heldout]:
        e = editlens.edit(lm, [c], method="mend", trained=mend)
        accs.append(_rewrite_t_acc(lm, c))
        e.undo()
    figs.add("mend/heldout_rewrite_t_acc", sum(accs) / len(accs), f"{len(accs)} held-out facts, one edit each")

    # edit speed against ROME on the same facts (ROME's statistics are computed by a warm-up edit first)
    editlens.edit(lm, [held[-1]], method="rome").undo()
    for name, kw in (("rome", {}), ("mend", {"trained": mend}), ("malmen", {"trained": malmen})):
        editlens.edit(lm, [held[-1]], method=name, **kw).undo()  # warm-up
        total = 0.0
        for c in held[:n_speed]:
            with timer(device) as t:
                e = editlens.edit(lm, [c], method=name, **kw)
            total += t["s"]
            e.undo()
        figs.add(f"{name}/edit_s", total / n_speed, f"mean of {n_speed} single-fact edits")
    for name in ("mend", "malmen"):
        figs.add(f"{name}/speedup_vs_rome", figs.values["rome/edit_s"] / max(figs.values[f"{name}/edit_s"], 1e-9),
                 "target >= 10")

    batch = held[:n_batch]
    with timer(device) as tb:
        e = editlens.edit(lm, batch, method="malmen", trained=malmen)
    e.undo()
    singles = 0.0
    for c in batch:
        with timer(device) as t:
            e = editlens.edit(lm, [c], method="mend", trained=mend)
        singles += t["s"]
        e.undo()
    figs.add("malmen/batch_edit_s", tb["s"], f"one edit of {len(batch)} facts")
    figs.add("mend/single_edits_s", singles, f"{len(batch)} single MEND edits")
    figs.add("malmen/batch_vs_singles", tb["s"] / max(singles, 1e-9), "target < 1")
    # SERAC: training cost, held-out t_acc and per-query cost against the plain model (benchmarks/bench_serac.py)
    from benchmarks import bench_serac

    figs.update(bench_serac.run(device=device, model=model, quick=quick, dtype=dtype))
    print(figs.table(), flush=True)
    return dict(figs.values)


if __name__ == "__main__":  # pragma: no cover
    torch.set_num_threads(2)
    run(quick=False)
