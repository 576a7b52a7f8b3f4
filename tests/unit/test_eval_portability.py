"""Portability, MQuAKE, locality facets, ConflictEdit and RoundEdit: hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from editlens.data.schema import Probe, Rewrite, make_case
from editlens.errors import EditlensError, MetricError
from editlens.evaluate import core
from editlens import drivers as D
from editlens.evaluate import portability as P
from editlens.lm.ops import TeacherForced


def tf_of(logprobs, argmax=None, target=None):
    lp = torch.log(torch.tensor(logprobs, dtype=torch.float32))
    n = len(logprobs)
    tid = torch.tensor(target if target is not None else list(range(n)))
    arg = torch.tensor(argmax if argmax is not None else list(range(n)))
    return TeacherForced(tid, lp, arg)


# ================================================================================================ pure functions
def test_fact_probability():
    assert P.fact_probability([tf_of([0.5, 0.125]), tf_of([0.5])]) == pytest.approx((0.25 + 0.5) / 2)
    with pytest.raises(EditlensError):
        P.fact_probability([])


def test_conflict_score_and_magnitude():
    assert P.conflict_score([0.5, 0.2, 0.3], [0.4, 0.3, 0.3]) == pytest.approx(1 / 3)  # ties do not count
    # (0.5-0.25)/0.5 = 0.5 ; (0.1-0.3)/0.1 = -2 -> floored at -1 ; (0.2-0)/0.2 = 1
    assert P.conflict_magnitude([0.5, 0.1, 0.2], [0.25, 0.3, 0.0]) == pytest.approx((0.5 - 1 + 1) / 3)
    assert P.tied_fact_damage([0.4, 0.2], [0.1, 0.3]) == pytest.approx((0.75 - 0.5) / 2)
    with pytest.raises(EditlensError, match="positive"):
        P.conflict_magnitude([0.0], [0.1])
    with pytest.raises(EditlensError, match="3 values"):
        P.conflict_score([0.1, 0.2, 0.3], [0.1])


def test_round_success():
    assert P.round_success(0.6, 0.2, 0.5, 0.1) == 1.0
    assert P.round_success(0.1, 0.2, 0.5, 0.1) == 0.5
    assert P.round_success(0.2, 0.2, 0.1, 0.1) == 0.0


def test_knowledge_distortion_hand_computed():
    # P = [0.2, 0.2] -> [0.5, 0.5]; Q = [0.3, 0] -> [1, 0]; M = [0.75, 0.25]
    # KL(P||M) = 0.5 ln(2/3) + 0.5 ln 2 = 0.5 ln(4/3); KL(Q||M) = ln(4/3); JS = 0.75 ln(4/3)
    d = P.knowledge_distortion([0.2, 0.2], [0.3, 0.0])
    assert d == pytest.approx(0.75 * math.log(4 / 3))
    assert P.knowledge_distortion([0.2, 0.2], [0.3, 0.0], code_compat=True) == pytest.approx(0.75 * math.log(4 / 3) / 2)
    assert P.knowledge_distortion([0.1, 0.3, 0.6], [0.2, 0.6, 1.2]) == pytest.approx(0.0, abs=1e-12)  # scale-free
    assert P.knowledge_distortion([1.0, 0.0], [0.0, 1.0]) == pytest.approx(math.log(2))
    with pytest.raises(EditlensError, match="non-negative"):
        P.knowledge_distortion([0.0, 0.0], [0.1, 0.2])


def test_ignore_and_failure_rate():
    # others: 0.3 > 0.1 yes, 0.2 > 0.2 no, 0.1 > 0.05 yes -> 2/3
    assert P.ignore_rate([0.5, 0.3, 0.2, 0.1], [0.9, 0.1, 0.2, 0.05]) == pytest.approx(2 / 3)
    assert P.ignore_rate([0.3, 0.5], [0.1, 0.6], target_index=1) == 1.0
    assert P.failure_rate([0.6, 0.5, 0.2, 1.0]) == 0.5  # 0.5 is not > 0.5
    with pytest.raises(EditlensError, match="two true objects"):
        P.ignore_rate([0.5], [0.4])
    with pytest.raises(EditlensError, match="outside"):
        P.ignore_rate([0.5, 0.1], [0.4, 0.1], target_index=5)


def test_argmax_unchanged_and_distract_prompt():
    assert P.argmax_unchanged(tf_of([0.5, 0.5, 0.5], [1, 2, 3]), tf_of([0.1, 0.1, 0.1], [1, 9, 3])) == pytest.approx(2 / 3)
    rw = Rewrite("{} is a product of", "Windows 11", "Google", "Microsoft")
    assert P.distract_prompt(rw, "Office 365, developed by") == "Windows 11 is a product of Google. Office 365, developed by"


# ================================================================================================ fake systems
class TableSystem:
    """A System answering from tables: generations, teacher-forced (probs, argmax), next-token argmax."""

    prompt_format = "raw"

    def __init__(self, fp="t", gens=None, tf=None, nxt=None):
        self.fingerprint = fp
        self.gens = gens or {}
        self.tf = tf or {}
        self.nxt = nxt or {}

    def next_token_logprobs(self, prompts):
        out = torch.full((len(prompts), 8), -10.0)
        for i, p in enumerate(prompts):
            out[i, self.nxt.get(p, 0)] = 0.0
        return torch.log_softmax(out, -1)

    def teacher_forced(self, prompts, targets):
        res = []
        for p, t in zip(prompts, targets):
            probs, arg = self.tf.get((p, t), ([0.5], [0]))
            res.append(tf_of(probs, arg))
        return res

    def target_logprobs(self, prompts, targets):
        return [x.logprobs for x in self.teacher_forced(prompts, targets)]

    def generate(self, prompts, max_new_tokens=16):
        return [self.gens.get(p, "") for p in prompts]


def _rows(res):
    return {(r.case_id, r.probe_kind, r.metric): r.value for r in res.rows}


def test_portability_tacc_and_ar_by_subtype():
    rw = Rewrite("{} plays the sport of", "Lionel Messi", "basketball", "soccer")
    case = make_case("m", rw, {"portability": [
        Probe("Leo Messi plays the sport of", "basketball", meta={"subtype": "subject_replace"}),
        Probe("The ball Messi uses is a", "basketball", meta={"subtype": "one_hop"}),
        Probe("Messi's sport uses a hoop called a", "basket", aliases=("net",), meta={"subtype": "one_hop"}),
        Probe("No subtype here", "x")]})
    sys_ = TableSystem(gens={"Leo Messi plays the sport of": " basketball.", "The ball Messi uses is a": " football",
                             "Messi's sport uses a hoop called a": " net, of course"},
                       tf={("Leo Messi plays the sport of", "basketball"): ([0.5, 0.5], [0, 0]),   # 1 of 2 tokens
                           ("The ball Messi uses is a", "basketball"): ([0.5], [0]),            # 1
                           ("Messi's sport uses a hoop called a", "basket"): ([0.5], [3])})     # 0
    res = core.evaluate(sys_, [case], metrics=["portability_tacc", "portability_ar"], progress=False, cache=False)
    rows = _rows(res)
    assert rows[("m", "portability/subject_replace", "portability_tacc")] == 0.5
    assert rows[("m", "portability/one_hop", "portability_tacc")] == 0.5
    assert rows[("m", "portability/unspecified", "portability_tacc")] == 1.0
    assert rows[("m", "portability/subject_replace", "portability_ar")] == 1.0
    assert rows[("m", "portability/one_hop", "portability_ar")] == 0.5   # " football" no, " net, of course" alias
    with pytest.raises(MetricError, match="unknown match"):
        P.PortabilityAR(match="fuzzy")


def _mquake_case():
    rw1 = Rewrite("{} is a citizen of", "Taylor Swift", "Canada", "United States of America")
    rw2 = Rewrite("The head of state of {} is", "Canada", "Ringo", "Charles III")
    q = [Probe(f"Q{i}?", "Ottawa", "Washington", ("Ottawa, Ontario",), {"group": "1", "phrasing": i}) for i in range(3)]
    hops = [Probe("Taylor Swift is a citizen of", "Canada", meta={"subtype": "single_hop", "hop": 0}),
            Probe("The capital of Canada is", "Ottawa", meta={"subtype": "single_hop", "hop": 1})]
    return make_case("1", rw1, {"multihop": q, "portability": hops}, extra_rewrites=[rw2])


def test_mquake_metrics_hand_computed():
    t = P.MQUAKE_QA_TEMPLATE
    gens = {t.format("Q0?"): " Washington", t.format("Q1?"): " It is Ottawa, Ontario.", t.format("Q2?"): " Toronto",
            "Taylor Swift is a citizen of": " Canada.", "The head of state of Canada is": " King Charles III",
            "The capital of Canada is": " Ottawa"}
    res = core.evaluate(TableSystem(gens=gens), [_mquake_case()], metrics=["mh_acc", "mh_edit_wise", "mh_instance_wise"],
                        progress=False, cache=False)
    rows = _rows(res)
    assert rows[("1", "multihop", "mh_acc")] == 1.0          # phrasing 1 answers it
    assert rows[("1", "multihop", "mh_edit_wise")] == 0.5     # Canada yes, Ringo no
    assert rows[("1", "multihop", "mh_instance_wise")] == 1.0  # both single hops recalled
    gens["The capital of Canada is"] = " Toronto"
    gens[t.format("Q1?")] = " Paris"
    res = core.evaluate(TableSystem(gens=gens), [_mquake_case()], metrics=["mh_acc", "mh_instance_wise"],
                        progress=False, cache=False)
    rows = _rows(res)
    assert rows[("1", "multihop", "mh_acc")] == 0.0 and rows[("1", "multihop", "mh_instance_wise")] == 0.0
    # cases without multihop probes get no mh_* rows
    plain = make_case("p", Rewrite("{} is in", "X", "Y", "Z"))
    res = core.evaluate(TableSystem(), [plain], metrics=["mh_acc", "mh_edit_wise", "mh_instance_wise"],
                        progress=False, cache=False)
    assert res.rows == []


def test_mquake_sample_runs(shared_data_dir):
    from editlens.data import load_cases

    cases = load_cases(shared_data_dir / "mquake_cf_sample.json")
    res = core.evaluate(TableSystem(), cases, metrics=["mh_acc", "mh_edit_wise", "mh_instance_wise"],
                        progress=False, cache=False)
    kinds = {(r.probe_kind, r.metric) for r in res.rows}
    assert kinds == {("multihop", "mh_acc"), ("multihop", "mh_edit_wise"), ("multihop", "mh_instance_wise")}
    assert len(res.rows) == 3 * len(cases) and all(r.value == 0.0 for r in res.rows)  # empty generations


def test_other_attribution_and_distract_neighbor():
    rw = Rewrite("{} is a product of", "Windows 11", "Google", "Microsoft")
    case = make_case("w", rw, {
        "other_attribution": [Probe("Windows 11 was released in", "2021"), Probe("Windows 11 is an", None)],
        "neighborhood": [Probe("Office 365, developed by", "Microsoft", "Google")]})
    dn = "Windows 11 is a product of Google. Office 365, developed by"
    base = TableSystem("b", tf={("Windows 11 was released in", "2021"): ([0.5, 0.5], [4, 5]),
                                (dn, "Microsoft"): ([0.5], [7])}, nxt={"Windows 11 is an": 3})
    edited = TableSystem("e", tf={("Windows 11 was released in", "2021"): ([0.1, 0.1], [4, 6]),
                                  (dn, "Microsoft"): ([0.1], [2])}, nxt={"Windows 11 is an": 3})
    res = core.evaluate(edited, [case], base=base, metrics=["other_attribution", "distract_neighbor"],
                        progress=False, cache=False)
    rows = _rows(res)
    assert rows[("w", "other_attribution", "other_attribution")] == pytest.approx((0.5 + 1.0) / 2)
    assert rows[("w", "distract_neighbor", "distract_neighbor")] == 0.0
    res = core.evaluate(edited, [case], base=base, metrics=[P.DistractNeighbor(construct=False)],
                        progress=False, cache=False)
    assert res.rows == []
    with pytest.raises(MetricError, match="base"):
        core.evaluate(edited, [case], metrics=["other_attribution"], progress=False, cache=False)


# ================================================================================================ drivers
class StateSystem(TableSystem):
    """Teacher-forced probability of (prompt, obj) read from a table for the current edit state."""

    def __init__(self, probs):
        super().__init__("s")
        self.probs = probs

    def teacher_forced(self, prompts, targets):
        return [tf_of([self.probs[(p, t)]]) for p, t in zip(prompts, targets)]


class FakeEditFn:
    """edit_fn whose state is the tuple of applied case ids; records calls and undos."""

    def __init__(self, tables):
        self.tables = tables
        self.log = []

    def __call__(self, lm, cases):
        key = tuple(c.case_id for c in cases)
        self.log.append(("apply", key))
        fn = self

        class Handle:
            system = StateSystem(fn.tables[key])

            def undo(self_inner):
                fn.log.append(("undo", key))

        return Handle()


def test_conflict_scores_driver_hand_computed():
    e1 = make_case("e1", Rewrite("{} was written by", "Hamlet", "Agatha Christie", "Shakespeare"))
    e2 = make_case("e2", Rewrite("The notable work of {} is", "Agatha Christie", "Odyssey", "Hamlet"))
    new = P.FactQuery(("Odyssey was written by",), "Agatha Christie")
    old = P.FactQuery(("Hamlet was written by", "The author of Hamlet is"), "Agatha Christie")
    tied = P.FactQuery("The notable work of Shakespeare is", "Hamlet")
    case = P.ConflictCase("r1", "composite", (e1, e2), new, old, tied)
    base = StateSystem({("The notable work of Shakespeare is", "Hamlet"): 0.4})
    tables = {("e1",): {("Hamlet was written by", "Agatha Christie"): 0.6, ("The author of Hamlet is", "Agatha Christie"): 0.2},
              ("e1", "e2"): {("Odyssey was written by", "Agatha Christie"): 0.5,
                             ("Hamlet was written by", "Agatha Christie"): 0.1, ("The author of Hamlet is", "Agatha Christie"): 0.1,
                             ("The notable work of Shakespeare is", "Hamlet"): 0.1}}
    fn = FakeEditFn(tables)
    res = D.conflict_scores(None, fn, [case], base_system=base)
    rows = _rows(res)
    k = "conflict/composite"
    assert rows[("r1", k, "p_old_mid")] == pytest.approx(0.4)   # mean of 0.6, 0.2
    assert rows[("r1", k, "p_old_final")] == pytest.approx(0.1)
    assert rows[("r1", k, "conflict_score")] == 1.0              # 0.5 > 0.1
    assert rows[("r1", k, "conflict_magnitude")] == pytest.approx((0.4 - 0.1) / 0.4)
    assert rows[("r1", k, "tied_fact_damage")] == pytest.approx((0.4 - 0.1) / 0.4)
    assert res.meta["summary"]["composite"]["CS"] == 1.0 and res.meta["summary"]["composite"]["n"] == 1
    assert fn.log == [("apply", ("e1",)), ("undo", ("e1",)), ("apply", ("e1", "e2")), ("undo", ("e1", "e2"))]


def test_conflict_driver_rejects_bad_handle():
    e = make_case("e", Rewrite("{} is", "a", "b", "c"))
    case = P.ConflictCase("x", "reverse", (e, e), P.FactQuery("a is", "b"), P.FactQuery("a is", "c"))
    with pytest.raises(EditlensError, match="Edit-like handle"):
        D.conflict_scores(None, lambda lm, cases: object(), [case], base_system=TableSystem())
    with pytest.raises(EditlensError, match="two EditCases"):
        P.ConflictCase("x", "reverse", (e,), P.FactQuery("a is", "b"), P.FactQuery("a is", "c"))
    with pytest.raises(EditlensError, match="non-empty"):
        P.FactQuery((), "b")


def test_round_edit_driver_hand_computed():
    rw = Rewrite("{} speaks", "Ann", "French", "English")  # o = English, o* = French
    rc = P.make_round_case("a", rw, ["German", "English", "Dutch"])
    assert rc.objects == ("English", "German", "Dutch") and rc.intermediate == "French"
    assert rc.edits[1].rewrite.target_new == "English" and rc.edits[1].rewrite.target_true == "French"
    pr = "Ann speaks"
    base = StateSystem({(pr, "English"): 0.4, (pr, "German"): 0.3, (pr, "Dutch"): 0.1})
    tables = {("a/e1",): {(pr, "French"): 0.7, (pr, "English"): 0.1},
              ("a/e1", "a/e2"): {(pr, "English"): 0.4, (pr, "German"): 0.05, (pr, "Dutch"): 0.15, (pr, "French"): 0.2}}
    res = D.round_edit_scores(None, FakeEditFn(tables), [rc], base_system=base)
    rows = _rows(res)
    assert rows[("a", "round_edit", "round_success")] == 1.0
    assert rows[("a", "round_edit", "ignore_rate")] == 0.5   # German fell, Dutch rose
    assert rows[("a", "round_edit", "failure")] == 0.0
    assert rows[("a", "round_edit", "distortion")] == pytest.approx(
        P.knowledge_distortion([0.4, 0.3, 0.1], [0.4, 0.05, 0.15]))
    assert res.meta["summary"]["FR"] == 0.0 and res.meta["summary"]["n"] == 1
    with pytest.raises(EditlensError, match="target_true"):
        P.make_round_case("b", Rewrite("{} speaks", "Ann", "French"), ["x", "y"])


def test_drivers_on_tiny_model_restore_weights(tiny_llama):
    """A real edit_fn (a weight perturbation with undo) on a tiny model: probabilities move, undo restores."""
    lm = tiny_llama
    w = lm.model.lm_head.weight if hasattr(lm.model, "lm_head") else next(lm.model.parameters())
    orig = w.detach().clone()
    from editlens.evaluate.system import ModelSystem

    def edit_fn(lm_, cases):
        snap = w.detach().clone()
        g = torch.Generator().manual_seed(len(cases))
        with torch.no_grad():
            w.add_(0.5 * torch.randn(w.shape, generator=g))

        class H:
            system = ModelSystem(lm_)

            def undo(self):
                with torch.no_grad():
                    w.copy_(snap)

        return H()

    rc = P.make_round_case("t", Rewrite("{} speaks", "Ann", "French", "English"), ["English", "German"])
    res = D.round_edit_scores(lm, edit_fn, [rc])
    assert {r.metric for r in res.rows} == {"round_success", "distortion", "ignore_rate", "failure"}
    assert 0.0 <= res.meta["summary"]["D"] <= math.log(2) + 1e-9
    assert torch.equal(w, orig)
