"""Reasoning reflection check: hand-made generations."""
from __future__ import annotations

from editlens.evaluate.reflection import reflection_check, reflection_rate, split_reasoning


def test_split_reasoning():
    assert split_reasoning("<think>a b</think> c") == ("a b", " c")
    assert split_reasoning("no tags at all") == (None, "no tags at all")
    assert split_reasoning("<think>cut off") == ("cut off", "")
    assert split_reasoning("template opened it</think>Rome") == ("template opened it", "Rome")


def test_reflects_when_old_follows_new():
    g = ("<think>The new information says the Eiffel Tower is in Rome. But wait, I remember it is in Paris. "
         "So the answer is Paris.</think> Paris")
    r = reflection_check(g, "Rome", "Paris")
    assert r.has_reasoning and r.reflects and r.reverted
    assert r.new_in_reasoning < r.old_after_new


def test_old_before_new_is_not_reflection():
    g = "<think>It used to be in Paris, but it has moved to Rome.</think> Rome"
    r = reflection_check(g, "Rome", "Paris")
    assert not r.reflects and not r.reverted and r.answer_new


def test_reflection_without_revert_and_word_boundaries():
    g = "<think>Rome, per the fact. Some say PARIS, but the fact wins.</think> Rome"
    r = reflection_check(g, "Rome", "Paris")
    assert r.reflects and not r.reverted  # case-insensitive match, answer still new
    r2 = reflection_check("<think>Rome ... Romeo and Juliet ... Parisian food</think> Rome", "Rome", "Paris")
    assert not r2.reflects  # "Parisian" is not "Paris"
    r3 = reflection_check("<think>Rome. Then Lutetia.</think>", ["Rome"], ["Paris", "Lutetia"])
    assert r3.reflects  # aliases of the old target count


def test_no_reasoning_and_rate():
    r = reflection_check("Paris", "Rome", "Paris")
    assert not r.has_reasoning and not r.reflects and r.answer_old
    gens = ["<think>Rome then Paris</think>", "<think>Rome</think>", "plain answer"]
    assert reflection_rate(gens, ["Rome"] * 3, ["Paris"] * 3) == 0.5
    assert reflection_rate(["x"], ["Rome"], ["Paris"]) is None


def test_registered_metric():
    from editlens.data.schema import Probe, Rewrite, make_case
    from editlens.evaluate.core import EDITED, Answers, Generate, registered_metrics
    from editlens.evaluate.reflection import ReflectionMetric

    assert registered_metrics()["reflection"] is ReflectionMetric
    m = ReflectionMetric(max_new_tokens=8)
    case = make_case("c", Rewrite("{} is in", "X", "Rome", "Paris"),
                     probes={"paraphrase": [Probe("X lies in", "Rome", "Paris")]})
    reqs = list(m.case_requests(case))
    assert reqs == [(EDITED, Generate("X is in", 8)), (EDITED, Generate("X lies in", 8))]
    answers = Answers({EDITED: {Generate("X is in", 8): "<think>Rome. No, Paris.</think>Paris",
                                Generate("X lies in", 8): "Rome"}})
    rows = list(m.case_rows(case, answers))
    assert [(r.probe_kind, r.value) for r in rows] == [("rewrite", 1.0)]
