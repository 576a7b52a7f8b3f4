"""The bulk-vs-naive agreement check of ``benchmarks/bench_eval.py``: continuous metrics must agree to 1e-4, and a
discrete metric may differ only where the check verifies a near-tie of the quantity it thresholds."""
from __future__ import annotations

import pytest
import torch

import editlens
from benchmarks.bench_eval import METRICS, check_agreement, decision_margin
from editlens.data import synthetic_cases
from editlens.evaluate import ModelSystem, Results, Row, evaluate, evaluate_naive
from tests.conftest import noisy_tiny_llama


@pytest.fixture(scope="module")
def setup():
    base = ModelSystem(editlens.load_model("tiny-llama"))
    edited = ModelSystem(noisy_tiny_llama(3))
    cases = synthetic_cases(3, seed=0)
    bulk = evaluate(edited, cases, base=base, metrics=METRICS, cache=False, progress=False)
    naive, _ = evaluate_naive(edited, cases, base=base, metrics=METRICS)
    return base, edited, cases, bulk, naive


def _tampered(res: Results, metric: str, delta: float, skip: int = 0) -> tuple[Results, tuple[str, str, str]]:
    """``res`` with the value of the (skip+1)-th row of ``metric`` shifted by ``delta``."""
    rows = list(res.rows)
    i = [i for i, r in enumerate(rows) if r.metric == metric][skip]
    r = rows[i]
    rows[i] = Row(r.case_id, r.probe_kind, r.metric, r.value + delta)
    return Results(rows, res.meta), (r.case_id, r.probe_kind, r.metric)


def test_bulk_and_naive_agree_on_tiny_model(setup):
    base, edited, cases, bulk, naive = setup
    out = check_agreement(bulk, naive, cases, base, edited)
    assert out["max_continuous_diff"] < 1e-4
    assert out["discrete_rows"] > 0


def test_continuous_difference_fails(setup):
    base, edited, cases, bulk, naive = setup
    bad, row = _tampered(naive, "kl", 1e-3)
    with pytest.raises(AssertionError, match="continuous metric") as err:
        check_agreement(bulk, bad, cases, base, edited)
    assert row[0] in str(err.value)


@pytest.mark.parametrize("metric", ["topk@5", "c_acc", "t_acc", "cfplus_ns"])
def test_discrete_difference_without_near_tie_fails(setup, metric):
    base, edited, cases, bulk, naive = setup
    by_id = {c.case_id: c for c in cases}
    # a random tiny model has near-flat logits, so some rows are at a near-tie: take the first row that is not
    for skip in range(sum(r.metric == metric for r in naive.rows)):
        bad, (cid, kind, m) = _tampered(naive, metric, 0.5, skip)
        if decision_margin(m, by_id[cid], kind, base, edited) >= 1e-4:
            break
    else:
        pytest.fail(f"every {metric} row is at a near-tie")
    with pytest.raises(AssertionError, match="not at a near-tie"):
        check_agreement(bulk, bad, cases, base, edited)


class _TiedAt(ModelSystem):
    """Next-token log-probabilities whose (k+1)-th value is set equal to the k-th: an exact tie at the top-k edge."""

    def __init__(self, system: ModelSystem, k: int):
        super().__init__(system.lm)
        self.model_state = system.model_state
        self.k = k

    def next_token_logprobs(self, prompts):
        lp = super().next_token_logprobs(prompts).clone()
        order = torch.argsort(lp, dim=-1, descending=True)
        rows = torch.arange(lp.shape[0])
        lp[rows, order[:, self.k]] = lp[rows, order[:, self.k - 1]]
        return lp


def test_discrete_flip_at_exact_tie_is_accepted_and_counted(setup):
    base, edited, cases, bulk, naive = setup
    tied = _TiedAt(edited, 5)
    bad, (cid, kind, m) = _tampered(naive, "topk@5", -0.2)
    case = next(c for c in cases if c.case_id == cid)
    assert decision_margin(m, case, kind, base, tied) == 0.0
    out = check_agreement(bulk, bad, cases, base, tied)
    assert out["discrete_flips"] == 1


def test_tacc_margin_is_the_top2_gap_of_the_teacher_forced_positions(setup):
    """At the first target position the distribution is the prompt's next-token one (another code path): the t_acc
    margin is at most its top-1/top-2 gap, and equal to it for a one-token target."""
    from benchmarks.bench_eval import _tacc_margin
    from editlens.lm.ops import target_token_ids

    _, edited, cases, _, _ = setup
    checked_equal = 0
    for c in cases:
        for p in c.probes_of("rewrite") + c.probes_of("paraphrase"):
            top = torch.topk(edited.next_token_logprobs([p.prompt])[0].double(), 2).values
            gap0 = float(top[0] - top[1])
            margin = _tacc_margin(edited, p.prompt, p.target)
            assert 0 <= margin <= gap0 + 1e-5
            if len(target_token_ids(edited.lm.tokenizer, p.prompt, p.target)[1]) == 1:
                assert margin == pytest.approx(gap0, abs=1e-5)
                checked_equal += 1
    assert checked_equal or all(len(target_token_ids(edited.lm.tokenizer, p.prompt, p.target)[1]) > 1
                                for c in cases for p in c.probes_of("rewrite"))
