"""WISE: router (activation scores, margin loss, threshold), TIES merge, side memory on tiny models, undo."""
from __future__ import annotations

import pytest
import torch

from editlens.data.schema import Rewrite, make_case
from editlens.edit import edit, edit_sequential
from editlens.edit.wise import (SideMemory, WiseAdaptor, WiseSystem, activation_scores, calibrate_threshold,
                                routing_loss, ties_merge)
from editlens.evaluate.system import ModelSystem


def test_activation_scores_by_hand():
    acts = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])  # one row, three tokens
    delta = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    # per token ||A_t Δᵀ||: 3, 8, sqrt(15² + 20²) = 25
    assert activation_scores(acts, delta).tolist() == pytest.approx([12.0])
    mask = torch.tensor([[True, True, False]])
    assert activation_scores(acts, delta, mask).tolist() == pytest.approx([5.5])


def test_routing_loss_margins():
    e, i = torch.tensor([30.0]), torch.tensor([1.0])
    assert float(routing_loss(e, i, 5.0, 20.0, 10.0)) == 0.0
    # irrelevant above alpha (+2), edit below beta (+5), gap below gamma (15 - 7 = +8)
    assert float(routing_loss(torch.tensor([15.0]), torch.tensor([7.0]), 5.0, 20.0, 10.0)) == pytest.approx(2 + 5 + 2)


def test_ties_merge_by_hand():
    a = torch.tensor([1.0, -2.0, 3.0, 0.0])
    b = torch.tensor([3.0, 1.0, -1.0, 0.0])
    # elected signs: +, -, +, 0; means of agreeing entries: 2, -2, 3, 0
    assert ties_merge([a, b]).tolist() == [2.0, -2.0, 3.0, 0.0]
    # density 0.5 keeps the two largest magnitudes per vector: a -> [0,-2,3,0], b -> [3,1,0,0]
    assert ties_merge([a, b], density=0.5).tolist() == [3.0, -2.0, 3.0, 0.0]
    assert ties_merge([a]).tolist() == a.tolist()


def test_calibrate_threshold():
    assert calibrate_threshold([10.0, 12.0], [2.0, 4.0]) == (7.0, True)
    assert calibrate_threshold([10.0], []) == (5.0, True)
    # not separated: the threshold stays in the gap just below the smallest edit score, so that edit is still
    # routed (it used to be the smallest edit score itself, which the strict `score > eps` dropped)
    assert calibrate_threshold([3.0, 12.0], [2.0, 4.0]) == (2.5, False)
    assert calibrate_threshold([3.0, 12.0], [5.0, 3.0]) == (1.5, False)


def test_not_separated_threshold_keeps_every_edit_routed():
    """The router of a memory whose calibration is not separated still sends each of its edits to it."""
    edit_scores, negatives = [3.0, 12.0], [2.0, 4.0, 13.0]
    eps, separated = calibrate_threshold(edit_scores, negatives)
    assert not separated
    ad = WiseAdaptor("m")
    ad.memories = [SideMemory(torch.tensor([[1.0]]), eps=eps)]
    inp = torch.tensor(edit_scores + negatives).view(-1, 1, 1)  # score of a row = its one activation
    route, _ = ad.route(inp, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    assert route.tolist() == [0, 0, -1, 0, 0]


def test_nearest_contrasts_by_hand():
    from editlens.edit.wise import nearest_contrasts

    # the candidates' mean is (1, 1); centred: edit (1, 0); candidates (1, 0), (1, 1), (-1, 0), (0, -1),
    # (2, 0), (-1, 1), (-2, -1) -> cosines with the edit 1, 0.707, -1, 0, 1, -0.707, -0.894
    edit_vec = torch.tensor([2.0, 1.0])
    cands = torch.tensor([[2.0, 1.0], [2.0, 2.0], [0.0, 1.0], [1.0, 0.0], [3.0, 1.0], [0.0, 2.0], [-1.0, 0.0]])
    # ranks: 0, 4 (tie: earlier first), 1, 3, 5, 6, 2; four nearest, calibration at rank int(0.5 * 4) = 2
    assert nearest_contrasts(edit_vec, cands, 3, 1) == ([0, 4, 3], [1])
    assert nearest_contrasts(edit_vec, cands, 2, 2) == ([0, 1], [4, 3])  # calibration ranks 1 and 3
    # too few (7 of 9): training keeps its 6, calibration gets the one left, at rank int(0.5 * 7) = 3
    assert nearest_contrasts(edit_vec, cands, 6, 3) == ([0, 4, 1, 5, 6, 2], [3])
    assert nearest_contrasts(edit_vec, cands[:0], 2, 1) == ([], [])
    # a shift shared by every prompt (the template's own activation) does not change the ranking
    assert nearest_contrasts(edit_vec + 100, cands + 100, 3, 1) == ([0, 4, 3], [1])


def _cases():
    return [make_case("0", Rewrite("{} lives in the city of", "Alice Smith", "Paris", "Rome")),
            make_case("1", Rewrite("{} plays the", "Bob Jones", "violin", "piano"))]


def test_wise_edit_routes_and_undoes(tiny_llama):
    base = ModelSystem(tiny_llama)
    p_edit, p_other = "Alice Smith lives in the city of", "The weather today is"
    before = [base.next_token_logprobs([p]) for p in (p_edit, p_other)]
    e = edit(tiny_llama, _cases(), "wise")
    s = e.system
    assert isinstance(s, WiseSystem) and len(s.adaptor.memories) == 1
    d = e.diagnostics
    assert d["router_separated"] and d["score_edit_min"] > d["threshold"] > d["score_irrelevant_max"]
    s.next_token_logprobs([p_edit])
    assert s.adaptor.last_route.tolist() == [0]
    lo = s.next_token_logprobs([p_other])
    if s.adaptor.last_route.tolist() == [-1]:
        assert torch.equal(lo, before[1])  # main memory: bit-identical
    # the side memory changed the edited prompt's distribution toward the target
    tf = s.teacher_forced([p_edit], ["Paris"])[0]
    tf_base = base.teacher_forced([p_edit], ["Paris"])[0]
    assert tf.total_logprob > tf_base.total_logprob
    e.undo()
    assert not s.adaptor.memories
    assert torch.equal(s.next_token_logprobs([p_edit]), before[0])
    assert not tiny_llama.model._forward_hooks


def test_sequential_new_memory_after_capacity(tiny_llama):
    run = edit_sequential(tiny_llama, _cases(), "wise", batch_size=1, edits_per_memory=1, n_iter=3)
    assert len(run.system.adaptor.memories) == 2
    run.undo()
    assert not run.system.adaptor.memories


class _Recorder:
    """An adaptor that records which phase each forward pass of its module was given."""

    module = ""

    def __init__(self, module: str):
        self.module = module
        self.calls: list[tuple[str, int]] = []

    def on_full(self, inp, out, start_cols, key_cols):
        self.calls.append(("full", int(inp.shape[1])))
        return out, "state"

    def on_step(self, inp, out, state):
        assert state == "state"
        self.calls.append(("step", int(inp.shape[1])))
        return out


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_generation_steps_are_seen_as_steps(request, model):
    """During generation the prompt is one full pass and every later token a cached step, whatever name the
    installed transformers gives the KV cache argument (``past_key_values`` up to 5.23, ``cache`` from 5.24):
    a step taken for a full pass would re-route each new token on its own and drop the edit mid-answer."""
    from editlens.edit.grace import adaptor_hooks
    from editlens.lm import ops

    lm = request.getfixturevalue(model)
    rec = _Recorder(lm.arch.mlp_out_at(1))
    with adaptor_hooks(lm, rec):
        ops.generate(lm, ["Alice Smith lives in the city of", "Hi"], max_new_tokens=4, stop=())
    assert rec.calls[0][0] == "full" and rec.calls[0][1] > 1
    assert [c for c, _ in rec.calls[1:]] == ["step"] * 3, rec.calls


def test_cached_step_detected_under_any_cache_name():
    from transformers import DynamicCache

    from editlens.edit.grace import _is_cached_step

    one = torch.zeros(2, 1, dtype=torch.long)
    full = torch.zeros(2, 5, dtype=torch.long)
    assert not _is_cached_step(full, {"attention_mask": torch.ones(2, 5)})
    assert not _is_cached_step(full, {})
    # a cached step is recognised by the mask covering the cached tokens, whatever the cache keyword is called
    assert _is_cached_step(one, {"attention_mask": torch.ones(2, 6), "kv_store_of_the_future": object()})
    cache = DynamicCache()
    cache.update(torch.zeros(2, 1, 5, 4), torch.zeros(2, 1, 5, 4), 0)
    for name in ("cache", "past_key_values"):
        assert _is_cached_step(one, {name: cache})
        assert not _is_cached_step(full, {name: DynamicCache()})  # empty cache: a full pass


def test_irrelevant_prompts_leave_out_edit_prompts():
    from editlens.edit.wise import irrelevant_prompts

    full = irrelevant_prompts(12)
    assert "The chemical symbol for gold is" in full
    kept = irrelevant_prompts(12, exclude=["the chemical symbol for  gold is."])  # case/space/punctuation
    assert len(kept) == 12 and not any(p.startswith("The chemical symbol for gold") for p in kept)


def test_contrast_prompts_share_the_template_not_the_subject():
    from editlens.edit.wise import _CONTRAST_SUBJECTS, contrast_prompts

    tr, ca = contrast_prompts("The capital of {} is", "Canada", 6, 3, exclude_subjects=["Egypt"],
                              exclude_prompts=["The capital of Mexico is"])
    assert len(tr) == 6 and len(ca) == 3 and not set(tr) & set(ca)
    for p in tr + ca:
        assert p.startswith("The capital of ") and p.endswith(" is")
        assert p[len("The capital of "):-len(" is")] in _CONTRAST_SUBJECTS
    assert not {"The capital of Canada is", "The capital of Egypt is", "The capital of Mexico is"} & set(tr + ca)
    assert contrast_prompts("No placeholder here", "Canada", 6, 3) == ([], [])
    # another rewrite gets another window of subjects
    assert contrast_prompts("{} was written by", "Hamlet", 6, 0)[0] != contrast_prompts("{} was written by",
                                                                                       "Ulysses", 6, 0)[0]


def test_edit_prompt_equal_to_an_irrelevant_prompt_keeps_the_router_separated(tiny_llama):
    """The built-in irrelevant set holds "The chemical symbol for gold is"; an edit of exactly that prompt used to
    be trained both above and below the threshold, so the router could not separate and the threshold fell to
    the edit's own score."""
    from editlens.edit.wise import irrelevant_prompts

    case = make_case("g", Rewrite("The chemical symbol for {} is", "gold", "Ag", "Au"))
    assert case.rewrite.text in irrelevant_prompts(6)  # the tiny default n_irrelevant
    e = edit(tiny_llama, [case], "wise")
    try:
        d = e.diagnostics
        negatives = max(d["score_irrelevant_max"], d.get("score_calibration_max", float("-inf")))
        assert d["router_separated"] and d["score_edit_min"] > d["threshold"] > negatives, d
        # a real margin, not float noise between two passes over the same text (before: 1e-7 relative)
        assert d["score_edit_min"] - negatives > 0.01 * d["score_edit_min"], d
        e.system.next_token_logprobs([case.rewrite.text])
        assert e.system.adaptor.last_route.tolist() == [0]
    finally:
        e.undo()


def test_unrouted_row_of_a_mixed_padded_batch_is_bit_identical_to_the_base(tiny_llama):
    """One routed and one unrouted prompt of different lengths (left padding) in one batch: the unrouted row's
    next-token log-probabilities and greedy generation equal the base model's in the same batch, bit for bit,
    while the routed row's differ (the side memory is applied per row, on the full pass and every cached step)."""
    from editlens.edit.wise import _prompt_acts

    lm = tiny_llama
    module = lm.arch.mlp_out_at(2)
    prompts = ["Alice Smith lives in the city of", "The weather"]
    w = lm.module(module).weight
    delta = torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.5
    acts, mask = _prompt_acts(lm, module, prompts)
    scores = activation_scores(acts, delta, mask).tolist()
    assert scores[0] != scores[1]
    routed, unrouted = (0, 1) if scores[0] > scores[1] else (1, 0)
    ad = WiseAdaptor(module)
    ad.memories = [SideMemory(delta, eps=sum(scores) / 2)]
    base, s = ModelSystem(lm), WiseSystem(ModelSystem(lm), ad)
    lo_b, lo_s = base.next_token_logprobs(prompts), s.next_token_logprobs(prompts)
    assert sorted(ad.last_route.tolist()) == [-1, 0]
    assert torch.equal(lo_s[unrouted], lo_b[unrouted])
    assert not torch.equal(lo_s[routed], lo_b[routed])
    g_b, g_s = base.generate(prompts, max_new_tokens=6), s.generate(prompts, max_new_tokens=6)
    assert g_s[unrouted] == g_b[unrouted]
    assert s.generate([prompts[unrouted]], max_new_tokens=6) == base.generate([prompts[unrouted]], max_new_tokens=6)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_mean_acts_stop_early_and_equal_the_full_pass(request, model):
    """The contrast ranking's activations (forward stopped at the router's layer, chunked) equal the masked mean
    of the full pass's recorded inputs, prompt by prompt, and the model's hooks are left as they were."""
    from editlens.edit.wise import _mean_acts, _prompt_acts

    lm = request.getfixturevalue(model)
    module = lm.arch.mlp_out_at(1)
    prompts = ["Alice Smith lives in the city of", "Hi", "The weather today is rather", "Bob plays the"]
    acts, mask = _prompt_acts(lm, module, prompts)
    m = mask.float()[..., None]
    ref = (acts * m).sum(1) / m.sum(1)
    got = _mean_acts(lm, module, prompts, chunk=3)  # two chunks of different widths
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert not lm.module(module)._forward_pre_hooks and not lm.module(module)._forward_hooks
