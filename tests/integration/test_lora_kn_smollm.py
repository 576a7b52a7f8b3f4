"""LoRA and KN on SmolLM2-135M with six CounterFact-style facts the model knows (the facts of
test_wise_locality_smollm.py; the shipped CounterFact sample has only five facts SmolLM2 answers greedily).

LoRA must flip at least 4 of 6 (greedy continuation starts with the new object) in one batch; KN's efficacy is
*reported* (known to be weak): the test records how many flip and asserts only that undo is exact. Both: every
tensor of the state dict is bit for bit the original after undo, and the module types are the original ones.
"""
from __future__ import annotations

import pytest
import torch

from editlens.data.known_facts import known_facts
from editlens.data.schema import Rewrite, make_case
from editlens.edit import edit
from editlens.lm import ops

pytestmark = pytest.mark.integration

FACTS = known_facts()  # (template, subject, true object, new object), editlens/resources/known_facts.json
MAX_NEW = 4
#: KN attributes layers 10..29 of 30 (the paper finds knowledge neurons in the upper layers) with the rewrite prompt
#: and two prefixed variants, to bound the CPU time of the integrated gradients (600 attribution batches of 20 rows)
KN_SETTINGS = dict(layers=list(range(10, 30)), n_prompts=2)


@pytest.fixture(scope="module")
def cases(smollm):
    gens = ops.generate(smollm, [t.replace("{}", s) for t, s, *_ in FACTS], max_new_tokens=MAX_NEW)
    assert all(g.strip().startswith(old) for g, (_, _, old, _) in zip(gens, FACTS)), gens  # known facts
    return [make_case(f"lk{i}", Rewrite(t, s, new, old)) for i, (t, s, old, new) in enumerate(FACTS)]


def _flipped(system, cases) -> list[bool]:
    gens = system.generate([c.rewrite.text for c in cases], max_new_tokens=MAX_NEW)
    return [g.strip().startswith(c.rewrite.target_new) for g, c in zip(gens, cases)]


def _snapshot(lm):
    return ({k: v.detach().clone() for k, v in lm.model.state_dict().items()},
            [(n, type(m)) for n, m in lm.model.named_modules()])


def _assert_exact(lm, snap):
    state, types = snap
    now = lm.model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [(n, type(m)) for n, m in lm.model.named_modules()] == types


def test_lora_flips_known_facts_and_undo_is_exact(smollm, cases, record_property):
    snap, fp = _snapshot(smollm), smollm.fingerprint
    e = edit(smollm, cases, "lora")
    try:
        flipped = _flipped(e.system, cases)
        record_property("lora_flipped", sum(flipped))
        assert sum(flipped) >= 4, (flipped, e.diagnostics)
    finally:
        e.undo()
    _assert_exact(smollm, snap)
    assert smollm.fingerprint == fp


def test_kn_edits_reports_efficacy_and_undo_is_exact(smollm, cases, record_property):
    snap, fp = _snapshot(smollm), smollm.fingerprint
    e = edit(smollm, cases, "kn", **KN_SETTINGS)
    try:
        flipped = _flipped(e.system, cases)
        record_property("kn_flipped", sum(flipped))
        print(f"KN flipped {sum(flipped)} of {len(cases)}: {flipped}; neurons per fact "
              f"{e.diagnostics.get('kn/neurons_per_case')}")
        assert e.diagnostics["kn/n_neurons"] >= 1
    finally:
        e.undo()
    _assert_exact(smollm, snap)
    assert smollm.fingerprint == fp
