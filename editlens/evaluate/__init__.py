"""Evaluation: metrics ask a :class:`System` for scores in bulk; base outputs are cached once.

Entry points: :func:`evaluate` (cases × metrics → :class:`Results`), :func:`gtfree_scores` (KL / top-k / JS
between two systems on any prompts, no cases needed), the metric registry (:func:`register_metric`,
:func:`resolve_metrics`, :func:`registered_metrics`), frozen base answers (:func:`freeze_base` →
:class:`FrozenBase`, which :func:`evaluate` and the experiment runner both use, under the one :func:`cache_key`). See ``docs/metrics.md`` for every metric's definition.
"""
from __future__ import annotations

from editlens.evaluate.core import (
    BASE,
    EDITED,
    Answers,
    BaseCache,
    FrozenBase,
    Generate,
    Metric,
    NextToken,
    Request,
    Results,
    Row,
    Score,
    answer_requests,
    cache_key,
    evaluate,
    evaluate_naive,
    freeze_base,
    metric_groups,
    register_metric,
    registered_metrics,
    request_set,
    resolve_metrics,
)
from editlens.system import ModelSystem, System, WrappedSystem

__all__ = [
    "BASE", "EDITED", "Answers", "BaseCache", "FrozenBase", "Generate", "Metric", "NextToken", "Request", "Results",
    "Row", "Score", "answer_requests", "cache_key", "evaluate", "evaluate_naive", "freeze_base", "metric_groups",
    "register_metric", "registered_metrics", "request_set", "resolve_metrics", "ModelSystem", "System",
    "WrappedSystem", "gtfree_scores",
]


def __getattr__(name: str):
    if name == "gtfree_scores":
        from editlens.evaluate.gtfree import gtfree_scores

        return gtfree_scores
    raise AttributeError(f"module 'editlens.evaluate' has no attribute {name!r}")


def _make_callable() -> None:
    """Let ``editlens.evaluate(system, cases, ...)`` work although ``editlens.evaluate`` is also this package."""
    import sys
    import types

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return evaluate(*args, **kwargs)

    sys.modules[__name__].__class__ = _CallableModule


_make_callable()
