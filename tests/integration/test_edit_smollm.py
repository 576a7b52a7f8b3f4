"""ROME, MEMIT, AlphaEdit and EMMET on SmolLM2-135M: known facts are overwritten, unrelated answers stay.

Statistics use a small model-sampled corpus (64 documents × 64 tokens) cached in the editlens cache, so only the
first run pays for it.
"""
from __future__ import annotations

import pytest
import torch

from editlens.data.schema import Rewrite, make_case
from editlens.edit import edit
from editlens.lm import ops

pytestmark = pytest.mark.integration

#: (template, subject, answer the model gives, new target)
FACTS = [
    ("{} is located in the city of", "The Eiffel Tower", "Paris", "Rome"),
    ("The capital of {} is", "France", "Paris", "Berlin"),
    ("The capital of {} is", "Japan", "Tokyo", "London"),
    ("The capital of {} is", "Italy", "Rome", "Madrid"),
    ("{} is located in the city of", "The Colosseum", "Rome", "Vienna"),
]
UNRELATED = [
    "Water is made of hydrogen and",
    "The largest planet in the solar system is",
    "The currency of the United States is the",
    "The first man on the moon was named",
    "The chemical symbol for gold is",
    "The tallest mountain in the world is",
    "Romeo and Juliet was written by",
    "The author of Harry Potter is",
    "The Great Wall is located in",
    "The Amazon River flows through",
]
FAST = dict(stats_n_samples=64, stats_max_length=64, n_prefixes=3)


def _prompts():
    return [t.replace("{}", s) for t, s, _, _ in FACTS]


def _cases():
    return [make_case(f"f{i}", Rewrite(t, s, new, old)) for i, (t, s, old, new) in enumerate(FACTS)]


def _first_words(lm, prompts):
    return [g.strip().split(" ")[0].strip(".,") if g.strip() else "" for g in ops.generate(lm, prompts, 3)]


@pytest.fixture(scope="module")
def base(smollm):
    answers = _first_words(smollm, _prompts())
    assert answers == [old for _, _, old, _ in FACTS], answers  # the model knows the facts
    return ops.next_token_logprobs(smollm, UNRELATED)


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit", "emmet"])
def test_known_facts_are_rewritten(smollm, base, method):
    before = {k: v.clone() for k, v in smollm.model.state_dict().items() if "mlp" in k}
    e = edit(smollm, _cases(), method, **FAST)
    try:
        answers = _first_words(smollm, _prompts())
        assert answers == [new for _, _, _, new in FACTS], (method, answers, e.diagnostics)
        if method != "emmet":
            # locality: next-token distributions of unrelated prompts barely move, and the greedy answer is kept
            # wherever the base model is not near a tie (a 0.05-nat margin may flip under any edit)
            after = ops.next_token_logprobs(smollm, UNRELATED)
            kl = (base.exp() * (base - after)).sum(-1)
            # ROME computes its update as the reference code does (unprefixed key, decay |d|/|v0|^2, stop on the
            # total loss): measurably less local than editlens's earlier objective — issue 16 reports neighbourhood
            # KL .092 (reference) vs .018 on six CounterFact facts; here the largest of ten unrelated prompts was
            # 0.109 with prefixes sampled after MEMIT's seed words (2026-11-30) and 0.156 with the reference's
            # prefixes sampled after <|endoftext|> (prefix_start="document", ROME's default since 2026-12-01; the
            # other nine stay below 0.13). The bound stays 0.1 for the batch methods.
            bound = 0.2 if method == "rome" else 0.1
            assert float(kl.max()) < bound, (method, kl.tolist())
            top2 = base.topk(2, dim=-1).values
            clear = (top2[:, 0] - top2[:, 1]) > 0.2
            changed = [p for p, a, b, c in zip(UNRELATED, after.argmax(-1).tolist(), base.argmax(-1).tolist(),
                                               clear.tolist()) if c and a != b]
            # ROME with the reference objective also moves the greedy answer of 2 of the 10 unrelated prompts
            # ("The currency of the United States is the", "The Great Wall is located in"; 2026-11-30): a measured
            # locality cost of computing ROME as the reference code does, bounded here so that it cannot grow
            # unnoticed. The batch methods must keep every clear answer.
            assert len(changed) <= (2 if method == "rome" else 0), (method, changed)
    finally:
        e.undo()
    for k, v in smollm.model.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k
