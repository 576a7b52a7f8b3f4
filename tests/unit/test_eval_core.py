"""The bulk evaluator, registry, cache and Results on tiny random models."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

import editlens
from editlens.data.schema import Probe, Rewrite, make_case
from editlens.errors import EditlensError, MetricError
from editlens.evaluate import (BASE, EDITED, BaseCache, Metric, ModelSystem, NextToken, Results, Row, evaluate,
                               evaluate_naive, gtfree_scores, register_metric, resolve_metrics)
from editlens.evaluate.core import cache_key
from tests.conftest import noisy_tiny_llama
from editlens.evaluate.gt import Consistency, Fluency, SAcc, SAccNorm

# short generations keep the tests fast on a shared CPU
def _gen_metrics():
    return [SAcc(max_new_tokens=4), SAccNorm(max_new_tokens=4), Fluency(max_new_tokens=6), Consistency(max_new_tokens=6)]


def _cases(n: int = 3):
    cases = []
    for i in range(n):
        rw = Rewrite("The capital of {} is", f"Country{i}", "Seoul", "Tokyo")
        cases.append(make_case(f"c{i}", rw, {
            "paraphrase": [Probe(f"Country{i}'s capital city is", "Seoul", "Tokyo")],
            "neighborhood": [Probe("The capital of China is", "Beijing", "Seoul"),
                             Probe(f"The capital of Land{i} is", "Tokyo", "Seoul")],
            "locality": [Probe("Water boils at a temperature of")],
            "generation": [Probe(f"Country{i} is famous for")],
        }, meta={"reference_texts": ["Seoul is a big city in Korea", "Tokyo has many trains"]}))
    return cases


@pytest.fixture()
def base(tiny_llama):
    return ModelSystem(tiny_llama)


@pytest.fixture()
def edited():
    return ModelSystem(noisy_tiny_llama(1))


class Counting(ModelSystem):
    """Counts System calls."""

    def __init__(self, lm):
        super().__init__(lm)
        self.calls: list[tuple[str, int]] = []

    def next_token_logprobs(self, prompts):
        self.calls.append(("next", len(prompts)))
        return super().next_token_logprobs(prompts)

    def teacher_forced(self, prompts, targets):
        self.calls.append(("tf", len(prompts)))
        return super().teacher_forced(prompts, targets)

    def generate(self, prompts, max_new_tokens=16):
        self.calls.append(("gen", len(prompts)))
        return super().generate(prompts, max_new_tokens)


def test_identical_systems_give_zero_kl_and_full_overlap(base):
    res = evaluate(base, _cases(), base=base, metrics=["kl", "js", "topk", "topk@3", "nkl", "nkl_code", "cfplus_nkl"],
                   progress=False, cache=False)
    df = res.to_pandas()
    assert set(df.probe_kind) >= {"rewrite", "paraphrase", "neighborhood", "locality"}
    assert (df[df.metric.isin(["kl", "js", "nkl", "nkl_code", "cfplus_nkl"])].value == 0.0).all()
    topk = df[df.metric.str.startswith("topk@")]
    assert set(topk.metric) == {"topk@1", "topk@3", "topk@5", "topk@10"}
    assert (topk.value == 1.0).all()


def test_identical_copies_not_the_same_object_also_zero(base, tiny_llama):
    other = ModelSystem(editlens.load_model("tiny-llama"))
    res = evaluate(other, _cases(2), base=base, metrics="kl,topk@5", progress=False, cache=False)
    assert res.to_pandas().query("metric == 'kl'").value.abs().max() < 1e-6
    assert (res.to_pandas().query("metric == 'topk@5'").value == 1.0).all()


def test_edited_system_moves_and_matches_gtfree_scores(base, edited):
    cases = _cases()
    res = evaluate(edited, cases, base=base, metrics="gtfree", progress=False, cache=False)
    df = res.to_pandas()
    kl_nb = df.query("metric == 'kl' and probe_kind == 'neighborhood'")
    assert (kl_nb.value > 0).all()
    js = df.query("metric == 'js'").value
    assert ((js > 0) & (js <= math.log(2))).all()
    # the per-case value is the mean over the case's neighbourhood probes of gtfree_scores
    prompts = [p.prompt for p in cases[1].probes_of("neighborhood")]
    direct = gtfree_scores(base, edited, prompts)
    row = kl_nb.set_index("case_id").loc["c1", "value"]
    assert row == pytest.approx(float(direct["kl"].mean()), abs=1e-6)  # batch composition: float rounding only
    nkl = df.query("metric == 'nkl'").set_index("case_id").value
    assert nkl.loc["c1"] == pytest.approx(row, rel=1e-9)
    t5 = df.query("metric == 'topk@5' and probe_kind == 'neighborhood'").set_index("case_id").loc["c1", "value"]
    assert t5 == pytest.approx(float(direct["topk@5"].mean()))


def test_bulk_equals_naive_and_batched_equals_unbatched(base, edited):
    cases = _cases(2)
    metrics = ["t_acc", "c_acc", "c_mag", "kl", "js", "topk", "cfplus_ns", "cfplus_nm", "cfplus_nkl", *_gen_metrics()]
    bulk = evaluate(edited, cases, base=base, metrics=metrics, progress=False, cache=False)
    tiny_batches = evaluate(edited, cases, base=base, metrics=metrics, batch_tokens=1, progress=False, cache=False)
    naive, n_calls = evaluate_naive(edited, cases, base=base, metrics=metrics)
    key = ["case_id", "probe_kind", "metric"]
    a = bulk.to_pandas().set_index(key).sort_index()
    for other in (tiny_batches, naive):
        b = other.to_pandas().set_index(key).sort_index()
        assert list(a.index) == list(b.index)
        assert (a.value - b.value).abs().max() < 1e-5
    assert n_calls > 50
    assert base.batch_tokens == 4096  # restored after the call


def test_one_call_per_request_type_per_system(tiny_llama):
    b = Counting(tiny_llama)
    lm2 = editlens.load_model("tiny-llama")
    lm2.push_state("other")
    e = Counting(lm2)
    evaluate(e, _cases(4), base=b, metrics=["gtfree", "t_acc", "c_acc", *_gen_metrics()], progress=False, cache=False)
    assert sorted(c for c, _ in b.calls) == ["next"]
    kinds = sorted(c for c, _ in e.calls)
    # next-token, teacher forcing, and one generate per max_new_tokens (4 for S-acc, 6 for fluency)
    assert kinds == ["gen", "gen", "next", "tf"]
    # prompts are de-duplicated: "The capital of China is" appears in every case but is asked once
    n_next = dict(e.calls)["next"]
    assert n_next == len({p.prompt for c in _cases(4) for k in c.kinds if k != "generation" for p in c.probes_of(k)}
                         | {f"The capital of Country{i} is Seoul. " + p.prompt for i, c in enumerate(_cases(4))
                            for p in c.probes_of("neighborhood")})


def test_base_outputs_cached_across_edited_systems(tiny_llama, edited, tmp_path):
    b = Counting(tiny_llama)
    cache = BaseCache()
    r1 = evaluate(edited, _cases(), base=b, metrics="kl,topk", cache=cache, progress=False)
    n = len(b.calls)
    other = ModelSystem(editlens.load_model("tiny-llama"))
    r2 = evaluate(other, _cases(), base=b, metrics="kl,topk", cache=cache, progress=False)
    assert len(b.calls) == n  # base not called again
    assert r1.meta["base_cache_hit"] is False and r2.meta["base_cache_hit"] is True
    # a different request set is a different key
    evaluate(other, _cases(2), base=b, metrics="kl", cache=cache, progress=False)
    assert len(b.calls) == n + 1
    # on disk: a fresh cache object over the same directory hits, values identical
    d = tmp_path / "cache"
    r3 = evaluate(edited, _cases(), base=b, metrics="kl,topk", cache=d, progress=False)
    calls = len(b.calls)
    r4 = evaluate(edited, _cases(), base=b, metrics="kl,topk", cache=BaseCache(d), progress=False)
    assert len(b.calls) == calls and r4.meta["base_cache_hit"] is True
    assert r3.to_pandas().equals(r4.to_pandas())
    assert r1.to_pandas().equals(r3.to_pandas())


def test_cache_key_depends_on_fingerprint_format_and_requests():
    reqs = [NextToken("a"), NextToken("b")]
    k = cache_key("fp", "raw", reqs)
    assert k == cache_key("fp", "raw", list(reversed(reqs)))
    assert k != cache_key("fp2", "raw", reqs)
    assert k != cache_key("fp", "chat", reqs)
    assert k != cache_key("fp", "raw", reqs[:1])


def test_lru_is_bounded():
    c = BaseCache(max_bytes=3 * 4 * 10)
    for i in range(5):
        c.put(str(i), {NextToken("x"): torch.zeros(10)})
    assert len(c) == 3 and c.get("0") is None and c.get("4") is not None


def test_unknown_metric_lists_names():
    with pytest.raises(MetricError, match="unknown metric 'nope'.*kl.*topk"):
        resolve_metrics("kl,nope")
    with pytest.raises(MetricError, match="integer"):
        resolve_metrics("topk@five")
    with pytest.raises(MetricError, match="no '@' parameter"):
        resolve_metrics("kl@3")


def test_groups_expand():
    names = {m.name for m in resolve_metrics("gt")}
    assert names == {"s_acc", "s_acc_norm", "t_acc", "c_acc", "c_mag"}
    gtfree = {m.name for m in resolve_metrics(["gtfree"])}
    assert {"kl", "js", "topk@1", "topk@5", "topk@10", "nkl", "nkl_code", "cfplus_ns", "cfplus_nm",
            "cfplus_nkl"} <= gtfree
    assert names | gtfree | {"fluency", "consistency"} <= {m.name for m in resolve_metrics("all")}


def test_base_required(base):
    with pytest.raises(MetricError, match="kl.*base="):
        evaluate(base, _cases(1), metrics="kl,t_acc", progress=False)
    res = evaluate(base, _cases(1), metrics="t_acc", progress=False)  # GT-only needs no base
    assert set(res.to_pandas().metric) == {"t_acc"}


def test_duplicate_case_ids_rejected(base):
    c = _cases(1)
    with pytest.raises(EditlensError, match="duplicate case_id 'c0'"):
        evaluate(base, c + c, base=base, metrics="kl", progress=False)


def test_results_tables_and_files(base, tmp_path):
    res = evaluate(base, _cases(), base=base, metrics="t_acc,kl", progress=False, cache=False)
    df = res.to_pandas()
    assert list(df.columns) == ["case_id", "probe_kind", "metric", "value"]
    s = res.summary()
    assert list(s.columns) == ["probe_kind", "metric", "mean", "sem", "n"]
    t = s.query("metric == 't_acc' and probe_kind == 'paraphrase'").iloc[0]
    vals = df.query("metric == 't_acc' and probe_kind == 'paraphrase'").value
    assert t["n"] == 3 and t["mean"] == pytest.approx(vals.mean())
    assert t["sem"] == pytest.approx(vals.std(ddof=1) / math.sqrt(3))
    assert res.meta["prompt_format"] == "raw"
    assert res.meta["system"]["fingerprint"] == base.fingerprint
    assert res.meta["metrics"]["kl"]["direction"] == "lower"
    for ext in ("csv", "parquet", "json"):
        path = res.save(tmp_path / f"r.{ext}")
        assert path.stat().st_size > 0
    assert pd.read_csv(tmp_path / "r.csv").shape == df.shape
    assert json.loads((tmp_path / "r.json").read_text())["meta"]["prompt_format"] == "raw"
    with pytest.raises(EditlensError, match=r"\.csv"):
        res.save(tmp_path / "r.txt")


def test_custom_metric_registration(base):
    @register_metric("test_prompt_len_diff")
    class PromptLen(Metric):
        def case_requests(self, case):
            for p in case.probes_of("locality"):
                yield BASE, NextToken(p.prompt)
                yield EDITED, NextToken(p.prompt)

        def case_rows(self, case, answers):
            for p in case.probes_of("locality"):
                d = answers.next_token(p.prompt, on=BASE) - answers.next_token(p.prompt, on=EDITED)
                yield Row(case.case_id, "locality", self.name, float(d.abs().max()))

    res = evaluate(base, _cases(2), base=base, metrics=["test_prompt_len_diff"], progress=False, cache=False)
    assert res.to_pandas().value.tolist() == [0.0, 0.0]
    with pytest.raises(MetricError, match="already registered"):
        register_metric("kl")(PromptLen)


def test_gt_metrics_rows(base):
    res = evaluate(base, _cases(), metrics=["t_acc", "c_acc", "c_mag", *_gen_metrics()], progress=False)
    df = res.to_pandas()
    assert ((df.value >= -1) & (df.value <= 100)).all()
    acc = df[df.metric.isin(["s_acc", "s_acc_norm", "t_acc", "c_acc"])].value
    assert ((acc >= 0) & (acc <= 1)).all()
    # c_acc applies only to probes with a foil: no locality row
    assert "locality" not in set(df.query("metric == 'c_acc'").probe_kind)
    assert set(df.query("metric in ['fluency', 'consistency']").probe_kind) == {"generation"}
    cons = df.query("metric == 'consistency'").value
    assert ((cons >= 0) & (cons <= 1 + 1e-9)).all()


def test_chat_format_needs_template(base):
    with pytest.raises(EditlensError, match="chat"):
        evaluate(base, _cases(1), metrics="t_acc", prompt_format="chat", progress=False)


# ---------------------------------------------------------------------------------------------- fused passes
class _Unfused(ModelSystem):
    @property
    def fuses_next_token_into_scores(self) -> bool:
        return False


def _row_counter(lm):
    seen = {"rows": 0}

    def pre(_m, args, kwargs):
        seen["rows"] += int(kwargs["input_ids"].shape[0])

    return seen, lm.model.register_forward_pre_hook(pre, with_kwargs=True)


def test_teacher_forced_pass_gives_the_next_token_distribution(tiny_llama, tiny_gpt2):
    from editlens.lm import ops

    prompts = ["The capital of France is", "A", "Water boils at a temperature of", "The capital of France is"]
    targets = ["Paris", "dog barks", "one hundred degrees", "Lyon and more"]
    for lm in (tiny_llama, tiny_gpt2):
        tfs, nexts = ops.teacher_forced_with_next_token(lm, prompts, targets, [0, 1, 2, 3], batch_tokens=4096)
        direct = ops.next_token_logprobs(lm, prompts)
        assert sorted(nexts) == [0, 1, 2, 3]
        for i in range(4):
            assert torch.allclose(nexts[i], direct[i], atol=1e-5), (lm.name, i)
            # the first teacher-forced target position is that distribution
            assert float(tfs[i].logprobs[0]) == pytest.approx(float(direct[i][tfs[i].target_ids[0]]), abs=1e-5)
        plain = ops.teacher_forced(lm, prompts, targets)
        for a, b in zip(tfs, plain):
            assert torch.equal(a.target_ids, b.target_ids) and torch.equal(a.argmax_ids, b.argmax_ids)
            assert torch.equal(a.logprobs, b.logprobs)


def test_evaluator_reads_next_token_answers_off_score_passes(base, edited):
    cases = _cases()
    metrics = ["t_acc", "c_acc", "kl", "js", "topk", "cfplus_ns", "cfplus_nkl"]
    unfused = _Unfused(edited.lm)
    unfused.model_state = edited.model_state
    assert edited.fuses_next_token_into_scores and not unfused.fuses_next_token_into_scores
    seen, h = _row_counter(edited.lm)
    try:
        a = evaluate(edited, cases, base=base, metrics=metrics, progress=False, cache=False)
        fused_rows, seen["rows"] = seen["rows"], 0
        b = evaluate(unfused, cases, base=base, metrics=metrics, progress=False, cache=False)
        unfused_rows = seen["rows"]
    finally:
        h.remove()
    # the edited system's NextToken prompts that also have a Score request cost no pass of their own
    from editlens.evaluate.core import resolve_metrics

    wanted = {r for m in resolve_metrics(metrics) for role, r in m.requests(cases) if role == EDITED}
    scored = {r.prompt for r in wanted if type(r).__name__ == "Score"}
    shared = {r.prompt for r in wanted if isinstance(r, NextToken) and r.prompt in scored}
    assert shared and unfused_rows - fused_rows == len(shared)
    key = ["case_id", "probe_kind", "metric"]
    da, db = a.to_pandas().set_index(key).sort_index(), b.to_pandas().set_index(key).sort_index()
    assert list(da.index) == list(db.index)
    assert (da.value - db.value).abs().max() < 1e-5


def test_systems_with_their_own_calls_do_not_fuse(base, tiny_llama):
    from editlens.edit.grace import GraceSystem

    assert base.fuses_next_token_into_scores
    assert not Counting(tiny_llama).fuses_next_token_into_scores
    from editlens.edit.ike import IKESystem
    from editlens.edit.scr import SCRSystem
    from editlens.edit.wise import WiseSystem

    # GRACE/WISE re-batch teacher forcing themselves (the adaptor must know where each prompt ends): no fusion;
    # IKE/SCR only rewrite prompts: fusion is exact
    for cls, fuses in ((GraceSystem, False), (WiseSystem, False), (IKESystem, True), (SCRSystem, True)):
        assert cls.__new__(cls).fuses_next_token_into_scores is fuses, cls
