"""``layer="trace"`` / ``layers="trace"`` of the locate-then-edit methods (issue 16): the edit layers chosen by causal
tracing of the cases being edited, checked against an independent computation (the paper's one-restoration-per-
forward loop, :func:`editlens.localize.causal_trace_reference`, averaged by hand) and brute-force window sums."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

import editlens
from editlens.data.synthetic import synthetic_cases
from editlens.edit import locate
from editlens.edit.base import edit_sequential, get_method
from editlens.errors import HParamsError
from editlens.localize import causal_trace_reference, choose_layers, default_range

SAMPLES, SEED = 2, 3


@pytest.fixture(autouse=True)
def _stats_dir(tmp_path_factory, monkeypatch):
    # the session's statistics cache, shared with the other edit tests (sampling the corpus is the slow part)
    monkeypatch.setenv("EDITLENS_STATS_DIR", str(tmp_path_factory.getbasetemp() / "stats"))


def _weights(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _same(lm, before) -> bool:
    return all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())


def _independent_scores(lm, cases, window: int) -> np.ndarray:
    """Mean over cases of (P(answer) with the MLP window around each layer restored at the last subject token −
    P(answer) corrupted), from the reference loop (one restoration per forward pass, every token traced)."""
    per_case = []
    for c in cases:
        t = causal_trace_reference(lm, c, kind="mlp", samples=SAMPLES, window=window, seed=SEED)
        per_case.append(t.scores[t.subject_range[1] - 1] - t.p_corrupt)
    return np.mean(per_case, axis=0)


def test_choose_layers_by_hand():
    s = [0.1, 0.5, 0.2, 0.9, 0.0, 0.3]
    assert choose_layers(s, 1, (0, 5)) == [3]
    assert choose_layers(s, 1, (0, 2)) == [1]  # restricted to the candidates
    assert choose_layers(s, 2, (0, 5)) == [2, 3]  # sums 0.6, 0.7, 1.1, 0.9, 0.3 -> start 2
    assert choose_layers(s, 3, (0, 5)) == [1, 2, 3]  # 0.8, 1.6, 1.1, 1.2
    assert choose_layers(s, 4, (2, 4)) == [2, 3, 4]  # a range shorter than n is taken whole
    assert choose_layers([1.0, 1.0, 1.0], 1, (0, 2)) == [0]  # ties: the first
    assert choose_layers([np.nan, 0.1, 0.0], 1, (0, 2)) == [1]
    assert default_range(30) == (1, 19) and default_range(4) == (1, 2) and default_range(1) == (0, 0)


def test_rome_trace_layer_is_argmax_of_independent_trace(tiny_llama):
    lm = tiny_llama
    cases = synthetic_cases(3, seed=1)
    before = _weights(lm)
    hp = {"layer": "trace", "trace_range": [0, 2], "trace_samples": SAMPLES, "seed": SEED, "trace_window": 1}
    e = editlens.edit(lm, cases, "rome", hparams=hp, progress=False)
    d = e.diagnostics
    changed = {n for n, p in lm.model.named_parameters() if not torch.equal(before[n], p)}
    e.undo()
    assert _same(lm, before)  # undo is bit-exact with the traced layer
    ref = _independent_scores(lm, cases, 1)
    np.testing.assert_allclose(d["trace/scores"], ref, rtol=1e-9, atol=1e-15)
    want = int(np.argmax(ref[0:3]))
    assert d["trace/layers"] == [want] and d["layers"] == [want]
    assert d["trace/candidates"] == [0, 2] and d["trace/n_cases"] == 3
    assert d["trace/samples"] == SAMPLES and d["trace/seed"] == SEED and d["trace/window"] == 1
    json.dumps(d)  # plain values only
    assert e.hparams.layer == "trace"  # the edit records what was asked for; the diagnostics what it resolved to
    assert changed == {lm.arch.mlp_out_at(want) + ".weight"}  # exactly the traced layer's MLP output projection


def test_memit_trace_window_is_best_independent_window(tiny_llama):
    lm = tiny_llama
    cases = synthetic_cases(4, seed=2)
    before = _weights(lm)
    hp = {"layers": "trace", "trace_range": [0, 3], "trace_samples": SAMPLES, "seed": SEED, "trace_window": 2,
          "trace_cases": 0}
    e = editlens.edit(lm, cases, "memit", hparams=hp, progress=False)
    d = e.diagnostics
    e.undo()
    assert _same(lm, before)
    ref = _independent_scores(lm, cases, 2)
    np.testing.assert_allclose(d["trace/scores"], ref, rtol=1e-9, atol=1e-15)
    n = len(get_method("memit").hparams_class.for_model(lm).layers)  # the method's default count (2 on tiny)
    windows = [list(w) for w in (range(s, s + n) for s in range(0, 4 - n + 1))]
    best = max(windows, key=lambda w: (sum(ref[l] for l in w), -w[0]))  # brute force, first on ties
    assert d["trace/layers"] == best and d["layers"] == best
    assert len(best) == n == 2


def test_trace_cases_are_spread_and_bounded(tiny_llama):
    cases = synthetic_cases(7, seed=4)
    hp = get_method("rome").hparams_class.for_model(tiny_llama).replace(layer="trace", trace_cases=3,
                                                                       trace_samples=1)
    layers, diag = locate.trace_layers_for(tiny_llama, cases, hp, "rome", "layer")
    assert diag["trace/n_cases"] == 3 and len(layers) == 1
    from editlens.localize.layers import select_cases

    assert [c.case_id for c in select_cases(cases, 3)] == [cases[0].case_id, cases[3].case_id, cases[6].case_id]


def test_sequential_trace_is_resolved_once(tiny_llama):
    lm = tiny_llama
    cases = synthetic_cases(3, seed=5)
    before = _weights(lm)
    hp = {"layer": "trace", "trace_range": [0, 2], "trace_samples": 1}
    diags = []
    seq = edit_sequential(lm, cases, "rome", hparams=hp, progress=False,
                          callback=lambda step, n, e: diags.append(dict(e.diagnostics)))
    assert len(diags) == 3
    first = diags[0]["trace/layers"]
    assert all(d["trace/layers"] == first and d["layers"] == first for d in diags)
    assert all(d["trace/scores"] == diags[0]["trace/scores"] for d in diags)
    seq.undo()
    assert _same(lm, before)


@pytest.mark.parametrize("method,key,value,match", [
    ("rome", "layer", "trac", r"'layer' of method 'rome' must be a layer index >= 0 or 'trace'.*'trac'"),
    ("rome", "layer", -1, r"'layer' of method 'rome' must be a layer index >= 0 or 'trace', got -1"),
    ("rome", "layer", 9, r"'layer' of method 'rome': layer 9 is outside the model \(4 layers"),
    ("r-rome", "layer", "Trace", r"'layer' of method 'r-rome'.*'Trace'"),
    ("memit", "layers", "trac", r"'layers' of method 'memit'.*'trac'"),
    ("memit", "layers", [-1, 2], r"'layers' of method 'memit'.*\[-1, 2\]"),
    ("memit", "layers", [1, 9], r"'layers' of method 'memit': layer 9 is outside the model"),
    ("alphaedit", "layers", ["trace"], r"'layers' of method 'alphaedit'"),
    ("pmet", "layers", "tracing", r"'layers' of method 'pmet'.*'tracing'"),
    ("rome", "trace_range", [0, 9], r"'trace_range' of method 'rome': \[0, 9\] is outside the model"),
    ("memit", "trace_range", [3, 1], r"'trace_range' of method 'memit' must be \[\] or \[first, last\]"),
    ("rome", "trace_samples", 0, r"'trace_samples' of method 'rome' must be >= 1"),
    ("rome", "trace_cases", -1, r"'trace_cases' of method 'rome' must be >= 0"),
])
def test_bad_trace_values_name_the_hyperparameter(tiny_llama, method, key, value, match):
    before = _weights(tiny_llama)
    hp = {key: value}
    if key.startswith("trace_"):
        hp["layer" if method.endswith("rome") else "layers"] = "trace"
    with pytest.raises(HParamsError, match=match):
        editlens.edit(tiny_llama, synthetic_cases(1, seed=0), method, hparams=hp, progress=False)
    assert _same(tiny_llama, before)


def test_trace_values_replace_both_ways(tiny_llama):
    cls = get_method("memit").hparams_class
    hp = cls.for_model(tiny_llama)
    t = hp.replace(layers="trace")
    assert t.layers == "trace" and t.replace(mom2_update_weight=10.0).layers == "trace"
    assert t.replace(layers=[1, 3]).layers == [1, 3] and t.replace(layers="1,2").layers == [1, 2]
    r = get_method("rome").hparams_class.for_model(tiny_llama).replace(layer="trace")
    assert r.layer == "trace" and r.replace(layer=2).layer == 2 and r.replace(layer="3").layer == 3


@pytest.mark.parametrize("method,key", [("rome", "layer"), ("memit", "layers"), ("pmet", "layers")])
def test_trace_hparams_round_trip_through_a_spec(tiny_llama, method, key):
    from editlens.testing import _hparams_roundtrip

    editor = get_method(method)()
    hp = editor.default_hparams(tiny_llama).replace(**{key: "trace", "trace_range": [1, 3], "trace_samples": 2})
    _hparams_roundtrip(method, editor, tiny_llama, hp)  # raises ContractError when a value comes back different
