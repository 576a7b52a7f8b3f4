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
their code, see ``docs/metrics-autoregressive-portability-general.md``) need two sequential edits and so are
drivers, not registered metrics: :func:`conflict_scores` (ConflictEdit: conflict score, conflict magnitude,
tied-fact damage) and :func:`round_edit_scores` (RoundEdit: success, knowledge distortion, ignore rate,
failure rate). Both take an ``edit_fn(lm, cases) -> Edit`` callback that applies ``cases`` **sequentially**
(one edit per step) and returns a handle with ``.system`` and ``.undo()``, so they work with any method;
:func:`sequential_edit_fn` makes one from a method name. The probability of a fact is
``p(o | s, r) = mean over the fact's prompts of exp(mean token log-prob of o)``, as in Li et al.'s code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

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


EditFn = Callable[["LM", Sequence[EditCase]], Any]


def sequential_edit_fn(method: str, **overrides: Any) -> EditFn:
    """``edit_fn`` for the drivers: ``editlens.edit.edit_sequential(lm, cases, method, batch_size=1, ...)``."""

    def fn(lm: "LM", cases: Sequence[EditCase]) -> Any:
        from editlens.edit import edit_sequential

        return edit_sequential(lm, list(cases), method, batch_size=1, **overrides)

    return fn


def _prob(system: "System", fact: FactQuery) -> float:
    return fact_probability(system.teacher_forced(list(fact.prompts), [fact.obj] * len(fact.prompts)))


def _probs(system: "System", facts: Sequence[FactQuery]) -> list[float]:
    prompts = [p for f in facts for p in f.prompts]
    objs = [f.obj for f in facts for _ in f.prompts]
    tfs = system.teacher_forced(prompts, objs) if prompts else []
    out, i = [], 0
    for f in facts:
        out.append(fact_probability(tfs[i:i + len(f.prompts)]))
        i += len(f.prompts)
    return out


def _apply(edit_fn: EditFn, lm: "LM", cases: Sequence[EditCase], case_id: str) -> Any:
    handle = edit_fn(lm, list(cases))
    if not hasattr(handle, "system") or not hasattr(handle, "undo"):
        raise EditlensError(f"edit_fn must return an Edit-like handle with .system and .undo() "
                            f"(case {case_id!r}, got {type(handle).__name__})")
    return handle


def conflict_scores(lm: "LM", edit_fn: EditFn, conflict_cases: Sequence[ConflictCase],
                    base_system: "System | None" = None) -> Results:
    """ConflictEdit: apply ``e1`` (θ'), measure ``p_θ'(k_o)``; undo; apply ``e1, e2`` sequentially (θ''),
    measure ``p_θ''(k_n)``, ``p_θ''(k_o)`` (and ``p_θ''(k_t)``); undo. The tied fact is also measured on the
    unedited model (``base_system``, default ``ModelSystem(lm)``) before any edit.

    Returns :class:`Results` with rows ``(case_id, "conflict/<kind>", metric, value)`` for ``conflict_score``
    (0/1; the mean is CS), ``conflict_magnitude`` (the per-record term; the mean is CM), ``tied_fact_damage``
    (composite only) and the raw probabilities ``p_new_final``, ``p_old_mid``, ``p_old_final``; ``meta["summary"]``
    holds ``{kind: {"CS", "CM", "TFD", "n"}}``.
    """
    from editlens.system import ModelSystem

    base = base_system if base_system is not None else ModelSystem(lm)
    rows: list[Row] = []
    acc: dict[str, dict[str, list[float]]] = {}
    for c in conflict_cases:
        kind = f"conflict/{c.kind}"
        p_tied_base = _prob(base, c.tied_fact) if c.tied_fact is not None else None
        h1 = _apply(edit_fn, lm, c.edits[:1], c.case_id)
        try:
            p_old_mid = _prob(h1.system, c.old_fact)
        finally:
            h1.undo()
        h2 = _apply(edit_fn, lm, c.edits, c.case_id)
        try:
            facts = [c.new_fact, c.old_fact] + ([c.tied_fact] if c.tied_fact is not None else [])
            probs = _probs(h2.system, facts)
        finally:
            h2.undo()
        p_new, p_old = probs[0], probs[1]
        cs = conflict_score([p_new], [p_old])
        cm = conflict_magnitude([p_old_mid], [p_old]) if p_old_mid > 0 else -1.0
        vals = {"conflict_score": cs, "conflict_magnitude": cm, "p_new_final": p_new, "p_old_mid": p_old_mid,
                "p_old_final": p_old}
        if c.tied_fact is not None and p_tied_base is not None:
            vals["tied_fact_damage"] = tied_fact_damage([p_tied_base], [probs[2]])
            vals["p_tied_base"], vals["p_tied_final"] = p_tied_base, probs[2]
        for k, v in vals.items():
            rows.append(Row(c.case_id, kind, k, float(v)))
        d = acc.setdefault(c.kind, {"CS": [], "CM": [], "TFD": []})
        d["CS"].append(cs)
        d["CM"].append(cm)
        if "tied_fact_damage" in vals:
            d["TFD"].append(vals["tied_fact_damage"])
    summary = {k: {m: (sum(v) / len(v) if v else None) for m, v in d.items()} | {"n": len(d["CS"])}
               for k, d in acc.items()}
    return Results(rows, {"driver": "conflict_scores", "summary": summary})


def round_edit_scores(lm: "LM", edit_fn: EditFn, round_cases: Sequence[RoundCase],
                      base_system: "System | None" = None, code_compat: bool = False) -> Results:
    """RoundEdit: measure the true objects' probabilities on the unedited model (θ), apply ``e1`` (θ'),
    measure ``p(o*)``, ``p(o)``; undo; apply ``e1, e2`` (θ*), measure every object and ``o*``; undo.

    Rows ``(case_id, "round_edit", metric, value)``: ``round_success`` (the per-record Succ), ``distortion``
    (:func:`knowledge_distortion`), ``ignore_rate`` and ``failure`` (``1[IR > 0.5]``; its mean is FR).
    ``meta["summary"]`` holds ``{"Succ", "D", "IR", "FR", "n"}``.
    """
    from editlens.system import ModelSystem

    base = base_system if base_system is not None else ModelSystem(lm)
    rows: list[Row] = []
    succ, dist, irs = [], [], []
    for c in round_cases:
        facts = [FactQuery(c.prompts, o) for o in c.objects]
        inter = FactQuery(c.prompts, c.intermediate)
        p_before = _probs(base, facts)
        h1 = _apply(edit_fn, lm, c.edits[:1], c.case_id)
        try:
            p_mid_inter, p_mid_orig = _probs(h1.system, [inter, facts[0]])
        finally:
            h1.undo()
        h2 = _apply(edit_fn, lm, c.edits, c.case_id)
        try:
            after = _probs(h2.system, facts + [inter])
        finally:
            h2.undo()
        p_after, p_final_inter = after[:-1], after[-1]
        s = round_success(p_mid_inter, p_mid_orig, p_after[0], p_final_inter)
        d = knowledge_distortion(p_before, p_after, code_compat=code_compat)
        ir = ignore_rate(p_before, p_after, 0)
        succ.append(s)
        dist.append(d)
        irs.append(ir)
        for k, v in (("round_success", s), ("distortion", d), ("ignore_rate", ir), ("failure", float(ir > 0.5))):
            rows.append(Row(c.case_id, "round_edit", k, v))
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
