"""The evaluator on the embedded SmolLM2-135M (integration; ~1 minute on a shared CPU)."""
from __future__ import annotations

import pytest

from editlens.data.schema import Probe, Rewrite, make_case
from editlens.evaluate import BaseCache, ModelSystem, evaluate, gtfree_scores
from editlens.evaluate.gt import SAcc, SAccNorm

pytestmark = pytest.mark.integration

KNOWN = [  # (template, subject, true object) that SmolLM2-135M-Instruct completes correctly with greedy decoding
    ("The capital of {} is", "France", "Paris"),
    ("The capital of {} is", "Japan", "Tokyo"),
    ("The {} is located in the city of", "Eiffel Tower", "Paris"),
]


def _cases():
    cases = []
    for i, (tpl, subj, obj) in enumerate(KNOWN):
        # probes ask for the *true* object (what the unedited model should know); foil = a counterfactual
        rw = Rewrite(tpl, subj, obj, "London")
        cases.append(make_case(f"k{i}", rw, {
            "neighborhood": [Probe("The capital of Italy is", "Rome", "London"),
                             Probe("The largest planet in the solar system is", "Jupiter", "Mars")],
            "locality": [Probe("Water is made of hydrogen and")],
        }))
    return cases


METRICS = ["kl", "js", "topk", "topk@20", "t_acc", "c_acc", SAcc(max_new_tokens=6), SAccNorm(max_new_tokens=6)]


def test_base_against_itself_and_known_facts(smollm):
    base = ModelSystem(smollm)
    res = evaluate(base, _cases(), base=base, metrics=METRICS, cache=BaseCache(), progress=False)
    df = res.to_pandas()
    div = df[df.metric.isin(["kl", "js"])]
    assert set(div.probe_kind) == {"rewrite", "neighborhood", "locality"}
    assert (div.value == 0.0).all()
    topk = df[df.metric.str.startswith("topk@")]
    assert set(topk.metric) == {"topk@1", "topk@5", "topk@10", "topk@20"} and (topk.value == 1.0).all()
    rewrite = df[df.probe_kind == "rewrite"].groupby("metric").value.mean()
    assert rewrite["s_acc"] == 1.0 and rewrite["s_acc_norm"] == 1.0
    assert rewrite["t_acc"] == 1.0 and rewrite["c_acc"] == 1.0
    nb = df[df.probe_kind == "neighborhood"].groupby("metric").value.mean()
    assert nb["t_acc"] > 0.5 and nb["c_acc"] == 1.0
    assert res.meta["prompt_format"] == "raw"


def test_chat_and_raw_both_run_and_are_recorded(smollm):
    raw = ModelSystem(smollm)
    cache = BaseCache()
    r_raw = evaluate(raw, _cases()[:2], base=raw, metrics="kl,t_acc", cache=cache, progress=False)
    r_chat = evaluate(raw, _cases()[:2], base=raw, metrics="kl,t_acc", prompt_format="chat", cache=cache,
                      progress=False)
    assert r_raw.meta["prompt_format"] == "raw" and r_chat.meta["prompt_format"] == "chat"
    assert r_chat.meta["system"]["fingerprint"].endswith(":chat")
    assert r_chat.meta["base_cache_hit"] is False  # the format is part of the cache key
    assert (r_chat.to_pandas().query("metric == 'kl'").value == 0.0).all()
    assert set(r_chat.to_pandas().metric) == {"kl", "t_acc"}


def test_gtfree_scores_on_unrelated_prompts(smollm):
    base = ModelSystem(smollm)
    chat = ModelSystem(smollm, prompt_format="chat")
    prompts = ["Water is made of hydrogen and", "The largest planet in the solar system is"]
    same = gtfree_scores(base, base, prompts)
    assert float(same["kl"].abs().max()) == 0.0 and float(same["topk@10"].min()) == 1.0
    # a different way of posing the prompt is a different distribution: KL > 0, overlap < 1 somewhere
    diff = gtfree_scores(base, chat, prompts)
    assert float(diff["kl"].min()) > 0 and float(diff["topk@10"].min()) < 1.0
