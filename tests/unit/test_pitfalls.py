"""ConflictEdit / RoundEdit loaders and metrics (issue 17: the pitfalls experiments).

Loaders: the shipped samples (first records of the public files) and, when ``../shared/data/pitfalls`` is there,
the full public files, every record; the mapping of records to facts checked against the raw JSON; bad records
name file, record and field. Metrics: hand-computed values on hand-set log-probabilities (JS checked with scipy),
the metric contract on the pitfalls cases, and the staged evaluation checked against the older drivers
(``conflict_scores`` / ``round_edit_scores``, written separately) on a tiny model.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import editlens
from editlens.data.formats import detect_format
from editlens.data.formats.pitfalls import is_staged, stage_cases
from editlens.errors import DataFormatError
from editlens.evaluate.core import BASE, EDITED, Answers, Score
from editlens.evaluate.pitfalls import (AfterFirstEdit, ConflictMagnitude, ConflictScore, Distortion, FailureRate,
                                        IgnoreRate, RoundSuccess, StagedSystem, TiedFactDamage, after_first_requests,
                                        answer_after_first)
from editlens.lm.ops import TeacherForced

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "editlens" / "resources" / "data" / "pitfalls"
FULL = REPO.parent / "shared" / "data" / "pitfalls"
EXAMPLES = REPO / "examples"
PITFALLS_METRICS = ["conflict_score", "conflict_magnitude", "tied_fact_damage", "round_success", "distortion",
                    "ignore_rate", "failure_rate"]
SAMPLE_FILES = {"reverse_edit_sample.json": ("conflictedit", 3), "composite_edit_sample.json": ("conflictedit", 3),
                "coverage_edit_sample.json": ("conflictedit", 3), "easy_sample.json": ("roundedit", 4),
                "hard_sample.json": ("roundedit", 4)}


def _raw(name: str) -> list[dict]:
    return json.loads((SAMPLES / name).read_text())


# ================================================================================================ loaders
@pytest.mark.parametrize("name", sorted(SAMPLE_FILES))
def test_samples_are_detected_and_load(name):
    fmt, n = SAMPLE_FILES[name]
    assert detect_format(SAMPLES / name) == fmt
    cases = editlens.load_cases(SAMPLES / name)
    assert len(cases) == n
    assert all(is_staged(c) and len(c.rewrites) == 2 for c in cases)


def test_samples_are_the_first_records_of_the_public_files():
    if not FULL.is_dir():
        pytest.skip("../shared/data/pitfalls is not beside this checkout")
    for name in SAMPLE_FILES:
        full = json.loads((FULL / name.replace("_sample", "")).read_text())
        sample = _raw(name)
        assert sample == full[:len(sample)], name
    for name in ("conflict_prompts.json", "round_prompts.json"):
        assert (SAMPLES / name).read_bytes() == (FULL / name).read_bytes()


@pytest.mark.parametrize("name,fmt,n,degenerate", [
    ("reverse_edit.json", "conflictedit", 2500, 0), ("composite_edit.json", "conflictedit", 2000, 24),
    ("coverage_edit.json", "conflictedit", 2500, 1), ("easy.json", "roundedit", 2500, 0),
    ("hard.json", "roundedit", 2500, 0)])
def test_full_public_files_load_every_record(name, fmt, n, degenerate):
    if not (FULL / name).is_file():
        pytest.skip(f"{FULL / name} is not there")
    raw = json.loads((FULL / name).read_text())
    cases = editlens.load_cases(FULL / name)
    assert detect_format(FULL / name) == fmt
    assert len(cases) == len(raw) == n  # composite_edit.json holds 2,000 records (the README says 2,500 each)
    assert sum("degenerate" in c.meta for c in cases) == degenerate
    assert [c.case_id for c in cases] == [str(i) for i in range(n)]
    assert all(len(c.rewrites) == 2 for c in cases)


def test_composite_record_maps_to_the_survey_facts():
    rec = _raw("composite_edit_sample.json")[0]
    c = editlens.load_cases(SAMPLES / "composite_edit_sample.json", limit=1)[0]
    e1, e2 = rec["edits"]
    tmpl = json.loads((SAMPLES / "conflict_prompts.json").read_text())
    assert c.rewrite.subject == e1["subject"]["label"] and c.rewrite.target_new == e1["new_object"]["label"]
    assert c.rewrite.target_true == e1["object"]["label"]
    assert c.extra_rewrites[0].target_new == e2["new_object"]["label"]
    assert c.extra_rewrites[0].target_true == e2["true_object"]["label"] == e1["new_object"]["label"]
    f = c.meta["facts"]
    s1, r1 = e1["subject"]["label"], e1["relation"]
    prompts = [r1["prompt"].replace("{}", s1)] + [t.replace("{}", s1) for t in tmpl[r1["id"]]]
    assert f["k_o"] == {"subject": s1, "relation": r1["id"], "object": e1["new_object"]["label"], "prompts": prompts}
    assert f["k_n"] == {"subject": s1, "relation": r1["id"], "object": e2["new_object"]["label"], "prompts": prompts}
    tied = rec["triples"][rec["prerequisites"][0]]
    assert f["k_t"]["object"] == tied["object"]["label"] and f["k_t"]["subject"] == tied["subject"]["label"]
    assert f["k_t"]["prompts"][0] == tied["relation"]["prompt"].replace("{}", tied["subject"]["label"])
    assert len(f["k_t"]["prompts"]) == 1 + len(tmpl[tied["relation"]["id"]])
    assert c.meta["rule"] == rec["rule"] and c.meta["conflict_kind"] == "composite"
    assert [p.target for p in c.probes_of("other_attribution")] == [tied["object"]["label"]] * len(f["k_t"]["prompts"])


def test_reverse_and_coverage_records_map_to_the_survey_facts():
    rec = _raw("reverse_edit_sample.json")[0]
    c = editlens.load_cases(SAMPLES / "reverse_edit_sample.json", limit=1)[0]
    e1, e2 = rec["edits"]
    f = c.meta["facts"]
    # e1 = (s1, r1, o1 -> o2), e2 = (o2, r2, s1 -> s2): k_o = (s1, r1, o2), k_n = (s2, r1, o2)
    assert e2["subject"]["id"] == e1["new_object"]["id"]
    assert (f["k_o"]["subject"], f["k_o"]["relation"], f["k_o"]["object"]) == (
        e1["subject"]["label"], e1["relation"]["id"], e1["new_object"]["label"])
    assert (f["k_n"]["subject"], f["k_n"]["relation"], f["k_n"]["object"]) == (
        e2["new_object"]["label"], e1["relation"]["id"], e1["new_object"]["label"])
    assert "k_t" not in f
    assert f["k_n"]["prompts"][0] == e1["relation"]["prompt"].replace("{}", e2["new_object"]["label"])
    rec = _raw("coverage_edit_sample.json")[0]
    c = editlens.load_cases(SAMPLES / "coverage_edit_sample.json", limit=1)[0]
    e1, e2 = rec["edits"]
    f = c.meta["facts"]
    assert f["k_o"]["prompts"] == f["k_n"]["prompts"]
    assert (f["k_o"]["object"], f["k_n"]["object"]) == (e1["new_object"]["label"], e2["new_object"]["label"])
    assert c.extra_rewrites[0].target_true == e1["new_object"]["label"]


def test_round_record_maps_to_a_round_trip():
    recs = _raw("easy_sample.json")
    cases = editlens.load_cases(SAMPLES / "easy_sample.json")
    tmpl = json.loads((SAMPLES / "round_prompts.json").read_text())
    for rec, c in zip(recs, cases):
        e = rec["edit"]
        o, o_star = e["object"]["label"], e["new_object"]["label"]
        assert (c.rewrite.target_true, c.rewrite.target_new) == (o, o_star)
        assert (c.extra_rewrites[0].target_true, c.extra_rewrites[0].target_new) == (o_star, o)
        assert c.meta["intermediate"] == o_star
        objs = c.meta["true_objects"]
        assert objs[0] == o and sorted(objs) == sorted(t["label"] for t in rec["true_objects"])
        assert len(c.meta["prompts"]) == 1 + len(tmpl[e["relation"]["id"]])
        assert c.meta["prompts"][0] == e["relation"]["prompt"].replace("{}", e["subject"]["label"])
        e1, e2 = stage_cases(c)
        assert e1.rewrites == (c.rewrite,) and e2.rewrites == (c.extra_rewrites[0],)
        assert e1.case_id == f"{c.case_id}/e1" and e2.meta["stage"] == 2
    # record 0 lists the edited object second: it is moved first, the others keep their order
    assert [t["label"] for t in recs[0]["true_objects"]][1] == recs[0]["edit"]["object"]["label"]
    assert cases[0].meta["true_objects"][1:] == [t["label"] for i, t in enumerate(recs[0]["true_objects"]) if i != 1]


def _write(tmp_path: Path, name: str, records: list, templates: dict | None = None) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(records))
    if templates is not None:
        (tmp_path / ("round_prompts.json" if name.startswith("r") else "conflict_prompts.json")).write_text(
            json.dumps(templates))
    return p


def _bad_conflict(mutate):
    recs = copy.deepcopy(_raw("composite_edit_sample.json")[:2])
    mutate(recs[1])
    return recs


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r["edits"][1].pop("new_object"), "edits[1].new_object"),
    (lambda r: r["edits"][0]["subject"].update(label=""), "edits[0].subject.label"),
    (lambda r: r["edits"][0]["relation"].update(prompt="The spouse of X is"), "edits[0].relation.prompt"),
    (lambda r: r["edits"].pop(), "edits"),
    (lambda r: r.update(type="lateral"), "type"),
    (lambda r: r.update(prerequisites=[7]), "prerequisites[0]"),
    (lambda r: r["triples"][0].update(object=[1]), "triples[0].object"),
])
def test_bad_conflict_records_name_file_record_and_field(tmp_path, mutate, field):
    path = _write(tmp_path, "conflict.json", _bad_conflict(mutate))
    with pytest.raises(DataFormatError) as ei:
        editlens.load_cases(path)
    e = ei.value
    assert (e.record, e.field) == (1, field), str(e)
    assert str(path) in str(e) and "record 1" in str(e)


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r["edit"].update(new_object=dict(r["edit"]["object"])), "edit.new_object"),
    (lambda r: r.update(true_objects=r["true_objects"][:1]), "true_objects"),
    (lambda r: r.update(true_objects=[t for t in r["true_objects"] if t["id"] != r["edit"]["object"]["id"]]
                        + [{"id": "Q1", "label": "x"}]), "true_objects"),
    (lambda r: r["true_objects"][1].pop("label"), "true_objects[1].label"),
    (lambda r: r["edit"]["relation"].pop("prompt"), "edit.relation.prompt"),
])
def test_bad_round_records_name_file_record_and_field(tmp_path, mutate, field):
    recs = copy.deepcopy(_raw("easy_sample.json")[:3])
    mutate(recs[2])
    path = _write(tmp_path, "round.json", recs)
    with pytest.raises(DataFormatError) as ei:
        editlens.load_cases(path)
    assert (ei.value.record, ei.value.field) == (2, field), str(ei.value)
    assert str(path) in str(ei.value)


def test_templates_beside_the_data_file_win_and_bad_ones_are_named(tmp_path):
    recs = _raw("easy_sample.json")[:1]
    rel = recs[0]["edit"]["relation"]["id"]
    path = _write(tmp_path, "round.json", recs, {rel: ["Mine: {} ->"]})
    c = editlens.load_cases(path)[0]
    subj = recs[0]["edit"]["subject"]["label"]
    assert c.meta["prompts"][1:] == [f"Mine: {subj} ->"]
    (tmp_path / "round_prompts.json").write_text(json.dumps({rel: ["no slot"]}))
    path2 = tmp_path / "sub"
    path2.mkdir()
    shutil.copy(tmp_path / "round_prompts.json", path2 / "round_prompts.json")
    shutil.copy(path, path2 / "round.json")
    with pytest.raises(DataFormatError, match=r"round_prompts\.json.*field '" + rel + r"\[0\]'"):
        editlens.load_cases(path2 / "round.json")


def test_degenerate_public_record_loads_with_a_note(tmp_path):
    rec = copy.deepcopy(_raw("coverage_edit_sample.json")[0])
    rec["edits"][0]["new_object"] = dict(rec["edits"][0]["object"])
    rec["edits"][1]["object"] = dict(rec["edits"][0]["object"])
    c = editlens.load_cases(_write(tmp_path, "cov.json", [rec]))[0]
    assert c.rewrite.target_true is None and "edits[0]" in c.meta["degenerate"]


def test_data_inspect_prints_the_counts():
    from editlens.cli.main import cli

    out = CliRunner().invoke(cli, ["data", "inspect", str(SAMPLES / "composite_edit_sample.json")])
    assert out.exit_code == 0, out.output
    assert "format:  conflictedit (detected)" in out.output and "cases:   3" in out.output
    assert "conflict kinds: composite: 3" in out.output and "tied facts: 3" in out.output
    out = CliRunner().invoke(cli, ["data", "inspect", str(SAMPLES / "easy_sample.json")])
    assert "format:  roundedit (detected)" in out.output and "true objects per case:" in out.output


# ================================================================================================ metrics by hand
def _tf(lp: float) -> TeacherForced:
    return TeacherForced(torch.tensor([0]), torch.tensor([lp], dtype=torch.float32), torch.tensor([0]))


def _hand_case(tmp_path: Path, kind: str):
    """A composite record whose facts have two prompts each (cloze + one template)."""
    rec = copy.deepcopy(_raw("composite_edit_sample.json")[0])
    tmpl = {rec["edits"][0]["relation"]["id"]: ["{} wed"], rec["triples"][0]["relation"]["id"]: ["{} has mother"]}
    return editlens.load_cases(_write(tmp_path, "conflict.json", [rec], tmpl))[0]


def _answers(case, metric, edited: dict, base: dict | None = None, mid: dict | None = None) -> Answers:
    """Answers to ``metric``'s requests from per-(prompt, object) probabilities (every prompt of a fact given its
    own value through the dicts keyed by (fact name or object, prompt index))."""
    store: dict = {EDITED: {}, BASE: {}}
    for role, req in metric.requests([case]):
        table = mid if isinstance(req, AfterFirstEdit) else (edited if role == EDITED else base)
        p = table[(req.target, req.prompt)]
        store[role][req] = math.log(p) if isinstance(req, AfterFirstEdit) else _tf(math.log(p))
    return Answers(store)


def test_conflict_metrics_by_hand(tmp_path):
    c = _hand_case(tmp_path, "composite")
    f = c.meta["facts"]
    kn, ko, kt = f["k_n"], f["k_o"], f["k_t"]
    assert len(kn["prompts"]) == len(ko["prompts"]) == len(kt["prompts"]) == 2
    # p(fact) = mean over its two prompts of exp(mean log-prob): k_n (0.3+0.1)/2 = 0.2, k_o (0.1+0.2)/2 = 0.15
    edited = {(kn["object"], kn["prompts"][0]): 0.3, (kn["object"], kn["prompts"][1]): 0.1,
              (ko["object"], ko["prompts"][0]): 0.1, (ko["object"], ko["prompts"][1]): 0.2,
              (kt["object"], kt["prompts"][0]): 0.2, (kt["object"], kt["prompts"][1]): 0.1}
    mid = {(ko["object"], ko["prompts"][0]): 0.5, (ko["object"], ko["prompts"][1]): 0.7}   # p' = 0.6
    base = {(kt["object"], kt["prompts"][0]): 0.5, (kt["object"], kt["prompts"][1]): 0.3}  # p_theta(k_t) = 0.4
    rows = {}
    for m in (ConflictScore(), ConflictMagnitude(), TiedFactDamage()):
        for r in m.rows([c], _answers(c, m, edited, base, mid)):
            rows[r.metric] = r
            assert r.probe_kind == "conflict/composite" and r.case_id == c.case_id
    assert rows["conflict_score"].value == 1.0                                      # 0.2 > 0.15
    assert rows["conflict_magnitude"].value == pytest.approx((0.6 - 0.15) / 0.6)    # 0.75
    assert rows["tied_fact_damage"].value == pytest.approx((0.4 - 0.15) / 0.4)      # 0.625
    # the old fact wins, and rises above its theta' value: CS 0, CM floored at -1
    edited[(ko["object"], ko["prompts"][0])] = edited[(ko["object"], ko["prompts"][1])] = 0.9
    mid = {k: 0.2 for k in mid}
    assert [r.value for r in ConflictScore().rows([c], _answers(c, ConflictScore(), edited))] == [0.0]
    m = ConflictMagnitude()
    assert [r.value for r in m.rows([c], _answers(c, m, edited, mid=mid))] == [-1.0]   # (0.2-0.9)/0.2 = -3.5


def test_round_metrics_by_hand():
    from scipy.spatial.distance import jensenshannon

    c = editlens.load_cases(SAMPLES / "easy_sample.json", limit=1)[0]
    prompts, objs, o_star = c.meta["prompts"], c.meta["true_objects"], c.meta["intermediate"]
    assert len(objs) == 3
    before = dict(zip(objs, (0.5, 0.3, 0.2)))
    after = dict(zip(objs, (0.6, 0.1, 0.2)))          # o_2 fell, o_3 equal (not a fall)
    base = {(o, p): before[o] for o in objs for p in prompts}
    edited = {(o, p): after[o] for o in objs for p in prompts} | {(o_star, p): 0.05 for p in prompts}
    mid = {(objs[0], p): 0.1 for p in prompts} | {(o_star, p): 0.7 for p in prompts}
    val = {}
    for m in (RoundSuccess(), Distortion(), Distortion(code_compat=True), IgnoreRate(), FailureRate()):
        (r,) = list(m.rows([c], _answers(c, m, edited, base, mid)))
        assert r.probe_kind == "round_edit"
        val[r.metric] = r.value
    P = torch.tensor([0.5, 0.3, 0.2]).double()
    Q = torch.tensor([0.6, 0.1, 0.2]).double() / 0.9
    js = float(jensenshannon(P.numpy(), Q.numpy())) ** 2      # scipy returns the square root, natural log
    assert val["distortion"] == pytest.approx(js, rel=1e-6)  # log-probs are float32
    assert val["distortion@code"] == pytest.approx(js / 3, rel=1e-6)
    assert val["ignore_rate"] == 0.5                           # 1 of the 2 other objects fell
    assert val["failure_rate"] == 0.0                          # IR must exceed 0.5
    assert val["round_success"] == 1.0                         # 0.7 > 0.1 after e1, 0.6 > 0.05 after the round trip
    mid = {k: 0.05 if k[0] == o_star else 0.1 for k in mid}    # e1 did not take: half success
    (r,) = list(RoundSuccess().rows([c], _answers(c, RoundSuccess(), edited, mid=mid)))
    assert r.value == 0.5
    after[objs[2]] = 0.19                                      # both others fell: IR 1, failure 1
    edited = {(o, p): after[o] for o in objs for p in prompts}
    assert [r.value for r in IgnoreRate().rows([c], _answers(c, IgnoreRate(), edited, base))] == [1.0]
    assert [r.value for r in FailureRate().rows([c], _answers(c, FailureRate(), edited, base))] == [1.0]


def test_staged_metrics_give_no_rows_without_theta_prime(tiny_llama):
    from editlens.evaluate import evaluate
    from editlens.system import ModelSystem

    cases = _contract_cases()
    sys_ = ModelSystem(tiny_llama)
    with pytest.warns(UserWarning, match="produced no rows"):
        res = evaluate(sys_, cases, base=sys_, metrics=["conflict_magnitude", "round_success"], cache=False,
                       progress=False)
    assert res.rows == []
    assert all(isinstance(r, AfterFirstEdit)
               for r in after_first_requests([ConflictMagnitude(), RoundSuccess()], cases))


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    """The first composite, coverage and easy records beside template files cut to one template per relation
    (2 prompts per fact instead of 11: the same code paths at a fifth of the cost)."""
    d = tmp_path_factory.mktemp("pitfalls_small")
    for name in ("conflict_prompts.json", "round_prompts.json"):
        full = json.loads((SAMPLES / name).read_text())
        (d / name).write_text(json.dumps({k: v[:1] for k, v in full.items()}))
    for name in ("composite_edit_sample.json", "coverage_edit_sample.json", "easy_sample.json"):
        (d / name).write_text(json.dumps(_raw(name)[:1]))
    return d


def _contract_cases(d: Path = SAMPLES):
    """The first composite and the first easy case (ids made unique: both files start at "0")."""
    import dataclasses

    return [dataclasses.replace(editlens.load_cases(d / n, limit=1)[0], case_id=n.split("_")[0] + ":0")
            for n in ("composite_edit_sample.json", "easy_sample.json")]


@pytest.mark.parametrize("metric", PITFALLS_METRICS)
def test_metric_contract_on_pitfalls_cases(metric, small_dir):
    """``check_metric`` on ConflictEdit/RoundEdit cases (its default contract cases have none: the registered
    check skips these metrics, saying what they need). θ′ comes from a second noisy tiny model."""
    from editlens.testing import _noisy_tiny, check_metric
    from editlens.system import ModelSystem

    cases = _contract_cases(small_dir)
    assert all(len(p) == 2 for p in [cases[0].meta["facts"]["k_n"]["prompts"], cases[1].meta["prompts"]])
    system = ModelSystem(_noisy_tiny())
    if metric in ("conflict_magnitude", "round_success"):
        from editlens.evaluate import resolve_metrics

        mid = ModelSystem(_noisy_tiny(seed=2))
        system = StagedSystem(system, answer_after_first(mid, after_first_requests(resolve_metrics([metric]), cases)))
    rep = check_metric(metric, cases=cases, system=system)
    assert rep["rows"] >= 1


def test_evaluate_staged_equals_the_conflict_and_round_drivers(tiny_llama, small_dir):
    """The registered metrics through ``evaluate_staged`` give, row for row, what the older drivers give from
    the same facts (each driver edits, measures and undoes on its own)."""
    from editlens.drivers import conflict_scores, evaluate_staged, round_edit_scores, sequential_edit_fn
    from editlens.evaluate import portability as Pm

    lm = tiny_llama
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    comp, rnd = ([c] for c in _contract_cases(small_dir))
    hp = {"stats_n_samples": 16, "stats_max_length": 32, "v_num_grad_steps": 5}
    res = evaluate_staged(lm, comp + rnd, "rome", ["pitfalls", "distortion@code"], hparams=hp, cache=False)
    got = {(r.case_id, r.metric): r.value for r in res.rows}
    assert res.meta["protocol"] == "staged" and res.meta["n_edits_applied"] == 6
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), n  # every edit undone
    c = comp[0]
    F = {k: Pm.FactQuery(tuple(v["prompts"]), v["object"]) for k, v in c.meta["facts"].items()}
    cc = Pm.ConflictCase(c.case_id, "composite", tuple(stage_cases(c)), F["k_n"], F["k_o"], F["k_t"])
    ref = conflict_scores(lm, sequential_edit_fn("rome", hparams=hp), [cc])
    want = {(r.case_id, r.metric): r.value for r in ref.rows
            if r.metric in ("conflict_score", "conflict_magnitude", "tied_fact_damage")}
    r0 = rnd[0]
    rc = Pm.RoundCase(r0.case_id, tuple(stage_cases(r0)), tuple(r0.meta["prompts"]), tuple(r0.meta["true_objects"]),
                      r0.meta["intermediate"])
    ref = round_edit_scores(lm, sequential_edit_fn("rome", hparams=hp), [rc])
    for r in ref.rows:
        want[(r.case_id, {"failure": "failure_rate"}.get(r.metric, r.metric))] = r.value
    # the code's batchmean divides each KL term by |O| (distortion@code; by hand in test_round_metrics_by_hand)
    want[(rc.case_id, "distortion@code")] = want[(rc.case_id, "distortion")] / len(rc.objects)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_eval_cli_edits_each_record_in_two_stages(tmp_path, small_dir):
    """``editlens eval --method`` on ConflictEdit data: two stages per record (IKE: no weights to train)."""
    from editlens.cli.main import cli

    out = tmp_path / "rows.csv"
    res = CliRunner().invoke(cli, ["eval", "--model", "tiny-llama", "--data", str(small_dir / "coverage_edit_sample.json"),
                                   "--limit", "1", "--method", "ike", "--metrics",
                                   "conflict_score,conflict_magnitude", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "two stages" in res.output
    import pandas as pd

    df = pd.read_csv(out)
    edited = df[df.system == "ike"]
    assert sorted(edited.metric) == ["conflict_magnitude", "conflict_score"]
    assert set(edited.probe_kind) == {"conflict/coverage"}
    assert set(df[df.system == "base"].metric) == {"conflict_score"}  # no theta' for the unedited model: no CM row


# ================================================================================================ specs
@pytest.mark.parametrize("name,units", [("repro_pitfalls_conflict.toml", 18), ("repro_pitfalls_distortion.toml", 12)])
def test_repro_specs_dry_run(tmp_path, name, units):
    """The specs dry-run on the full public files when they are there, and (always) on a copy pointing at the
    shipped samples."""
    from editlens.cli.main import cli

    text = (EXAMPLES / name).read_text()
    specs = [EXAMPLES / name] if FULL.is_dir() else []
    local = text.replace("../../shared/data/pitfalls/", f"{SAMPLES.as_posix()}/").replace(".json\"", "_sample.json\"")
    local = local.replace("limit = 20", "limit = 3").replace("sizes = [20]", "sizes = [3]")
    (tmp_path / name).write_text(local)
    specs.append(tmp_path / name)
    for spec in specs:
        res = CliRunner().invoke(cli, ["bench", str(spec), "--dry-run"])
        assert res.exit_code == 0, res.output
        assert f"units: {units} = " in res.output
    from editlens.runs.runner import load_validated_spec

    spec = load_validated_spec(tmp_path / name)
    # the survey's six rows: FT, MEND, ROME, MEMIT, SERAC, IKE (MEND and SERAC trained by the run)
    assert {m.name for m in spec.methods} == {"ft-l", "mend", "rome", "memit", "serac", "ike"}
    assert {m.name for m in spec.methods if m.trained} == {"mend", "serac"}
    assert set(spec.metrics) <= set(PITFALLS_METRICS) | {"distortion@code"}


def test_converted_to_jsonl_the_cases_keep_their_facts(tmp_path):
    """``editlens data convert`` keeps what the metrics read (case.meta), so converted files evaluate the same."""
    from editlens.data import save_cases

    for name in ("composite_edit_sample.json", "easy_sample.json"):
        cases = editlens.load_cases(SAMPLES / name)
        out = save_cases(cases, tmp_path / f"{name}.jsonl")
        back = editlens.load_cases(out)
        assert [c.meta for c in back] == [c.meta for c in cases]
        assert [c.rewrites for c in back] == [c.rewrites for c in cases] and all(is_staged(c) for c in back)
    assert editlens.load_cases(SAMPLES / "easy_sample.json", format="round") == editlens.load_cases(
        SAMPLES / "easy_sample.json")
