"""``layer="trace"`` / ``layers="trace"`` on SmolLM2-135M (issue 16). Short: the resolution made at edit time, on one
known fact, reproduces that fact's row of the committed figures of docs/localize.md
(docs/img/trace_layers_smollm2.json, written by docs/img/make_trace_layers.py); the figures' average is the mean of
their rows, and their chosen layers are the argmax / best window of that average."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from editlens.data.known_facts import known_fact_cases
from editlens.edit import locate
from editlens.edit.base import get_method

FIGURES = Path(__file__).resolve().parents[2] / "docs" / "img" / "trace_layers_smollm2.json"


@pytest.mark.integration
def test_trace_layers_on_smollm2(smollm):
    fig = json.loads(FIGURES.read_text())
    rows = np.array(fig["per_case_scores"])
    assert rows.shape == (6, 30)
    np.testing.assert_allclose(rows.mean(axis=0), fig["scores"], atol=2e-6)
    lo, hi = fig["candidates"]
    avg = np.array(fig["scores"])
    assert fig["rome_trace_layer"] == lo + int(np.argmax(avg[lo:hi + 1]))
    n = len(fig["memit_default_layers"])
    best = max(range(lo, hi - n + 2), key=lambda s: (avg[s:s + n].sum(), -s))  # brute force, first on ties
    assert fig["memit_trace_layers"] == list(range(best, best + n))

    case = known_fact_cases()[0]
    hp = get_method("rome").hparams_class.for_model(smollm).replace(
        layer="trace", trace_samples=fig["samples"], trace_window=fig["window"], seed=fig["seed"])
    layers, diag = locate.trace_layers_for(smollm, [case], hp, "rome", "layer")
    scores = np.array(diag["trace/scores"])
    assert diag["trace/candidates"] == [lo, hi] == [1, 19] and diag["trace/n_cases"] == 1
    np.testing.assert_allclose(scores, rows[0], atol=2e-6)  # the committed row of this fact
    assert diag["trace/p_clean"] > 10 * diag["trace/p_corrupt"]  # the corruption removes the fact
    assert layers == [lo + int(np.argmax(scores[lo:hi + 1]))]
