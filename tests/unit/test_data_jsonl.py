"""editlens JSON Lines: save/load round trip, hand-written files, and the `editlens data` CLI."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from editlens.cli.data import data
from editlens.data import Probe, Rewrite, detect_format, load_cases, make_case, save_cases, synthetic_cases
from editlens.errors import DataFormatError

SAMPLES = ["counterfact_sample.json", "zsre_mend_eval_sample.json", "knowedit_wiki_counterfact_sample.json",
           "mquake_cf_sample.json", "rippleedits_sample.json"]


@pytest.mark.parametrize("name", SAMPLES)
def test_round_trip_samples(shared_data_dir, tmp_path, name):
    cases = load_cases(shared_data_dir / name)
    out = save_cases(cases, tmp_path / "out.jsonl")
    assert detect_format(out) == "jsonl"
    back = load_cases(out)
    assert back == cases
    # the file is one JSON object per line
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(cases) and all(json.loads(ln)["case_id"] for ln in lines)


def test_round_trip_synthetic_gzip_and_no_rewrite_probe(tmp_path):
    cases = synthetic_cases(25, seed=4)
    bare = make_case("bare", Rewrite("{} likes", "Ana", "tea", None), {"paraphrase": [Probe("Ana enjoys", "tea")]},
                     add_rewrite_probe=False)
    cases.append(bare)
    out = save_cases(cases, tmp_path / "sub" / "cases.jsonl.gz")
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    back = load_cases(out)
    assert back == cases
    assert back[-1].probes_of("rewrite") == ()
    assert load_cases(out, limit=3) == cases[:3]


def test_hand_written_jsonl(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text("\n".join([
        json.dumps({"case_id": 7, "rewrite": {"prompt": "{} is located in", "subject": "Eiffel Tower",
                                              "target_new": "Rome", "target_true": "Paris"},
                    "probes": {"paraphrase": [{"prompt": "The Eiffel Tower stands in", "target": "Rome",
                                               "foil": "Paris"}],
                               "neighborhood": [{"prompt": "The Louvre is located in", "target": "Paris",
                                                 "foil": "Rome", "aliases": ["Paris, France"], "meta": {"i": 1}}]}}),
        "",
        json.dumps({"case_id": "b", "rewrite": {"prompt": "{} speaks", "subject": "Ana", "target_new": "Greek"}}),
    ]) + "\n")
    a, b = load_cases(p)
    assert a.case_id == "7" and a.rewrite.text == "Eiffel Tower is located in"
    assert [(q.prompt, q.target, q.foil) for q in a.probes_of("rewrite")] == [("Eiffel Tower is located in", "Rome",
                                                                               "Paris")]
    nb = a.probes_of("neighborhood")[0]
    assert nb.aliases == ("Paris, France",) and nb.meta == {"i": 1} and nb.answers == ("Paris", "Paris, France")
    assert b.rewrite.target_true is None and b.probes_of("rewrite")[0].foil is None


def test_jsonl_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    good = {"case_id": 0, "rewrite": {"prompt": "{} speaks", "subject": "Ana", "target_new": "Greek"}}
    bad = {"case_id": 1, "rewrite": {"prompt": "{} speaks", "subject": "Ana", "target_new": "Greek"},
           "probes": {"paraphrasing": []}}
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataFormatError) as ei:
        load_cases(p)
    assert ei.value.record == 1 and ei.value.field == "probes.paraphrasing" and "unknown probe kind" in str(ei.value)
    bad["probes"] = {"paraphrase": [{"target": "Greek"}]}
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataFormatError) as ei:
        load_cases(p)
    assert ei.value.field == "probes.paraphrase[0].prompt"


def test_save_rejects_non_json_meta(tmp_path):
    case = make_case("x", Rewrite("{} is", "A", "B"), meta={"obj": object()})
    with pytest.raises(DataFormatError) as ei:
        save_cases([case], tmp_path / "x.jsonl")
    assert ei.value.field == "meta"
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_inspect(shared_data_dir):
    r = CliRunner().invoke(data, ["inspect", str(shared_data_dir / "counterfact_sample.json")])
    assert r.exit_code == 0, r.output
    out = r.output
    assert "format:  counterfact (detected)" in out
    assert "cases:   8" in out
    for line in ("rewrite                   8 probes in      8 cases",
                 "paraphrase               16 probes in      8 cases",
                 "neighborhood             16 probes in      8 cases",
                 "attribute                16 probes in      8 cases",
                 "generation               16 probes in      8 cases"):
        assert line in out, out
    case = json.loads(out[out.index("{"):])
    assert case["case_id"] == "0" and case["rewrite"]["subject"] == "Japan"
    r = CliRunner().invoke(data, ["inspect", str(shared_data_dir / "mquake_cf_sample.json"), "--limit", "1",
                                  "--format", "mquake"])
    assert r.exit_code == 0 and "cases:   1" in r.output and "format:  mquake\n" in r.output
    assert "multihop                  3 probes in      1 cases" in r.output


def test_cli_errors_are_clean(tmp_path, shared_data_dir):
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"a\": 1}")
    r = CliRunner().invoke(data, ["inspect", str(bad)])
    assert r.exit_code != 0 and "not valid JSON" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(data, ["inspect", str(shared_data_dir / "zsre_mend_eval_sample.json"), "--format", "xyz"])
    assert r.exit_code != 0 and "unknown format 'xyz'" in r.output


def test_cli_convert_and_synth(tmp_path, shared_data_dir):
    out = tmp_path / "z.jsonl"
    r = CliRunner().invoke(data, ["convert", str(shared_data_dir / "zsre_mend_eval_sample.json"), str(out),
                                  "--sample", "3", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert load_cases(out) == load_cases(shared_data_dir / "zsre_mend_eval_sample.json", sample=3, seed=1)
    out2 = tmp_path / "s.jsonl"
    r = CliRunner().invoke(data, ["synth", "5", str(out2), "--seed", "2"])
    assert r.exit_code == 0 and load_cases(out2) == synthetic_cases(5, seed=2)
