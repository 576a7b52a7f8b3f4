"""ConflictEdit and RoundEdit metrics (Li et al., ICLR 2024; the pitfalls survey's Tables 3–4) as registered metrics.

They read the facts the loaders of :mod:`editlens.data.formats.pitfalls` put in ``case.meta`` and use the
probability of Li et al.'s code, ``p(o | s, r)`` = the mean over the fact's prompts of
``exp(mean token log-prob of o)`` (:func:`editlens.evaluate.portability.fact_probability`). θ is the unedited
model (the base), θ′ the model after ``e1`` only, θ″ (RoundEdit: θ*) the model after ``e1`` then ``e2`` (the
evaluated system).

=====================  ======================================================================  =======  ==========
metric                 one row per case (the mean over cases is the paper's figure)            better   systems
=====================  ======================================================================  =======  ==========
``conflict_score``     CS: ``1[p_θ″(k_n) > p_θ″(k_o)]``                                          higher   θ″
``conflict_magnitude`` CM: ``max((p_θ′(k_o) − p_θ″(k_o)) / p_θ′(k_o), −1)``                      higher   θ′, θ″
``tied_fact_damage``   TFD (composite): ``(p_θ(k_t) − p_θ″(k_t)) / p_θ(k_t)`` (θ as in the code) lower    θ, θ″
``round_success``      Succ: ``½·1[p_θ′(o*) > p_θ′(o)] + ½·1[p_θ*(o) > p_θ*(o*)]``               higher   θ′, θ*
``distortion``         D: ``JS(P_θ ‖ P_θ*)`` over the true objects, P L1-normalised, nats       lower    θ, θ*
``ignore_rate``        IR: share of the other true objects whose probability fell              lower    θ, θ*
``failure_rate``       FR: ``1[IR > 0.5]``                                                      lower    θ, θ*
=====================  ======================================================================  =======  ==========

Rows have ``probe_kind = "conflict/<reverse|composite|coverage>"`` (ConflictEdit) or ``"round_edit"``
(RoundEdit). ``distortion@code`` divides by ``|O|`` as the code's ``KLDivLoss(reduction="batchmean")`` does.

**θ′.** ``conflict_magnitude`` and ``round_success`` need the model after the first edit only, which an evaluation
of one edited system does not have. They ask for it with :class:`AfterFirstEdit` requests, which a
:class:`StagedSystem` answers from answers taken on θ′; :func:`editlens.drivers.evaluate_staged` (and so
``editlens eval --method``, and the runner for specs that name these metrics on such data) edits each record
alone — ``e1`` (θ′: answers frozen), undo, ``e1`` then ``e2`` (θ″), evaluate, undo — as Li et al. do. Evaluated
on a plain system (no θ′), these two metrics give no rows (they declare :attr:`needs`), never a made-up value.
All seven give rows only on ConflictEdit / RoundEdit cases (``needs`` says so; ``check_metric`` over the default
contract cases then skips them, and ``tests/unit/test_pitfalls.py`` runs the full contract on the shipped samples).
The other five need only θ and θ″ and work on any edited system; for the paper's protocol the edits of each
record must still be made alone (the staged driver does), not all records at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from editlens.data.formats.pitfalls import CONFLICT_NAME, ROUND_NAME
from editlens.errors import MetricError
from editlens.evaluate import portability as P
from editlens.evaluate.core import BASE, EDITED, Answers, CustomRequest, Metric, Request, Row, Score, register_metric

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.system import System

__all__ = ["AfterFirstEdit", "StagedSystem", "after_first_requests", "answer_after_first", "conflict_facts",
           "round_facts", "ConflictScore", "ConflictMagnitude", "TiedFactDamage", "RoundSuccess", "Distortion",
           "IgnoreRate", "FailureRate", "STAGED_METRICS"]

#: metrics that need θ′ (the model after the first edit only)
STAGED_METRICS = ("conflict_magnitude", "round_success")
_NEEDS_STAGE = ("the model after the first edit only (θ′): evaluate with editlens.drivers.evaluate_staged, "
                "`editlens eval --method M` or a run spec, which edit each ConflictEdit/RoundEdit record in two stages")
_NEEDS_DATA = ("ConflictEdit / RoundEdit cases (editlens.load_cases of reverse_edit/composite_edit/coverage_edit/easy/"
               "hard.json; samples in editlens/resources/data/pitfalls/)")


# ================================================================================================ θ′ requests
@dataclass(frozen=True, order=True)
class AfterFirstEdit(CustomRequest):
    """The mean token log-prob of ``target`` after ``prompt`` on θ′ (the model after the case's first edit only).

    Only a :class:`StagedSystem` can answer it (from answers taken on θ′); any other system answers ``None``."""

    prompt: str
    target: str

    @classmethod
    def answer_group(cls, system: "System", requests: Sequence["CustomRequest"]) -> list[Any]:
        return [None] * len(requests)


def answer_after_first(mid: "System", requests: Sequence[AfterFirstEdit]) -> dict[AfterFirstEdit, float]:
    """Answer :class:`AfterFirstEdit` requests on ``mid`` (θ′) with one ``teacher_forced`` call."""
    reqs = sorted(set(requests))
    if not reqs:
        return {}
    tfs = mid.teacher_forced([r.prompt for r in reqs], [r.target for r in reqs])
    return {r: float(tf.mean_logprob) for r, tf in zip(reqs, tfs)}


def after_first_requests(metrics: Sequence[Metric], cases: Sequence["EditCase"]) -> list[AfterFirstEdit]:
    """The :class:`AfterFirstEdit` requests ``metrics`` make for ``cases`` (what the staged driver answers on θ′)."""
    return sorted({r for m in metrics for _, r in m.requests(cases) if isinstance(r, AfterFirstEdit)})


class StagedSystem:
    """The evaluated system θ″ plus frozen answers taken on θ′.

    Every attribute and call goes to ``final``; :class:`AfterFirstEdit` requests are answered from ``after_first``
    (a request missing there is an error naming it). Other custom request types are answered by ``final``."""

    def __init__(self, final: "System", after_first: Mapping[AfterFirstEdit, float]):
        self.final = final
        self.after_first = dict(after_first)

    def __getattr__(self, name: str) -> Any:
        if name in ("final", "after_first"):  # not yet set (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.final, name)

    def answer_custom(self, requests: Sequence[CustomRequest]) -> list[Any]:
        reqs = list(requests)
        if reqs and all(isinstance(r, AfterFirstEdit) for r in reqs):
            missing = [r for r in reqs if r not in self.after_first]
            if missing:
                raise MetricError(f"no θ′ answer for {missing[0]!r}: the staged driver did not take it")
            return [self.after_first[r] for r in reqs]
        own = getattr(self.final, "answer_custom", None)
        return list(own(reqs)) if callable(own) else type(reqs[0]).answer_group(self.final, reqs)


# ================================================================================================ facts
def conflict_facts(case: "EditCase") -> dict[str, P.FactQuery] | None:
    """``{"k_n", "k_o"[, "k_t"]}`` of a ConflictEdit case (``None`` for other cases)."""
    if case.meta.get("source") != CONFLICT_NAME:
        return None
    try:
        return {k: P.FactQuery(tuple(v["prompts"]), v["object"]) for k, v in case.meta["facts"].items()}
    except (KeyError, TypeError) as e:
        raise MetricError(f"case {case.case_id!r}: malformed ConflictEdit facts in meta ({e!r}); load the data "
                          "with editlens.load_cases") from None


def round_facts(case: "EditCase") -> tuple[tuple[str, ...], tuple[str, ...], str] | None:
    """``(prompts, true objects with o first, o*)`` of a RoundEdit case (``None`` for other cases)."""
    if case.meta.get("source") != ROUND_NAME:
        return None
    try:
        prompts, objs, inter = tuple(case.meta["prompts"]), tuple(case.meta["true_objects"]), case.meta["intermediate"]
    except (KeyError, TypeError) as e:
        raise MetricError(f"case {case.case_id!r}: malformed RoundEdit meta ({e!r}); load the data with "
                          "editlens.load_cases") from None
    if len(objs) < 2 or not prompts:
        raise MetricError(f"case {case.case_id!r}: RoundEdit needs prompts and at least two true objects")
    return prompts, objs, str(inter)


def _kind(case: "EditCase") -> str:
    return f"conflict/{case.meta.get('conflict_kind', 'unknown')}"


def _scores(fact: P.FactQuery) -> list[Score]:
    return [Score(p, fact.obj) for p in fact.prompts]


def _after(fact: P.FactQuery) -> list[AfterFirstEdit]:
    return [AfterFirstEdit(p, fact.obj) for p in fact.prompts]


def _p(answers: Answers, fact: P.FactQuery, on: str = EDITED) -> float:
    return P.fact_probability([answers.score(p, fact.obj, on=on) for p in fact.prompts])


def _p_mid(answers: Answers, fact: P.FactQuery) -> float | None:
    vals = [answers.get(r) for r in _after(fact)]
    if any(v is None for v in vals):
        return None
    return float(sum(math.exp(v) for v in vals) / len(vals))


def _objects(prompts: Sequence[str], objs: Sequence[str]) -> list[P.FactQuery]:
    return [P.FactQuery(tuple(prompts), o) for o in objs]


# ================================================================================================ ConflictEdit
class _Conflict(Metric):
    groups = ("pitfalls",)
    needs = _NEEDS_DATA

    def facts(self, case: "EditCase") -> dict[str, P.FactQuery] | None:
        return conflict_facts(case)


@register_metric("conflict_score", groups=("pitfalls",))
class ConflictScore(_Conflict):
    """ConflictEdit CS: the implied new fact beats the old one after both edits, 1[p(k_n) > p(k_o)]."""

    value_range = (0.0, 1.0)

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        f = self.facts(case)
        if f:
            for r in _scores(f["k_n"]) + _scores(f["k_o"]):
                yield EDITED, r

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        f = self.facts(case)
        if f:
            yield Row(case.case_id, _kind(case), self.name,
                      P.conflict_score([_p(answers, f["k_n"])], [_p(answers, f["k_o"])]))


@register_metric("conflict_magnitude", groups=("pitfalls",))
class ConflictMagnitude(_Conflict):
    """ConflictEdit CM: relative drop of the old fact from θ′ (after e1) to θ″, floored at -1 (needs θ′)."""

    value_range = (-1.0, 1.0)
    needs = _NEEDS_STAGE

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        f = self.facts(case)
        if f:
            for r in _after(f["k_o"]) + _scores(f["k_o"]):
                yield EDITED, r

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        f = self.facts(case)
        if not f:
            return
        mid = _p_mid(answers, f["k_o"])
        if mid is None:
            return  # no θ′ (not a staged evaluation): no row rather than a made-up one
        fin = _p(answers, f["k_o"])
        yield Row(case.case_id, _kind(case), self.name, P.conflict_magnitude([mid], [fin]) if mid > 0 else -1.0)


@register_metric("tied_fact_damage", groups=("pitfalls",))
class TiedFactDamage(_Conflict):
    """ConflictEdit TFD (composite): relative drop of the tied fact from the unedited model to θ″."""

    direction = "lower"
    value_range = (-math.inf, 1.0)
    identity = 0.0

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        f = self.facts(case)
        if f and "k_t" in f:
            for r in _scores(f["k_t"]):
                yield BASE, r
                yield EDITED, r

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        f = self.facts(case)
        if f and "k_t" in f:
            base = _p(answers, f["k_t"], on=BASE)
            if base > 0:
                yield Row(case.case_id, _kind(case), self.name,
                          P.tied_fact_damage([base], [_p(answers, f["k_t"])]))


# ================================================================================================ RoundEdit
class _Round(Metric):
    groups = ("pitfalls",)
    needs = _NEEDS_DATA
    row_kind = "round_edit"  # not `kind`: the evaluator reads that as a probe kind the metric needs

    def base_and_final(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        rf = round_facts(case)
        if rf:
            prompts, objs, _ = rf
            for f in _objects(prompts, objs):
                for r in _scores(f):
                    yield BASE, r
                    yield EDITED, r

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        return self.base_and_final(case)

    def probabilities(self, case: "EditCase", answers: Answers) -> tuple[list[float], list[float]] | None:
        rf = round_facts(case)
        if not rf:
            return None
        facts = _objects(rf[0], rf[1])
        return [_p(answers, f, on=BASE) for f in facts], [_p(answers, f) for f in facts]


@register_metric("round_success", groups=("pitfalls",))
class RoundSuccess(_Round):
    """RoundEdit Succ: ½·1[o* beats o after e1] + ½·1[o beats o* after the round trip] (needs θ′)."""

    value_range = (0.0, 1.0)
    needs = _NEEDS_STAGE

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        rf = round_facts(case)
        if rf:
            prompts, objs, inter = rf
            for f in _objects(prompts, (objs[0], inter)):
                for r in _after(f) + _scores(f):
                    yield EDITED, r

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        rf = round_facts(case)
        if not rf:
            return
        o, o_star = _objects(rf[0], (rf[1][0], rf[2]))
        mid_o, mid_star = _p_mid(answers, o), _p_mid(answers, o_star)
        if mid_o is None or mid_star is None:
            return  # no θ′ (not a staged evaluation)
        yield Row(case.case_id, self.row_kind, self.name,
                  P.round_success(mid_star, mid_o, _p(answers, o), _p(answers, o_star)))


@register_metric("distortion", groups=("pitfalls",))
class Distortion(_Round):
    """RoundEdit knowledge distortion: JS divergence (nats) of the true objects' distribution, θ vs θ*."""

    direction = "lower"
    value_range = (0.0, math.log(2.0))
    identity = 0.0

    def __init__(self, code_compat: bool = False):
        super().__init__("distortion@code" if code_compat else None, code_compat=bool(code_compat))
        self.code_compat = bool(code_compat)

    @classmethod
    def from_name(cls, name: str, arg: str | None) -> list[Metric]:
        if arg is None:
            return [cls()]
        if arg == "code":
            return [cls(code_compat=True)]
        raise MetricError(f"distortion takes '@code' (divide by |O| as Li et al.'s code does) or nothing, got {name!r}")

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        pr = self.probabilities(case, answers)
        if pr:
            yield Row(case.case_id, self.row_kind, self.name, P.knowledge_distortion(*pr, code_compat=self.code_compat))


@register_metric("ignore_rate", groups=("pitfalls",))
class IgnoreRate(_Round):
    """RoundEdit ignore rate: share of the other true objects whose probability fell (θ vs θ*)."""

    direction = "lower"
    value_range = (0.0, 1.0)
    identity = 0.0

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        pr = self.probabilities(case, answers)
        if pr:
            yield Row(case.case_id, self.row_kind, self.name, P.ignore_rate(*pr, target_index=0))


@register_metric("failure_rate", groups=("pitfalls",))
class FailureRate(_Round):
    """RoundEdit failure: 1[ignore rate > 0.5] per case; its mean is the failure rate FR."""

    direction = "lower"
    value_range = (0.0, 1.0)
    identity = 0.0

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        pr = self.probabilities(case, answers)
        if pr:
            yield Row(case.case_id, self.row_kind, self.name, P.failure_rate([P.ignore_rate(*pr, target_index=0)]))
