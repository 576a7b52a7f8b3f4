"""The average indirect effect over a dataset, by token category (the paper's Figure 2 / §2.2)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from editlens.lm.ops import DEFAULT_BATCH_TOKENS
from editlens.localize.trace import (CATEGORIES, Trace, TraceError, _check_args, _prepare, _trace, embedding_std,
                                     token_categories)

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM


@dataclass
class AverageTrace:
    """Average indirect effects of one kind of state over traced prompts.

    Attributes:
        kind, window: as traced.
        categories: :data:`~editlens.localize.trace.CATEGORIES` (first / middle / last subject token, first
            subsequent token, further tokens, last token).
        effects: ``[categories, layers]`` mean over prompts of the prompt's mean indirect effect
            (``score - p_corrupt``) over its tokens of that category; NaN where no prompt has the category.
        sem: standard error of those means (NaN below two prompts).
        counts: prompts contributing to each category.
        p_clean, p_corrupt, total_effect: means over the prompts.
        traces: the per-prompt traces.
    """

    kind: str
    window: int
    categories: tuple[str, ...]
    effects: np.ndarray
    sem: np.ndarray
    counts: list[int]
    p_clean: float
    p_corrupt: float
    total_effect: float
    traces: list[Trace] = field(default_factory=list)
    #: every traced case, including those left out of the average by ``known_only``
    traces_all: list[Trace] = field(default_factory=list)

    @property
    def n_cases(self) -> int:
        return len(self.traces)

    def peak(self, category: str = "last subject token") -> int:
        """The layer of the largest average indirect effect for a category."""
        return int(np.nanargmax(self.effects[self.categories.index(category)]))

    def to_pandas(self):
        """Tidy rows: category, layer, mean indirect effect, s.e.m., n."""
        import pandas as pd

        rows = [{"kind": self.kind, "category": c, "layer": l, "mean_indirect_effect": float(self.effects[k, l]),
                 "sem": float(self.sem[k, l]), "n": self.counts[k]}
                for k, c in enumerate(self.categories) for l in range(self.effects.shape[1])]
        return pd.DataFrame(rows)

    def plot(self, path: str | Path | None = None, title: str | None = None):
        from editlens.localize.plots import plot_average

        return plot_average(self, path, title=title)


def aggregate(traces: Sequence[Trace]) -> AverageTrace:
    """Average already computed traces (all of one kind and layer count)."""
    if not traces:
        raise TraceError("no traces to average")
    kinds = {t.kind for t in traces}
    layers = {t.n_layers for t in traces}
    if len(kinds) > 1 or len(layers) > 1:
        raise TraceError(f"traces of different kinds {sorted(kinds)} or layer counts {sorted(layers)}")
    L = layers.pop()
    per_cat: dict[str, list[np.ndarray]] = {c: [] for c in CATEGORIES}
    for t in traces:
        ie = t.indirect_effect
        members: dict[str, list[int]] = {c: [] for c in CATEGORIES}
        for i in range(len(t.tokens)):
            for c in token_categories(i, t.subject_range, len(t.tokens)):
                members[c].append(i)
        for c, idx in members.items():
            if idx:
                per_cat[c].append(ie[idx].mean(axis=0))
    effects = np.full((len(CATEGORIES), L), np.nan)
    sem = np.full((len(CATEGORIES), L), np.nan)
    counts = []
    for k, c in enumerate(CATEGORIES):
        vals = np.array(per_cat[c])
        counts.append(len(vals))
        if len(vals):
            effects[k] = vals.mean(axis=0)
        if len(vals) > 1:
            sem[k] = vals.std(axis=0, ddof=1) / np.sqrt(len(vals))
    return AverageTrace(kind=traces[0].kind, window=traces[0].window, categories=CATEGORIES, effects=effects,
                        sem=sem, counts=counts, p_clean=float(np.mean([t.p_clean for t in traces])),
                        p_corrupt=float(np.mean([t.p_corrupt for t in traces])),
                        total_effect=float(np.mean([t.total_effect for t in traces])), traces=list(traces),
                        traces_all=list(traces))


def trace_cases(lm: "LM", cases: Sequence[Any], kind: str, *, samples: int, window: int, seed: int,
                noise: float | None, batch_tokens: int, last_subject_only: bool = False,
                progress: Callable[[int, int, Trace], None] | None = None) -> list[Trace]:
    """One trace per case (what :func:`average_trace` and ``layers.trace_layers`` share): every argument and case
    checked before the first trace, the noise scale (default 3 × the embeddings' std) computed once, each case's
    noise draws seeded by ``seed``. ``last_subject_only``: only the last subject token's row is computed (the other
    rows are NaN)."""
    _check_args(kind, samples, window, noise, seed, batch_tokens)
    cases = list(cases)
    if not cases:
        raise TraceError("no cases to trace")
    preps = [_prepare(lm, c, None, None) for c in cases]
    traces = []
    with lm.lock:
        scale = 3.0 * embedding_std(lm) if noise is None else float(noise)
        for k, prep in enumerate(preps):
            t = _trace(lm, prep, kind, scale, samples, window, seed, batch_tokens, True, loop=False,
                       tokens=[prep.span[1] - 1] if last_subject_only else None)
            traces.append(t)
            if progress is not None:
                progress(k, len(preps), t)
    return traces


def average_trace(lm: "LM", cases: Sequence["EditCase"], *, kind: str = "hidden", noise: float | None = None,
                  samples: int = 10, window: int = 10, seed: int = 0, known_only: bool = False,
                  batch_tokens: int = DEFAULT_BATCH_TOKENS,
                  progress: Callable[[int, int, Trace], Any] | None = None) -> AverageTrace:
    """Trace every case (its rewrite's prompt, subject and ``target_true``, else the model's greedy token) and
    average the indirect effects by token category.

    Every case is checked before the first trace. The noise scale (default 3 × the embeddings' std) is computed
    once; each case's noise draws are seeded by ``seed``. ``known_only``: average only the cases whose answer token
    is the model's greedy prediction (the paper traces known facts); the others are still in ``traces``' source
    but not averaged (``traces_all`` holds every trace). ``progress(i, n, trace)`` is called after each case.
    """
    traces = trace_cases(lm, cases, kind, samples=samples, window=window, seed=seed, noise=noise,
                         batch_tokens=batch_tokens, progress=progress)
    use = [t for t in traces if t.known] if known_only else traces
    if not use:
        raise TraceError(f"known_only: the model predicts none of the {len(traces)} answers; nothing to average")
    avg = aggregate(use)
    avg.traces_all = traces
    return avg
