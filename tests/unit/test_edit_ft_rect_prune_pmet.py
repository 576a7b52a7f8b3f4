"""FT-L/FT-M, RECT, PRUNE, PMET: pure tensor functions on hand-made tensors, then the methods on tiny models."""
from __future__ import annotations

import math

import pytest
import torch

from editlens.edit.prune import largest_singular_value, prune_F, prune_restrain
from editlens.edit.rect import rect_mask, rect_n_keep, rect_scores
from editlens.errors import HParamsError


# ------------------------------------------------------------------------------------------------ RECT
def test_rect_mask_hand_computed():
    W = torch.tensor([[1.0, 2.0], [4.0, -0.5]])
    dW = torch.tensor([[0.5, 0.5], [1.0, 0.1]])
    # relative changes: 0.5, 0.25, 0.25, 0.2
    assert torch.allclose(rect_scores(W, dW).float(), torch.tensor([[0.5, 0.25], [0.25, 0.2]]))
    assert torch.equal(rect_mask(W, dW, 0.25), torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    # tie between (0,1) and (1,0): the lower flat index wins
    assert torch.equal(rect_mask(W, dW, 0.5), torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    assert torch.equal(rect_mask(W, dW, 0.75), torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    assert torch.equal(rect_mask(W, dW, 1.0), dW)
    assert torch.equal(rect_mask(W, dW, 0.0), torch.zeros(2, 2))


def test_rect_mask_keeps_exact_fraction_of_largest_relative_changes():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 48, generator=g)
    dW = torch.randn(64, 48, generator=g) * 0.01
    for frac in (0.2, 0.05, 0.5, 0.33):
        out = rect_mask(W, dW, frac)
        kept = out != 0
        assert int(kept.sum()) == rect_n_keep(W.numel(), frac) == round(frac * W.numel())
        assert torch.equal(out[kept], dW[kept])  # kept values are the update's own values
        rel = (dW.abs() / W.abs())
        assert rel[kept].min() >= rel[~kept].max()  # the kept ones are the largest relative changes


def test_rect_zero_weight_counts_as_infinite_change_and_bad_fraction():
    W = torch.tensor([0.0, 1.0, 1.0, 0.0])
    dW = torch.tensor([1e-6, 0.5, 0.1, 0.0])
    assert torch.equal(rect_mask(W, dW, 0.25), torch.tensor([1e-6, 0.0, 0.0, 0.0]))
    with pytest.raises(HParamsError, match="keep_fraction"):
        rect_mask(W, dW, 1.5)
    with pytest.raises(HParamsError, match="does not match"):
        rect_mask(W, dW[:3], 0.2)


# ------------------------------------------------------------------------------------------------ PRUNE
def _matrix_with_singular_values(svals, m, n, seed):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    S = torch.zeros(m, n, dtype=torch.float64)
    for i, s in enumerate(svals):
        S[i, i] = s
    return U @ S @ V.T


def test_prune_F_hand_computed():
    s = torch.tensor([20.0, 10.0, 3.0], dtype=torch.float64)
    out = prune_F(s, sigma_max=10.0, alpha=2.0)
    assert out[0].item() == pytest.approx(10.0 + math.log2(20.0) - math.log2(10.0))  # 11
    assert out[1].item() == 10.0 and out[2].item() == 3.0
    e = prune_F(torch.tensor([100.0], dtype=torch.float64), sigma_max=10.0, alpha=math.e)
    assert e.item() == pytest.approx(10.0 + math.log(10.0))
    with pytest.raises(HParamsError, match="alpha"):
        prune_F(s, 10.0, alpha=1.0)


def test_prune_restrains_large_singular_values_and_keeps_small_ones():
    W = _matrix_with_singular_values([5.0, 4.0, 2.0, 1.0, 0.5, 0.1], 8, 6, seed=1)
    D = _matrix_with_singular_values([40.0, 9.0, 3.0, 1.5, 0.2], 8, 6, seed=2)
    alpha = 1.5
    R, info = prune_restrain(W, D, alpha)
    assert info["sigma_max_W"] == pytest.approx(5.0) and info["n_restrained"] == 2
    sv_before = torch.linalg.svdvals(D)
    sv_after = torch.linalg.svdvals(R)
    bound = lambda s: 5.0 + math.log(s / 5.0, alpha)  # noqa: E731
    assert sv_after[0].item() == pytest.approx(min(40.0, bound(40.0)), rel=1e-9)
    assert sv_after[1].item() == pytest.approx(min(9.0, bound(9.0)), rel=1e-9)
    assert (sv_after[:2] <= sv_before[:2]).all()
    # the small singular values (and their directions) are untouched
    torch.testing.assert_close(sv_after[2:], sv_before[2:], rtol=1e-10, atol=1e-12)
    # the condition-number growth is bounded: ||W + R||_2 <= σ_max(W) + F(σ̄_1)
    assert largest_singular_value(W + R) <= 5.0 + bound(40.0) + 1e-9
    assert largest_singular_value(W + D) > largest_singular_value(W + R)


def test_prune_leaves_small_updates_bit_identical():
    W = _matrix_with_singular_values([5.0, 1.0], 4, 3, seed=3).float()
    D = _matrix_with_singular_values([4.9, 0.3], 4, 3, seed=4).float()
    R, info = prune_restrain(W, D, 1.2)
    assert info["n_restrained"] == 0 and torch.equal(R, D) and R.dtype == torch.float32


def test_prune_min_keeps_it_a_restraint_for_small_sigma_max():
    # σ_max(W) = 0.5 < 1/ln(1.2): F(0.6) = 0.5 + log_1.2(1.2) = 1.5 > 0.6 -> min keeps 0.6
    s = prune_F(torch.tensor([0.6, 50.0], dtype=torch.float64), 0.5, 1.2)
    assert s[0].item() == pytest.approx(0.6)
    assert s[1].item() == pytest.approx(0.5 + math.log(100.0, 1.2))


# ------------------------------------------------------------------------------------------------ FT pure parts
def test_linf_project_and_losses_hand_computed():
    from editlens.edit.ft import linf_project_, masked_target_nll, prompt_last_nll

    W0 = torch.zeros(2, 3)
    W = torch.tensor([[0.3, -0.05, -0.2], [0.0, 0.1, 0.09]])
    linf_project_(W, W0, 0.1)
    assert torch.equal(W, torch.tensor([[0.1, -0.05, -0.1], [0.0, 0.1, 0.09]]))
    # two positions, vocab 2; only the second position is a target token
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    labels = torch.tensor([[1, 0]])
    mask = torch.tensor([[False, True]])
    assert masked_target_nll(logits, labels, mask).item() == pytest.approx(-math.log(0.75))
    # prompt_last: both target tokens scored under the one next-token distribution after the prompt
    last = torch.tensor([[math.log(3.0), 0.0]])
    assert prompt_last_nll(last, [[0, 1]]).item() == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2)


# ------------------------------------------------------------------------------------------------ methods on tiny models
def _cases():
    from editlens.data.schema import Rewrite, make_case

    return [make_case("a", Rewrite("{} is located in the city of", "The tower", "Rome", "Paris")),
            make_case("b", Rewrite("The capital of {} is", "Japan", "London", "Tokyo"))]


def _weights(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _assert_bit_identical(lm, before):
    after = lm.model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_registry_names_and_unknown_override():
    from editlens.edit import edit, get_method, registered_methods
    from editlens.edit.ft import FTHParams, FTLHParams, FTMHParams
    from editlens.errors import MethodError

    names = registered_methods()
    for n in ("ft", "ft-l", "ft-m", "pmet"):
        assert n in names
    assert get_method("FT-M").hparams_class is FTMHParams and get_method("ft-l").hparams_class is FTLHParams
    assert get_method("ft").hparams_class is FTHParams
    with pytest.raises(HParamsError, match="'nope'.*'ft-m'"):
        FTMHParams().replace(nope=1)
    with pytest.raises(HParamsError, match="variant"):
        FTHParams().replace(variant="ft-x")
    with pytest.raises(MethodError, match="unknown editing method"):
        get_method("ft-z")


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_ft_l_respects_linf_bound_and_undo_is_bit_exact(model):
    import editlens
    from editlens.edit import edit
    from editlens.lm.arch import weight_view

    lm = editlens.load_model(model)
    before = _weights(lm)
    fp = lm.fingerprint
    e = edit(lm, _cases(), "ft-l", steps=5, norm_constraint=2e-3, lr=1e-2)
    assert e.diagnostics["ft/objective"] == "prompt_last" and e.diagnostics["ft/norm_constraint"] == 2e-3
    layer = e.hparams.layers[0]
    name = lm.arch.mlp_out_at(layer)
    W = weight_view(lm.module(name)).detach()
    W0 = before[name + ".weight"]
    W0 = W0.t() if lm.arch.conv1d else W0
    diff = (W - W0).abs()
    assert diff.max() <= 2e-3 * (1 + 1e-5)
    assert diff.max() >= 2e-3 * 0.99  # lr 1e-2 hits the bound
    # only the chosen matrix moved
    changed = [k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [name + ".weight"]
    assert lm.fingerprint != fp
    e.undo()
    _assert_bit_identical(lm, before)
    assert lm.fingerprint == fp


def test_ft_m_defaults_and_edit_moves_the_target(tiny_llama):
    from editlens.edit import edit
    from editlens.lm import ops

    cases = _cases()
    before = _weights(tiny_llama)
    lp0 = [t.sum().item() for t in ops.target_logprobs(tiny_llama, [c.rewrite.text for c in cases],
                                                           [c.rewrite.target_new for c in cases])]
    e = edit(tiny_llama, cases, "ft-m")
    assert e.hparams.variant == "ft-m"
    assert e.diagnostics["ft/objective"] == "target_new" and e.diagnostics["ft/norm_constraint"] == 0.0
    lp1 = [t.sum().item() for t in ops.target_logprobs(tiny_llama, [c.rewrite.text for c in cases],
                                                           [c.rewrite.target_new for c in cases])]
    assert all(b > a + 0.5 for a, b in zip(lp0, lp1))
    got = ops.generate(tiny_llama, [c.rewrite.text for c in cases], 2)
    assert [g.split()[0] for g in got] == [c.rewrite.target_new for c in cases]
    assert e.diagnostics["loss/final"] < e.diagnostics["loss/first"]
    e.undo()
    _assert_bit_identical(tiny_llama, before)
    # "ft" with the variant override behaves as ft-m
    e2 = edit(tiny_llama, cases, "ft", variant="ft-m", steps=2)
    assert e2.diagnostics["ft/objective"] == "target_new"
    e2.undo()
    _assert_bit_identical(tiny_llama, before)


def test_ft_bad_layer_and_evk_hook(tiny_llama):
    from editlens.edit import edit

    with pytest.raises(HParamsError, match="layer 9"):
        edit(tiny_llama, _cases(), "ft-m", layers=[9])
    calls = []

    def extra(ctx):
        # reference outputs come from the original weights, edited outputs carry gradient to the trained weights
        ids = torch.tensor([[5, 6, 7]])
        pos = torch.tensor([2])
        idx = torch.tensor([0])
        with torch.no_grad():
            ref = ctx.run(idx, pos, input_ids=ids, use_delta=False)
        out = ctx.run(idx, pos, input_ids=ids)
        calls.append((ctx.step, float((out - ref).detach().abs().max())))
        return ((out - ref) ** 2).mean()

    before = _weights(tiny_llama)
    e = edit(tiny_llama, _cases(), "ft-m", steps=3, evk_align=extra)
    assert calls and calls[0][1] == 0.0 and max(c[1] for c in calls) > 0
    assert "loss/extra" in e.diagnostics
    e.undo()
    _assert_bit_identical(tiny_llama, before)


# ------------------------------------------------------------------------------------------------ PMET
def test_pmet_layer_update_closed_form_identity():
    from editlens.edit.pmet import pmet_layer_update

    g = torch.Generator().manual_seed(5)
    K = torch.randn(3, 10, generator=g, dtype=torch.float64)  # 3 keys, d_in 10
    R = torch.randn(3, 4, generator=g, dtype=torch.float64)  # d_out 4
    A = torch.randn(10, 10, generator=g, dtype=torch.float64)
    C = 0.5 * (A @ A.T) + torch.eye(10, dtype=torch.float64)
    for m in (1, 2, 4):
        D = pmet_layer_update(K, R, C, m)
        # normal equation: ΔW (KᵀK + C) = (R/√m)ᵀ K
        torch.testing.assert_close(D @ (K.T @ K + C), (R / math.sqrt(m)).T @ K, rtol=1e-9, atol=1e-10)
    # without regularisation (C -> 0) the update interpolates the spread residual: ΔW k_i = r_i/√m
    D = pmet_layer_update(K, R, 1e-12 * torch.eye(10, dtype=torch.float64), 4)
    torch.testing.assert_close(D @ K.T, (R / 2.0).T, rtol=1e-6, atol=1e-6)


def test_pmet_on_tiny_model_reaches_the_ffn_target_and_undoes(tiny_llama):
    from editlens.edit import edit

    before = _weights(tiny_llama)
    fp = tiny_llama.fingerprint
    e = edit(tiny_llama, _cases(), "pmet", layers=[2], n_prefixes=0, mom2_update_weight=1e-9)
    d = e.diagnostics
    assert d["layers"] == [2] and d["pmet/delta_attn_norm"] > 0 and d["pmet/delta_mlp_norm"] > 0
    # one layer, keys of exactly the edited prompts, λ -> 0: the FFN output at L hits m* = m0 + δ_mlp
    assert d["pmet/resid_after"] < 1e-3 * d["resid_norm/2"]
    changed = [k for k, v in tiny_llama.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [tiny_llama.arch.mlp_out_at(2) + ".weight"]  # attention weights are not edited
    e.undo()
    _assert_bit_identical(tiny_llama, before)
    assert tiny_llama.fingerprint == fp


def test_pmet_multi_layer_defaults_and_spreading(tiny_gpt2):
    from editlens.edit import edit

    before = _weights(tiny_gpt2)
    e = edit(tiny_gpt2, _cases(), "pmet")
    d = e.diagnostics
    assert d["layers"] == [1, 2] and d["delta_norm/1"] > 0 and d["delta_norm/2"] > 0
    assert d["pmet/resid_after"] < d["resid_norm/1"]
    e.undo()
    _assert_bit_identical(tiny_gpt2, before)


# ------------------------------------------------------------------------------------------------ RECT / PRUNE methods
def test_rect_method_sparsity_and_undo(tiny_llama):
    from editlens.edit import edit
    from editlens.edit.rect import RECTHParams

    assert RECTHParams().keep_fraction == 0.2
    before = _weights(tiny_llama)
    e = edit(tiny_llama, _cases(), "rect", keep_fraction=0.1)
    for layer in e.diagnostics["layers"]:
        name = tiny_llama.arch.mlp_out_at(layer) + ".weight"
        diff = tiny_llama.model.state_dict()[name] - before[name]
        n_keep = round(0.1 * diff.numel())
        assert int((diff != 0).sum()) == e.diagnostics[f"rect/kept/{layer}"]
        assert 0.99 * n_keep <= int((diff != 0).sum()) <= n_keep
    e.undo()
    _assert_bit_identical(tiny_llama, before)
    with pytest.raises(HParamsError, match="keep_fraction"):
        edit(tiny_llama, _cases(), "rect", keep_fraction=0.0)


def test_prune_single_edit_equals_restrained_memit(tiny_llama):
    from editlens.edit import edit
    from editlens.lm.arch import weight_view

    kw = dict(mom2_update_weight=1e-4, clamp_norm_factor=10.0)
    before = _weights(tiny_llama)
    m = edit(tiny_llama, _cases(), "memit", **kw)
    memit_w = {l: weight_view(tiny_llama.module(tiny_llama.arch.mlp_out_at(l))).detach().double().clone()
               for l in m.diagnostics["layers"]}
    m.undo()
    p = edit(tiny_llama, _cases(), "prune", alpha=10.0, **kw)
    for l in p.diagnostics["layers"]:
        mod = tiny_llama.module(tiny_llama.arch.mlp_out_at(l))
        W0 = weight_view(mod).detach().double() * 0 + before[tiny_llama.arch.mlp_out_at(l) + ".weight"].double()
        D = memit_w[l] - W0
        expect, info = prune_restrain(W0, D, 10.0)
        assert info["n_restrained"] > 0 and p.diagnostics[f"prune/n_restrained/{l}"] == info["n_restrained"]
        got = weight_view(mod).detach().double() - W0
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
        sv = torch.linalg.svdvals(got)
        assert sv[0].item() == pytest.approx(info["top_sv_after"], rel=1e-4)
        assert sv[0].item() < torch.linalg.svdvals(D)[0].item()
    p.undo()
    _assert_bit_identical(tiny_llama, before)


def test_prune_sequential_restrains_the_accumulated_update(tiny_llama):
    from editlens.edit import edit_sequential
    from editlens.lm.arch import weight_view

    before = _weights(tiny_llama)
    seen = []
    e = edit_sequential(tiny_llama, _cases(), "prune", batch_size=1, alpha=10.0, mom2_update_weight=1e-4,
                        clamp_norm_factor=10.0, callback=lambda s, n, ed: seen.append(dict(ed.diagnostics)))
    assert len(seen) == 2
    for l in e.diagnostics["layers"]:
        name = tiny_llama.arch.mlp_out_at(l)
        W0 = before[name + ".weight"].double()
        total = weight_view(tiny_llama.module(name)).detach().double() - W0
        sigma_max = largest_singular_value(W0)
        sv = torch.linalg.svdvals(total)
        # the accumulated update's top singular value is F(σ̄) of the unrestrained accumulation, below it
        assert sv[0].item() == pytest.approx(e.diagnostics[f"prune/top_sv_after/{l}"], rel=1e-4)
        assert e.diagnostics[f"prune/top_sv_after/{l}"] <= e.diagnostics[f"prune/top_sv_before/{l}"]
        bound = sigma_max + math.log(e.diagnostics[f"prune/top_sv_before/{l}"] / sigma_max, 10.0)
        assert sv[0].item() <= bound * (1 + 1e-4)
        assert e.diagnostics[f"prune/sigma_max_W/{l}"] == pytest.approx(sigma_max)
    e.undo()
    _assert_bit_identical(tiny_llama, before)
