"""General abilities and autoregressive metrics on the embedded SmolLM2-135M-Instruct (real behaviour)."""
from __future__ import annotations

import math

import pytest

from editlens.data.schema import Probe, Rewrite, make_case
from editlens.evaluate import core
from editlens.evaluate import general as Gn
from editlens.evaluate import generation as G
from editlens.evaluate.system import ModelSystem

pytestmark = pytest.mark.integration


def test_general_abilities_base_smollm(smollm):
    system = ModelSystem(smollm)
    metrics = Gn.general_metrics(smollm, suites=["factual_qa"])
    res = core.evaluate(system, [], metrics=metrics, progress=False, cache=False)
    ppl = res.value("ppl")
    assert math.isfinite(ppl) and 1.0 < ppl < 100.0          # plausible on plain English prose (~35)
    acc = res.value("downstream_acc@factual_qa")
    assert acc >= 0.5                                          # chance is 0.25
    assert res.value("muting_rate") == 0.0                     # the base model is not muted
    refusals = [r for r in res.rows if r.metric == "refusal_rate"]
    assert len(refusals) == 15 and all(r.value in (0.0, 1.0) for r in refusals)
    assert res.meta["metrics"]["refusal_rate"]["posing"] == "chat template"
    assert 0.0 <= res.value("refusal_rate") <= 1.0
    assert res.value("refusal_muted") == 0.0


def test_autoregressive_vs_teacher_forced_smollm(smollm):
    system = ModelSystem(smollm)
    rw = Rewrite("The capital of {} is", "France", "Paris")
    case = make_case("fr", rw, {"paraphrase": [Probe("The capital city of France is", "Paris")]})
    res = core.evaluate(system, [case], metrics=["t_acc", "s_acc_norm", "ar_em", "ar_contains", "tf_ar_gap"],
                        progress=False, cache=False)
    table = G.tf_ar_table(res).set_index("probe_kind")
    # the base model knows this fact: teacher-forced and autoregressive agree, the gap is ~0
    assert table.loc["rewrite", "t_acc"] == 1.0 and table.loc["rewrite", "ar_contains"] == 1.0
    assert abs(table.loc["rewrite", "gap"]) < 1e-9
