"""KN (knowledge neurons) on tiny random models: integrated gradients against an independent 2000-step reference
loop (one forward/backward per step, its own hook), completeness (attributions sum to P(w̄) − P(0)), the refining
rule on hand-made attributions, the update rule on the value slots, the method contract and bit-exact undo."""
from __future__ import annotations

import pytest
import torch

import editlens
from editlens.edit import edit
from editlens.edit.kn import KNHParams, integrated_gradients, locate_neurons, refine
from editlens.errors import HParamsError
from editlens.lm import ops
from editlens.testing import check_method, edit_cases

PROMPT = "Alice Smith lives in the city of"
LAYER = 1
M_REF = 1000


@pytest.fixture(scope="module")
def lm():
    return editlens.load_model("tiny-llama")


def _answer(lm) -> int:
    enc = ops.pad_left([ops.encode(lm.tokenizer, PROMPT)], ops._pad_id(lm), lm.device)
    with torch.no_grad():
        return int(lm.model(**enc).logits[0, -1].argmax())


def _prob_with(lm, t: int, replace):
    """P(t | PROMPT) with the input of layer LAYER's down_proj at the last token replaced by ``replace(x)``."""
    seen = {}

    def hook(mod, args):
        x = args[0].clone()
        seen["w"] = args[0][0, -1].detach().clone()
        x[0, -1] = replace(args[0][0, -1])
        return (x,)

    h = lm.model.model.layers[LAYER].mlp.down_proj.register_forward_pre_hook(hook)
    try:
        ids = torch.tensor([ops.encode(lm.tokenizer, PROMPT)])
        p = torch.softmax(lm.model(input_ids=ids).logits[0, -1].float(), -1)[t]
    finally:
        h.remove()
    return p, seen["w"]


@pytest.fixture(scope="module")
def reference(lm):
    """A plain loop: the right Riemann sum of w̄ ∫ ∂P(αw̄)/∂w dα with 1000 steps, one forward/backward each."""
    t = _answer(lm)
    with torch.no_grad():
        f1, wbar = _prob_with(lm, t, lambda x: x)
        f0, _ = _prob_with(lm, t, lambda x: torch.zeros_like(x))
    total = torch.zeros_like(wbar)
    for k in range(1, M_REF + 1):
        z = (k / M_REF * wbar).clone().requires_grad_(True)
        p, _ = _prob_with(lm, t, lambda x: z)
        (g,) = torch.autograd.grad(p, z)
        total += g
    return {"t": t, "attr": wbar * total / M_REF, "f1": float(f1), "f0": float(f0)}


def test_integrated_gradients_match_a_fine_reference_loop(lm, reference):
    ref = reference["attr"]
    scale = float(ref.abs().max())
    assert scale > 0
    fine, _ = integrated_gradients(lm, [PROMPT], [reference["t"]], LAYER, M_REF, batch_rows=M_REF)
    assert float((fine - ref).abs().max()) <= 1e-3 * scale  # same quadrature, batched: float error only
    coarse, _ = integrated_gradients(lm, [PROMPT], [reference["t"]], LAYER, 20)  # the paper's m = 20
    err20 = float((coarse - ref).abs().max())
    assert err20 <= 0.02 * scale, err20 / scale
    # the batch of several prompts gives each prompt its own attribution (rows do not mix)
    two, _ = integrated_gradients(lm, [PROMPT, "Bob Jones is a resident of"], [reference["t"]] * 2, LAYER, 20)
    assert torch.allclose(two[0], coarse, rtol=1e-4, atol=1e-6 * scale)


def test_completeness_sum_is_the_probability_change(lm, reference):
    df = reference["f1"] - reference["f0"]
    assert abs(df) > 1e-3 * reference["f1"]  # zeroing the layer really changes P: the check is not vacuous
    s = float(reference["attr"].sum())
    assert abs(s - df) <= 2e-3 * abs(df), (s, df)
    coarse, _ = integrated_gradients(lm, [PROMPT], [reference["t"]], LAYER, 20)
    assert abs(float(coarse.sum()) - df) <= 0.05 * abs(df)  # right Riemann sum, m = 20: discretisation error


def test_refine_hand_values():
    # 4 prompts x 6 neurons; threshold 0.2 of each row's max
    attrs = torch.tensor([[10.0, 3.0, 1.0, 0.0, 2.5, -5.0],
                          [8.0, 0.5, 4.0, 0.0, 3.0, 0.0],
                          [9.0, 2.0, 0.1, 0.0, 0.1, 0.0],
                          [1.0, 0.0, 0.0, 5.0, 0.5, 0.0]])
    # kept: row0 {0,1,4}, row1 {0,2,4}, row2 {0,1}, row3 {3}; shares: n0 .75, n1 .5, n2 .25, n3 .25, n4 .5
    assert refine(attrs, 0.2, 0.7, 1, 5) == ([0], 0.7)
    # p moves down by 0.05 until 2..5 neurons: at 0.5 neurons 0, 1, 4
    sel, p = refine(attrs, 0.2, 0.7, 2, 5)
    assert sel == [0, 1, 4] and p == pytest.approx(0.5)
    # too many at 0.25 (five) for max 2 -> p moves up to 0.3: neurons 0, 1, 4 still 3 > 2 ... up to 0.55: [0]
    # jumps from 3 to 1 across the window [2, 2] -> fallback: the 2 shared by most prompts, ties by mean attribution
    sel, p = refine(attrs, 0.2, 0.25, 2, 2)
    assert p == -1.0 and sel == [0, 4]  # shares .75 (n0), then n1 .5 (mean 1.375) vs n4 .5 (mean 1.525)


def test_update_rule_on_value_slots(lm):
    case = edit_cases(1)[0]
    hp = KNHParams.for_model(lm).replace(layers=[1, 2])
    before = {l: lm.model.model.layers[l].mlp.down_proj.weight.detach().clone() for l in (1, 2)}
    from editlens.edit.locate import context_prefixes

    found = locate_neurons(lm, case, hp, context_prefixes(lm, hp.n_prompts, hp.prefix_length, seed=hp.seed))
    assert 1 <= len(found["neurons"]) <= hp.max_neurons
    e = edit(lm, [case], "kn", layers=[1, 2])
    try:
        emb = lm.model.get_output_embeddings().weight.detach()
        first = lambda s: ops.target_token_ids(lm.tokenizer, case.rewrite.text, s)[1][0]  # noqa: E731
        want_dir = 8.0 * emb[first(case.rewrite.target_new)] - 1.0 * emb[first(case.rewrite.target_true)]
        chosen = set(found["neurons"])
        for l in (1, 2):
            d = lm.model.model.layers[l].mlp.down_proj.weight.detach() - before[l]
            for i in range(d.shape[1]):
                if (l, i) in chosen:
                    assert torch.allclose(d[:, i], want_dir, atol=1e-5), (l, i)
                else:
                    assert torch.equal(d[:, i], torch.zeros_like(d[:, i])), (l, i)
        assert e.diagnostics["kn/n_neurons"] == len(chosen)
    finally:
        e.undo()
    for l in (1, 2):
        assert torch.equal(lm.model.model.layers[l].mlp.down_proj.weight, before[l])


def test_contract():
    assert check_method("kn")["evk_align"] == "refused"


@pytest.mark.parametrize("key,value", [("steps", 0), ("threshold", 0.0), ("threshold", 1.0), ("share", 0.0),
                                       ("share", 1.5), ("min_neurons", 0), ("prompts", "templates"),
                                       ("layers", [99]), ("layers", [1, 1]), ("n_prompts", -1),
                                       ("update_scale", float("nan")), ("batch_rows", 5)])
def test_bad_hyperparameters_name_the_field(lm, key, value):
    with pytest.raises(HParamsError, match=repr(key)):
        edit(lm, edit_cases(1), "kn", **{key: value})


def test_min_above_max_is_refused(lm):
    with pytest.raises(HParamsError, match="'min_neurons'"):
        edit(lm, edit_cases(1), "kn", min_neurons=6, max_neurons=5)
