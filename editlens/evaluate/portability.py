"""Portability and the pitfalls of knowledge editing: Yao et al.'s facets, MQuAKE, ConflictEdit, RoundEdit.

Registered metrics (rows per case; the survey "Editing the Mind of Giants", Tables 3–4, reports them):

* ``portability_tacc`` — Yao et al. (EMNLP 2023) portability, EasyEdit's score: teacher-forced token accuracy
  (mean over answer tokens of ``argmax == gold``) of each ``portability`` probe; one row per case and subtype,
  ``probe_kind = "portability/<meta['subtype']>"`` (``subject_replace``, ``reverse_relation``, ``one_hop``,
  MQuAKE's ``single_hop``, RippleEdits criteria...; ``unspecified`` when absent).
* ``portability_ar`` — the same probes judged autoregressively: the greedy answer (16 new tokens) contains
  the target or an alias (``match="contains"``; ``"em"`` / ``"prefix"`` available, see
  :mod:`editlens.evaluate.generation`).
* ``mh_acc`` — MQuAKE multi-hop accuracy (Zhong et al. 2023; survey Eq. 9): a question group (the phrasings
  sharing ``meta["group"]``) is solved when the greedy answer to **any** phrasing contains the new answer or
  an alias; per case the mean over its groups (one group per MQuAKE case). Questions are posed as
  ``"Question: {q}\\nAnswer:"`` (``qa_template``).
* ``mh_edit_wise`` — MQuAKE edit-wise success: the share of the case's edited facts (its ``rewrite`` probes,
  one per requested rewrite) whose greedy continuation contains the new object.
* ``mh_instance_wise`` — MQuAKE instance-wise accuracy (Zhong et al. 2023 §3; survey Eq. 8): 1 when **every**
  single-hop fact of the new chain (``portability`` probes with ``subtype == "single_hop"``, MQuAKE's
  ``new_single_hops``) is recalled, else 0. Only cases with ``multihop`` probes get ``mh_*`` rows.
* ``other_attribution`` — Yao et al.'s Other-Attribution, EasyEdit's locality score: per probe the share of
  answer positions whose teacher-forced argmax token is the same under the base and the edited system
  (probes without a target: the next-token argmax). Higher is better.
* ``distract_neighbor`` — Yao et al.'s Distract-Neighbor: the same locality score on ``distract_neighbor``
  probes; a case without them gets them built from its ``neighborhood`` probes by prefixing the edit statement
  (CounterFact+ construction: ``f"{rewrite prompt with subject} {target_new}. " + prompt``).
* ``other_task`` — in :mod:`editlens.evaluate.general` (downstream accuracy, edited − base).

Multi-edit pitfalls (Li et al., ICLR 2024, "Unveiling the Pitfalls of Knowledge Editing"; definitions read from
their code, see ``docs/metrics-autoregressive-portability-general.md``) need two sequential edits. They are
registered metrics in :mod:`editlens.evaluate.pitfalls` (on the cases the ConflictEdit / RoundEdit loaders build,
evaluated through :func:`editlens.drivers.evaluate_staged`) and, on hand-built cases, drivers. The drivers, which edit, live above editing and evaluation in
:mod:`editlens.drivers` (:func:`~editlens.drivers.conflict_scores`: conflict score, conflict magnitude, tied-fact
damage; :func:`~editlens.drivers.round_edit_scores`: success, knowledge distortion, ignore rate, failure rate);
this module measures the systems they hand over (:func:`measure_fact`, :func:`measure_facts`) and turns the
measurements into rows (:func:`conflict_values` / :func:`conflict_results`, :func:`round_values` /
:func:`round_results`), never editing anything itself. The probability of a fact is
``p(o | s, r) = mean over the fact's prompts of exp(mean token log-prob of o)``, as in Li et al.'s code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import torch

from editlens.data.schema import EditCase, Probe, ProbeKind, Rewrite, make_case
from editlens.errors import EditlensError, MetricError
from editlens.evaluate import functional as F
from editlens.evaluate.core import BASE, EDITED, Answers, Generate, Metric, NextToken, Request, Results, Row, Score, register_metric
from editlens.evaluate.generation import DEFAULT_MAX_NEW_TOKENS, MATCHERS, match, pose

if TYPE_CHECKING:  # pragma: no cover
    from editlens.system import System
    from editlens.lm import LM
    from editlens.lm.ops import TeacherForced

MQUAKE_QA_TEMPLATE = "Question: {}\nAnswer:"
SINGLE_HOP = "single_hop"


# ================================================================================================ pure functions
def _floats(x: Sequence[float] | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).flatten()
    if t.numel() == 0:
        raise EditlensError(f"{name} is empty")
    return t


def _pair(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor, na: str, nb: str) -> tuple[torch.Tensor, torch.Tensor]:
    ta, tb = _floats(a, na), _floats(b, nb)
    if ta.shape != tb.shape:
        raise EditlensError(f"{na} has {ta.numel()} values but {nb} has {tb.numel()}")
    return ta, tb


def fact_probability(scores: Sequence["TeacherForced"]) -> float:
    """``p(o | s, r)``: the mean over prompts of ``exp(mean token log-prob of o)`` (Li et al.'s code)."""
    if not scores:
        raise EditlensError("no teacher-forced scores to average")
    return float(sum(math.exp(tf.mean_logprob) for tf in scores) / len(scores))


def conflict_score(p_new: Sequence[float], p_old: Sequence[float]) -> float:
    """ConflictEdit conflict score ``CS = 1/N Σ 1[p_θ''(k_n) > p_θ''(k_o)]`` (higher is better)."""
    n, o = _pair(p_new, p_old, "p_new", "p_old")
    return float((n > o).double().mean())


def conflict_magnitude(p_old_mid: Sequence[float], p_old_final: Sequence[float]) -> float:
    """ConflictEdit conflict magnitude ``CM = 1/N Σ max((p_θ'(k_o) − p_θ''(k_o)) / p_θ'(k_o), −1)``.

    ``θ'`` is the model after the first edit, ``θ''`` after both; the relative drop of the old (now
    contradicted) fact, floored at −1 as in Li et al.'s code. Higher is better.
    """
    mid, fin = _pair(p_old_mid, p_old_final, "p_old_mid", "p_old_final")
    if bool((mid <= 0).any()):
        raise EditlensError("p_old_mid must be positive (it divides)")
    return float(torch.clamp((mid - fin) / mid, min=-1.0).mean())


def tied_fact_damage(p_tied_base: Sequence[float], p_tied_final: Sequence[float]) -> float:
    """Tied-fact damage ``TFD = 1/N Σ (p_θ(k_t) − p_θ''(k_t)) / p_θ(k_t)`` (θ = the unedited model, as in Li
    et al.'s code; the survey's Eq. 15 writes the intermediate model). Lower is better."""
    base, fin = _pair(p_tied_base, p_tied_final, "p_tied_base", "p_tied_final")
    if bool((base <= 0).any()):
        raise EditlensError("p_tied_base must be positive (it divides)")
    return float(((base - fin) / base).mean())


def round_success(p_mid_inter: float, p_mid_orig: float, p_final_orig: float, p_final_inter: float) -> float:
    """RoundEdit success of one record: ``½·1[p_θ'(o*) > p_θ'(o)] + ½·1[p_θ*(o) > p_θ*(o*)]``."""
    return 0.5 * float(p_mid_inter > p_mid_orig) + 0.5 * float(p_final_orig > p_final_inter)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum()


def knowledge_distortion(p_before: Sequence[float], p_after: Sequence[float], code_compat: bool = False) -> float:
    """RoundEdit knowledge distortion ``D = JS(P_θ ‖ P_θ*)`` over the object set, in nats (lower is better).

    ``P`` is the vector of fact probabilities of the true objects ``[p(o), p(o_2), …, p(o_N)]`` **L1-normalised
    over the object set**; ``JS = ½ KL(P‖M) + ½ KL(Q‖M)``, ``M = (P+Q)/2``, natural log, bounded by ``ln 2``.
    ``code_compat=True`` reproduces Li et al.'s code, whose ``KLDivLoss(reduction="batchmean")`` on a 1-D
    vector divides each KL term by ``|O|``.
    """
    p, q = _pair(p_before, p_after, "p_before", "p_after")
    if bool((p < 0).any() or (q < 0).any()) or float(p.sum()) <= 0 or float(q.sum()) <= 0:
        raise EditlensError("object probabilities must be non-negative with a positive sum")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)
    js = 0.5 * _kl(p, m) + 0.5 * _kl(q, m)
    if code_compat:
        js = js / p.numel()
    return float(js)


def ignore_rate(p_before: Sequence[float], p_after: Sequence[float], target_index: int = 0) -> float:
    """RoundEdit ignore rate of one record: the share of the *other* true objects whose probability fell,
    ``IR = 1/(|O|−1) Σ_{o_i ≠ o} 1[p_θ(o_i) > p_θ*(o_i)]`` (lower is better). ``target_index`` = position of
    the edited object ``o``."""
    p, q = _pair(p_before, p_after, "p_before", "p_after")
    n = p.numel()
    if n < 2:
        raise EditlensError("the ignore rate needs at least two true objects (the edited one and another)")
    if not -n <= target_index < n:
        raise EditlensError(f"target_index {target_index} is outside the {n} objects")
    keep = torch.ones(n, dtype=torch.bool)
    keep[target_index] = False
    return float((p[keep] > q[keep]).double().mean())


def failure_rate(ignore_rates: Sequence[float], threshold: float = 0.5) -> float:
    """RoundEdit failure rate ``FR = 1/N Σ 1[IR_record > 0.5]`` (lower is better)."""
    irs = _floats(ignore_rates, "ignore_rates")
    return float((irs > threshold).double().mean())


# ================================================================================================ drivers
@dataclass(frozen=True)
class FactQuery:
    """A fact whose probability is measured: ``obj`` after each of ``prompts`` (``p = mean exp(mean lp)``)."""

    prompts: tuple[str, ...]
    obj: str

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            object.__setattr__(self, "prompts", (self.prompts,))
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise EditlensError(f"FactQuery needs non-empty prompts, got {self.prompts!r}")
        if not isinstance(self.obj, str) or not self.obj.strip():
            raise EditlensError(f"FactQuery needs a non-empty object, got {self.obj!r}")


@dataclass(frozen=True)
class ConflictCase:
    """One ConflictEdit record: two edits applied in order and the facts compared after them.

    Reverse conflict: ``e1 = (s1, r, o1→o2)``, ``e2 = (o2, r⁻¹, s1→s2)``; ``new_fact = (s2, r, o2)``,
    ``old_fact = (s1, r, o2)``. Composite conflict: ``e1 = (s1, r1, o1→o2)``, ``e2 = (s2, r2, o2→o3)`` with a
    tied fact ``(s1, r, s2)`` and a rule ``r ∧ r2 → r1``; ``new_fact = (s1, r1, o3)``, ``old_fact = (s1, r1, o2)``,
    ``tied_fact = (s1, r, s2)``.
    """

    case_id: str
    kind: str
    edits: tuple[EditCase, EditCase]
    new_fact: FactQuery
    old_fact: FactQuery
    tied_fact: FactQuery | None = None

    def __post_init__(self) -> None:
        if len(self.edits) != 2 or not all(isinstance(e, EditCase) for e in self.edits):
            raise EditlensError(f"conflict case {self.case_id!r}: edits must be two EditCases (e1, e2)")


@dataclass(frozen=True)
class RoundCase:
    """One RoundEdit record: ``e1 = (s, r, o→o*)`` then ``e2 = (s, r, o*→o)``.

    ``objects`` are the true objects ``(o, o_2, …, o_N)`` with the edited object first; ``intermediate`` is
    ``o*``; ``prompts`` the prompts of ``(s, r)`` (the rewrite prompt plus the relation's extra prompts).
    """

    case_id: str
    edits: tuple[EditCase, EditCase]
    prompts: tuple[str, ...]
    objects: tuple[str, ...]
    intermediate: str

    def __post_init__(self) -> None:
        if len(self.objects) < 2:
            raise EditlensError(f"round case {self.case_id!r}: needs at least two true objects (o first)")
        if len(self.edits) != 2:
            raise EditlensError(f"round case {self.case_id!r}: edits must be two EditCases (e1, e2)")


def make_round_case(case_id: str, rewrite: Rewrite, objects: Sequence[str],
                    extra_prompts: Sequence[str] = ()) -> RoundCase:
    """A :class:`RoundCase` from the first rewrite ``(s, r, o→o*)`` (``target_true = o``, ``target_new = o*``)
    and the true objects (``o`` first; it is put first when it is elsewhere in the list)."""
    if rewrite.target_true is None:
        raise EditlensError(f"round case {case_id!r}: the rewrite needs target_true (the original object o)")
    o, o_star = rewrite.target_true, rewrite.target_new
    objs = [o] + [x for x in objects if x != o]
    back = Rewrite(rewrite.prompt, rewrite.subject, target_new=o, target_true=o_star)
    e1 = make_case(f"{case_id}/e1", rewrite)
    e2 = make_case(f"{case_id}/e2", back)
    return RoundCase(str(case_id), (e1, e2), (rewrite.text, *extra_prompts), tuple(objs), o_star)


def measure_fact(system: "System", fact: FactQuery) -> float:
    """``p(o | s, r)`` of one fact on ``system``: :func:`fact_probability` of its prompts' teacher-forced scores."""
    return fact_probability(system.teacher_forced(list(fact.prompts), [fact.obj] * len(fact.prompts)))


def measure_facts(system: "System", facts: Sequence[FactQuery]) -> list[float]:
    """``p(o | s, r)`` of each fact, all prompts in one ``teacher_forced`` call."""
    prompts = [p for f in facts for p in f.prompts]
    objs = [f.obj for f in facts for _ in f.prompts]
    tfs = system.teacher_forced(prompts, objs) if prompts else []
    out, i = [], 0
    for f in facts:
        out.append(fact_probability(tfs[i:i + len(f.prompts)]))
        i += len(f.prompts)
    return out


# The ConflictEdit / RoundEdit drivers (edit e1, measure, undo, edit e1+e2, measure, undo) live in
# :mod:`editlens.drivers`, above both editing and evaluation; what follows turns their measurements into rows.
def conflict_final_facts(c: ConflictCase) -> list[FactQuery]:
    """The facts measured after both edits (θ''): ``k_n``, ``k_o`` and, for a composite conflict, ``k_t``."""
    return [c.new_fact, c.old_fact] + ([c.tied_fact] if c.tied_fact is not None else [])


def conflict_values(c: ConflictCase, p_tied_base: float | None, p_old_mid: float,
                    final: Sequence[float]) -> dict[str, float]:
    """One ConflictEdit record's values from ``p_θ(k_t)`` (unedited; ``None`` without a tied fact),
    ``p_θ'(k_o)`` (after ``e1``) and the probabilities of :func:`conflict_final_facts` after ``e1, e2``."""
    p_new, p_old = final[0], final[1]
    cs = conflict_score([p_new], [p_old])
    cm = conflict_magnitude([p_old_mid], [p_old]) if p_old_mid > 0 else -1.0
    vals = {"conflict_score": cs, "conflict_magnitude": cm, "p_new_final": p_new, "p_old_mid": p_old_mid,
            "p_old_final": p_old}
    if c.tied_fact is not None and p_tied_base is not None:
        vals["tied_fact_damage"] = tied_fact_damage([p_tied_base], [final[2]])
        vals["p_tied_base"], vals["p_tied_final"] = p_tied_base, final[2]
    return vals


def conflict_results(records: Sequence[tuple[ConflictCase, Mapping[str, float]]]) -> Results:
    """:class:`Results` of ConflictEdit from ``(case, conflict_values(...))`` per record: rows
    ``(case_id, "conflict/<kind>", metric, value)`` and ``meta["summary"] = {kind: {"CS", "CM", "TFD", "n"}}``."""
    rows: list[Row] = []
    acc: dict[str, dict[str, list[float]]] = {}
    for c, vals in records:
        kind = f"conflict/{c.kind}"
        for k, v in vals.items():
            rows.append(Row(c.case_id, kind, k, float(v)))
        d = acc.setdefault(c.kind, {"CS": [], "CM": [], "TFD": []})
        d["CS"].append(vals["conflict_score"])
        d["CM"].append(vals["conflict_magnitude"])
        if "tied_fact_damage" in vals:
            d["TFD"].append(vals["tied_fact_damage"])
    summary = {k: {m: (sum(v) / len(v) if v else None) for m, v in d.items()} | {"n": len(d["CS"])}
               for k, d in acc.items()}
    return Results(rows, {"driver": "conflict_scores", "summary": summary})


def round_facts(c: RoundCase) -> tuple[list[FactQuery], FactQuery]:
    """The RoundEdit facts of a record: each true object (``o`` first) and the intermediate ``o*``."""
    return [FactQuery(c.prompts, o) for o in c.objects], FactQuery(c.prompts, c.intermediate)


def round_values(p_before: Sequence[float], p_mid_inter: float, p_mid_orig: float, p_after: Sequence[float],
                 p_final_inter: float, code_compat: bool = False) -> dict[str, float]:
    """One RoundEdit record's values: ``round_success``, ``distortion``, ``ignore_rate``, ``failure``, from the
    true objects' probabilities before (θ) and after both edits (θ*) and ``p(o*)``, ``p(o)`` after ``e1`` (θ')
    and ``p(o*)`` after both."""
    s = round_success(p_mid_inter, p_mid_orig, p_after[0], p_final_inter)
    d = knowledge_distortion(p_before, p_after, code_compat=code_compat)
    ir = ignore_rate(p_before, p_after, 0)
    return {"round_success": s, "distortion": d, "ignore_rate": ir, "failure": float(ir > 0.5)}


def round_results(records: Sequence[tuple[RoundCase, Mapping[str, float]]], code_compat: bool = False) -> Results:
    """:class:`Results` of RoundEdit from ``(case, round_values(...))`` per record: rows
    ``(case_id, "round_edit", metric, value)`` and ``meta["summary"] = {"Succ", "D", "IR", "FR", "n"}``."""
    rows: list[Row] = []
    succ, dist, irs = [], [], []
    for c, vals in records:
        succ.append(vals["round_success"])
        dist.append(vals["distortion"])
        irs.append(vals["ignore_rate"])
        for k in ("round_success", "distortion", "ignore_rate", "failure"):
            rows.append(Row(c.case_id, "round_edit", k, vals[k]))
    n = len(succ)
    summary = {"Succ": sum(succ) / n, "D": sum(dist) / n, "IR": sum(irs) / n, "FR": failure_rate(irs), "n": n} if n else {"n": 0}
    return Results(rows, {"driver": "round_edit_scores", "summary": summary, "code_compat": code_compat})


# ================================================================================================ metrics
def subtype_of(probe: Probe) -> str:
    """``meta["subtype"]`` of a probe (``"unspecified"`` when absent)."""
    st = probe.meta.get("subtype") if probe.meta else None
    return str(st) if st else "unspecified"


def portability_groups(case: EditCase) -> dict[str, list[Probe]]:
    """Portability probes with a target, grouped by ``"portability/<subtype>"`` (in order of appearance)."""
    out: dict[str, list[Probe]] = {}
    for p in case.probes_of(ProbeKind.PORTABILITY):
        if p.target:
            out.setdefault(f"portability/{subtype_of(p)}", []).append(p)
    return out


@register_metric("portability_tacc", groups=("portability",))
class PortabilityTAcc(Metric):
    """Teacher-forced token accuracy of portability probes, per subtype (Yao et al.; EasyEdit's score)."""

    value_range = (0.0, 1.0)

    probe_kinds = (ProbeKind.PORTABILITY.value,)  # named when the cases have none (evaluate warns)

    def case_requests(self, case: EditCase) -> Iterable[tuple[str, Request]]:
        for probes in portability_groups(case).values():
            for p in probes:
                yield EDITED, Score(p.prompt, p.target)  # type: ignore[arg-type]

    def case_rows(self, case: EditCase, answers: Answers) -> Iterable[Row]:
        for kind, probes in portability_groups(case).items():
            yield from self.mean_row(case, kind, [answers.score(p.prompt, p.target).token_accuracy  # type: ignore[arg-type]
                                                  for p in probes])


class _GenMetric(Metric):
    """Greedy generations judged with a string matcher."""

    value_range = (0.0, 1.0)

    def __init__(self, match: str = "contains", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 qa_template: str | None = None, **params: Any):
        if match not in MATCHERS:
            raise MetricError(f"unknown match {match!r}; use one of {', '.join(MATCHERS)}")
        super().__init__(match=match, max_new_tokens=int(max_new_tokens), qa_template=qa_template, **params)
        self.how = match
        self.max_new_tokens = int(max_new_tokens)
        self.qa_template = qa_template

    def req(self, probe: Probe) -> Generate:
        return Generate(pose(probe.prompt, self.qa_template), self.max_new_tokens)

    def ok(self, probe: Probe, answers: Answers) -> bool:
        return match(answers.get(self.req(probe)), probe.answers, self.how)


@register_metric("portability_ar", groups=("portability",))
class PortabilityAR(_GenMetric):
    """Greedy answers to portability probes contain the target (per subtype; autoregressive portability)."""

    probe_kinds = (ProbeKind.PORTABILITY.value,)  # named when the cases have none (evaluate warns)

    def case_requests(self, case: EditCase) -> Iterable[tuple[str, Request]]:
        for probes in portability_groups(case).values():
            for p in probes:
                yield EDITED, self.req(p)

    def case_rows(self, case: EditCase, answers: Answers) -> Iterable[Row]:
        for kind, probes in portability_groups(case).items():
            yield from self.mean_row(case, kind, [float(self.ok(p, answers)) for p in probes])


class _MQuAKE(_GenMetric):
    groups = ("portability",)
    probe_kinds = (ProbeKind.MULTIHOP.value,)  # named when the cases have none (evaluate warns)

    def __init__(self, match: str = "contains", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 qa_template: str | None = MQUAKE_QA_TEMPLATE):
        super().__init__(match, max_new_tokens, qa_template)

    def probes(self, case: EditCase) -> list[Probe]:  # pragma: no cover - abstract
        raise NotImplementedError

    def case_requests(self, case: EditCase) -> Iterable[tuple[str, Request]]:
        if any(p.target for p in case.probes_of(ProbeKind.MULTIHOP)):
            for p in self.probes(case):
                yield EDITED, self.req(p)


@register_metric("mh_acc", groups=("portability",))
class MultiHopAccuracy(_MQuAKE):
    """MQuAKE multi-hop accuracy: any phrasing of the question answered with the new answer (or an alias)."""

    def probes(self, case: EditCase) -> list[Probe]:
        return [p for p in case.probes_of(ProbeKind.MULTIHOP) if p.target]

    def case_rows(self, case: EditCase, answers: Answers) -> Iterable[Row]:
        groups: dict[str, list[Probe]] = {}
        for p in self.probes(case):
            groups.setdefault(str(p.meta.get("group", case.case_id)), []).append(p)
        vals = [float(any(self.ok(p, answers) for p in g)) for g in groups.values()]
        yield from self.mean_row(case, ProbeKind.MULTIHOP.value, vals)


@register_metric("mh_edit_wise", groups=("portability",))
class MultiHopEditWise(_MQuAKE):
    """MQuAKE edit-wise success: share of the case's edited facts (rewrite probes) recalled by generation."""

    def probes(self, case: EditCase) -> list[Probe]:
        return [p for p in case.probes_of(ProbeKind.REWRITE) if p.target]

    def case_rows(self, case: EditCase, answers: Answers) -> Iterable[Row]:
        if any(p.target for p in case.probes_of(ProbeKind.MULTIHOP)):
            yield from self.mean_row(case, ProbeKind.MULTIHOP.value,
                                     [float(self.ok(p, answers)) for p in self.probes(case)])


@register_metric("mh_instance_wise", groups=("portability",))
class MultiHopInstanceWise(_MQuAKE):
    """MQuAKE instance-wise accuracy: every single-hop fact of the new chain is recalled (1/0 per case)."""

    def probes(self, case: EditCase) -> list[Probe]:
        return [p for p in case.probes_of(ProbeKind.PORTABILITY) if p.target and subtype_of(p) == SINGLE_HOP]

    def case_rows(self, case: EditCase, answers: Answers) -> Iterable[Row]:
        hops = self.probes(case)
        if hops and any(p.target for p in case.probes_of(ProbeKind.MULTIHOP)):
            yield Row(case.case_id, ProbeKind.MULTIHOP.value, self.name,
                      float(all(self.ok(p, answers) for p in hops)))


# ------------------------------------------------------------------------------------------------ locality facets
def argmax_unchanged(base: "TeacherForced", edited: "TeacherForced") -> float:
    """EasyEdit's locality of one probe: share of answer positions with the same teacher-forced argmax."""
    if base.argmax_ids.shape != edited.argmax_ids.shape:
        raise EditlensError("base and edited scores cover different target tokens")
    if base.argmax_ids.numel() == 0:
        return 1.0
    if not F.scores_ok(base, edited):
        return math.nan  # non-finite logits: the argmax is meaningless
    return float((base.argmax_ids == edited.argmax_ids).double().mean())


def distract_prompt(rewrite: Rewrite, prompt: str) -> str:
    """``f"{rewrite prompt with subject} {target_new}. " + prompt`` (CounterFact+ / Distract-Neighbor)."""
    return f"{rewrite.statement} {prompt}"


class _Locality(Metric):
    """Base/edited argmax agreement on one probe kind (EasyEdit's locality)."""

    value_range = (0.0, 1.0)
    identity = 1.0

    groups = ("portability",)
    kind: str = ""

    def probes(self, case: EditCase) -> list[Probe]:
        return list(case.probes_of(self.kind))

    def case_requests(self, case: EditCase) -> Iterable[tuple[str, Request]]:
        for p in self.probes(case):
            req: Request = Score(p.prompt, p.target) if p.target else NextToken(p.prompt)
            yield BASE, req
            yield EDITED, req

    def value(self, p: Probe, answers: Answers) -> float:
        if p.target:
            return argmax_unchanged(answers.score(p.prompt, p.target, on=BASE), answers.score(p.prompt, p.target))
        b, e = answers.next_token(p.prompt, on=BASE), answers.next_token(p.prompt)
        if not (F.distribution_ok(b) and F.distribution_ok(e)):
            return math.nan  # non-finite logits: the argmax is meaningless
        return float(int(b.argmax()) == int(e.argmax()))

    def case_rows(self, case: EditCase, answers: Answers) -> Iterable[Row]:
        yield from self.mean_row(case, self.kind, [self.value(p, answers) for p in self.probes(case)])


@register_metric("other_attribution", groups=("portability",))
class OtherAttribution(_Locality):
    """Other attributes of the edited subject unchanged: base/edited teacher-forced argmax agreement."""

    kind = ProbeKind.OTHER_ATTRIBUTION.value


@register_metric("distract_neighbor", groups=("portability",))
class DistractNeighbor(_Locality):
    """Neighbourhood prompts prefixed with the edit statement: base/edited argmax agreement."""

    kind = ProbeKind.DISTRACT_NEIGHBOR.value

    def __init__(self, construct: bool = True):
        super().__init__(construct=bool(construct))
        self.construct = bool(construct)

    def probes(self, case: EditCase) -> list[Probe]:
        own = list(case.probes_of(self.kind))
        if own or not self.construct:
            return own
        return [Probe(distract_prompt(case.rewrite, p.prompt), p.target, p.foil, p.aliases,
                      {**dict(p.meta), "constructed_from": "neighborhood"})
                for p in case.probes_of(ProbeKind.NEIGHBORHOOD)]
