"""LoRA editing (peft) on tiny random models: the method contract, bit-exact undo with no peft wrapper left behind
(state_dict and module types), the edit really moves the edit prompt, the merged update is low rank (rank ≤ r,
also after a sequential run: the same adapters keep training), bad hyperparameters name their field."""
from __future__ import annotations

import pytest
import torch

import editlens
from editlens.edit import edit, edit_sequential
from editlens.edit.lora import LoRAHParams, default_layers, lora_kl
from editlens.errors import HParamsError, MethodError
from editlens.system import ModelSystem
from editlens.testing import check_method, edit_cases


def _state(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _structure(lm):
    """Module names and exact types, parameter names and requires_grad flags, and the model's own attributes."""
    return ([(n, type(m)) for n, m in lm.model.named_modules()],
            [(n, p.requires_grad) for n, p in lm.model.named_parameters()],
            sorted(lm.model.__dict__))


def _assert_restored(lm, state, structure, fp):
    now = lm.model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k].view(torch.uint8) if v.is_floating_point() else now[k],
                                                       v.view(torch.uint8) if v.is_floating_point() else v), k
    assert _structure(lm) == structure
    assert not hasattr(lm.model, "peft_config")
    assert lm.fingerprint == fp


def _target_logprob(lm, case):
    from editlens.lm import ops

    p, t = ops.target_token_ids(lm.tokenizer, case.rewrite.text, case.rewrite.target_new)
    return float(ModelSystem(lm).next_token_logprobs([case.rewrite.text])[0, t[0]])


def test_contract():
    rep = check_method("lora")
    assert rep["evk_align"] == "refused"


def test_default_layers():
    assert default_layers(30) == [10, 14, 18, 22]
    assert default_layers(4) == [1, 2, 3]
    assert default_layers(1) == [0]


@pytest.mark.parametrize("n", [1, 3])
def test_edit_changes_prompt_low_rank_and_undo_is_exact(tiny_llama, n):
    lm = tiny_llama
    cases = edit_cases(n)
    state, structure, fp = _state(lm), _structure(lm), lm.fingerprint
    before = [_target_logprob(lm, c) for c in cases]
    e = edit(lm, cases, "lora", rank=2, layers=[1, 2])
    try:
        # the module objects are the plain ones again while the edit is applied
        assert _structure(lm) == structure
        after = [_target_logprob(lm, c) for c in cases]
        assert all(a > b + 0.5 for a, b in zip(after, before)), (before, after)
        changed = [k for k, v in lm.model.state_dict().items() if not torch.equal(v, state[k])]
        assert sorted(changed) == ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
        for k in changed:
            d = (lm.model.state_dict()[k].double() - state[k].double())
            assert int(torch.linalg.matrix_rank(d, rtol=1e-4)) <= 2  # ΔW = (α/r) B A has rank ≤ r
        assert e.diagnostics["loss/final"] < e.diagnostics["loss/first"]
    finally:
        e.undo()
    _assert_restored(lm, state, structure, fp)


def test_sequential_keeps_training_the_same_adapters(tiny_llama):
    lm = tiny_llama
    cases = edit_cases(3)
    state, structure, fp = _state(lm), _structure(lm), lm.fingerprint
    ranks = []
    _target_logprob_base = _target_logprob(lm, cases[-1])

    def cb(step, n, run):
        d = lm.model.state_dict()["model.layers.2.mlp.down_proj.weight"].double() - \
            state["model.layers.2.mlp.down_proj.weight"].double()
        ranks.append(int(torch.linalg.matrix_rank(d, rtol=1e-4)))

    run = edit_sequential(lm, cases, "lora", rank=2, layers=[2], callback=cb)
    try:
        # one pair (A, B) trained further at each step: the accumulated change stays of rank ≤ r = 2 (fresh adapters
        # per step would reach 2 per step, 6 after three)
        assert len(ranks) == 3 and max(ranks) <= 2 and min(ranks) >= 1, ranks
        assert _target_logprob(lm, cases[-1]) > _target_logprob_base + 0.5
        assert _structure(lm) == structure
    finally:
        run.undo()
    _assert_restored(lm, state, structure, fp)


def test_conv1d_model_edits_and_undoes(tiny_gpt2):
    lm = tiny_gpt2
    state, structure, fp = _state(lm), _structure(lm), lm.fingerprint
    c = edit_cases(1)[0]
    b = _target_logprob(lm, c)
    e = edit(lm, [c], "lora")
    assert _target_logprob(lm, c) > b + 0.5
    e.undo()
    _assert_restored(lm, state, structure, fp)


def test_locality_term_reduces_drift_on_unrelated_prompts(tiny_llama):
    from editlens.edit.wise import irrelevant_prompts

    lm = tiny_llama
    prompts = irrelevant_prompts(8)
    base = ModelSystem(lm).next_token_logprobs(prompts).float()
    kls = {}
    for w in (0.0, 50.0):
        e = edit(lm, edit_cases(2), "lora", locality_weight=w, n_locality=8)
        try:
            kls[w] = float(lora_kl(base, e.system.next_token_logprobs(prompts).float()))
            if w:
                assert "loss/locality_kl" in e.diagnostics
        finally:
            e.undo()
    assert kls[50.0] < 0.5 * kls[0.0], kls


def test_lora_kl_hand_value():
    p = torch.tensor([[0.5, 0.5]])
    q_logits = torch.log(torch.tensor([[0.25, 0.75]]))
    want = 0.5 * torch.log(torch.tensor(0.5 / 0.25)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))
    assert torch.allclose(lora_kl(p.log(), q_logits), want)


@pytest.mark.parametrize("key,value", [("rank", 0), ("steps", 0), ("batch_size", 0), ("lr", 0.0), ("lr", -1.0),
                                       ("alpha", 0.0), ("dropout", 1.0), ("dropout", -0.1), ("modules", ["qkv"]),
                                       ("modules", []), ("layers", []), ("layers", [1, 1]), ("layers", [99]),
                                       ("locality_weight", -1.0), ("n_locality", -1), ("weight_decay", -0.1)])
def test_bad_hyperparameters_name_the_field(tiny_llama, key, value):
    lm = tiny_llama
    state = _state(lm)
    with pytest.raises(HParamsError, match=repr(key)):
        edit(lm, edit_cases(1), "lora", **{key: value})
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())


def test_locality_needs_prompts_and_gate_needs_gated_mlp(tiny_llama, tiny_gpt2):
    with pytest.raises(HParamsError, match="'n_locality'"):
        LoRAHParams(locality_weight=1.0, n_locality=0).validate()
    with pytest.raises(HParamsError, match="'modules'.*gated"):
        edit(tiny_gpt2, edit_cases(1), "lora", modules=["mlp_gate"])


def test_model_with_peft_adapters_is_refused(tiny_llama):
    from peft import LoraConfig, inject_adapter_in_model

    lm = tiny_llama
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["model.layers.0.mlp.up_proj"]), lm.model)
    with pytest.raises(MethodError, match="already holds peft adapter layers"):
        edit(lm, edit_cases(1), "lora")
