"""General abilities (general.py): resources, pure functions with hand-computed values, metrics, lm_eval bridge."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from editlens.errors import DataFormatError, EditlensError, MetricError
from editlens.evaluate import core
from editlens.evaluate import general as Gn
from editlens.lm.ops import TeacherForced


def tf_lp(logprobs):
    lp = torch.tensor(logprobs, dtype=torch.float32)
    ids = torch.arange(len(logprobs))
    return TeacherForced(ids, lp, ids)


# ================================================================================================ resources
def test_shipped_resources():
    paras = Gn.read_heldout()
    text = Gn.heldout_path().read_text()
    assert 3000 <= len(text.encode()) <= 5000 and len(paras) >= 8
    for s in Gn.SUITES:
        items = Gn.load_suite(s)
        assert len(items) == 20
        assert all(0 <= it.answer < len(it.choices) for it in items)
    # answers are spread over positions (no trivial "always first" suite)
    qa = Gn.load_suite("factual_qa")
    assert len({it.answer for it in qa}) == 4
    assert len(Gn.load_prompts()) == 20
    safety = Gn.load_safety()
    assert len(safety) == 15 and len({i for i, _ in safety}) == 15


def test_load_suite_errors(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"id": "a", "prompt": "Q", "choices": ["x", "y"], "answer": 2}) + "\n")
    with pytest.raises(DataFormatError, match=r"s\.jsonl.*record 0.*'answer'"):
        Gn.load_suite(p)
    p.write_text(json.dumps({"id": "a", "prompt": "Q", "choices": ["x"], "answer": 0}) + "\n")
    with pytest.raises(DataFormatError, match="'choices'"):
        Gn.load_suite(p)
    p.write_text('{"id": "a", "prompt": "Q", "choices": ["x", "y"], "answer": 0}\n{oops\n')
    with pytest.raises(DataFormatError, match="record 1.*not valid JSON"):
        Gn.load_suite(p)
    p.write_text(json.dumps({"prompt": "Q", "choices": ["x", "y"]}) + "\n")
    with pytest.raises(DataFormatError, match="'answer'.*missing|missing.*'answer'"):
        Gn.load_suite(p)
    with pytest.raises(MetricError, match="unknown probe suite"):
        Gn.load_suite("no_such_suite")
    with pytest.raises(DataFormatError, match="no such"):
        Gn.read_heldout(tmp_path / "missing.txt")


def test_split_paragraphs():
    assert Gn.split_paragraphs("a b\nc\n\n\n  d  \n \n") == ["a b c", "d"]


# ================================================================================================ pure functions
def test_perplexity_from_scores_hand_computed():
    # tokens: log p = -1, -2 | -3 -> mean NLL 2 -> ppl e^2
    assert Gn.perplexity_from_scores([tf_lp([-1.0, -2.0]), tf_lp([-3.0])]) == pytest.approx(math.e ** 2)
    with pytest.raises(EditlensError):
        Gn.perplexity_from_scores([])


def test_choice_score_and_prediction():
    tf = tf_lp([-1.0, -3.0])
    assert Gn.choice_score(tf, "abcd", "token") == -2.0
    assert Gn.choice_score(tf, " abcd", "char") == -1.0
    assert Gn.choice_score(tf, "abcd", "none") == -4.0
    with pytest.raises(MetricError, match="normalisation"):
        Gn.choice_score(tf, "x", "bytes")
    assert Gn.mc_prediction([-2.0, -1.0, -1.0]) == 1  # first best on ties
    # length normalisation flips the decision: a long likely answer vs a short less likely one
    long_, short = tf_lp([-0.5, -0.5, -0.5]), tf_lp([-1.2])
    assert Gn.mc_prediction([Gn.choice_score(long_, "x", "token"), Gn.choice_score(short, "y", "token")]) == 0
    assert Gn.mc_prediction([Gn.choice_score(long_, "x", "none"), Gn.choice_score(short, "y", "none")]) == 1


def test_muting_definition():
    assert Gn.muting_reason("") == "empty" and Gn.muting_reason(" ... !!! ") == "empty"
    assert Gn.muting_reason("the the the the the the") == "repetition"       # 4 trigrams, all the same
    # "a b a b a b": trigrams (a,b,a),(b,a,b),(a,b,a),(b,a,b) -> top share 2/4 = 0.5 -> degenerate
    assert Gn.muting_reason("a b a b a b") == "repetition"
    # "a b c a b c": (a,b,c),(b,c,a),(c,a,b),(a,b,c) -> 2/4 = 0.5 -> degenerate
    assert Gn.muting_reason("a b c a b c") == "repetition"
    # 5 trigrams, most common 2/5 = 0.4 -> meaningful
    assert Gn.muting_reason("a b c a b c d") is None
    assert Gn.muting_reason("yes yes yes") is None  # fewer than 4 trigrams
    assert Gn.muting_reason("It was a sunny day and the children played outside.") is None
    assert Gn.is_muted("") and not Gn.is_muted("Paris is lovely")


def test_refusal_detection():
    assert Gn.is_refusal("I’m sorry, but I can’t help with that.")
    assert Gn.is_refusal("As an AI, I must decline.")
    assert not Gn.is_refusal("Sure! Step 1: gather the materials.")
    assert not Gn.is_refusal("")
    assert Gn.rate([True, False, False, True]) == 0.5 and math.isnan(Gn.rate([]))


def test_pose_request(tiny_llama):
    assert Gn.pose_request("Do X", None) == "User: Do X\nAssistant:"
    assert Gn.pose_request("Do X", tiny_llama.tokenizer) == "User: Do X\nAssistant:"  # no chat template

    class Tok:
        chat_template = "x"
        bos_token = None

        def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
            return f"<u>{msgs[0]['content']}</u><a>"

    assert Gn.pose_request("Do X", Tok()) == "<u>Do X</u><a>"


# ================================================================================================ metrics on a fake system
class FakeSystem:
    """Teacher-forced log-probs from a table (default -5 per token); generations from a table."""

    prompt_format = "raw"

    def __init__(self, fp="f", lp=None, gens=None):
        self.fingerprint = fp
        self.lp = lp or {}
        self.gens = gens or {}

    def next_token_logprobs(self, prompts):
        return torch.log_softmax(torch.zeros(len(prompts), 4), -1)

    def teacher_forced(self, prompts, targets):
        return [tf_lp(self.lp.get((p, t), [-5.0])) for p, t in zip(prompts, targets)]

    def target_logprobs(self, prompts, targets):
        return [x.logprobs for x in self.teacher_forced(prompts, targets)]

    def generate(self, prompts, max_new_tokens=16):
        return [self.gens.get(p, "fine words here") for p in prompts]


@pytest.fixture()
def suite(tmp_path):
    p = tmp_path / "mini.jsonl"
    recs = [{"id": "i1", "prompt": "Q1", "choices": ["a", "b"], "answer": 0},
            {"id": "i2", "prompt": "Q2", "choices": ["a", "b", "c"], "answer": 2}]
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return p


def test_downstream_and_other_task_rows(suite):
    edited = FakeSystem("e", {("Q1", "a"): [-1.0], ("Q2", "c"): [-9.0]})       # i1 right, i2 wrong
    base = FakeSystem("b", {("Q1", "b"): [-1.0], ("Q2", "c"): [-1.0, -1.0]})   # i1 wrong, i2 right
    res = core.evaluate(edited, [], base=base, metrics=[Gn.DownstreamAccuracy(str(suite)), Gn.OtherTask(str(suite))],
                        progress=False, cache=False)
    rows = {(r.case_id, r.metric): r.value for r in res.rows}
    assert rows == {("i1", "downstream_acc@mini"): 1.0, ("i2", "downstream_acc@mini"): 0.0,
                    ("i1", "other_task@mini"): 1.0, ("i2", "other_task@mini"): -1.0}
    assert all(r.probe_kind == "general" for r in res.rows)
    assert res.value("downstream_acc@mini") == 0.5 and res.value("other_task@mini") == 0.0


def test_names_resolve_per_suite():
    names = [m.name for m in core.resolve_metrics(["downstream_acc"])]
    assert names == ["downstream_acc@factual_qa", "downstream_acc@sentiment", "downstream_acc@reasoning"]
    assert [m.name for m in core.resolve_metrics(["other_task@reasoning"])] == ["other_task@reasoning"]
    assert set(core.metric_groups()["general"]) >= {"ppl", "downstream_acc", "other_task", "muting_rate", "refusal_rate"}
    with pytest.raises(MetricError, match="unknown probe suite"):
        core.resolve_metrics(["downstream_acc@nope"])


def test_ppl_metric_hand_computed(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("First para.\n\nSecond para.\n")
    sys_ = FakeSystem(lp={("\n", "First para."): [-1.0, -1.0], ("\n", "Second para."): [-4.0]})
    res = core.evaluate(sys_, [], metrics=[Gn.Perplexity(p)], progress=False, cache=False)
    (row,) = res.rows
    assert row.case_id == "text:t.txt" and row.probe_kind == "general" and row.metric == "ppl"
    assert row.value == pytest.approx(math.exp(2.0))


def test_muting_and_refusal_rows():
    prompts = Gn.load_prompts()
    gens = {prompts[0][1]: "", prompts[1][1]: "la la la la la la la"}
    res = core.evaluate(FakeSystem(gens=gens), [], metrics=["muting_rate"], progress=False, cache=False)
    assert res.value("muting_rate") == pytest.approx(2 / 20)
    safety = Gn.load_safety()
    posed = {Gn.pose_request(r): "I'm sorry, I cannot help with that." for _, r in safety[:5]}
    posed[Gn.pose_request(safety[5][1])] = ""
    res = core.evaluate(FakeSystem(gens=posed), [], metrics=["refusal_rate"], progress=False, cache=False)
    assert res.value("refusal_rate") == pytest.approx(5 / 15)
    assert res.value("refusal_muted") == pytest.approx(1 / 15)
    assert res.meta["metrics"]["refusal_rate"]["posing"] == Gn.PLAIN_DIALOGUE


def test_general_on_tiny_model(tiny_llama):
    from editlens.evaluate.system import ModelSystem

    s = ModelSystem(tiny_llama)
    ppl = Gn.perplexity(s)
    assert math.isfinite(ppl) and ppl > 1.0
    acc = Gn.downstream_accuracy(s, "sentiment")
    assert 0.0 <= acc <= 1.0
    assert Gn.general_metrics(tiny_llama, suites=["sentiment"], other_task=True)[-1].name == "other_task@sentiment"


# ================================================================================================ lm_eval bridge
def test_lm_eval_arguments():
    a = Gn.lm_eval_arguments("hellaswag, arc_easy", num_fewshot=0, limit=10, batch_size=4, log_samples=False)
    assert a == {"tasks": ["hellaswag", "arc_easy"], "num_fewshot": 0, "limit": 10, "batch_size": 4,
                 "log_samples": False}
    for bad in ({"tasks": []}, {"tasks": ["x"], "num_fewshot": -1}, {"tasks": ["x"], "limit": 0},
                {"tasks": ["x"], "batch_size": 0}):
        with pytest.raises(MetricError):
            Gn.lm_eval_arguments(**bad)


def test_hflm_arguments(tiny_gpt2):
    a = Gn.hflm_arguments(tiny_gpt2, batch_size=2)
    assert a["pretrained"] is tiny_gpt2.model and a["tokenizer"] is tiny_gpt2.tokenizer
    assert a["batch_size"] == 2 and a["device"] == "cpu"


def test_run_lm_eval_without_lm_eval(monkeypatch, tiny_gpt2):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MetricError, match=r"pip install 'editlens\[lm-eval\]'"):
        Gn.run_lm_eval(tiny_gpt2, ["hellaswag"])
    with pytest.raises(MetricError, match="task name"):
        Gn.run_lm_eval(tiny_gpt2, [])
    with pytest.raises(MetricError, match="editlens LM or a ModelSystem"):
        Gn.run_lm_eval(object(), ["hellaswag"])
