"""FT-M on the embedded SmolLM2: known facts become the new targets under greedy decoding; undo restores them."""
from __future__ import annotations

import pytest

from editlens.data.schema import Rewrite, make_case
from editlens.edit import edit
from editlens.lm import ops

pytestmark = pytest.mark.integration

#: (template, subject, new target, true target): facts SmolLM2-135M-Instruct answers correctly (greedy)
FACTS = [
    ("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    ("The capital of {} is", "Japan", "Berlin", "Tokyo"),
    ("The capital of {} is", "Spain", "London", "Madrid"),
    ("{} is located in the city of", "The Colosseum", "Tokyo", "Rome"),
    ("The official language of {} is", "Germany", "French", "German"),
    ("The currency of {} is the", "Japan", "euro", "yen"),
]


def _first_word(text: str) -> str:
    return text.strip().split()[0].strip(".,") if text.strip() else ""


def test_ft_m_writes_known_facts(smollm):
    cases = [make_case(str(i), Rewrite(t, s, new, old)) for i, (t, s, new, old) in enumerate(FACTS)]
    prompts = [c.rewrite.text for c in cases]
    before = ops.generate(smollm, prompts, max_new_tokens=3)
    known = [c for c, g in zip(cases, before) if _first_word(g) == c.rewrite.target_true]
    assert len(known) >= 5, before
    fp = smollm.fingerprint
    # the SmolLM2 defaults (layer 20 down_proj, lr 2e-3, 15 epochs); one batch for speed
    e = edit(smollm, known, "ft-m", batch_size=len(known))
    try:
        assert e.diagnostics["ft/objective"] == "target_new" and e.hparams.layers == [20]
        after = ops.generate(smollm, [c.rewrite.text for c in known], max_new_tokens=3)
        hits = [_first_word(g) == c.rewrite.target_new for c, g in zip(known, after)]
        assert sum(hits) >= 5, after
        assert e.diagnostics["loss/final"] < 0.2 * e.diagnostics["loss/first"]
    finally:
        e.undo()
    assert smollm.fingerprint == fp and smollm.weights_fingerprint() == smollm.base_fingerprint
    assert ops.generate(smollm, prompts, max_new_tokens=3) == before
