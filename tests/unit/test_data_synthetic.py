"""The synthetic generator: deterministic, unique, self-consistent fictional worlds."""
from __future__ import annotations

import pytest

from editlens.data import synthetic_cases
from editlens.data.synthetic import CHAINS, RELATIONS, TEMPLATES


def test_deterministic_and_seed_dependent():
    a, b = synthetic_cases(30, seed=5), synthetic_cases(30, seed=5)
    assert a == b
    c = synthetic_cases(30, seed=6)
    assert [x.rewrite for x in a] != [x.rewrite for x in c]
    assert synthetic_cases(0) == []


def test_unique_ids_and_subjects_without_collisions():
    cases = synthetic_cases(400, seed=1)
    ids = [c.case_id for c in cases]
    assert len(set(ids)) == len(ids) == 400
    subjects = [c.rewrite.subject for c in cases]
    assert len(set(subjects)) == len(subjects)
    # no subject occurs inside another subject's name
    for s in subjects[:100]:
        assert sum(s in t for t in subjects) == 1
    # neighbours (bystanders) are never edited subjects
    edited = set(subjects)
    for c in cases:
        for p in c.probes_of("neighborhood") + c.probes_of("attribute"):
            assert not any(s in p.prompt for s in edited if s != c.rewrite.subject)


def test_case_structure():
    for c in synthetic_cases(60, seed=3):
        rw = c.rewrite
        rel = c.meta["relation"]
        assert rel in RELATIONS and rw.prompt in TEMPLATES[rel]
        assert rw.target_true and rw.target_new != rw.target_true
        assert c.probes_of("rewrite")[0].prompt == rw.text
        para = c.probes_of("paraphrase")
        assert len(para) == 2 and all(p.prompt != rw.text and rw.subject in p.prompt for p in para)
        assert all((p.target, p.foil) == (rw.target_new, rw.target_true) for p in para)
        nb = c.probes_of("neighborhood")
        assert len(nb) == 3
        for p in nb:
            assert p.foil == rw.target_new and p.target != rw.target_new and rw.subject not in p.prompt
            assert p.prompt.replace(p.prompt, "") == "" and rw.prompt.split("{}")[0] in p.prompt
        for p in c.probes_of("attribute"):
            assert (p.target, p.foil) == (rw.target_new, rw.target_true)
        oa = c.probes_of("other_attribution")
        assert len(oa) == 3 and {p.meta["relation"] for p in oa} == set(RELATIONS) - {rel}
        assert all(p.target is None for p in c.probes_of("generation"))
        n_chains = len(CHAINS[rel])
        assert len(c.probes_of("multihop")) == 2 * n_chains
        assert len(c.probes_of("portability")) == n_chains


def test_two_hop_answers_follow_the_world():
    cases = synthetic_cases(80, seed=9, relations=["citizenship"])
    for c in cases:
        facts = {f["prompt"]: f["target"] for f in c.meta["hop_facts"]}
        new, old = c.rewrite.target_new, c.rewrite.target_true
        cap_new, cap_old = facts[f"The capital of {new} is"], facts[f"The capital of {old} is"]
        lang_new = facts[f"The official language of {new} is"]
        by_chain = {p.meta["chain"]: p for p in c.probes_of("portability")}
        assert by_chain["capital"].target == cap_new and by_chain["capital"].foil == cap_old
        assert by_chain["language"].target == lang_new
        assert by_chain["capital"].meta["subtype"] == "one_hop"
        groups = {}
        for p in c.probes_of("multihop"):
            groups.setdefault(p.meta["group"], set()).add(p.target)
        assert len(groups) == 2 and all(len(t) == 1 for t in groups.values())
    # the same country always has the same capital across cases (one world per call)
    capital = {}
    for c in cases:
        for f in c.meta["hop_facts"]:
            assert capital.setdefault(f["prompt"], f["target"]) == f["target"]


def test_options_and_errors():
    cases = synthetic_cases(10, seed=0, relations=["instrument"], n_paraphrases=3, n_neighbors=5)
    assert all(c.meta["relation"] == "instrument" for c in cases)
    assert all(len(c.probes_of("paraphrase")) == 3 and len(c.probes_of("neighborhood")) == 5 for c in cases)
    assert all(c.probes_of("multihop") == () for c in cases)
    with pytest.raises(ValueError, match="unknown relation"):
        synthetic_cases(3, relations=["spouse"])
    with pytest.raises(ValueError):
        synthetic_cases(-1)
