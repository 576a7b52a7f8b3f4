"""Collapse diagnostics: the effective rank against closed forms, and the hidden_rank metric contract."""
from __future__ import annotations

import math

import pytest
import torch

import editlens
from editlens.errors import MetricError
from editlens.evaluate.collapse import HiddenRank, effective_rank


@pytest.mark.parametrize("r", [1, 3, 7])
def test_effective_rank_of_equal_singular_values_is_the_rank(r):
    g = torch.Generator().manual_seed(r)
    q1, _ = torch.linalg.qr(torch.randn(40, r, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(16, r, generator=g, dtype=torch.float64))
    m = 2.5 * q1 @ q2.T  # rank r, all r singular values 2.5
    assert torch.linalg.matrix_rank(m) == r
    assert effective_rank(m) == pytest.approx(r, abs=1e-9)


def test_effective_rank_hand_values():
    # singular values (3, 1): p = (3/4, 1/4), erank = exp(-(3/4 ln 3/4 + 1/4 ln 1/4))
    m = torch.diag(torch.tensor([3.0, 1.0, 0.0]))
    want = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(m) == pytest.approx(want, rel=1e-12)
    assert 1.0 < want < 2.0
    with pytest.raises(MetricError, match="2-D"):
        effective_rank(torch.ones(3))


def test_hidden_rank_contract_and_names():
    from editlens.testing import check_metric

    check_metric("hidden_rank")
    assert [m.name for m in HiddenRank.from_name("hidden_rank", "3")] == ["hidden_rank@3"]
    with pytest.raises(MetricError, match="integer layer index"):
        HiddenRank.from_name("hidden_rank", "x")


def test_hidden_rank_values_on_an_edited_model(tiny_llama):
    from tests.conftest import noisy_tiny_llama
    from editlens.evaluate import ModelSystem

    base = ModelSystem(tiny_llama)
    cases = editlens.synthetic_cases(1, seed=0)
    edited = ModelSystem(noisy_tiny_llama(0, scale=0.5))
    res = editlens.evaluate(edited, cases, base=base, metrics=["hidden_rank@1"])
    df = res.to_pandas().set_index("metric")["value"]
    # the base's effective rank, recomputed by hand from its layer-1 outputs over the held-out text
    from editlens.evaluate.general import read_heldout

    hs = []
    for p in read_heldout():
        rec = {}
        h = tiny_llama.model.get_submodule(tiny_llama.arch.block(1)).register_forward_hook(
            lambda m, i, o: rec.__setitem__("h", (o[0] if isinstance(o, tuple) else o)[0]))
        with torch.no_grad():
            tiny_llama.model(input_ids=torch.tensor([tiny_llama.tokenizer(p).input_ids]))
        h.remove()
        hs.append(rec["h"].double())
    s = torch.linalg.svdvals(torch.cat(hs))
    p_ = s / s.sum()
    want = float(torch.exp(-(p_ * p_.log()).sum()))
    from editlens.evaluate.collapse import hidden_rank

    assert hidden_rank(base, 1) == pytest.approx(want, rel=1e-5)
    assert df["hidden_rank@1"] == pytest.approx(hidden_rank(edited, 1) / want, rel=1e-5)
    assert abs(df["hidden_rank@1"] - 1.0) > 1e-4  # the noisy MLPs change the spectrum
    with pytest.raises(MetricError, match="hidden_rank@9: the model has layers 0..3"):
        editlens.evaluate(base, cases, base=base, metrics=["hidden_rank@9"])


def test_delta_spectrum_of_a_known_rank_one_change(tiny_llama):
    from editlens.evaluate import ModelSystem
    from editlens.testing import check_metric

    check_metric("delta_spectrum")
    base = ModelSystem(tiny_llama)
    w = tiny_llama.module(tiny_llama.arch.mlp_out_at(1)).weight
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(w.shape[0], generator=g), torch.randn(w.shape[1], generator=g)
    orig = w.detach().clone()
    with torch.no_grad():
        w.add_(0.1 * torch.outer(u, v))
    class _Snap:  # what lm.state_view needs to show the base weights to the base system
        def pairs(self):
            return [(w, orig)]

    tiny_llama.push_state("rank-one", _Snap())
    try:
        edited = ModelSystem(tiny_llama)
        res = editlens.evaluate(edited, editlens.synthetic_cases(1, seed=0), base=base, metrics=["delta_spectrum"])
        df = res.to_pandas()
        val = {(r.case_id, r.metric): r.value for r in df.itertuples()}
        want = 0.1 * float(u.norm() * v.norm())
        assert val[("mlp_out:1", "delta_spectrum")] == pytest.approx(want, rel=1e-4)
        assert val[("mlp_out:1", "delta_spectrum_s1")] == pytest.approx(want, rel=1e-4)
        assert val[("mlp_out:1", "delta_spectrum_s2")] < 1e-6 * want  # rank one (float32 rounding only)
        assert all(val[(f"mlp_out:{l}", "delta_spectrum")] == 0.0 for l in (0, 2, 3))
    finally:
        with torch.no_grad():
            w.copy_(orig)
        tiny_llama.pop_state("rank-one")
    with pytest.raises(MetricError, match="must be one of"):
        editlens.evaluate(base, [], base=base, metrics=["delta_spectrum@qkv"])
