"""Drivers that edit and then evaluate: the layer above both :mod:`editlens.edit` and :mod:`editlens.evaluate`.

A method never knows which metrics run and a metric never knows which method made a system, so neither package
imports the other (``tests/unit/test_layering.py``). Procedures that need both — apply an edit, measure the
edited system, undo, apply another — live here and hand the edited systems to the evaluation code.

* :func:`conflict_scores` — ConflictEdit (Li et al., ICLR 2024): apply ``e1`` (θ'), measure ``p_θ'(k_o)``; undo;
  apply ``e1, e2`` sequentially (θ''), measure ``k_n``, ``k_o`` (and the tied fact ``k_t``); undo.
* :func:`round_edit_scores` — RoundEdit: measure the true objects on the unedited model (θ), apply ``e1`` (θ'),
  measure ``o*`` and ``o``; undo; apply ``e1, e2`` (θ*), measure every object and ``o*``; undo.
* :func:`evaluate_staged` — the same two-stage protocol for *registered* metrics (the pitfalls metrics of
  :mod:`editlens.evaluate.pitfalls`, and any other): per ConflictEdit/RoundEdit record, apply ``e1`` (θ′) and
  freeze the answers to the metrics' :class:`~editlens.evaluate.pitfalls.AfterFirstEdit` requests; undo; apply
  ``e1`` then ``e2`` (θ″) and evaluate every metric on it; undo. ``editlens eval --method`` uses it for such data.
* :func:`sequential_edit_fn` — the ``edit_fn`` both take, from a method name
  (:func:`editlens.edit.edit_sequential` with one edit per step).

The measurements and the row/summary definitions are :mod:`editlens.evaluate.portability`'s (``measure_fact(s)``,
``conflict_values``/``conflict_results``, ``round_values``/``round_results``); see
``docs/metrics-autoregressive-portability-general.md``. The experiment runner (:mod:`editlens.runs.runner`) is the
other driver: it edits with :mod:`editlens.edit` and evaluates with :func:`editlens.evaluate.evaluate`.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from editlens.errors import EditlensError
from editlens.evaluate import portability as P

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.evaluate.core import Results
    from editlens.lm import LM
    from editlens.system import System

#: ``edit_fn(lm, cases) -> handle``: applies ``cases`` sequentially (one edit per step) and returns a handle with
#: ``.system`` (the edited system) and ``.undo()`` (an :class:`~editlens.edit.base.Edit` is one)
EditFn = Callable[["LM", Sequence["EditCase"]], Any]

__all__ = ["EditFn", "sequential_edit_fn", "conflict_scores", "round_edit_scores", "evaluate_staged"]


def sequential_edit_fn(method: str, **overrides: Any) -> EditFn:
    """``edit_fn`` for the drivers: ``editlens.edit.edit_sequential(lm, cases, method, batch_size=1, ...)``."""

    def fn(lm: "LM", cases: Sequence["EditCase"]) -> Any:
        from editlens.edit import edit_sequential

        return edit_sequential(lm, list(cases), method, batch_size=1, **overrides)

    return fn


@contextlib.contextmanager
def _edited(edit_fn: EditFn, lm: "LM", cases: Sequence["EditCase"], case_id: str) -> Iterator["System"]:
    """The system with ``cases`` applied by ``edit_fn``, undone on exit (also on error)."""
    handle = edit_fn(lm, list(cases))
    if not hasattr(handle, "system") or not hasattr(handle, "undo"):
        raise EditlensError(f"edit_fn must return an Edit-like handle with .system and .undo() "
                            f"(case {case_id!r}, got {type(handle).__name__})")
    try:
        yield handle.system
    finally:
        handle.undo()


def _base(lm: "LM", base_system: "System | None") -> "System":
    if base_system is not None:
        return base_system
    from editlens.system import ModelSystem

    return ModelSystem(lm)


def conflict_scores(lm: "LM", edit_fn: EditFn, conflict_cases: Sequence[P.ConflictCase],
                    base_system: "System | None" = None) -> "Results":
    """ConflictEdit: apply ``e1`` (θ'), measure ``p_θ'(k_o)``; undo; apply ``e1, e2`` sequentially (θ''),
    measure ``p_θ''(k_n)``, ``p_θ''(k_o)`` (and ``p_θ''(k_t)``); undo. The tied fact is also measured on the
    unedited model (``base_system``, default ``ModelSystem(lm)``) before any edit.

    Returns :class:`~editlens.evaluate.core.Results` with rows ``(case_id, "conflict/<kind>", metric, value)`` for
    ``conflict_score`` (0/1; the mean is CS), ``conflict_magnitude`` (the per-record term; the mean is CM),
    ``tied_fact_damage`` (composite only) and the raw probabilities ``p_new_final``, ``p_old_mid``,
    ``p_old_final``; ``meta["summary"]`` holds ``{kind: {"CS", "CM", "TFD", "n"}}``
    (:func:`editlens.evaluate.portability.conflict_results`).
    """
    base = _base(lm, base_system)
    records = []
    for c in conflict_cases:
        p_tied_base = P.measure_fact(base, c.tied_fact) if c.tied_fact is not None else None
        with _edited(edit_fn, lm, c.edits[:1], c.case_id) as mid:
            p_old_mid = P.measure_fact(mid, c.old_fact)
        with _edited(edit_fn, lm, c.edits, c.case_id) as final:
            probs = P.measure_facts(final, P.conflict_final_facts(c))
        records.append((c, P.conflict_values(c, p_tied_base, p_old_mid, probs)))
    return P.conflict_results(records)


def round_edit_scores(lm: "LM", edit_fn: EditFn, round_cases: Sequence[P.RoundCase],
                      base_system: "System | None" = None, code_compat: bool = False) -> "Results":
    """RoundEdit: measure the true objects' probabilities on the unedited model (θ), apply ``e1`` (θ'),
    measure ``p(o*)``, ``p(o)``; undo; apply ``e1, e2`` (θ*), measure every object and ``o*``; undo.

    Rows ``(case_id, "round_edit", metric, value)``: ``round_success`` (the per-record Succ), ``distortion``
    (:func:`~editlens.evaluate.portability.knowledge_distortion`), ``ignore_rate`` and ``failure``
    (``1[IR > 0.5]``; its mean is FR). ``meta["summary"]`` holds ``{"Succ", "D", "IR", "FR", "n"}``.
    """
    base = _base(lm, base_system)
    records = []
    for c in round_cases:
        facts, inter = P.round_facts(c)
        p_before = P.measure_facts(base, facts)
        with _edited(edit_fn, lm, c.edits[:1], c.case_id) as mid:
            p_mid_inter, p_mid_orig = P.measure_facts(mid, [inter, facts[0]])
        with _edited(edit_fn, lm, c.edits, c.case_id) as final:
            after = P.measure_facts(final, facts + [inter])
        records.append((c, P.round_values(p_before, p_mid_inter, p_mid_orig, after[:-1], after[-1],
                                          code_compat=code_compat)))
    return P.round_results(records, code_compat=code_compat)


def evaluate_staged(lm: "LM", cases: Sequence["EditCase"], method: str, metrics: Any = ("pitfalls",), *,
                    base: "System | None" = None, hparams: Any = None, evk_align: Any = None,
                    prompt_format: str = "raw", seed: int = 0, batch_tokens: int | None = 4096,
                    cache: Any = True, progress: bool = False, trained: Any = None) -> "Results":
    """Evaluate ``metrics`` on ``cases`` with each case edited **alone** by ``method`` (Li et al.'s protocol).

    A ConflictEdit / RoundEdit case (:func:`editlens.data.formats.pitfalls.is_staged`) is edited in two stages:
    ``e1`` alone (θ′), where the answers to the metrics' :class:`~editlens.evaluate.pitfalls.AfterFirstEdit`
    requests are taken (only when a metric asks for them); undo; then ``e1`` and ``e2`` one after the other
    (:func:`editlens.edit.edit_sequential`, one edit per step: θ″), where every metric is evaluated through a
    :class:`~editlens.evaluate.pitfalls.StagedSystem`; undo. Any other case is edited alone with
    :func:`editlens.edit.edit` and evaluated. ``base`` (default: the unedited ``lm``) answers the base requests.

    Returns one :class:`~editlens.evaluate.core.Results` with the rows of every case; ``meta`` is the first
    evaluation's plus ``protocol = "staged"``, the number of edits applied and the edit time.
    """
    import time

    from editlens.data.formats.pitfalls import is_staged, stage_cases
    from editlens.edit import edit, edit_sequential
    from editlens.evaluate.core import Results, evaluate, resolve_metrics
    from editlens.evaluate.pitfalls import StagedSystem, after_first_requests, answer_after_first

    metric_objs = resolve_metrics(metrics)
    kw: dict[str, Any] = {"hparams": hparams, "evk_align": evk_align, "prompt_format": prompt_format}
    if trained is not None:
        kw["trained"] = trained
    if base is None:
        from editlens.system import ModelSystem

        base = ModelSystem(lm, prompt_format=prompt_format)
    rows: list = []
    meta: dict[str, Any] = {}
    n_edits, t_edit, t_start = 0, 0.0, time.perf_counter()
    import warnings

    for i, case in enumerate(cases):
        if progress:  # pragma: no cover - console output
            print(f"[evaluate_staged] {method}: case {i + 1}/{len(cases)} ({case.case_id})", flush=True)
        if not is_staged(case):
            t0 = time.perf_counter()
            with _edited(lambda m, cs: edit(m, cs, method, **kw), lm, [case], case.case_id) as system:
                t_edit += time.perf_counter() - t0
                with warnings.catch_warnings():  # a metric without rows on this one case is said once, below
                    warnings.filterwarnings("ignore", message=r".*produced no rows")
                    res = evaluate(system, [case], base=base, metrics=metric_objs, batch_tokens=batch_tokens,
                                   cache=cache, progress=False)
            n_edits += len(case.rewrites)
        else:
            stages = stage_cases(case)
            first: dict = {}
            reqs = after_first_requests(metric_objs, [case])
            if reqs:
                t0 = time.perf_counter()
                with _edited(lambda m, cs: edit(m, cs, method, **kw), lm, stages[:1], case.case_id) as mid:
                    t_edit += time.perf_counter() - t0
                    first = answer_after_first(mid, reqs)
                n_edits += 1
            t0 = time.perf_counter()
            with _edited(lambda m, cs: edit_sequential(m, cs, method, batch_size=1, seed=seed, **kw), lm, stages,
                         case.case_id) as final:
                t_edit += time.perf_counter() - t0
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=r".*produced no rows")
                    res = evaluate(StagedSystem(final, first), [case], base=base, metrics=metric_objs,
                                   batch_tokens=batch_tokens, cache=cache, progress=False)
            n_edits += 2
        rows.extend(res.rows)
        if not meta:
            meta = dict(res.meta)
    silent = [m.name for m in metric_objs if not any(r.metric == m.name for r in rows)]
    if silent and cases:
        warnings.warn(f"{len(silent)} metric(s) produced no rows on these {len(cases)} case(s): {', '.join(silent)}",
                      stacklevel=2)
    meta["timings"] = {**dict(meta.get("timings", {})), "total_s": time.perf_counter() - t_start}
    meta.update({"protocol": "staged", "method": method, "n_cases": len(cases), "n_edits_applied": n_edits,
                 "edit_time_s": t_edit})
    return Results(rows, meta)
