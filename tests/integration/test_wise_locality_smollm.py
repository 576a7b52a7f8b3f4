"""WISE on SmolLM2-135M and CounterFact-style facts: the edits flip, and the neighbourhood (the same relation
about other subjects, CounterFact's ``neighborhood_prompts``) keeps its greedy answers — in one batch and one
edit at a time.

The neighbourhood subjects are held out: none is one of WISE's contrast subjects, so the router is judged on
prompts it was neither trained nor calibrated on. One rewrite prompt ("The chemical symbol for gold is") is
word for word one of WISE's built-in irrelevant prompts.
"""
from __future__ import annotations

import re

import pytest

from editlens.data.schema import Rewrite, make_case
from editlens.edit import edit, edit_sequential
from editlens.edit.wise import _CONTRAST_SUBJECTS, irrelevant_prompts
from editlens.evaluate.system import ModelSystem
from editlens.lm import ops

pytestmark = pytest.mark.integration

# (template, subject, true, new, neighbourhood subjects)
FACTS = [("The capital of {} is", "Japan", "Tokyo", "Madrid", ("China", "South Korea", "Thailand")),
         ("{} was written by", "Romeo and Juliet", "William Shakespeare", "Charles Dickens",
          ("Hamlet", "Pride and Prejudice", "The Great Gatsby")),
         ("{} was painted by", "The Mona Lisa", "Leonardo da Vinci", "Pablo Picasso",
          ("The Starry Night", "The Last Supper", "The Scream")),
         ("The official language of {} is", "France", "French", "Spanish", ("Germany", "Italy", "Brazil")),
         ("The chemical symbol for {} is", "gold", "Au", "Ag", ("iron", "oxygen", "sodium")),
         ("{} is located in the city of", "The Eiffel Tower", "Paris", "Rome",
          ("The Colosseum", "Big Ben", "The Statue of Liberty"))]
NEIGHBOURS = [t.replace("{}", n) for t, _, _, _, ns in FACTS for n in ns]
MAX_NEW = 4


@pytest.fixture(scope="module")
def cases(smollm):
    held_out = {n.casefold() for *_, ns in FACTS for n in ns}
    assert not held_out & {s.casefold() for s in _CONTRAST_SUBJECTS}
    assert any(t.replace("{}", s) in irrelevant_prompts(12) for t, s, *_ in FACTS)
    gens = ops.generate(smollm, [t.replace("{}", s) for t, s, *_ in FACTS], max_new_tokens=MAX_NEW)
    assert all(g.strip().startswith(old) for g, (_, _, old, _, _) in zip(gens, FACTS)), gens  # known facts
    return [make_case(f"w{i}", Rewrite(t, s, new, old)) for i, (t, s, old, new, _) in enumerate(FACTS)]


@pytest.fixture(scope="module")
def base_neighbours(smollm):
    return ModelSystem(smollm).generate(NEIGHBOURS, max_new_tokens=MAX_NEW)


@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_wise_flips_edits_and_keeps_the_neighbourhood(smollm, cases, base_neighbours, mode):
    """The issue's target: every edit flips and >= 90% of the neighbourhood answers stay (at most 1 of 18
    changes), in one batch and one edit at a time.

    Before the fix: batch 6/6 flipped, 16/18 kept (the router admitted "Pride and Prejudice" and "The Great
    Gatsby was written by" next to the "Romeo and Juliet" edit: its contrasts were a type-mixed window with few
    works, so it learnt "a work's author" rather than the fact); sequential 5/6 flipped (the uncalibratable
    threshold was set *at* the "gold" edit's score, and routing is strict), 17/18 kept. Measured after: 6/6 and
    18/18 in both modes (docs/methods-preserving-incontext.md, WISE)."""
    fp = smollm.weights_fingerprint()
    e = edit(smollm, cases, "wise") if mode == "batch" else edit_sequential(smollm, cases, "wise", batch_size=1)
    try:
        s = e.system
        gens = s.generate([c.rewrite.text for c in cases], max_new_tokens=MAX_NEW)
        flipped = [g.strip().startswith(c.rewrite.target_new) for g, c in zip(gens, cases)]
        after = s.generate(NEIGHBOURS, max_new_tokens=MAX_NEW)
        changed = [(p, a, b) for p, a, b in zip(NEIGHBOURS, base_neighbours, after) if a != b]
        d = e.diagnostics
        assert all(flipped), (mode, gens, d)
        assert len(changed) <= 0.1 * len(NEIGHBOURS), (mode, changed, d)
        if mode == "batch":
            assert d["router_separated"], d
        # the contrasts the router was trained and calibrated on never name a held-out neighbour subject
        negatives = [p for m in s.adaptor.memories for p in m.contrasts + m.calibration]
        held_out = re.compile("|".join(rf"\b{re.escape(n)}\b" for *_, ns in FACTS for n in ns), re.IGNORECASE)
        assert len(negatives) >= 40 * len(cases) and not [p for p in negatives if held_out.search(p)]
    finally:
        e.undo()
    assert smollm.weights_fingerprint() == fp
    assert not smollm.model._forward_hooks
