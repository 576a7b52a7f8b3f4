"""Malformed files and records raise DataFormatError naming the file, the record and the field."""
from __future__ import annotations

import copy
import json

import pytest

from editlens.data import detect_format, load_cases
from editlens.errors import DataFormatError, EditlensError


def _write(tmp_path, obj, name="data.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def _err(path, **kw) -> DataFormatError:
    with pytest.raises(DataFormatError) as ei:
        load_cases(path, **kw)
    assert isinstance(ei.value, EditlensError)
    assert str(path) in str(ei.value)
    return ei.value


@pytest.fixture()
def cf(shared_data_dir):
    return json.loads((shared_data_dir / "counterfact_sample.json").read_text())


@pytest.fixture()
def zsre(shared_data_dir):
    return json.loads((shared_data_dir / "zsre_mend_eval_sample.json").read_text())


def _check(e: DataFormatError, record: int, field: str, words: str):
    msg = str(e)
    assert e.record == record and f"record {record}" in msg, msg
    assert e.field == field and repr(field) in msg, msg
    assert words in msg, msg


def test_missing_field(tmp_path, cf):
    del cf[3]["requested_rewrite"]["subject"]
    _check(_err(_write(tmp_path, cf)), 3, "requested_rewrite.subject", "missing required field")


def test_missing_nested_target(tmp_path, cf):
    del cf[2]["requested_rewrite"]["target_new"]["str"]
    _check(_err(_write(tmp_path, cf)), 2, "requested_rewrite.target_new.str", "missing")


def test_wrong_type(tmp_path, cf):
    cf[5]["paraphrase_prompts"] = "just one string"
    _check(_err(_write(tmp_path, cf)), 5, "paraphrase_prompts", "expected an array, got string")
    cf[5]["paraphrase_prompts"] = ["ok", 42.5, None]
    # numbers are not strings (docs/data.md): no silent conversion
    _check(_err(_write(tmp_path, cf)), 5, "paraphrase_prompts[1]", "expected a string, got number")
    cf[5]["paraphrase_prompts"] = ["ok", None]
    _check(_err(_write(tmp_path, cf)), 5, "paraphrase_prompts[1]", "expected a string, got null")


def test_record_not_an_object(tmp_path, cf):
    cf[1] = ["not", "a", "record"]
    e = _err(_write(tmp_path, cf))
    assert e.record == 1 and "expected a JSON object" in str(e)


def test_empty_target(tmp_path, cf, zsre):
    cf[4]["requested_rewrite"]["target_new"]["str"] = "  "
    _check(_err(_write(tmp_path, cf)), 4, "requested_rewrite.target_new.str", "must not be empty")
    zsre[1]["alt"] = ""
    _check(_err(_write(tmp_path, zsre, "z.json")), 1, "alt", "must not be empty")


def test_template_without_placeholder(tmp_path, cf):
    cf[0]["requested_rewrite"]["prompt"] = "The capital of Japan is"
    _check(_err(_write(tmp_path, cf)), 0, "requested_rewrite.prompt", "exactly one '{}'")


def test_subject_absent_from_prompt(tmp_path, zsre, shared_data_dir):
    zsre[3]["subject"] = "Hermione Granger"
    e = _err(_write(tmp_path, zsre))
    _check(e, 3, "src", "does not occur")
    assert "Hermione Granger" in str(e)
    ke = json.loads((shared_data_dir / "knowedit_wiki_counterfact_sample.json").read_text())
    ke[2]["subject"] = "Ruby"
    _check(_err(_write(tmp_path, ke, "ke.json")), 2, "prompt", "does not occur")


def test_subject_case_insensitive_match_is_accepted(tmp_path, zsre):
    zsre[0]["subject"] = "mount everest"
    c = load_cases(_write(tmp_path, zsre))[0]
    assert c.rewrite.subject == "Mount Everest" and c.rewrite.prompt == "Which mountain range is {} part of?"


def test_empty_file(tmp_path):
    for text in ("", "   \n\n"):
        e = _err(_write(tmp_path, text))
        assert "empty" in str(e)
    e = _err(_write(tmp_path, "[]", "empty_array.json"))
    assert "no records" in str(e)


def test_not_json_with_line_and_column(tmp_path, cf):
    text = json.dumps(cf, indent=1)
    lines = text.split("\n")
    lines[6] = lines[6] + ","  # a trailing comma -> invalid JSON on line 7 or 8
    e = _err(_write(tmp_path, "\n".join(lines)))
    assert "not valid JSON" in str(e) and "line " in str(e) and "column " in str(e)
    e = _err(_write(tmp_path, "case_id,prompt\n0,hello\n", "data.csv"))
    assert "not valid JSON" in str(e) and "line 1, column 1" in str(e)


def test_jsonl_bad_line_names_record_and_line(tmp_path, cf):
    lines = [json.dumps(r) for r in cf]
    lines[3] = lines[3][:-5]  # truncated record
    p = _write(tmp_path, "\n".join(lines) + "\n", "cf.jsonl")
    e = _err(p)
    assert e.record == 3 and "line 4" in str(e) and "not valid JSON" in str(e)
    # records before the bad one still load with limit (lazy decoding)
    assert len(load_cases(p, limit=3)) == 3


def test_unknown_format_lists_formats(tmp_path):
    p = _write(tmp_path, [{"question": "q", "answer": "a"}])
    for call in (lambda: detect_format(p), lambda: load_cases(p)):
        with pytest.raises(DataFormatError) as ei:
            call()
        msg = str(ei.value)
        assert "unknown format" in msg and str(p) in msg
        for name in ("counterfact", "zsre", "mquake", "ripple", "knowedit", "jsonl"):
            assert name in msg
    with pytest.raises(DataFormatError) as ei:
        load_cases(p, format="wikibio")
    assert "unknown format 'wikibio'" in str(ei.value) and "counterfact" in str(ei.value)


def test_missing_file(tmp_path):
    e = _err(tmp_path / "nope.json")
    assert "no such file" in str(e)


def test_wrong_forced_format_names_field(tmp_path, shared_data_dir):
    p = shared_data_dir / "zsre_mend_eval_sample.json"
    with pytest.raises(DataFormatError) as ei:
        load_cases(p, format="counterfact")
    assert ei.value.record == 0 and ei.value.field == "requested_rewrite"


def test_bad_limit_and_sample(shared_data_dir):
    p = shared_data_dir / "counterfact_sample.json"
    for kw in ({"limit": -1}, {"sample": -2}, {"limit": 1.5}):
        with pytest.raises(DataFormatError):
            load_cases(p, **kw)


def test_mquake_ripple_knowedit_errors(tmp_path, shared_data_dir):
    mq = json.loads((shared_data_dir / "mquake_cf_sample.json").read_text())
    bad = copy.deepcopy(mq)
    bad[1]["requested_rewrite"][1]["target_new"]["str"] = ""
    _check(_err(_write(tmp_path, bad, "mq.json")), 1, "requested_rewrite[1].target_new.str", "must not be empty")
    bad = copy.deepcopy(mq)
    del bad[0]["new_answer"]
    _check(_err(_write(tmp_path, bad, "mq2.json")), 0, "new_answer", "missing")
    rp = json.loads((shared_data_dir / "rippleedits_sample.json").read_text())
    bad = copy.deepcopy(rp)
    bad[1]["Compositionality_I"][0]["test_queries"][0]["answers"][0]["value"] = ["x"]
    _check(_err(_write(tmp_path, bad, "rp.json")), 1, "Compositionality_I[0].test_queries[0].answers[0].value",
           "expected a string")
    bad = copy.deepcopy(rp)
    bad[0]["edit"]["relation"] = "X"
    bad[0]["edit"]["prompt"] = "Something entirely different."
    _check(_err(_write(tmp_path, bad, "rp2.json")), 0, "edit.relation", "cannot locate the subject")
    ke = json.loads((shared_data_dir / "knowedit_wiki_counterfact_sample.json").read_text())
    ke[1]["portability"]["Reasoning"][0] = {"prompt": "Where?"}
    _check(_err(_write(tmp_path, ke, "ke.json")), 1, "portability.Reasoning[0].ground_truth", "missing")


def test_skip_invalid(tmp_path, cf):
    del cf[2]["requested_rewrite"]
    p = _write(tmp_path, cf)
    with pytest.warns(UserWarning, match="skipped 1 invalid record"):
        cases = load_cases(p, skip_invalid=True)
    assert [c.case_id for c in cases] == ["0", "1", "3", "4", "5", "6", "7"]


# ---------------------------------------------------------------------------------------- issue 13, item 14
def _jsonl_rec(**rw):
    base = {"prompt": "The capital of {} is", "subject": "Japan", "target_new": "Seoul", "target_true": "Tokyo"}
    base.update(rw)
    return {"case_id": "0", "rewrite": base}


@pytest.mark.parametrize("field,value,tname", [("target_new", 5, "integer"), ("target_true", 1991, "integer"),
                                              ("target_new", 2.5, "number"), ("subject", 7, "integer")])
def test_number_is_not_a_string_jsonl(tmp_path, field, value, tname):
    p = _write(tmp_path, json.dumps(_jsonl_rec(**{field: value})) + "\n", "d.jsonl")
    e = _err(p)
    _check(e, 0, f"rewrite.{field}", f"expected a string, got {tname}")
    assert json.dumps(str(value)) in str(e)  # says how to write it instead


def test_number_target_counterfact(tmp_path, cf):
    bad = copy.deepcopy(cf)
    bad[2]["requested_rewrite"]["target_new"]["str"] = 5
    e = _err(_write(tmp_path, bad))
    _check(e, 2, "requested_rewrite.target_new.str", "expected a string, got integer")


def test_number_answer_zsre(tmp_path, zsre):
    bad = copy.deepcopy(zsre)
    bad[1]["alt"] = 1991
    e = _err(_write(tmp_path, bad))
    _check(e, 1, "alt", "expected a string, got integer")


def test_target_new_equals_target_true_jsonl(tmp_path):
    p = _write(tmp_path, json.dumps(_jsonl_rec(target_new="Tokyo")) + "\n", "d.jsonl")
    e = _err(p)
    _check(e, 0, "rewrite.target_new", "equals target_true")


def test_target_new_equals_target_true_counterfact(tmp_path, cf):
    bad = copy.deepcopy(cf)
    bad[3]["requested_rewrite"]["target_new"]["str"] = bad[3]["requested_rewrite"]["target_true"]["str"]
    e = _err(_write(tmp_path, bad))
    _check(e, 3, "requested_rewrite.target_new", "equals target_true")
    # skip_invalid keeps the other records (one warning naming the record)
    with pytest.warns(UserWarning, match="equals target_true"):
        cases = load_cases(_write(tmp_path, bad), skip_invalid=True)
    assert len(cases) == len(cf) - 1


def test_target_new_equals_target_true_make_case():
    from editlens.data.schema import Rewrite, make_case

    rw = Rewrite("The capital of {} is", "Japan", "Tokyo", "Tokyo")
    with pytest.raises(DataFormatError, match="equals target_true"):
        make_case("c0", rw)
    with pytest.raises(DataFormatError, match="rewrite.target_new"):
        rw.validate()


def test_metric_without_probes_of_its_kind_warns(tiny_llama):
    from editlens.data import synthetic_cases
    from editlens.evaluate import ModelSystem, evaluate

    cases = [c.with_probes("generation", []).with_probes("portability", []) for c in synthetic_cases(2)]
    assert not any(c.probes_of("portability") for c in cases)
    base = ModelSystem(tiny_llama)
    with pytest.warns(UserWarning) as rec:
        res = evaluate(base, cases, base=base, metrics=["s_acc", "portability_tacc", "fluency"], progress=False)
    msgs = [str(w.message) for w in rec]
    hit = [m for m in msgs if "portability_tacc" in m]
    assert hit and "portability" in hit[0] and "no rows" in hit[0], msgs
    assert any("fluency" in m and "generation" in m for m in msgs), msgs
    assert not any("'s_acc'" in m for m in msgs)  # a metric that found its probes is not named
    assert set(res.to_pandas().metric) == {"s_acc"}
