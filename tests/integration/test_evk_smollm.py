"""EVK-Bench and EVK-Align on the embedded SmolLM2 (small: two cases, few samples)."""
from __future__ import annotations

import pytest

from editlens.data import synthetic_cases
from editlens.edit import edit
from editlens.edit.evk_align import EvkAlign
from editlens.evaluate import evk
from editlens.evaluate.core import evaluate
from editlens.evaluate.system import ModelSystem

pytestmark = pytest.mark.integration
FAST = dict(stats_n_samples=64, stats_max_length=64)  # same statistics as the other SmolLM2 tests (cached)


def _metrics():
    return evk.evk_metrics(spans=("relation", "full"), sigmas=(0.1, 0.4), n_samples=2)


def test_evk_on_smollm_self_and_memit(smollm):
    cases = synthetic_cases(2, seed=0)
    base = ModelSystem(smollm)
    same = evaluate(base, cases, base=base, metrics=_metrics(), progress=False, cache=False)
    df = same.to_pandas()
    assert (df[df.metric.str.contains("kl")].value == 0).all()
    assert (df[df.metric.str.contains("topk")].value == 1).all()

    e = edit(smollm, cases, "memit", v_num_grad_steps=10, **FAST)
    try:
        res = evaluate(e.system, cases, base=base, metrics=_metrics(), progress=False, cache=False)
    finally:
        e.undo()
    # the edit changes the edit prompt itself (σ = 0) much more than its neighbours
    kl0_rw = res.value("evk_kl@full:0", "rewrite")
    kl0_nb = res.value("evk_kl@full:0", "neighborhood")
    assert kl0_rw > 0.5
    assert kl0_nb < kl0_rw
    # the virtual neighbourhood of the edit prompt moves too (the spill EVK-Bench measures)
    assert res.value("evk_kl@relation:0.4", "rewrite") > 0
    assert res.value("evk_text_kl", "neighborhood") == pytest.approx(kl0_nb, rel=1e-3, abs=1e-5)

    e2 = edit(smollm, cases, "memit", v_num_grad_steps=10, **FAST,
              evk_align=EvkAlign(weight=1.0, sigmas=(0.4,), n_samples=1))
    try:
        assert e2.diagnostics["evk_align"]["sigmas"] == [0.4]
        assert e2.diagnostics["loss/extra"] >= 0
    finally:
        e2.undo()
    assert smollm.fingerprint == smollm.base_fingerprint
