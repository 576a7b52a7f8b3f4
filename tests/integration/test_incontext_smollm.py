"""GRACE, WISE, IKE and SCR on SmolLM2-135M: real facts it knows are changed; unrelated prompts are not.

The facts are checked first: only those the model answers correctly (greedy) are edited.
"""
from __future__ import annotations

import pytest
import torch

from editlens.data.schema import Rewrite, make_case
from editlens.edit import edit, edit_sequential
from editlens.edit.scr import SCRSystem
from editlens.evaluate.system import ModelSystem
from editlens.lm import ops

pytestmark = pytest.mark.integration

FACTS = [("{} is located in the city of", "The Eiffel Tower", "Paris", "Rome"),
         ("{} is located in the city of", "The Colosseum", "Rome", "London"),
         ("{} was painted by", "The Mona Lisa", "Leonardo da Vinci", "Pablo Picasso"),
         ("The capital of {} is", "Japan", "Tokyo", "Madrid"),
         ("{} was written by", "Romeo and Juliet", "William Shakespeare", "Charles Dickens"),
         ("The official language of {} is", "France", "French", "Spanish"),
         ("The capital of {} is", "Italy", "Rome", "Berlin"),
         ("The capital of {} is", "Germany", "Berlin", "Vienna"),
         ("The capital of {} is", "Spain", "Madrid", "Lisbon")]
UNRELATED = ["My favourite food is", "The weather today is", "Barack Obama was born in",
             "The best way to learn a language is"]


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    return (p_log.exp() * (p_log - q_log)).sum(-1)


@pytest.fixture(scope="module")
def known_all(smollm):
    """Every case whose true answer SmolLM2 generates before editing (at least 5)."""
    prompts = [t.replace("{}", s) for t, s, _, _ in FACTS]
    gens = ops.generate(smollm, prompts, max_new_tokens=6)
    cases = [make_case(f"k{i}", Rewrite(t, s, new, old))
             for i, ((t, s, old, new), g) in enumerate(zip(FACTS, gens)) if g.strip().startswith(old)]
    assert len(cases) >= 5, gens
    return cases


@pytest.fixture(scope="module")
def known(known_all):
    return known_all[:5]


def _reliability(system, cases) -> list[bool]:
    gens = system.generate([c.rewrite.text for c in cases], max_new_tokens=6)
    return [g.strip().startswith(c.rewrite.target_new) for g, c in zip(gens, cases)]


@pytest.fixture(scope="module")
def base_unrelated(smollm):
    return ModelSystem(smollm).next_token_logprobs(UNRELATED)


@pytest.mark.parametrize("method", ["grace", "wise", "ike", "scr"])
def test_method_edits_known_facts(smollm, known, known_all, base_unrelated, method):
    fp = smollm.weights_fingerprint()
    # IKE relies on a 135M model following a fact stated in context, which it does for most but not all facts
    # (8 of 9 here; the Eiffel Tower stays in Paris): it gets every known fact and must flip at least 5.
    cases = known_all if method == "ike" else known
    e = edit(smollm, cases, method)
    try:
        ok = _reliability(e.system, cases)
        if method == "ike":
            assert sum(ok) >= 5, (method, ok, e.diagnostics)
        else:
            assert all(ok), (method, ok, e.diagnostics)
        if method in ("grace", "scr"):
            kl = _kl(base_unrelated, e.system.next_token_logprobs(UNRELATED))
            assert float(kl.max()) < 1e-6, kl
    finally:
        e.undo()
    assert smollm.weights_fingerprint() == fp  # the weights were never touched
    assert not smollm.model._forward_hooks


def test_scr_confirmation_removes_irrelevant_fact(smollm):
    case = make_case("t", Rewrite("{} is the capital of", "Tokyo", "France", "Japan"))
    e = edit(smollm, [case], "scr")
    try:
        sys = e.system
        assert isinstance(sys, SCRSystem)
        query = "The capital of France is"
        [inp] = sys.contextualise([query])
        [d] = sys.decisions
        # retrieved (similar enough) ...
        assert d["similarity"] >= sys.hparams.sim_threshold and d["fact"] == "Tokyo is the capital of France."
        # ... but the model does not confirm it, so the query reaches the model unchanged
        assert not d["confirmed"] and inp == query
        no_confirm = SCRSystem(ModelSystem(smollm), sys.hparams.replace(confirm=False))
        no_confirm.add_cases([case])
        assert no_confirm.contextualise([query])[0] != query
    finally:
        e.undo()


def test_scr_keeps_reliability_after_100_sequential_edits(smollm):
    try:
        from editlens.data.synthetic import synthetic_cases
        cases = synthetic_cases(100, seed=3)
    except ImportError:  # pragma: no cover - generator not available
        cases = [make_case(f"f{i}", Rewrite("{} lives in the city of", f"Person{i} Zorvan", f"Velto{i}", None))
                 for i in range(100)]
    first = cases[:10]
    at: dict[int, float] = {}

    def cb(step, n, run):
        at[n] = sum(_reliability(run.system, first)) / len(first)

    run = edit_sequential(smollm, cases, "scr", batch_size=1, checkpoints=[10, 100], callback=cb)
    try:
        assert run.system.memory.n_encoded == 100  # every fact encoded exactly once
        assert at[10] >= 0.7, at
        assert at[100] >= at[10] - 0.1, at
    finally:
        run.undo()
