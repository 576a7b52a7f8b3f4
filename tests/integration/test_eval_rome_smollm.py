"""The whole evaluation suite on a real edit: ROME on SmolLM2 over 20 cases (the shipped CounterFact-schema sample,
the two MQuAKE-schema cases and synthetic cases). Every metric of the ``all`` group returns rows; the base system
is perfectly stable against itself; teacher-forced and autoregressive efficacy are both reported and differ.

CPU budget: the probes of each case are capped (:data:`CAP` per kind) and the CounterFact cases get one
reference text each so that ``consistency`` (which needs reference texts, absent from the public CounterFact
file) has something to score."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from editlens.cli.basic import sample_data_path
from editlens.data import load_cases, synthetic_cases
from editlens.edit import edit
from editlens.evaluate import ModelSystem, evaluate
from editlens.evaluate.core import metric_groups

pytestmark = pytest.mark.integration

CAP = {"paraphrase": 2, "neighborhood": 3, "attribute": 2, "generation": 1}


def _capped(case, prefix: str = "", reference: bool = False):
    probes = {k: v[:CAP[k]] if k in CAP else v for k, v in case.probes.items()}
    meta = dict(case.meta)
    if reference:
        new = case.rewrite.target_new
        meta["reference_texts"] = [f"{new} is what everyone mentions here. The story of {new} is well known."]
    return dataclasses.replace(case, case_id=prefix + case.case_id, probes=probes, meta=meta)


# small statistics (shared with the other SmolLM2 tests) and a short value optimisation: ROME edits one fact at
# a time, 20 of them here
FAST = dict(stats_n_samples=64, stats_max_length=64, n_prefixes=2, v_num_grad_steps=8)  # 52 s for 21 facts


@pytest.fixture(scope="module")
def cases():
    data = Path(sample_data_path()).parent
    cs = ([_capped(c, "cf-", reference=True) for c in load_cases(sample_data_path(), limit=8)]
          + [_capped(c, "mquake-") for c in load_cases(data / "mquake_cf_sample.json")]
          + [_capped(c) for c in synthetic_cases(10, seed=3)])
    assert len(cs) == 20 and len({c.case_id for c in cs}) == 20
    return cs


def test_rome_over_20_cases_returns_every_metric(smollm, cases):
    names = [m for m in metric_groups()["all"] if m != "my_metric"]
    base = ModelSystem(smollm)
    same = evaluate(base, cases, base=base, metrics=["kl", "topk", "js"], progress=False)
    df0 = same.to_pandas()
    assert (df0[df0.metric == "kl"].value.abs() < 1e-6).all()
    assert (df0[df0.metric.str.startswith("topk")].value == 1.0).all()

    e = edit(smollm, cases, "rome", **FAST)
    try:
        res = evaluate(e.system, cases, base=base, metrics=names, progress=False)
    finally:
        e.undo()
    df = res.to_pandas()
    got = {m.split("@")[0] for m in df.metric.unique()}
    missing = [m for m in names if m not in got]
    assert not missing, missing
    assert df.value.map(lambda v: isinstance(v, float) and not math.isnan(v)).mean() > 0.95
    # the edit worked on most facts, the neighbours moved less than the edited prompts
    rw = df[(df.probe_kind == "rewrite")]
    assert rw[rw.metric == "c_acc"].value.mean() >= 0.7
    nb = df[(df.probe_kind == "neighborhood") & (df.metric == "kl")].value.mean()
    assert nb < rw[rw.metric == "kl"].value.mean()
    # teacher-forced and autoregressive efficacy are both there, and not the same numbers
    tf = df[df.metric == "t_acc"].groupby("probe_kind").value.mean()
    ar = df[df.metric == "ar_em"].groupby("probe_kind").value.mean()
    assert {"rewrite", "paraphrase"} <= set(tf.index) & set(ar.index)
    assert any(abs(tf[k] - ar[k]) > 1e-9 for k in ("rewrite", "paraphrase"))
