"""Every sample dataset loads into the expected cases, with values checked by hand against the files."""
from __future__ import annotations

import json
import shutil

import pytest

from editlens.data import FORMATS, EditCase, ProbeKind, detect_format, load_cases

SAMPLES = {
    "counterfact_sample.json": ("counterfact", 8),
    "zsre_mend_eval_sample.json": ("zsre", 6),
    "knowedit_wiki_counterfact_sample.json": ("knowedit", 3),
    "mquake_cf_sample.json": ("mquake", 2),
    "rippleedits_sample.json": ("ripple", 2),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_loads_and_is_detected(shared_data_dir, name):
    fmt, n = SAMPLES[name]
    path = shared_data_dir / name
    assert detect_format(path) == fmt
    cases = load_cases(path)
    assert len(cases) == n
    assert all(isinstance(c, EditCase) for c in cases)
    assert len({c.case_id for c in cases}) == n
    for c in cases:
        assert c.rewrite.prompt.count("{}") == 1
        assert c.rewrite.subject in c.rewrite.text
        assert c.probes_of("rewrite")[0].target == c.rewrite.target_new
        assert c.meta["source"] == fmt
    # same result when the format is forced
    assert load_cases(path, format=fmt) == cases


def test_detection_is_by_content_not_file_name(shared_data_dir, tmp_path):
    for name, (fmt, n) in SAMPLES.items():
        renamed = tmp_path / f"data_{fmt}_renamed.txt"
        shutil.copy(shared_data_dir / name, renamed)
        assert detect_format(renamed) == fmt
        assert len(load_cases(renamed)) == n
    # CounterFact records stored as JSON Lines are still CounterFact
    recs = json.loads((shared_data_dir / "counterfact_sample.json").read_text())
    jl = tmp_path / "cf.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert detect_format(jl) == "counterfact"
    assert load_cases(jl) == load_cases(shared_data_dir / "counterfact_sample.json")


def test_formats_registry():
    assert set(FORMATS) == {"counterfact", "zsre", "mquake", "ripple", "knowedit", "jsonl", "conflictedit", "roundedit"}


def test_counterfact_values(shared_data_dir):
    cases = load_cases(shared_data_dir / "counterfact_sample.json")
    c = cases[0]
    assert c.case_id == "0"
    assert (c.rewrite.prompt, c.rewrite.subject, c.rewrite.target_new, c.rewrite.target_true) == (
        "The capital of {} is", "Japan", "Seoul", "Tokyo")
    assert c.rewrite.text == "The capital of Japan is"
    rw = c.probes_of("rewrite")
    assert [(p.prompt, p.target, p.foil) for p in rw] == [("The capital of Japan is", "Seoul", "Tokyo")]
    para = c.probes_of("paraphrase")
    assert [p.prompt for p in para] == ["A short trip around Asia. The capital city of Japan is",
                                        "Japan's seat of government is the city of"]
    assert all((p.target, p.foil) == ("Seoul", "Tokyo") for p in para)
    nb = c.probes_of("neighborhood")
    assert [p.prompt for p in nb] == ["The capital of China is", "The capital of South Korea is"]
    assert all((p.target, p.foil) == ("Tokyo", "Seoul") for p in nb)  # neighbours keep the old fact
    at = c.probes_of("attribute")
    assert [p.prompt for p in at] == ["The capital of Korea is", "Seoul is the capital of"]
    assert all((p.target, p.foil) == ("Seoul", "Tokyo") for p in at)
    gen = c.probes_of("generation")
    assert [p.prompt for p in gen] == ["The capital of Japan is famous for", "Japan's capital city has"]
    assert all(p.target is None and p.foil is None for p in gen)
    assert c.meta["relation_id"] == "P36" and c.meta["pararel_idx"] == 1000
    assert c.meta["target_new_id"] == "Q0" and c.meta["target_true_id"] == "Q1"
    # a subject with a lowercase article and a multi-word target
    uk = cases[7]
    assert uk.rewrite.subject == "the United Kingdom" and uk.rewrite.text == "The currency of the United Kingdom is the"
    messi = cases[6]
    assert (messi.rewrite.target_new, messi.rewrite.target_true) == ("basketball player", "soccer player")
    assert cases[4].probes_of("neighborhood")[0].prompt == "Jacqueline du Pr\u00e9 plays the instrument"
    assert c.kinds == ("rewrite", "paraphrase", "neighborhood", "attribute", "generation")


def test_multi_counterfact_list_rewrite_and_references(shared_data_dir, tmp_path):
    recs = json.loads((shared_data_dir / "counterfact_sample.json").read_text())
    rec = dict(recs[0])
    rec["requested_rewrite"] = [recs[0]["requested_rewrite"], recs[1]["requested_rewrite"]]
    rec["reference_texts"] = ["Seoul is a city of ten million people."]
    p = tmp_path / "mcf.json"
    p.write_text(json.dumps([rec]))
    (c,) = load_cases(p)
    assert c.rewrite.subject == "Japan"
    assert [r.subject for r in c.extra_rewrites] == ["Brazil"]
    assert [(r.prompt, r.target_new, r.target_true) for r in c.extra_rewrites] == [
        ("{} is located in the continent of", "Europe", "South America")]
    assert [p.prompt for p in c.probes_of("rewrite")] == ["The capital of Japan is",
                                                           "Brazil is located in the continent of"]
    assert c.meta["reference_texts"] == ["Seoul is a city of ten million people."]


def test_zsre_values(shared_data_dir):
    cases = load_cases(shared_data_dir / "zsre_mend_eval_sample.json")
    c = cases[0]
    assert c.case_id == "0"
    assert (c.rewrite.prompt, c.rewrite.subject, c.rewrite.target_new, c.rewrite.target_true) == (
        "Which mountain range is {} part of?", "Mount Everest", "Andes", "Himalayas")
    (para,) = c.probes_of("paraphrase")
    assert (para.prompt, para.target, para.foil) == ("Mount Everest belongs to which mountain range?", "Andes",
                                                      "Himalayas")
    (loc,) = c.probes_of("locality")
    assert loc.prompt == "who painted the mona lisa?"
    assert loc.target == "Leonardo da Vinci" and loc.foil is None
    assert loc.meta["original_prompt"] == "nq question: who painted the mona lisa"
    assert c.meta["cond"] == "Himalayas >> Andes || Which mountain range is Mount Everest part of?"
    assert c.meta["pred"] == "Himalayas"
    amazon = cases[2]
    assert amazon.rewrite.prompt == "On which continent is the {}?" and amazon.rewrite.subject == "Amazon River"
    assert cases[1].probes_of("locality")[0].target == "100"
    assert cases[5].rewrite.target_new == "Dennis Ritchie" and cases[5].rewrite.target_true == "Guido van Rossum"


def test_zsre_easyedit_portability_variant(tmp_path):
    rec = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
           "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
           "rephrase": "What university did Watts Humphrey take part in?",
           "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving",
           "portability": {
               "Subject_Replace": [{"prompt": "What university did W. S. Humphrey attend?",
                                    "ground_truth": "University of Michigan"}],
               "Reverse_Relation": [{"prompt": "Which famous alumnus attended the University of Michigan?",
                                     "answer": ["Watts Humphrey", "Humphrey"]}],
               "One_Hop": [{"prompt": "In which city is the university Watts Humphrey attended?",
                            "ground_truth": [["Ann Arbor", "Ann Arbor, Michigan"]]}]},
           "locality": {"Other_Attribution": [{"prompt": "Watts Humphrey was born in", "ground_truth": "Tucson"}]}}
    p = tmp_path / "zsre_portability.json"
    p.write_text(json.dumps([rec]))
    assert detect_format(p) == "zsre"
    (c,) = load_cases(p)
    port = c.probes_of("portability")
    assert [p.meta["subtype"] for p in port] == ["subject_replace", "reverse_relation", "one_hop"]
    assert (port[0].target, port[0].foil) == ("University of Michigan", "Illinois Institute of Technology")
    assert (port[1].target, port[1].aliases, port[1].foil) == ("Watts Humphrey", ("Humphrey",), None)
    assert (port[2].target, port[2].aliases) == ("Ann Arbor", ("Ann Arbor, Michigan",))
    (oa,) = c.probes_of("other_attribution")
    assert (oa.prompt, oa.target, oa.meta["subtype"]) == ("Watts Humphrey was born in", "Tucson", "other_attribution")
    assert c.probes_of("locality")[0].prompt == "who played desmond doss father in hacksaw ridge?"


def test_knowedit_values(shared_data_dir):
    cases = load_cases(shared_data_dir / "knowedit_wiki_counterfact_sample.json")
    c = cases[1]
    assert (c.rewrite.prompt, c.rewrite.subject, c.rewrite.target_new, c.rewrite.target_true) == (
        "Who is the author of {}?", "Harry Potter", "Stephen King", "J. K. Rowling")
    assert [(p.prompt, p.target) for p in c.probes_of("paraphrase")] == [
        ("Who wrote the Harry Potter books?", "Stephen King")]
    port = c.probes_of("portability")
    assert [(p.meta["subtype"], p.target) for p in port] == [
        ("subject_aliasing", "Stephen King"), ("reasoning", "Maine"), ("logical_generalization", "Harry Potter")]
    assert port[0].foil == "J. K. Rowling" and port[1].foil is None
    (loc,) = c.probes_of("locality")
    assert (loc.prompt, loc.target, loc.meta["subtype"]) == (
        "What is the first Harry Potter book called?", "Harry Potter and the Philosopher's Stone",
        "relation_specificity")
    # empty Logical_Generalization list -> no probe of that subtype
    assert [p.meta["subtype"] for p in cases[0].probes_of("portability")] == ["subject_aliasing", "reasoning"]
    assert cases[2].probes_of("locality")[0].target == "1991"


def test_knowedit_list_ground_truth_and_list_prompts(tmp_path):
    rec = {"subject": "Python", "prompt": "Who created the Python programming language?",
           "target_new": "Dennis Ritchie", "ground_truth": ["Guido van Rossum", "Guido"],
           "portability": {"reasoning": [{"prompt": ["Q1 about Python?", "Q2 about Python?"],
                                          "ground_truth": [["C", "C language"], ["Unix"]]}]},
           "locality": {"Relation_Specificity": [{"prompt": "Python was first released in",
                                                  "ground_truth": [["1991"]]}]}}
    p = tmp_path / "ke.json"
    p.write_text(json.dumps([rec]))
    (c,) = load_cases(p)
    assert c.rewrite.target_true == "Guido van Rossum" and c.meta["true_aliases"] == ["Guido"]
    port = c.probes_of("portability")
    assert [(q.prompt, q.target, q.aliases) for q in port] == [("Q1 about Python?", "C", ("C language",)),
                                                               ("Q2 about Python?", "Unix", ())]
    assert c.probes_of("locality")[0].target == "1991"


def test_mquake_values(shared_data_dir):
    cases = load_cases(shared_data_dir / "mquake_cf_sample.json")
    c1, c2 = cases
    assert c1.case_id == "1" and c2.case_id == "2"
    assert (c1.rewrite.prompt, c1.rewrite.subject, c1.rewrite.target_new, c1.rewrite.target_true) == (
        "{} is a citizen of", "Taylor Swift", "Canada", "United States of America")
    assert c1.extra_rewrites == ()
    mh = c1.probes_of("multihop")
    assert [p.prompt for p in mh][0] == "What is the capital of the country of citizenship of Taylor Swift?"
    assert len(mh) == 3
    assert all(p.target == "Ottawa" and p.aliases == ("Ottawa, Ontario",) and p.foil == "Washington, D.C."
               for p in mh)
    assert {p.meta["group"] for p in mh} == {"1"} and [p.meta["phrasing"] for p in mh] == [0, 1, 2]
    assert mh[0].meta["foil_aliases"] == ["Washington", "DC"]
    port = c1.probes_of("portability")
    assert [(p.prompt, p.target, p.foil, p.meta["subtype"]) for p in port] == [
        ("Taylor Swift is a citizen of", "Canada", "United States of America", "single_hop"),
        ("The capital of Canada is", "Ottawa", "Washington, D.C.", "single_hop")]
    assert port[1].meta["question"] == "What is the capital of Canada?"
    # two requested rewrites -> primary + extra, one rewrite probe each
    assert c2.rewrite.subject == "The Hobbit" and c2.rewrite.target_new == "Charles Dickens"
    (extra,) = c2.extra_rewrites
    assert (extra.prompt, extra.subject, extra.target_new, extra.target_true) == (
        "{} was born in the country of", "Charles Dickens", "France", "United Kingdom")
    assert [p.prompt for p in c2.probes_of("rewrite")] == ["The author of The Hobbit is",
                                                           "Charles Dickens was born in the country of"]
    assert all(p.target == "France" and p.aliases == ("French Republic",) and p.foil == "South Africa"
               for p in c2.probes_of("multihop"))
    assert c2.meta["orig"]["edit_triples"] == [["Q74287", "P50", "Q5686"], ["Q5686", "P19", "Q142"]]
    assert c2.meta["rewrite_questions"][1] == "In which country was Charles Dickens born?"


def test_ripple_values(shared_data_dir):
    c1, c2 = load_cases(shared_data_dir / "rippleedits_sample.json")
    assert (c1.rewrite.prompt, c1.rewrite.subject, c1.rewrite.target_new, c1.rewrite.target_true) == (
        "The name of the country of citizenship of {} is", "Leonardo DiCaprio", "Syria", "United States of America")
    assert (c2.rewrite.prompt, c2.rewrite.subject, c2.rewrite.target_new, c2.rewrite.target_true) == (
        "The name of the head of government of {} is", "Norway", "Olaf Scholz", "Jonas Gahr St\u00f8re")
    port = {p.meta["criterion"]: p for p in c1.probes_of("portability")}
    assert set(port) == {"Compositionality_I", "Subject_Aliasing"}
    comp = port["Compositionality_I"]
    assert comp.target == "Damascus" and comp.aliases == ("Dimashq",) and comp.meta["subtype"] == "compositionality_i"
    assert comp.meta["condition_queries"] == [{"prompt": "The name of the capital city of Syria is",
                                               "target": "Damascus", "aliases": ["Dimashq"]}]
    assert comp.meta["test_condition"] == "OR"
    alias = port["Subject_Aliasing"]
    assert (alias.prompt, alias.target, alias.foil, alias.aliases) == (
        "The name of the country of citizenship of Leo DiCaprio is", "Syria", "United States of America",
        ("Syrian Arab Republic",))
    # Relation_Specificity on the same subject -> other_attribution
    (oa,) = c1.probes_of("other_attribution")
    assert (oa.prompt, oa.target, oa.meta["subtype"]) == ("The name of the mother of Leonardo DiCaprio is",
                                                          "Irmelin Indenbirken", "relation_specificity")
    assert c1.probes_of("locality") == ()
    assert c2.probes_of("other_attribution")[0].target == "Oslo"
    assert c2.probes_of("portability")[0].target == "Osnabr\u00fcck"
    assert c1.meta["example_type"] == "popular" and c1.meta["relation"] == "COUNTRY_OF_CITIZENSHIP"


def test_ripple_locality_when_other_subject_and_unknown_relation_fallback(shared_data_dir, tmp_path):
    recs = json.loads((shared_data_dir / "rippleedits_sample.json").read_text())
    rec = recs[1]
    rec["Forgetfulness"] = [{"test_queries": [{"prompt": "The name of the head of government of Sweden is",
                                              "answers": [{"value": "Ulf Kristersson", "aliases": []}]}],
                             "test_condition": "AND", "condition_queries": []}]
    rec["edit"]["relation"] = "FAVOURITE_DISH"
    rec["edit"]["prompt"] = "The favourite dish of Norway is fish soup."
    rec["edit"]["original_fact"]["prompt"] = "The favourite dish of Norway is lutefisk."
    p = tmp_path / "ripple.json"
    p.write_text(json.dumps([rec]))
    (c,) = load_cases(p)
    assert (c.rewrite.prompt, c.rewrite.subject, c.rewrite.target_new, c.rewrite.target_true) == (
        "The favourite dish of {} is", "Norway", "fish soup", "lutefisk")
    (loc,) = c.probes_of("locality")
    assert (loc.target, loc.meta["subtype"], loc.meta["test_condition"]) == ("Ulf Kristersson", "forgetfulness", "AND")


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_limit_and_sample(shared_data_dir, name):
    path = shared_data_dir / name
    full = load_cases(path)
    assert load_cases(path, limit=1) == full[:1]
    assert load_cases(path, limit=100) == full
    assert load_cases(path, limit=0) == []
    s1 = load_cases(path, sample=2, seed=3)
    assert len(s1) == 2 and s1 == load_cases(path, sample=2, seed=3)
    assert all(c in full for c in s1)
    ids = [c.case_id for c in full]
    assert [ids.index(c.case_id) for c in s1] == sorted(ids.index(c.case_id) for c in s1)  # file order
    assert load_cases(path, sample=len(full) + 5) == full
    assert all(c in full[:2] for c in load_cases(path, limit=2, sample=1, seed=0))


def test_sample_seed_changes_selection(shared_data_dir):
    path = shared_data_dir / "counterfact_sample.json"
    picks = {tuple(c.case_id for c in load_cases(path, sample=3, seed=s)) for s in range(8)}
    assert len(picks) > 1


def test_probe_kinds_are_canonical(shared_data_dir):
    valid = {k.value for k in ProbeKind}
    for name in SAMPLES:
        for c in load_cases(shared_data_dir / name):
            assert set(c.probes) <= valid


def test_packaged_samples_match_the_shared_ones():
    """The package ships copies of ``../shared/data`` (the demo and fresh clones use them): they must not drift."""
    from tests.conftest import PACKAGED_DATA, REPO

    shared = REPO.parent / "shared" / "data"
    names = sorted(p.name for p in PACKAGED_DATA.iterdir() if p.suffix == ".json")
    assert len(names) >= 5
    if not shared.is_dir():
        pytest.skip("../shared/data is not beside this checkout (the packaged copies are used)")
    for n in names:
        assert (shared / n).read_bytes() == (PACKAGED_DATA / n).read_bytes(), n
