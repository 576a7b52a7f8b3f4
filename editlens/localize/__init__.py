"""Where a fact is recalled: causal tracing (Meng et al. 2022) and its dataset average.

* :func:`causal_trace` — one prompt: P(answer) with the subject corrupted and one (token, layer) state restored;
* :func:`causal_trace_reference` — the same, one restoration per forward pass (the paper's loop);
* :func:`average_trace` — the average indirect effect over a dataset by token category (the paper's Figure 2).

See docs/localize.md.
"""
from __future__ import annotations

from editlens.localize.average import AverageTrace, average_trace
from editlens.localize.trace import (CATEGORIES, KINDS, Trace, TraceError, causal_trace, causal_trace_reference,
                                     embedding_std, token_categories)

__all__ = ["AverageTrace", "CATEGORIES", "KINDS", "Trace", "TraceError", "average_trace", "causal_trace",
           "causal_trace_reference", "embedding_std", "token_categories"]
