"""KE (De Cao et al. 2021): the pieces against independent values, then train -> edit -> undo/sequential/save-load.

* the gradient the hyper-network conditions on equals autograd's gradient of that fact's loss alone (llama Linear
  and GPT-2 Conv1D layouts), and the fact's NLL equals one computed from an unpadded forward;
* the update form ``c·σ(η)(softmax(α)γᵀ ⊙ G + softmax(β)δᵀ)`` against numbers worked out by hand;
* the per-fact forward hooks equal adding ``ΔW`` to the weights; rows of another fact see nothing;
* the KL against scipy's ``entropy``; the Lagrange multiplier rises while the constraint is violated and falls to
  0 (never below) while it holds, through the real training loop;
* a trained editor round-trips through save/load bit for bit and edits identically; undo is bit-exact; a batch
  edit is the sum of the single-fact updates; a sequential run takes its second gradient at the edited weights.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy

import editlens
from editlens.data.schema import EditCase
from editlens.edit import edit, edit_sequential, ke
from editlens.edit.trained import TrainedEditor, train
from editlens.errors import EditlensError, HParamsError, TrainingError
from editlens.lm.arch import weight_param, weight_view

FAST = dict(steps=6, batch_size=2, val_every=3, lstm_dim=8, cond_dim=8, ffn_dim=8)


@pytest.fixture(scope="module")
def llama():
    return editlens.load_model("tiny-llama")


@pytest.fixture(scope="module")
def cases():
    return editlens.synthetic_cases(10, seed=3)


@pytest.fixture(scope="module")
def trained(llama, cases):
    return train("ke", llama, cases[:8], progress=False, seed=0, **FAST)


def _params(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _same(lm, saved):
    return all(torch.equal(v, saved[k]) for k, v in lm.model.state_dict().items())


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_fact_gradients_equal_autograd(model, cases):
    lm = editlens.load_model(model)
    hp = ke.KETrainHParams.for_model(lm)
    paths = hp.module_paths(lm)
    facts = ke.edit_facts(lm, cases[:3])
    G, nll = ke.fact_gradients(lm, facts, paths)
    params = [weight_param(lm.module(p)) for p in paths]
    for f_i, (case, fact) in enumerate(zip(cases[:3], facts)):
        # reference: the fact alone, unpadded, loss written out, autograd w.r.t. the real weights
        p_ids, t_ids = editlens.lm.ops.target_token_ids(lm.tokenizer, case.rewrite.text, case.rewrite.target_new)
        ids = torch.tensor([p_ids + t_ids[:-1]])
        try:
            for w in params:
                w.requires_grad_(True)
            logits = lm.model(input_ids=ids).logits[0, -len(t_ids):].float()
            ref_nll = -torch.log_softmax(logits, -1)[torch.arange(len(t_ids)), torch.tensor(t_ids)].mean()
            ref = torch.autograd.grad(ref_nll, params)
        finally:
            for w in params:
                w.requires_grad_(False)
        assert float(nll[f_i]) == pytest.approx(float(ref_nll.detach()), rel=1e-5, abs=1e-5)
        for p, g in zip(paths, ref):
            g_outin = g.t() if model == "tiny-gpt2" else g  # Conv1D stores [in, out]
            assert G[p][f_i].shape == weight_view(lm.module(p)).shape
            assert float(g_outin.norm()) > 0
            torch.testing.assert_close(G[p][f_i], g_outin.float(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ update form
def test_ke_update_by_hand():
    # m = 2, n = 3; softmax([0, ln 3]) = [1/4, 3/4]; softmax([ln 2, 0]) = [2/3, 1/3]; σ(0) = 1/2; c = 4
    G = torch.tensor([[1.0, -2.0, 4.0], [0.5, 0.0, -1.0]], dtype=torch.float64)
    alpha = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64)
    gamma = torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64)
    beta = torch.tensor([math.log(2.0), 0.0], dtype=torch.float64)
    delta = torch.tensor([3.0, 0.0, 6.0], dtype=torch.float64)
    eta = torch.tensor(0.0, dtype=torch.float64)
    out = ke.ke_update(G, alpha, gamma, beta, delta, eta, 4.0)
    # c·σ(η) = 2; row 0: 2·(1/4·[2,1,-1]⊙[1,-2,4] + 2/3·[3,0,6]) = 2·([0.5,-0.5,-1] + [2,0,4]) = [5,-1,6]
    # row 1: 2·(3/4·[2,1,-1]⊙[0.5,0,-1] + 1/3·[3,0,6]) = 2·([0.75,0,0.75] + [1,0,2]) = [3.5,0,5.5]
    expected = torch.tensor([[5.0, -1.0, 6.0], [3.5, 0.0, 5.5]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    # batched over facts: each fact its own factors
    outs = ke.ke_update(torch.stack([G, 2 * G]), torch.stack([alpha, alpha]), torch.stack([gamma, gamma]),
                        torch.stack([beta, beta]), torch.stack([delta, 0 * delta]), torch.stack([eta, eta]), 4.0)
    torch.testing.assert_close(outs[0], expected)
    torch.testing.assert_close(outs[1], 2 * (expected - torch.tensor([[4.0, 0, 8.0], [2.0, 0, 4.0]],
                                                                     dtype=torch.float64)))


def test_untrained_net_is_a_descent_step(llama, cases):
    """γ starts at −1, α uniform, σ(0) = 1/2, β-shift 0: ΔW = −c/(2m) · G for every matrix and fact."""
    hp = ke.KETrainHParams.for_model(llama).replace(**FAST)
    torch.manual_seed(0)
    net = ke.build_net(llama, hp)
    facts = ke.edit_facts(llama, cases[:2])
    G, _ = ke.fact_gradients(llama, facts, list(net.shapes))
    emb, lengths = ke.fact_embeddings(llama, facts)
    with torch.no_grad():
        out = net(emb, lengths, G)
    for p, (m, _) in net.shapes.items():
        torch.testing.assert_close(out[p], -hp.max_scale / (2 * m) * G[p])


# ------------------------------------------------------------------------------------------------ hooks, KL
def test_per_fact_deltas_equal_adding_the_weights(llama, cases):
    path = llama.arch.mlp_out_at(2)
    W = weight_param(llama.module(path))
    g = torch.Generator().manual_seed(1)
    d0 = 0.05 * torch.randn(W.shape, generator=g)
    zero = torch.zeros_like(d0)
    rows = [ke._row(llama, c.rewrite.text, c.rewrite.target_new) for c in cases[:3]]
    with torch.no_grad():
        base, _ = ke._tf_forward(llama, rows)
        with ke.per_fact_deltas(llama, {path: [d0, zero]}, [(0, 2), (2, 3)]):
            hooked, _ = ke._tf_forward(llama, rows)
        saved = W.detach().clone()
        try:
            W.add_(d0)
            direct, _ = ke._tf_forward(llama, rows[:2])
        finally:
            W.copy_(saved)
    torch.testing.assert_close(hooked[:2], direct, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(hooked[:2], base[:2], atol=1e-3)  # the delta mattered
    assert torch.equal(hooked[2], base[2])  # a row of another fact (zero delta) is untouched bit for bit
    assert not llama.module(path)._forward_hooks  # hooks removed


def test_row_kl_and_nll_against_scipy():
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(2, 3, 5, generator=g, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.randn(2, 3, 5, generator=g, dtype=torch.float64), -1)
    labels = torch.tensor([[-2, 1, 4], [-1, -2, -2]])  # row 0: positions 1, 2; row 1: position 0 (no target)
    kl = ke.row_kl(p, q, labels)
    e = lambda b, t: entropy(p[b, t].exp().numpy(), q[b, t].exp().numpy())  # noqa: E731
    assert float(kl[0]) == pytest.approx((e(0, 1) + e(0, 2)) / 2, rel=1e-10)
    assert float(kl[1]) == pytest.approx(e(1, 0), rel=1e-10)
    nll = ke.row_nll(q, labels)
    assert float(nll[0]) == pytest.approx(-(float(q[0, 1, 1]) + float(q[0, 2, 4])) / 2, rel=1e-12)
    assert float(ke.lagrangian(torch.tensor(2.0), torch.tensor(0.5), torch.tensor(3.0), 0.1)) == pytest.approx(3.2)


def test_margin_anneal():
    hp = ke.KETrainHParams(layers=[0], modules=["mlp_out"], steps=11, margin=1e-3, margin_start=1e-2)
    assert ke.annealed_margin(hp, 0) == pytest.approx(1e-2)
    assert ke.annealed_margin(hp, 5) == pytest.approx(5.5e-3)
    assert ke.annealed_margin(hp, 10) == pytest.approx(1e-3)


def test_lagrange_multiplier_follows_the_constraint(llama, cases):
    tight = train("ke", llama, cases[:6], progress=False, seed=0, **{**FAST, "margin": 1e-12, "margin_start": 1e-12,
                                                                      "lagrange_lr": 0.1})
    lam = tight.meta["lambda_curve"]
    assert all(k > 1e-12 for k in tight.meta["kl_curve"])  # violated at every step ...
    assert all(b > a for a, b in zip(lam, lam[1:])) and lam[0] > 1.0  # ... so λ ascends every step
    loose = train("ke", llama, cases[:6], progress=False, seed=0, **{**FAST, "margin": 50.0, "margin_start": 50.0,
                                                                      "lagrange_lr": 0.5})
    lam = loose.meta["lambda_curve"]
    assert lam[0] < 1.0 and min(lam) == 0.0 and all(x >= 0.0 for x in lam)  # holds: λ descends, projected at 0


# ------------------------------------------------------------------------------------------------ train / edit
def test_trained_editor_meta_and_save_load_bit_for_bit(llama, cases, trained, tmp_path):
    assert trained.method == "ke" and trained.base_fingerprint == llama.base_fingerprint
    assert trained.meta["modules"] == ke.KETrainHParams.for_model(llama).module_paths(llama)
    assert len(trained.meta["loss_curve"]) == trained.meta["steps_run"] > 0
    assert trained.meta["validation"], "validation ran on the held-out part"
    loaded = TrainedEditor.load(trained.save(tmp_path / "ke"))
    assert set(loaded.tensors) == set(trained.tensors)
    assert all(torch.equal(loaded.tensors[k], trained.tensors[k]) for k in trained.tensors)
    assert loaded.hparams == trained.hparams
    saved = _params(llama)
    e1 = edit(llama, cases[8:9], method="ke", trained=trained)
    w1 = _params(llama)
    e1.undo()
    assert _same(llama, saved)
    e2 = edit(llama, cases[8:9], method="ke", trained=tmp_path / "ke")
    assert _same(llama, w1)  # the loaded editor edits bit for bit the same
    e2.undo()
    assert _same(llama, saved) and llama.fingerprint == llama.base_fingerprint


def test_edit_changes_only_the_trained_modules_and_batch_is_the_sum(llama, cases, trained):
    saved = _params(llama)
    paths = trained.meta["modules"]
    deltas = []
    for batch in ([cases[8]], [cases[9]], cases[8:10]):
        e = edit(llama, batch, method="ke", trained=trained)
        now = _params(llama)
        changed = {k for k in now if not torch.equal(now[k], saved[k])}
        assert changed == {p + ".weight" for p in paths}
        assert e.diagnostics["ke/n_facts"] == len(batch)
        assert set(e.diagnostics["layers"]) == set(trained.hparams["layers"])
        deltas.append({p: now[p + ".weight"] - saved[p + ".weight"] for p in paths})
        e.undo()
        assert _same(llama, saved)
    for p in paths:  # updates of one batch are computed at the same weights and added
        torch.testing.assert_close(deltas[2][p], deltas[0][p] + deltas[1][p], rtol=1e-4, atol=1e-7)
    e = edit(llama, [cases[8]], method="ke", trained=trained, scale=0.5)
    half = {p: _params(llama)[p + ".weight"] - saved[p + ".weight"] for p in paths}
    e.undo()
    for p in paths:
        torch.testing.assert_close(half[p], 0.5 * deltas[0][p], rtol=1e-4, atol=1e-7)


def test_sequential_takes_gradients_at_the_edited_weights_and_undoes(llama, cases, trained):
    saved = _params(llama)
    paths = trained.meta["modules"]
    run = edit_sequential(llama, cases[7:10], "ke", batch_size=1, trained=trained)
    after = _params(llama)
    run.undo()
    assert _same(llama, saved) and llama.fingerprint == llama.base_fingerprint
    # reference: the same three edits applied by hand, each at the weights the previous ones left
    e1 = edit(llama, [cases[7]], method="ke", trained=trained)
    e2 = edit(llama, [cases[8]], method="ke", trained=trained)
    e3 = edit(llama, [cases[9]], method="ke", trained=trained)
    by_hand = _params(llama)
    for e in (e3, e2, e1):
        e.undo()
    assert _same(llama, saved)
    for p in paths:
        torch.testing.assert_close(after[p + ".weight"], by_hand[p + ".weight"], rtol=1e-5, atol=1e-7)
    # and it differs from summing updates all taken at the base weights (the batch edit)
    e = edit(llama, cases[7:10], method="ke", trained=trained)
    batch = _params(llama)
    e.undo()
    assert any(not torch.allclose(batch[p + ".weight"], after[p + ".weight"], atol=1e-6) for p in paths)


# ------------------------------------------------------------------------------------------------ errors
def test_errors_before_any_work(llama, cases, trained):
    saved = _params(llama)
    with pytest.raises(HParamsError, match="layer 9 is outside"):
        train("ke", llama, cases[:4], progress=False, layers=[9], **{k: v for k, v in FAST.items()})
    with pytest.raises(HParamsError, match="unknown module kind"):
        train("ke", llama, cases[:4], progress=False, modules=["attn_out"])
    gpt2 = editlens.load_model("tiny-gpt2")
    with pytest.raises(HParamsError, match="no gated MLP"):
        train("ke", gpt2, cases[:4], progress=False, modules=["mlp_gate"])
    no_nb = EditCase(cases[0].case_id, cases[0].rewrite,
                     {k: v for k, v in cases[0].probes.items() if k != "neighborhood"})
    with pytest.raises(TrainingError, match=rf"{cases[0].case_id!r}.*neighborhood"):
        train("ke", llama, [cases[1], no_nb], progress=False)
    with pytest.raises(EditlensError, match="trained for model 'tiny-llama'"):
        edit(gpt2, cases[:1], method="ke", trained=trained)
    with pytest.raises(HParamsError, match="scale"):
        edit(llama, cases[:1], method="ke", trained=trained, scale=-1.0)
    assert _same(llama, saved)


def test_nan_loss_stops_with_the_step(llama, cases):
    with pytest.raises(TrainingError, match="step 0"):
        train("ke", llama, cases[:4], progress=False, **{**FAST, "max_scale": 1e38})


def test_contract_overrides_train_quickly(llama, cases):
    te = train("ke", llama, cases[:4], progress=False, **ke.KE().contract_train_overrides())
    assert te.meta["steps_run"] == 4
    assert np.isfinite(te.meta["loss_curve"]).all()
