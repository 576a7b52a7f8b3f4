"""A GRACE edit made with ``prompt_format="chat"`` on SmolLM2-135M-Instruct flips the model's greedy *chat* answer,
and ``editlens.evaluate(..., prompt_format="chat")`` measures it (issue 14, item 5).

Only facts SmolLM2 answers correctly in chat format before the edit are used, so the flip is a real change.
"""
from __future__ import annotations

import pytest

import editlens
from editlens.data.schema import Probe, Rewrite, make_case
from editlens.errors import MetricError
from editlens.evaluate.system import ModelSystem

pytestmark = pytest.mark.integration

FACTS = [("The capital of {} is", "Japan", "Tokyo", "Madrid"),
         ("{} was written by", "Romeo and Juliet", "William Shakespeare", "Charles Dickens"),
         ("The official language of {} is", "France", "French", "Spanish"),
         ("The capital of {} is", "Italy", "Rome", "Berlin")]


def _starts(gen: str, answer: str) -> bool:
    return gen.strip().startswith(answer)


@pytest.fixture(scope="module")
def known_in_chat(smollm):
    """Two cases whose true answer SmolLM2 generates greedily when asked in chat format."""
    chat = ModelSystem(smollm, prompt_format="chat")
    prompts = [t.replace("{}", s) for t, s, _, _ in FACTS]
    gens = chat.generate(prompts, max_new_tokens=6)
    cases = [make_case(f"chat{i}", Rewrite(t, s, new, old),
                       {"neighborhood": [Probe("The capital of Germany is", "Berlin", new)]})
             for i, ((t, s, old, new), g) in enumerate(zip(FACTS, gens)) if _starts(g, old)]
    assert len(cases) >= 2, gens
    return cases[:2]


def test_grace_chat_edit_flips_the_greedy_chat_answer(smollm, known_in_chat):
    cases = known_in_chat
    base = ModelSystem(smollm, prompt_format="chat")
    prompts = [c.rewrite.text for c in cases]
    before = base.generate(prompts, max_new_tokens=6)
    assert not any(_starts(g, c.rewrite.target_new) for g, c in zip(before, cases)), before
    fp = smollm.weights_fingerprint()
    e = editlens.edit(smollm, cases, method="grace", prompt_format="chat")
    try:
        assert e.system.prompt_format == "chat"
        after = e.system.generate(prompts, max_new_tokens=6)
        assert all(_starts(g, c.rewrite.target_new) for g, c in zip(after, cases)), (before, after, e.diagnostics)
        res = editlens.evaluate(e.system, cases, base=base, metrics=["s_acc", "t_acc", "kl"], prompt_format="chat",
                                progress=False, cache=False)
        assert res.meta["prompt_format"] == "chat"
        df = res.to_pandas()
        rw = df[df["probe_kind"] == "rewrite"].set_index(["case_id", "metric"])["value"]
        for c in cases:  # s_acc: the greedy chat answer starts with the new target (what flipped above)
            assert rw[(c.case_id, "s_acc")] == 1.0 and rw[(c.case_id, "t_acc")] == 1.0, df
            assert rw[(c.case_id, "kl")] > 0.5, df
        # an unrelated neighbour prompt misses the codebook: exactly the base distribution
        nb = df[(df["probe_kind"] == "neighborhood") & (df["metric"] == "kl")]["value"]
        assert len(nb) == 2 and float(nb.abs().max()) < 1e-6, df
        # the same edit evaluated in another format than it was made in is a clear error, not a silent miss
        with pytest.raises(MetricError, match="made in prompt format 'chat'"):
            editlens.evaluate(e.system, cases, base=base, metrics=["t_acc"], prompt_format="raw", progress=False)
    finally:
        e.undo()
    assert smollm.weights_fingerprint() == fp and not smollm.model._forward_hooks
