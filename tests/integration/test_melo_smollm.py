"""MELO on SmolLM2-135M with the six known facts (editlens/resources/known_facts.json), one batch, defaults.

At least 4 of 6 must flip (greedy continuation starts with the new object); prompts outside every cluster —
unrelated prompts and the same relations with other subjects — answer bit-identical to the base model (next-token
log-probs and greedy continuations); undo leaves every tensor, module type and hook as before.
"""
from __future__ import annotations

import pytest
import torch

from editlens.data.known_facts import known_fact_cases, known_facts
from editlens.edit import edit
from editlens.lm import ops
from editlens.system import ModelSystem

pytestmark = pytest.mark.integration

MAX_NEW = 4
OUT_OF_SCOPE = ["The weather today is", "My favourite food is", "She opened the door and",
                "Once upon a time there was", "Water boils at a temperature of",
                # the edited relations with other subjects (CounterFact's neighbourhood prompts)
                "The capital of France is", "Hamlet was written by", "The official language of Germany is",
                "The chemical symbol for silver is", "The Colosseum is located in the city of"]


def _structure(lm):
    hooks = sum(len(getattr(m, a, {}) or {}) for m in lm.model.modules()
                for a in ("_forward_hooks", "_forward_pre_hooks"))
    return [(n, type(m)) for n, m in lm.model.named_modules()], hooks


def test_melo_flips_known_facts_out_of_scope_bit_identical_undo_exact(smollm, record_property):
    lm = smollm
    facts = known_facts()
    gens = ops.generate(lm, [t.replace("{}", s) for t, s, *_ in facts], max_new_tokens=MAX_NEW)
    assert all(g.strip().startswith(old) for g, (_, _, old, _) in zip(gens, facts)), gens  # known facts
    cases = known_fact_cases("melo")
    state = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    structure, fp = _structure(lm), lm.fingerprint
    base = ModelSystem(lm)
    base_lp = base.next_token_logprobs(OUT_OF_SCOPE)
    base_gen = base.generate(OUT_OF_SCOPE, max_new_tokens=MAX_NEW)

    e = edit(lm, cases, "melo")
    try:
        s = e.system
        gens = s.generate([c.rewrite.text for c in cases], max_new_tokens=MAX_NEW)
        flipped = [g.strip().startswith(c.rewrite.target_new) for g, c in zip(gens, cases)]
        record_property("melo_flipped", sum(flipped))
        print(f"MELO flipped {sum(flipped)} of {len(cases)}: {gens}; {e.diagnostics}")
        assert sum(flipped) >= 4, (gens, e.diagnostics)
        for c in cases:  # every edit prompt is served by the batch's block
            s.next_token_logprobs([c.rewrite.text])
            assert s.adaptor.last_blocks.tolist() == [0], c.rewrite.text
        lp = s.next_token_logprobs(OUT_OF_SCOPE)
        assert torch.equal(lp, base_lp)
        assert s.generate(OUT_OF_SCOPE, max_new_tokens=MAX_NEW) == base_gen
        assert _structure(lm) == structure
    finally:
        e.undo()
    now = lm.model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())
    assert _structure(lm) == structure and lm.fingerprint == fp
