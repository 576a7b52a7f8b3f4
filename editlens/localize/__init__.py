"""Where a fact is recalled: causal tracing (Meng et al. 2022) and its dataset average.

* :func:`causal_trace` — one prompt: P(answer) with the subject corrupted and one (token, layer) state restored;
* :func:`causal_trace_reference` — the same, one restoration per forward pass (the paper's loop);
* :func:`average_trace` — the average indirect effect over a dataset by token category (the paper's Figure 2);
* :func:`trace_layers` — edit layers chosen from the average MLP effect at the last subject token (what
  ``layer="trace"`` / ``layers="trace"`` of the locate-then-edit methods resolve to).

See docs/localize.md.
"""
from __future__ import annotations

from editlens.localize.average import AverageTrace, average_trace
from editlens.localize.layers import LayerChoice, choose_layers, default_range, trace_layers
from editlens.localize.trace import (CATEGORIES, KINDS, Trace, TraceError, causal_trace, causal_trace_reference,
                                     embedding_std, token_categories)

__all__ = ["AverageTrace", "CATEGORIES", "KINDS", "LayerChoice", "Trace", "TraceError", "average_trace",
           "causal_trace", "causal_trace_reference", "choose_layers", "default_range", "embedding_std",
           "token_categories", "trace_layers"]
