"""MALMEN (editlens/edit/malmen.py): the least-squares aggregation against independent closed forms, the separated
backpropagation against plain end-to-end autograd, and the method contract pieces (train, edit, undo, sequential)
on the tiny random model."""
from __future__ import annotations

import math

import pytest
import torch

import editlens
from editlens.edit import hypernet as H
from editlens.edit.trained import TrainedEditor, train
from editlens.lm.arch import weight_param

SMALL = dict(rank=8, epochs=1, max_steps=3, val_every=3, max_val=2, batch_size=3)


@pytest.fixture(scope="module")
def tiny():
    return editlens.load_model("tiny-llama")


@pytest.fixture(scope="module")
def cases():
    return editlens.synthetic_cases(14)


@pytest.fixture(scope="module")
def trained(tiny, cases):
    return train("malmen", tiny, cases[:9], progress=False, **SMALL)


@pytest.mark.parametrize("n,d_in,d_out", [(5, 12, 7), (30, 8, 4)])  # both branches: N < d_in and N > d_in
def test_ls_shift_equals_ridge_least_squares_closed_form(n, d_in, d_out):
    g = torch.Generator().manual_seed(n)
    K = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    D = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    lam = 0.37
    S = H.ls_shift(K, D, lam)
    # independent: min ||[K; sqrt(λ) I] Sᵀ - [D; 0]||² by torch.linalg.lstsq on the augmented system
    A = torch.cat([K, math.sqrt(lam) * torch.eye(d_in, dtype=torch.float64)])
    B = torch.cat([D, torch.zeros(d_in, d_out, dtype=torch.float64)])
    ref = torch.linalg.lstsq(A, B).solution.T
    torch.testing.assert_close(S, ref, rtol=1e-10, atol=1e-10)
    # and the normal equation written out: S (KᵀK + λI) = Dᵀ K
    torch.testing.assert_close(S @ (K.T @ K + lam * torch.eye(d_in, dtype=torch.float64)), D.T @ K,
                               rtol=1e-9, atol=1e-9)


def test_ls_shift_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(3)
    K = torch.randn(4, 6, generator=g, dtype=torch.float64)
    D = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d, l: H.ls_shift(K, d, l), (D, lam))


def test_single_key_is_interpolated_when_ridge_vanishes():
    g = torch.Generator().manual_seed(4)
    k, d = torch.randn(1, 9, generator=g, dtype=torch.float64), torch.randn(1, 5, generator=g, dtype=torch.float64)
    S = H.ls_shift(k, d, 1e-12)
    torch.testing.assert_close(S @ k[0], d[0], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(S, torch.outer(d[0], k[0]) / (k[0] @ k[0]), rtol=1e-8, atol=1e-10)  # minimum norm


def test_value_differences_by_hand():
    """d_t = −α (ũ_tᵀ u_t) δ̃_t; at initialisation ũ, δ̃ are the standardised inputs."""
    bank = H.HyperBank([(6, 4)], rank=3, n_blocks=2, edit_lr=0.25, lamda=2.0)
    g = torch.Generator().manual_seed(5)
    U, D = torch.randn(7, 6, generator=g), torch.randn(7, 4, generator=g)
    bank.update_stats(0, U, D)
    un = (U - U.double().mean(0).float()) / (U.double().std(0).float() + 1e-7)
    dn = (D - D.double().mean(0).float()) / (D.double().std(0).float() + 1e-7)
    want = -0.25 * (un * U).sum(-1, keepdim=True) * dn
    with torch.no_grad():
        torch.testing.assert_close(bank.value_diffs(0, U, D), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bank.malmen_delta(0, U, D), H.ls_shift(U, want, 2.0), rtol=1e-4, atol=1e-6)
        assert math.isclose(float(bank.lamda(0)), 2.0, rel_tol=1e-6)


def _perturbed_bank(lm, modules, batch):
    shapes = [H.in_out_features(lm.module(m)) for m in modules]
    bank = H.HyperBank(shapes, rank=4, n_blocks=2, edit_lr=1e-3, lamda=0.5, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in bank.nets.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return bank


def test_separated_backprop_equals_end_to_end_autograd(tiny, cases):
    """meta_step's split (LM backward per edit into leaf shifts, then ∂L/∂S through the solve and the network) gives
    the gradient of one end-to-end backward through everything."""
    hp = H.HyperTrainHParams(rank=4, c_edit=1.0, c_loc=0.7, max_paraphrases=2, max_neighbors=2)
    modules = H.edited_modules(tiny, H.resolve_layers(tiny, []), H.MODULE_KINDS)
    batch = cases[:3]
    bank = _perturbed_bank(tiny, modules, batch)
    res = H.meta_step("malmen", bank, tiny, modules, batch, hp, train=True)
    split = {n: p.grad.clone() for n, p in bank.named_parameters() if p.grad is not None}
    bank.zero_grad(set_to_none=True)
    # reference: the loss written out, one backward (stats are those meta_step left, as it used them)
    factors = H.capture_factors(tiny, modules, H.make_rows(tiny, H.rewrite_pairs(batch)))
    shifts = {m: bank.malmen_delta(i, *factors[m]) for i, m in enumerate(modules)}
    post = [(r.text, r.target_new) for c in batch for r in c.rewrites] + \
        [(p.prompt, p.target) for c in batch for p in c.probes_of("paraphrase")[:2]]
    loc = [(p.prompt, p.target) for c in batch for p in c.probes_of("neighborhood")[:2]]
    rp, rl = H.make_rows(tiny, post), H.make_rows(tiny, loc)
    with torch.no_grad():
        lp_pre = H.row_logprobs(tiny, rl)
    with torch.enable_grad(), H.added_outputs(tiny, {m: (lambda x, S=S: x @ S.T) for m, S in shifts.items()}):
        nll = H.row_nll(H.row_logprobs(tiny, rp), rp)[0]
        kl = H.row_kl(lp_pre, H.row_logprobs(tiny, rl), rl)
        total = 1.0 * nll.mean() + 0.7 * kl.mean()
        total.backward()
    assert math.isclose(float(total.detach()), res.loss, rel_tol=1e-4)
    ref = {n: p.grad for n, p in bank.named_parameters() if p.grad is not None}
    assert set(ref) == set(split) and "log_lamda" in ref and "alpha" in ref
    assert float(ref["alpha"].norm()) > 0 and float(ref["nets.0.U.0"].norm()) > 0
    for n in ref:
        torch.testing.assert_close(split[n], ref[n], rtol=2e-3, atol=1e-7 * max(1.0, float(ref[n].abs().max())))


def test_prefix_cache_gives_the_same_step(tiny, cases):
    """Running only the edited blocks on cached states equals running the whole model (MEND and MALMEN losses)."""
    hp = H.HyperTrainHParams(rank=4)
    layers = H.resolve_layers(tiny, [])
    modules = H.edited_modules(tiny, layers, H.MODULE_KINDS)
    cache = H.PrefixCache(tiny, min(layers))
    assert cache.enabled, cache.reason
    assert not H.PrefixCache(editlens.load_model("tiny-gpt2"), 1).enabled  # GPT-2 adds position embeddings
    for kind in ("mend", "malmen"):
        bank = _perturbed_bank(tiny, modules, cases[:2])
        for i, m in enumerate(modules):
            f = H.capture_factors(tiny, modules, H.make_rows(tiny, H.rewrite_pairs(cases[:2])))[m]
            bank.update_stats(i, *f)
        full = H.meta_step(kind, bank, tiny, modules, cases[:2], hp, train=False)
        cut = H.meta_step(kind, bank, tiny, modules, cases[:2], hp, train=False, cache=cache)
        assert math.isclose(full.loss, cut.loss, rel_tol=1e-4), (kind, full, cut)
        assert full.acc_rewrite == cut.acc_rewrite


def test_batch_edit_is_the_least_squares_shift_of_all_tokens(tiny, cases, trained):
    modules = trained.meta["arch"]["modules"]
    w0 = {m: weight_param(tiny.module(m)).detach().clone() for m in modules}
    batch = cases[9:13]
    bank, mods = H.bank_from_trained(trained, tiny)
    factors = H.capture_factors(tiny, mods, H.make_rows(tiny, H.rewrite_pairs(batch)))
    e = editlens.edit(tiny, batch, method="malmen", trained=trained)
    for i, m in enumerate(mods):
        U, D = factors[m]
        with torch.no_grad():
            want = H.ls_shift(U.double(), bank.value_diffs(i, U, D).double(), bank.lamda(i).double())
        got = (weight_param(tiny.module(m)).detach() - w0[m]).double()
        # float32 solve on the model's device against float64 here: agree to float32 rounding of the largest entry
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    e.undo()
    assert all(torch.equal(weight_param(tiny.module(m)), w0[m]) for m in modules)


def test_train_save_load_undo_sequential(tiny, cases, trained, tmp_path):
    assert trained.meta["arch"]["kind"] == "malmen" and trained.meta["n_steps"] == 3
    trained.save(tmp_path / "ed")
    back = TrainedEditor.load(tmp_path / "ed")
    assert all(torch.equal(back.tensors[k], trained.tensors[k]) for k in trained.tensors)
    modules = trained.meta["arch"]["modules"]
    w0 = {m: weight_param(tiny.module(m)).detach().clone() for m in modules}
    run = editlens.edit.edit_sequential(tiny, cases[9:13], "malmen", batch_size=2, trained=tmp_path / "ed")
    assert not all(torch.equal(weight_param(tiny.module(m)), w0[m]) for m in modules)
    run.undo()
    assert all(torch.equal(weight_param(tiny.module(m)), w0[m]) for m in modules)


def test_mend_editor_is_refused_by_malmen(tiny, cases):
    from editlens.errors import MethodError

    te = train("mend", tiny, cases[:4], progress=False, rank=4, max_steps=1, val_every=1, max_val=1)
    with pytest.raises(MethodError, match="trained for method 'mend'"):
        editlens.edit(tiny, cases[:1], method="malmen", trained=te)
