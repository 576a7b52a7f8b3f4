"""MELO on tiny random models: the vector database's rules by hand; routing against hand-built keys (inside the
radius the block is active and the output equals the model with that block's ΔW = (α/r)·B·A merged by hand,
outside it the output is bit-identical to the base model); per-block isolation; bit-exact undo (state_dict, module
types, requires_grad flags, hooks, no peft_config), batch and sequential; bad hyperparameters named.
The method contract runs in tests/unit/test_contracts.py (every registered method)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from editlens.edit import edit, edit_sequential
from editlens.edit.melo import MeloSystem, VectorDB, block_name
from editlens.errors import HParamsError, MethodError
from editlens.lm import ops
from editlens.lm.arch import is_conv1d
from editlens.system import ModelSystem
from editlens.testing import edit_cases

FAST = dict(steps=4)
OTHER = ["The weather today is", "My favourite food is"]


def _structure(lm):
    hooks = sum(len(getattr(m, a, {}) or {}) for m in lm.model.modules()
                for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs"))
    return ([(n, type(m), id(m)) for n, m in lm.model.named_modules()],
            [(n, p.requires_grad) for n, p in lm.model.named_parameters()], sorted(lm.model.__dict__), hooks)


def _state(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _assert_exact(lm, state, structure, fp):
    now = lm.model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k].view(torch.uint8), v.view(torch.uint8)) for k, v in state.items())
    assert _structure(lm) == structure
    assert not hasattr(lm.model, "peft_config")
    assert lm.fingerprint == fp


def _key(lm, module, prompt):
    return ops.capture(lm, [prompt], [module], [-1], kind="input")[module][0]


@contextlib.contextmanager
def _merged(lm, system: MeloSystem, block: int, scale: float):
    """The block's ΔW = scale·B·A (computed here by hand from the block's A, B, not by peft) added to the weights;
    restored bit for bit on exit."""
    saved = {}
    with torch.no_grad():
        for path, (A, B) in system.adaptor.block_state(block_name(block)).items():
            w = lm.module(path).weight
            saved[path] = w.detach().clone()
            d = scale * (B.double() @ A.double())  # [out, in]
            w.add_((d.T if is_conv1d(lm.module(path)) else d).to(w.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for path, w0 in saved.items():
                lm.module(path).weight.copy_(w0)


# ----------------------------------------------------------------------------------------------- vector database
def test_vector_db_rules_by_hand():
    db = VectorDB(2)
    assert db.lookup(torch.zeros(1, 2)).tolist() == [-1]
    assert db.insert(torch.tensor([0.0, 0.0]), "A", 0, 1.0) == "new"
    assert db.lookup(torch.tensor([[0.5, 0.0], [1.2, 0.0]])).tolist() == [0, -1]  # radius 1
    # d = 1.5 <= 1 + 1, same label: joins; centre = mean of the points, radius = max(init 1, spread 0.75)
    assert db.insert(torch.tensor([1.5, 0.0]), "A", 1, 1.0) == "join"
    assert db.centres[0].tolist() == [0.75, 0.0] and float(db.radii[0]) == pytest.approx(1.0)
    # inside the cluster, the block of the nearest point serves the query
    assert db.lookup(torch.tensor([[1.4, 0.0], [0.1, 0.0], [1.8, 0.0]])).tolist() == [1, 0, -1]
    # far away (d = 9.25 > 2): a new cluster
    assert db.insert(torch.tensor([10.0, 0.0]), "B", 2, 1.0) == "new" and len(db) == 2
    # d = 1.2 <= 2, different label: split; the old radius 0.6 - 1e-5, the new 0.6 + 1e-5; both old points lie
    # 0.75 from the centre, outside 0.6: forgotten, the cluster keeps its centre with no block
    assert db.insert(torch.tensor([0.75, 1.2]), "C", 3, 1.0) == "split"
    assert float(db.radii[0]) == pytest.approx(0.6 - 1e-5) and float(db.radii[2]) == pytest.approx(0.6 + 1e-5)
    assert db.counts == {"new": 2, "join": 1, "split": 1, "forgotten": 2}
    assert db.lookup(torch.tensor([[0.75, 0.1], [0.75, 1.1], [10.0, 0.5]])).tolist() == [-1, 3, 2]


def test_vector_db_split_keeps_points_inside():
    db = VectorDB(2)
    db.insert(torch.tensor([0.0, 0.0]), "A", 0, 1.0)
    db.insert(torch.tensor([0.4, 0.0]), "A", 1, 1.0)  # centre (0.2, 0)
    assert db.insert(torch.tensor([0.2, 0.9]), "D", 2, 1.0) == "split"  # radius 0.45: both points (0.2 away) kept
    assert db.counts["forgotten"] == 0 and db.points[0][1].tolist() == [0, 1]
    assert db.lookup(torch.tensor([[0.05, 0.0], [0.35, 0.0], [0.2, 0.85]])).tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------------------------- routing
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_routing_against_hand_built_keys(model, request):
    lm = request.getfixturevalue(model)
    state, structure, fp = _state(lm), _structure(lm), lm.fingerprint
    base = ModelSystem(lm)
    case = edit_cases(1)[0]
    prompt = case.rewrite.text
    prompts = [prompt] + OTHER
    base_out = base.next_token_logprobs(prompts)
    e = edit(lm, [case], "melo", **FAST)
    s = e.system
    assert isinstance(s, MeloSystem) and s.adaptor.n_blocks == 1 and _structure(lm) == structure
    with _merged(lm, s, 0, e.hparams.alpha / e.hparams.rank):
        ref = ModelSystem(lm).next_token_logprobs(prompts)
        ref_tf = ModelSystem(lm).teacher_forced([prompt], [case.rewrite.target_new])[0]
        ref_gen = ModelSystem(lm).generate([prompt], 4)
    assert not torch.equal(ref[0], base_out[0])  # the block really changes the edit prompt

    # the database as trained: the edit prompt is served by block 0 (= the merged model), the others by the base
    out = s.next_token_logprobs(prompts)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[1:], base_out[1:])
    tf = s.teacher_forced([prompt], [case.rewrite.target_new])[0]
    torch.testing.assert_close(tf.logprobs, ref_tf.logprobs, atol=1e-5, rtol=1e-5)
    assert s.generate([prompt], 4) == ref_gen  # the block stays on for the generated tokens

    # hand-built keys: a cluster centred 0.9 r from the prompt's key routes it, one 1.1 r away does not
    ad = s.adaptor
    k = _key(lm, ad.module, prompt)
    u = torch.randn(k.shape, generator=torch.Generator().manual_seed(0))
    u = u / u.norm()
    r = 0.5
    for frac, routed in ((0.9, True), (1.1, False)):
        ad.db.clear()
        ad.db.insert(k + frac * r * u, "x", 0, r)
        s.refresh()
        one = s.next_token_logprobs([prompt])
        assert ad.last_blocks.tolist() == ([0] if routed else [-1])
        if routed:
            torch.testing.assert_close(one[0], ref[0], atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(one[0], base_out[0])
    # between calls the model holds no peft layer or hook
    assert _structure(lm) == structure
    e.undo()
    _assert_exact(lm, state, structure, fp)
    assert ad.n_blocks == 0 and len(ad.db) == 0
    assert torch.equal(s.next_token_logprobs(prompts), base_out)


# ----------------------------------------------------------------------------------------------- blocks
def test_sequential_blocks_are_isolated_and_each_edit_routes_to_its_own(tiny_llama):
    lm = tiny_llama
    state, structure, fp = _state(lm), _structure(lm), lm.fingerprint
    cases = edit_cases(3)
    seen: list[dict] = []

    def cb(step, n, run):
        ad = run.system.adaptor
        seen.append({i: ad.block_state(block_name(i)) for i in range(ad.n_blocks)})

    run = edit_sequential(lm, cases, "melo", batch_size=1, callback=cb, **FAST)
    ad = run.system.adaptor
    assert ad.n_blocks == 3 and len(seen) == 3
    for later in range(1, 3):  # training block `later` leaves every earlier block exactly as it was
        for i in range(later):
            for path, (A, B) in seen[i][i].items():
                A2, B2 = seen[later][i][path]
                assert torch.equal(A, A2) and torch.equal(B, B2)
    for i in range(3):  # each block was trained (B starts at 0) and is distinct
        assert all(bool(B.abs().sum() > 0) for _, B in seen[2][i].values())
    for i, c in enumerate(cases):
        run.system.next_token_logprobs([c.rewrite.text])
        assert ad.last_blocks.tolist() == [i]
    run.system.next_token_logprobs(OTHER[:1])
    assert ad.last_blocks.tolist() == [-1]
    assert run.diagnostics["melo/blocks"] == 3 and run.diagnostics["melo/clusters"] == 3
    run.undo()
    _assert_exact(lm, state, structure, fp)


def test_batch_edit_one_block_and_undo_exact(tiny_llama):
    lm = tiny_llama
    state, structure, fp = _state(lm), _structure(lm), lm.fingerprint
    base = ModelSystem(lm)
    cases = edit_cases(3)
    prompts = [c.rewrite.text for c in cases] + OTHER
    before = base.next_token_logprobs(prompts)
    e = edit(lm, cases[:2], "melo", **FAST)
    ad = e.system.adaptor
    assert ad.n_blocks == 1 and len(ad.db) == 2
    out = e.system.next_token_logprobs(prompts)
    assert not torch.equal(out[0], before[0]) and not torch.equal(out[1], before[1])
    assert torch.equal(out[2:], before[2:])  # the third case was not edited: its key is outside every radius
    e.undo()
    _assert_exact(lm, state, structure, fp)
    e.undo()  # a second undo does nothing


def test_training_failure_leaves_nothing(tiny_llama, monkeypatch):
    import editlens.edit.ft as ft

    lm = tiny_llama
    state, structure, fp = _state(lm), _structure(lm), lm.fingerprint
    real = ft._batch_loss
    calls = []

    def failing(*a, **k):  # the loss turns NaN from the 4th forward on (in the second step of the run below)
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) > 3 else loss

    monkeypatch.setattr(ft, "_batch_loss", failing)
    with pytest.raises(MethodError, match="melo: the training loss became nan"):
        edit_sequential(lm, edit_cases(2), "melo", batch_size=1, steps=3, stop_loss=0.0)
    _assert_exact(lm, state, structure, fp)
    calls.clear()
    with pytest.raises(MethodError, match="melo: the training loss became nan"):
        edit(lm, edit_cases(1), "melo", steps=5, stop_loss=0.0)
    _assert_exact(lm, state, structure, fp)


# ----------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("over, field", [
    (dict(key_layer=2, layers=[1, 2, 3]), "key_layer"),
    (dict(key_layer=1, layers=[1, 2, 3], modules=["mlp_in"]), "key_layer"),
    (dict(layers=[2, 9]), "layers"),
    (dict(rank=0), "rank"),
    (dict(radius=0.0), "radius"),
    (dict(modules=["mlp_out", "mlp_out"]), "modules"),
])
def test_bad_hparams_named_before_any_work(tiny_llama, over, field):
    structure, fp = _structure(tiny_llama), tiny_llama.fingerprint
    with pytest.raises(HParamsError, match=field):
        edit(tiny_llama, edit_cases(1), "melo", **over)
    assert _structure(tiny_llama) == structure and tiny_llama.fingerprint == fp


def test_same_layer_mlp_out_allowed_and_max_blocks(tiny_llama):
    lm = tiny_llama
    state, structure, fp = _state(lm), _structure(lm), lm.fingerprint
    e = edit(lm, edit_cases(1), "melo", key_layer=1, layers=[1], steps=1)
    e.undo()
    with pytest.raises(MethodError, match="max_blocks=1"):
        edit_sequential(lm, edit_cases(2), "melo", batch_size=1, max_blocks=1, steps=1)
    _assert_exact(lm, state, structure, fp)


def test_chat_format_keys_and_training_in_the_chat_prompt():
    from editlens.lm.prompting import PromptFormat
    from tests.unit.test_prompt_format import chat_tiny

    lm = chat_tiny()
    case = edit_cases(1)[0]
    e = edit(lm, [case], "melo", prompt_format="chat", steps=2)
    try:
        s = e.system
        assert s.prompt_format == "chat"
        chat = PromptFormat.parse("chat", lm.tokenizer).apply(case.rewrite.text)
        assert torch.equal(s.adaptor.db.points[0][0][0], _key(lm, s.adaptor.module, chat))  # the key of the chat prompt
        s.next_token_logprobs([case.rewrite.text])  # posed in the chat format: routed
        assert s.adaptor.last_blocks.tolist() == [0]
    finally:
        e.undo()
