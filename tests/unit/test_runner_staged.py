"""The runner evaluates ConflictEdit / RoundEdit units with Li et al.'s staged protocol (each record alone: e1,
then e1+e2), so a spec gives the metrics that need the model after the first edit (conflict_magnitude,
round_success) — a batch edit of all records at once gives them no rows."""
from __future__ import annotations

import json
import textwrap

import pytest

import editlens
from editlens.runs.runner import run_spec
from editlens.runs.store import Store

SAMPLES = editlens.__path__[0] + "/resources/data/pitfalls"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two coverage records and one easy record, one template per relation (as test_pitfalls.small_dir)."""
    from pathlib import Path

    d = tmp_path_factory.mktemp("staged")
    for name in ("conflict_prompts.json", "round_prompts.json"):
        full = json.loads((Path(SAMPLES) / name).read_text())
        (d / name).write_text(json.dumps({k: v[:1] for k, v in full.items()}))
    for name, n in (("coverage_edit_sample.json", 2), ("easy_sample.json", 1)):
        (d / name).write_text(json.dumps(json.loads((Path(SAMPLES) / name).read_text())[:n]))
    return d


def test_a_spec_runs_pitfalls_units_staged(small, tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(textwrap.dedent(f"""
        name = "staged"
        model = "tiny-llama"
        metrics = ["conflict_score", "conflict_magnitude", "round_success", "distortion"]

        [[datasets]]
        path = "{(small / 'coverage_edit_sample.json').as_posix()}"

        [[datasets]]
        path = "{(small / 'easy_sample.json').as_posix()}"

        [[methods]]
        name = "ft-m"
        hparams = {{ steps = 2 }}

        [regime]
        kind = "batch"
        sizes = [1]
    """).lstrip())
    lm = editlens.load_model("tiny-llama")
    fp = lm.fingerprint
    rid = run_spec(spec, store=tmp_path / "s.sqlite", lm=lm, progress=False)
    assert lm.fingerprint == fp
    with Store(tmp_path / "s.sqlite", readonly=True) as st:
        df = st.rows_with_meta(rid)
        protocol = st.diagnostics(rid, key="protocol")
    edited = df[df["system"] == "edited"] if "system" in df else df
    got = set(edited["metric"])
    # conflict_magnitude and round_success need theta' (after e1 alone): only the staged protocol gives them
    assert {"conflict_magnitude", "round_success"} <= got, sorted(got)
    assert {"conflict_score", "distortion"} <= got
    assert len(protocol) == 2 and set(protocol["value"]) == {"staged"}, protocol
