"""IKE on the tiny model: demonstrations, fact assignment, prompt layout, undo."""
from __future__ import annotations

import pytest
import torch

from editlens.data.schema import Probe, Rewrite, make_case
from editlens.edit import edit, edit_sequential
from editlens.edit.ike import IKEHParams, IKESystem, build_demonstrations
from editlens.evaluate.system import ModelSystem


def _cases():
    out = []
    for i, (subj, new, old) in enumerate([("Alice Smith", "Paris", "Rome"), ("Bob Jones", "Oslo", "Lima"),
                                           ("Carol White", "Kyiv", "Cairo")]):
        out.append(make_case(str(i), Rewrite("{} lives in the city of", subj, new, old), probes={
            "paraphrase": [Probe(f"{subj} resides in the city of", new, old)],
            "neighborhood": [Probe(f"Person{i} lives in the city of", "Madrid", new), Probe("No target here")]}))
    return out


def test_build_demonstrations_kinds():
    demos = build_demonstrations(_cases())
    kinds = [d.kind for d in demos if d.case_id == "0"]
    assert kinds == ["copy", "update", "retain"]  # the target-less neighbourhood probe gives no demo
    copy = demos[0]
    assert copy.fact == "Alice Smith lives in the city of Paris." and copy.answer == "Paris"
    retain = [d for d in demos if d.kind == "retain"][0]
    assert retain.answer == "Madrid"


def test_prompt_layout_and_own_case_excluded(tiny_llama):
    sys = IKESystem(ModelSystem(tiny_llama), IKEHParams.for_model(tiny_llama).replace(k=2))
    sys.add_cases(_cases())
    [p] = sys.transform_prompts(["Alice Smith resides in the city of"])
    blocks = p.split("\n\n")
    assert len(blocks) == 3  # two demonstrations and the query
    assert blocks[-1] == "New Fact: Alice Smith lives in the city of Paris.\nPrompt: Alice Smith resides in the city of"
    for b in blocks[:-1]:
        assert b.startswith("New Fact: ") and "Alice Smith" not in b  # never the query's own case
        assert "\nPrompt: " in b
    # a prompt of no case gets the most similar fact
    [q] = sys.transform_prompts(["Where does Bob Jones live? In the city of"])
    assert "New Fact: Bob Jones lives in the city of Oslo.\nPrompt: Where does Bob Jones live" in q


def test_system_scores_the_transformed_prompt(tiny_llama):
    e = edit(tiny_llama, _cases(), "ike")
    assert isinstance(e.system, IKESystem)
    base = ModelSystem(tiny_llama)
    q = ["Bob Jones lives in the city of"]
    [t] = e.system.transform_prompts(q)
    assert torch.allclose(e.system.next_token_logprobs(q), base.next_token_logprobs([t]), atol=1e-5)
    e.undo()
    assert torch.equal(e.system.next_token_logprobs(q), base.next_token_logprobs(q))


def test_sequential_accumulates_and_undoes(tiny_llama):
    run = edit_sequential(tiny_llama, _cases(), "ike", batch_size=1)
    assert len(run.system.facts) == 3 and len(run.system.demos) == 9
    run.undo()
    assert run.system.transform_prompts(["x"]) == ["x"]


def test_demo_pool_synthetic_gives_demonstrations_to_a_lone_edit():
    import editlens
    from editlens.edit.ike import IKEHParams
    from editlens.errors import HParamsError

    lm = editlens.load_model("tiny-llama")
    case = editlens.synthetic_cases(1, seed=3)
    own = editlens.edit(lm, case, "ike")
    # demo_pool="edited" (default): one edited case, whose own demonstrations are never shown with it: none at all
    assert own.system.transform_prompts([case[0].rewrite.text])[0].count("New Fact: ") == 1
    own.undo()
    e = editlens.edit(lm, case, "ike", demo_pool="synthetic:5", k=3)
    try:
        from editlens.edit.ike import build_demonstrations
        pool = build_demonstrations(editlens.synthetic_cases(5, seed=11))
        assert e.diagnostics["demonstrations"] == len(pool)  # the pool only; the edited case adds none
        text = e.system.transform_prompts([case[0].rewrite.text])[0]
        assert text.count("New Fact: ") == 4  # 3 demonstrations + the new fact
        assert text.rstrip().endswith(case[0].rewrite.text)
        assert all(d.case_id.startswith("pool:") for d in e.system.demo_list)
    finally:
        e.undo()
    for bad in ("synthetic:0", "synthetic", "training", "synthetic:x"):
        with pytest.raises(HParamsError, match="demo_pool"):
            IKEHParams().replace(demo_pool=bad)
