"""GRACE on tiny models: codebook rules (add / expand / split), hit, miss, generation, reversibility."""
from __future__ import annotations

import pytest
import torch

from editlens.data.schema import Rewrite, make_case
from editlens.edit import edit, edit_sequential
from editlens.edit.grace import GraceAdaptor, GraceSystem, codebook_update
from editlens.evaluate.system import ModelSystem
from editlens.lm import ops


def test_codebook_rules_by_hand():
    ad = GraceAdaptor("m", d_key=2, d_value=1)
    assert codebook_update(ad, torch.tensor([0.0, 0.0]), "A", 1.0) == ("add", -1, 1.0)
    ad.add(torch.tensor([0.0, 0.0]), torch.tensor([1.0]), 1.0, "A")
    # far away (d = 5 > eps + eps_init = 2): a new entry
    assert codebook_update(ad, torch.tensor([5.0, 0.0]), "B", 1.0)[0] == "add"
    # overlapping, same label: expand the radius to the distance
    act, i, r = codebook_update(ad, torch.tensor([1.5, 0.0]), "A", 1.0)
    assert (act, i) == ("expand", 0) and r == pytest.approx(1.5) and float(ad.eps[0]) == pytest.approx(1.5)
    # overlapping, different label: both radii become half the distance
    act, i, r = codebook_update(ad, torch.tensor([0.0, 2.0]), "C", 1.0)
    assert (act, i) == ("split", 0) and r == pytest.approx(1.0) and float(ad.eps[0]) == pytest.approx(1.0)


def test_lookup_hit_miss_and_nearest():
    ad = GraceAdaptor("m", d_key=2, d_value=1)
    ad.add(torch.tensor([0.0, 0.0]), torch.tensor([1.0]), 1.0, "A")
    ad.add(torch.tensor([1.5, 0.0]), torch.tensor([2.0]), 1.0, "B")
    idx, dist = ad.lookup(torch.tensor([[0.2, 0.0], [1.0, 0.0], [3.0, 3.0]]))
    assert idx.tolist() == [0, 1, -1]  # (1.0, 0): both within radius, nearest wins
    assert dist[2] == pytest.approx((1.5 ** 2 + 9) ** 0.5)


def _case(subject="Alice Smith", new="Paris", old="Rome"):
    return make_case("0", Rewrite("{} lives in the city of", subject, new, old))


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_hit_miss_generation_and_undo(model, request):
    lm = request.getfixturevalue(model)
    base = ModelSystem(lm)
    prompt, other = "Alice Smith lives in the city of", "The weather today is"
    before = torch.cat([base.next_token_logprobs([prompt]), base.next_token_logprobs([other])])
    e = edit(lm, [_case()], "grace", n_iter=30, lr=1.0)
    s = e.system
    assert isinstance(s, GraceSystem) and len(s.adaptor) == 1
    target_id = ops.target_token_ids(lm.tokenizer, prompt, "Paris")[1][0]
    # hit: the edited prompt's top-1 becomes the target; generation keeps the value for generated tokens
    lp = s.next_token_logprobs([prompt])
    assert s.adaptor.last_hits.tolist() == [0]
    assert int(lp[0].argmax()) == target_id
    assert s.generate([prompt], 3)[0].startswith(" Paris")
    tf = s.teacher_forced([prompt], ["Paris"])[0]
    assert int(tf.argmax_ids[0]) == target_id
    # miss: an unrelated prompt is bit-identical to the base model
    lo = s.next_token_logprobs([other])
    assert s.adaptor.last_hits.tolist() == [-1]
    assert torch.equal(lo[0], before[1])
    # reversible: no hooks left, outputs identical after undo
    assert not lm.model._forward_hooks and not lm.model._forward_pre_hooks
    e.undo()
    assert len(s.adaptor) == 0
    assert torch.equal(s.next_token_logprobs([other])[0], before[1])
    assert torch.equal(s.next_token_logprobs([prompt])[0], before[0])


def test_split_on_conflicting_label(tiny_llama):
    # the same prompt edited to two different targets: the second edit splits the first entry
    run = edit_sequential(tiny_llama, [_case(new="Paris"), _case(new="Oslo")], "grace", batch_size=1,
                          eps_init=10.0, n_iter=2)
    ad = run.system.adaptor
    assert ad.counts["split"] == 1 and len(ad) == 2
    assert float(ad.eps[0]) == pytest.approx(float(ad.eps[1])) and float(ad.eps[0]) < 1e-3
    same = edit_sequential(tiny_llama, [_case(new="Paris"), _case(subject="Alice Smyth", new="Paris")], "grace",
                           batch_size=1, eps_init=10.0, n_iter=2)
    assert same.system.adaptor.counts["expand"] == 1 and len(same.system.adaptor) == 1
    same.undo()
    run.undo()
    assert len(ad) == 0
