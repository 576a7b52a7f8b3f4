"""Edit layers chosen by causal tracing: what ``layer="trace"`` / ``layers="trace"`` of the locate-then-edit methods
resolve to (ROME, R-ROME, MEMIT, AlphaEdit, EMMET, RECT, PRUNE, PMET; see docs/localize.md, "Edit layers from the
trace").

The score of layer ``l`` is the **average MLP indirect effect at the last subject token**: for each traced case,
:func:`~editlens.localize.trace.causal_trace`'s ``kind="mlp"`` probability of the case's true answer with the MLP
outputs of a window of layers around ``l`` restored at the last subject token of the corrupted run, minus the
corrupted probability; averaged over the cases (ROME, Meng et al. 2022, §2 and Figure 2: the MLP effect at the last
subject token peaks at early-middle layers, where ROME edits). Only that token's restorations are run
(``layers`` forward rows per noise draw and case instead of ``tokens × layers``), with the paper's noise
(3 × the std of the input embeddings) and common noise draws seeded by ``seed``.

Choice (:func:`choose_layers`), among the **candidate layers** ``[first, last]`` (default :func:`default_range`:
layer 1 to ``⌈2L/3⌉ − 1``):

* one layer (ROME): the candidate with the highest score (the first on ties);
* ``n`` layers (MEMIT and its relatives): the contiguous window of ``n`` candidates with the largest summed score
  (the first on ties). MEMIT (Meng et al., ICLR 2023, §4 and its causal-tracing figure of the MLP effect at the
  last subject token) spreads its update over the *range* of critical mid-layer MLPs — the plateau of high
  indirect effect (R = 3..8 for GPT-J, 13..17 for GPT-2 XL) rather than a single peak — so the window covers the
  ``n`` consecutive layers that carry the most effect together. ``n`` is the method's default number of layers for
  the model; a candidate range shorter than ``n`` is taken whole.

The default range leaves out layer 0 (its MLP acts on the raw token embeddings; with a window of layers, its cell
restores the bottom of the network for every fact) and the top third of the model (where the paper finds the
MLP effect at the subject small, and where an edit has few layers left to propagate the new value); both ends are
a guard for small or noisy traces, and ``trace_range`` overrides them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from editlens.lm.ops import DEFAULT_BATCH_TOKENS
from editlens.localize.average import trace_cases
from editlens.localize.trace import TraceError

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM


@dataclass
class LayerChoice:
    """The layers chosen from a trace and what they were chosen from (all plain values).

    Attributes:
        layers: the chosen layers (ascending).
        scores: per layer of the model, the average MLP indirect effect at the last subject token.
        candidates: ``(first, last)`` of the layers the choice was made among.
        case_ids: the traced cases (``None`` for cases without an id).
        p_clean, p_corrupt: means over the traced cases.
        samples, window, seed, noise: the tracing settings.
        meta: ``per_case_scores``: each traced case's indirect effects (the rows ``scores`` averages).
    """

    layers: list[int]
    scores: list[float]
    candidates: tuple[int, int]
    case_ids: list[Any]
    p_clean: float
    p_corrupt: float
    samples: int
    window: int
    seed: int
    noise: float
    meta: dict[str, Any] = field(default_factory=dict)

    def diagnostics(self, prefix: str = "trace/") -> dict[str, Any]:
        """Plain scalars and lists for an edit's diagnostics."""
        return {f"{prefix}layers": list(self.layers), f"{prefix}scores": list(self.scores),
                f"{prefix}candidates": list(self.candidates), f"{prefix}n_cases": len(self.case_ids),
                f"{prefix}p_clean": self.p_clean, f"{prefix}p_corrupt": self.p_corrupt,
                f"{prefix}samples": self.samples, f"{prefix}window": self.window, f"{prefix}seed": self.seed,
                f"{prefix}noise": self.noise}


def default_range(n_layers: int) -> tuple[int, int]:
    """``(first, last)`` candidate layers by default: 1 to ``⌈2L/3⌉ − 1`` (0 to 0 for a one-layer model)."""
    if n_layers < 1:
        raise TraceError(f"a model needs at least one layer, got {n_layers}")
    last = max(1, math.ceil(2 * n_layers / 3)) - 1
    first = 1 if last >= 1 else 0
    return first, last


def choose_layers(scores: Sequence[float], n: int, candidates: tuple[int, int]) -> list[int]:
    """The ``n`` contiguous layers within ``candidates = (first, last)`` whose summed score is largest (the first
    window on ties; ``n = 1``: the argmax). A range shorter than ``n`` is returned whole. NaN scores count as −∞."""
    first, last = int(candidates[0]), int(candidates[1])
    s = np.asarray(scores, dtype=np.float64)
    if not 0 <= first <= last < len(s):
        raise TraceError(f"candidate layers {first}..{last} are not within the {len(s)} scored layers")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TraceError(f"number of layers must be an integer >= 1, got {n!r}")
    if last - first + 1 <= n:
        return list(range(first, last + 1))
    s = np.where(np.isnan(s), -np.inf, s)
    best, best_start = -np.inf, first
    for start in range(first, last - n + 2):
        total = float(s[start:start + n].sum())
        if total > best:
            best, best_start = total, start
    return list(range(best_start, best_start + n))


def select_cases(cases: Sequence["EditCase"], max_cases: int) -> list["EditCase"]:
    """At most ``max_cases`` cases spread evenly over ``cases`` (first and last included; 0: all)."""
    cases = list(cases)
    if max_cases <= 0 or len(cases) <= max_cases:
        return cases
    idx = np.unique(np.round(np.linspace(0, len(cases) - 1, max_cases)).astype(int))
    return [cases[i] for i in idx]


def last_subject_mlp_effects(lm: "LM", cases: Sequence["EditCase"], *, samples: int = 3, window: int = 10,
                             seed: int = 0, noise: float | None = None,
                             batch_tokens: int = DEFAULT_BATCH_TOKENS) -> tuple[np.ndarray, list]:
    """Per layer, the mean over ``cases`` of the MLP indirect effect at the last subject token, and the traces
    (``kind="mlp"``; only the last subject token's row of each trace is computed, the other rows are NaN)."""
    traces = trace_cases(lm, cases, "mlp", samples=samples, window=window, seed=seed, noise=noise,
                         batch_tokens=batch_tokens, last_subject_only=True)
    effects = np.mean([t.scores[t.subject_range[1] - 1] - t.p_corrupt for t in traces], axis=0)
    return effects, traces


def trace_layers(lm: "LM", cases: Sequence["EditCase"], n_layers: int, *, candidates: tuple[int, int] | None = None,
                 samples: int = 3, window: int = 10, seed: int = 0, max_cases: int = 8, noise: float | None = None,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS) -> LayerChoice:
    """Trace (at most ``max_cases`` of) ``cases`` and choose ``n_layers`` edit layers (see the module docstring).

    Raises:
        TraceError: before any forward pass, for candidates outside the model, bad tracing settings, a case whose
            subject is not in its prompt.
    """
    L = lm.n_layers
    cand = default_range(L) if candidates is None else (int(candidates[0]), int(candidates[1]))
    if not 0 <= cand[0] <= cand[1] < L:
        raise TraceError(f"candidate layers {cand[0]}..{cand[1]} are outside the model ({L} layers, 0..{L - 1})")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise TraceError(f"number of layers must be an integer >= 1, got {n_layers!r}")
    chosen_cases = select_cases(cases, max_cases)
    effects, traces = last_subject_mlp_effects(lm, chosen_cases, samples=samples, window=window, seed=seed,
                                               noise=noise, batch_tokens=batch_tokens)
    layers = choose_layers(effects, n_layers, cand)
    per_case = [[float(x) for x in t.scores[t.subject_range[1] - 1] - t.p_corrupt] for t in traces]
    return LayerChoice(layers=layers, scores=[float(x) for x in effects], candidates=cand,
                       case_ids=[c.case_id for c in chosen_cases],
                       p_clean=float(np.mean([t.p_clean for t in traces])),
                       p_corrupt=float(np.mean([t.p_corrupt for t in traces])), samples=samples, window=window,
                       seed=seed, noise=float(traces[0].noise), meta={"per_case_scores": per_case})
