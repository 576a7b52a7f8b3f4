"""ROME / MEMIT / AlphaEdit / EMMET on the tiny random models (GPT-2 Conv1D layout and LLaMA)."""
from __future__ import annotations

import pytest
import torch

import editlens
from editlens.data.schema import Rewrite, make_case
from editlens.edit import edit, edit_sequential, get_method, registered_methods
from editlens.edit import locate
from editlens.edit.stats import read_corpus, second_moment
from editlens.errors import DataFormatError, HParamsError
from editlens.lm.arch import weight_view

from editlens.edit.memit import MultiLayerEditor
from editlens.edit.rome import ROME
from tests.conftest import shipped_methods, trained_for

#: the locate-then-edit methods (ROME and the MEMIT family), registered ones included as soon as they exist; the
#: contracts every method keeps (bit-exact undo, sequential undo, ...) are checked in test_contracts.py
METHODS = [m for m in shipped_methods() if issubclass(get_method(m), (ROME, MultiLayerEditor))]


@pytest.fixture(autouse=True)
def _stats_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDITLENS_STATS_DIR", str(tmp_path_factory.getbasetemp() / "stats"))


def _cases(n=2):
    subjects = ["Alice Smith", "Bob Jones", "Carol White", "Dan Brown"]
    return [make_case(str(i), Rewrite("{} lives in the city of", subjects[i], "Paris")) for i in range(n)]


def _snapshot(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _assert_same(lm, before):
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_edit_and_undo_bit_for_bit(model, method):
    lm = editlens.load_model(model)
    before = _snapshot(lm)
    fp = lm.fingerprint
    e = edit(lm, _cases(2), method)
    layers = e.diagnostics["layers"]
    for l in layers:
        assert e.diagnostics[f"delta_norm/{l}"] > 0
        assert e.diagnostics[f"dk_norm/{l}"] >= 0
    assert "loss/nll" in e.diagnostics and e.diagnostics["wall_time_s"] > 0
    assert e.system.fingerprint != fp
    changed = [n for n, v in lm.model.state_dict().items() if not torch.equal(v, before[n])]
    assert changed and all(any(lm.arch.mlp_out_at(l) in n for l in layers) for n in changed)
    e.undo()
    assert lm.fingerprint == fp
    _assert_same(lm, before)


@pytest.mark.parametrize("method", shipped_methods())
def test_sequential_undo_and_flat_state(method):
    lm = editlens.load_model("tiny-gpt2")
    before = _snapshot(lm)
    sizes = []

    def cb(step, n, ed):
        sizes.append((len(lm._state), len(ed.state.snapshot)))

    run = edit_sequential(lm, _cases(4), method, batch_size=1, callback=cb, **trained_for(method, lm))
    assert len(sizes) == 4 and len(set(sizes)) == 1  # one tag, one clone per tensor whatever the steps
    if method == "alphaedit":
        kp = run.state.data["alphaedit_KpKp"]
        assert set(kp) == set(run.diagnostics["layers"])
    run.undo()
    _assert_same(lm, before)


def test_rome_conv1d_maps_key_to_value():
    """On GPT-2 (Conv1D, weight stored [in, out]) the edited projection maps k* to W k* + δ."""
    lm = editlens.load_model("tiny-gpt2")
    hp = get_method("rome").hparams_class.for_model(lm)
    name = lm.arch.mlp_out_at(hp.layer)
    W0 = weight_view(lm.module(name)).detach().clone()
    cov, prefixes = locate.prepare(lm, hp, [hp.layer])
    req = locate.requests_from_cases(_cases(1))
    k = locate.compute_keys(lm, hp.layer, req, prefixes)[0].double()
    e = edit(lm, _cases(1), "rome")
    W1 = weight_view(lm.module(name)).detach().double()
    assert tuple(W1.shape) == tuple(W0.shape)
    dW = W1 - W0.double()
    sv = torch.linalg.svdvals(dW)  # rank one: the second singular value is float32 rounding of W1 − W0
    assert float(sv[1]) < 1e-5 * float(sv[0]), sv[:3]
    # rank one with row space C⁻¹k*: ΔW w = 0 for every w orthogonal to u = C⁻¹k* (fails if the Conv1D
    # layout were transposed)
    u = torch.linalg.solve(cov[hp.layer], k)
    w = torch.randn(u.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = w - (w @ u) / (u @ u) * u
    assert float((dW @ w).norm()) < 1e-4 * float(dW.norm()) * float(w.norm())
    assert float((dW @ u).norm()) > 0
    e.undo()


def test_memit_lambda_monotone_dk_norm():
    lm = editlens.load_model("tiny-llama")
    dks = []
    for lam in (1e0, 1e2, 1e4):
        e = edit(lm, _cases(2), "memit", mom2_update_weight=lam)
        dks.append(sum(e.diagnostics[f"dk_norm/{l}"] for l in e.diagnostics["layers"]))
        e.undo()
    assert dks[0] > dks[1] > dks[2], dks


def test_unknown_override_names_key_and_method():
    lm = editlens.load_model("tiny-llama")
    with pytest.raises(HParamsError, match=r"'lamda'.*'memit'"):
        edit(lm, _cases(1), "memit", lamda=3)
    with pytest.raises(HParamsError, match="nullspace_mode"):
        edit(lm, _cases(1), "alphaedit", nullspace_mode="sideways")


def test_stats_one_pass_equals_per_layer_and_cache(tmp_path):
    lm = editlens.load_model("tiny-gpt2")
    docs = ["the cat sat on the mat", "a dog ran in the park today", "x"]
    a = second_moment(lm, [0, 2], corpus=docs, cache_dir=tmp_path, progress=False)
    b = second_moment(lm, [0, 2], corpus=docs, cache_dir=tmp_path / "b", progress=False, one_pass=False)
    for l in (0, 2):
        assert torch.allclose(a[l], b[l], atol=1e-6)
        assert torch.allclose(a[l], a[l].T)
    assert len(list(tmp_path.glob("mom2-*.pt"))) == 2
    c = second_moment(lm, [2], corpus=docs, cache_dir=tmp_path, progress=False)
    assert torch.equal(c[2], a[2])
    # hand check: mean of k kᵀ over non-padding tokens of one document
    from editlens.lm import ops

    k = ops.capture(lm, [docs[0]] * len(ops.encode(lm.tokenizer, docs[0])), [lm.arch.mlp_out_at(2)],
                    list(range(len(ops.encode(lm.tokenizer, docs[0])))))[lm.arch.mlp_out_at(2)].double()
    one = second_moment(lm, [2], corpus=docs[:1], use_cache=False, progress=False, out_dtype=torch.float64)[2]
    assert torch.allclose(one, k.T @ k / k.shape[0], atol=1e-5)


def test_read_corpus_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nline two\n\nsecond para\n")
    assert read_corpus(tmp_path / "a.txt") == ["first para line two", "second para"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert read_corpus(tmp_path / "b.jsonl") == ["one", "two"]
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n{"txt": "two"}\n')
    with pytest.raises(DataFormatError, match=r"record 1.*'text'"):
        read_corpus(tmp_path / "c.jsonl")


def test_value_memo_serves_a_lambda_sweep(monkeypatch):
    """MEMIT's z does not depend on λ: a λ sweep optimises it once, and the memoised result is identical to a
    fresh optimisation; changing the weights or the arguments misses the memo."""
    lm = editlens.load_model("tiny-llama")
    calls = []
    real = locate._compute_values
    monkeypatch.setattr(locate, "_compute_values", lambda *a, **k: calls.append(1) or real(*a, **k))
    after = {}
    for lam in (1.0, 100.0):
        e = edit(lm, _cases(2), "memit", mom2_update_weight=lam, progress=False)
        after[lam] = e.diagnostics["loss/nll"], _snapshot(lm)
        e.undo()
    assert len(calls) == 1
    assert after[1.0][0] == after[100.0][0]
    assert any(not torch.equal(after[1.0][1][k], after[100.0][1][k]) for k in after[1.0][1])
    # the memoised z gives bit for bit the weights of an un-memoised run
    lm.__dict__.pop("_value_memo")
    e = edit(lm, _cases(2), "memit", mom2_update_weight=100.0, progress=False)
    _assert_same(lm, after[100.0][1])
    e.undo()
    assert len(calls) == 2
    # other arguments or other weights: recomputed
    edit(lm, _cases(2), "memit", mom2_update_weight=100.0, v_num_grad_steps=3, progress=False).undo()
    assert len(calls) == 3
    w = next(lm.model.parameters())
    saved = w.detach().clone()
    with torch.no_grad():
        w.mul_(1.01)
    try:
        edit(lm, _cases(2), "memit", mom2_update_weight=100.0, v_num_grad_steps=3, progress=False).undo()
        assert len(calls) == 4
    finally:
        with torch.no_grad():
            w.copy_(saved)
