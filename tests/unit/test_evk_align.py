"""EVK-Align (editlens.edit.evk_align) on tiny random models: value, exact gradient, plumbing into editors."""
from __future__ import annotations

import pytest
import torch

import editlens
from editlens.data import synthetic_cases
from editlens.edit import edit, locate
from editlens.edit.evk_align import EvkAlign, from_config
from editlens.errors import HParamsError
from editlens.evaluate import evk
from editlens.lm import ops


def _ctx(lm, reqs, layer=1):
    return locate.ValueLossContext(lm=lm, layer=layer, module=lm.arch.mlp_out_at(layer), requests=reqs,
                                   delta=torch.zeros(len(reqs), lm.d_model, requires_grad=True),
                                   init=torch.zeros(len(reqs), lm.d_model), prefixes=[""])


def _direct_value_loss(al: EvkAlign, ctx) -> torch.Tensor:
    """The same loss written out plainly: one sample at a time, full autograd graph."""
    lm = ctx.lm
    terms = []
    for i, r in enumerate(ctx.requests):
        subj = evk.subject_range(r.prompt, r.template, r.subject)
        ids = ops.encode(lm.tokenizer, r.prompt)
        sp = evk.span_tokens(lm.tokenizer, r.prompt, 0, len(r.prompt), subj)
        last = ops.subject_last_token(lm.tokenizer, r.template, r.subject)
        for j in range(al.n_samples):
            eps_full = evk.sample_noise(al.seed, r.prompt, j, len(sp["full"]), lm.d_model)
            for span in al.spans:
                pos = sp[span]
                eps = eps_full[[sp["full"].index(t) for t in pos]]
                for s in al.sigmas:
                    x = torch.tensor([ids])
                    emb = lm.model.get_input_embeddings()(x)[0]
                    e2 = emb.clone()
                    e2[pos] = evk.perturb(emb[pos], eps, s)
                    with torch.no_grad():
                        ref = torch.log_softmax(lm.model(inputs_embeds=e2[None]).logits[0, -1].float(), -1)
                    with locate.add_to_output(lm.model, ctx.module, ctx.delta[i], rows=torch.tensor([0]),
                                              positions=torch.tensor([last])):
                        lp = torch.log_softmax(lm.model(inputs_embeds=e2[None]).logits[0, -1].float(), -1)
                    terms.append((ref.exp() * (ref - lp)).sum())
    return al.weight * torch.stack(terms).mean()


def test_value_loss_zero_at_start_and_matches_direct_value_and_gradient(tiny_llama):
    lm = tiny_llama
    reqs = locate.requests_from_cases(synthetic_cases(2, seed=3))
    al = EvkAlign(weight=2.0, sigmas=(0.3, 0.6), n_samples=2, spans=("relation", "full"))
    ctx = _ctx(lm, reqs)
    l0 = al(ctx)
    assert float(l0.detach()) == pytest.approx(0.0, abs=1e-7)
    l0.backward()
    assert float(ctx.delta.grad.abs().max()) < 1e-6  # KL is minimal (0) at δ = 0
    with torch.no_grad():
        ctx.delta.copy_(torch.randn(ctx.delta.shape, generator=torch.Generator().manual_seed(0)) * 30.0)
    ctx.delta.grad = None
    ctx.step = 1
    got = al(ctx)
    got.backward()
    g_got = ctx.delta.grad.clone()
    ctx.delta.grad = None
    want = _direct_value_loss(al, ctx)
    want.backward()
    assert float(got.detach()) > 0
    # batched/left-padded vs one-by-one forward passes: float32 rounding only
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=2e-3)
    g_want = ctx.delta.grad
    assert float((g_got - g_want).norm() / g_want.norm()) < 5e-3


def test_weight_loss_gradient_matches_autograd(tiny_llama):
    lm = tiny_llama
    cases = synthetic_cases(1, seed=1)
    al = EvkAlign(weight=1.0, sigmas=(0.3,), n_samples=2, max_neighbors=2)
    W = lm.module(lm.arch.mlp_out_at(1)).weight
    W.requires_grad_(True)
    try:
        l0 = al.extra_loss(lm, cases)            # reference computed here, on the original weights
        assert float(l0) == pytest.approx(0.0, abs=1e-7)
        with torch.no_grad():
            W.add_(0.05 * torch.randn(W.shape, generator=torch.Generator().manual_seed(0)))
        W.grad = None
        l1 = al.extra_loss(lm, cases)
        l1.backward()
        g1 = W.grad.clone()
        # a doubled weight doubles value and gradient
        al2 = EvkAlign(weight=2.0, sigmas=(0.3,), n_samples=2, max_neighbors=2)
        al2._ref, al2._ref_key = al._ref, al._ref_key
        W.grad = None
        l2 = al2.extra_loss(lm, cases)
        l2.backward()
        assert float(l1) > 0
        assert float(l2) == pytest.approx(2 * float(l1), rel=1e-5)
        assert torch.allclose(W.grad, 2 * g1, rtol=1e-4, atol=1e-9)
        # finite difference along the gradient (float32: loose)
        with torch.no_grad():
            step = 1e-2 * g1 / g1.norm()
            W.add_(step)
        up = float(al.extra_loss(lm, cases))
        with torch.no_grad():
            W.sub_(2 * step)
        down = float(al.extra_loss(lm, cases))
        fd = (up - down) / 2e-2
        assert fd == pytest.approx(float(g1.norm()), rel=0.1)
    finally:
        W.requires_grad_(False)
        W.grad = None


def test_memit_with_align_records_settings_and_weight_zero_changes_nothing(tiny_llama):
    lm = tiny_llama
    cases = synthetic_cases(2, seed=0)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    e0 = edit(lm, cases, "memit")
    d0 = {n: (p.detach() - before[n]).clone() for n, p in lm.model.named_parameters()}
    e0.undo()
    e1 = edit(lm, cases, "memit", evk_align=EvkAlign(weight=0.0, n_samples=1))
    d1 = {n: (p.detach() - before[n]).clone() for n, p in lm.model.named_parameters()}
    assert e1.diagnostics["evk_align"]["weight"] == 0.0
    e1.undo()
    for n in d0:
        assert torch.equal(d0[n], d1[n]), n
    al = EvkAlign(weight=5.0, n_samples=2)
    e2 = edit(lm, cases, "memit", evk_align=al)
    assert e2.diagnostics["evk_align"] == al.settings()
    assert "loss/extra" in e2.diagnostics
    e2.undo()
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n])


def test_align_reduces_relation_drift_on_the_value_objective(tiny_llama):
    """The optimised δ trades target NLL against the EVK term: with a large weight the final EVK loss is lower."""
    lm = tiny_llama
    reqs = locate.requests_from_cases(synthetic_cases(3, seed=2))
    probe = EvkAlign(weight=1.0, sigmas=(0.3,), n_samples=2, seed=9)

    def drift(delta):
        ctx = _ctx(lm, reqs, layer=2)
        with torch.no_grad():
            ctx.delta.copy_(delta)
        ctx.step = 0
        probe(ctx)  # reference
        ctx.step = 1
        return float(probe(ctx))

    kw = dict(prefixes=[""], steps=15, lr=0.5, kl_factor=0.0, weight_decay=0.0, clamp_norm_factor=4.0,
              early_stop_loss=0.0)
    plain = locate.compute_values(lm, reqs, 2, **kw)
    aligned = locate.compute_values(lm, reqs, 2, extra_loss=EvkAlign(weight=50.0, sigmas=(0.3,), n_samples=2), **kw)
    assert drift(aligned.delta) < drift(plain.delta)


def test_ft_uses_the_weight_space_loss(tiny_llama):
    lm = tiny_llama
    cases = synthetic_cases(1, seed=4)
    al = EvkAlign(weight=1.0, n_samples=1, sigmas=(0.3,))
    e = edit(lm, cases, "ft", steps=2, evk_align=al)
    assert e.diagnostics["evk_align"]["sigmas"] == [0.3]
    assert al._ref is not None and len(al._ref[0]) > 0
    e.undo()


def test_config_validation():
    al = from_config({"weight": 3, "sigmas": [0.1, 0.2], "spans": "full"})
    assert al.weight == 3.0 and al.sigmas == (0.1, 0.2) and al.spans == ("full",)
    with pytest.raises(HParamsError, match="wieght"):
        from_config({"wieght": 1})
    with pytest.raises(HParamsError, match="sigmas"):
        EvkAlign(sigmas=(0.0,))
    with pytest.raises(HParamsError, match="spans"):
        EvkAlign(spans=("object",))
    with pytest.raises(HParamsError, match="weight"):
        EvkAlign(weight=-1)
    with pytest.raises(HParamsError, match="n_samples"):
        EvkAlign(n_samples=0)
