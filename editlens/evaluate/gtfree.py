"""Ground-truth-free specificity (edit-locality paper, arXiv 2601.17343 §3.5) and CounterFact+ (arXiv 2305.17553).

All compare the base (unedited) and the evaluated system's **next-token distributions over the full vocabulary
at the end of a prompt** (the first answer token; no target, no teacher forcing):

* ``kl`` — ``KL(p_base ‖ p_edited)`` (Eq. 10), nats, lower is better.
* ``js`` — Jensen–Shannon divergence with ``ε = 1e-10`` inside the logs (the authors' experiment code), nats,
  ``[0, ln 2]``, lower is better.
* ``topk@K`` — ``|TopK(p_base) ∩ TopK(p_edited)| / K`` (Eq. 11), ``[0, 1]``, higher is better; ``topk`` means
  K ∈ {1, 5, 10} as in the paper.

``kl``, ``js`` and ``topk`` are computed on every probe kind except ``generation`` (targets are not needed); the
specificity figures of the paper are the ``neighborhood`` rows (``locality`` / ``other_attribution`` /
``distract_neighbor`` rows likewise measure preservation; ``rewrite`` / ``paraphrase`` rows show how much the
edit moved the edited prompts). :func:`gtfree_scores` computes them on any prompts, without cases.

CounterFact+ (Hoelscher-Obermaier et al., Findings ACL 2023), on neighbourhood probes:

* ``nkl`` — the paper's Eq. 1: ``KL(P_unedited ‖ P_edited)`` on the plain neighbourhood prompts (the same
  number as the ``kl`` neighbourhood row, averaged per case, then over cases).
* ``nkl_code`` — the released code's value ``KL(P_edited ‖ P_unedited) / |V|`` (its ``kl_div(...,
  reduction="batchmean")`` on a 1-D vector); only for comparison with published numbers (~1e-6).
* ``cfplus_ns`` / ``cfplus_nm`` — NS / NM on CounterFact+ prompts ``f"{rewrite prompt with subject}
  {target_new}. " + neighbourhood prompt``: ``1[P*(o_c) > P*(o*)]`` and ``P*(o_c) − P*(o*)`` with
  ``P = exp(mean token log-prob)``, o_c = the probe's target (true object), o* = its foil (the new object).
* ``cfplus_nkl`` — ``KL(P_unedited ‖ P_edited)`` of next-token distributions on the CounterFact+ prompts.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import torch

from editlens.errors import EditlensError, MetricError
from editlens.evaluate import functional as F
from editlens.evaluate.core import BASE, EDITED, Answers, Metric, NextToken, Request, Row, Score, register_metric

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase, Probe
    from editlens.system import System

GENERATION_KIND = "generation"
NEIGHBORHOOD_KIND = "neighborhood"
DEFAULT_KS = (1, 5, 10)


def prompt_probes(case: "EditCase", kinds: Sequence[str] | None = None) -> Iterator[tuple[str, list[str]]]:
    """``(kind, unique prompts)`` of a case (every kind but ``generation`` unless ``kinds`` is given)."""
    for kind in case.kinds:
        if kind == GENERATION_KIND or (kinds is not None and kind not in kinds):
            continue
        prompts = list(dict.fromkeys(p.prompt for p in case.probes_of(kind)))
        if prompts:
            yield kind, prompts


class _Divergence(Metric):
    """Base/edited next-token comparison on the prompts of each probe kind."""

    groups = ("gtfree",)
    direction = "lower"
    kinds: tuple[str, ...] | None = None

    def compare(self, base_lp: torch.Tensor, edit_lp: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        for _, prompts in prompt_probes(case, self.kinds):
            for p in prompts:
                yield BASE, NextToken(p)
                yield EDITED, NextToken(p)

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        for kind, prompts in prompt_probes(case, self.kinds):
            b = torch.stack([answers.next_token(p, on=BASE) for p in prompts])
            e = torch.stack([answers.next_token(p, on=EDITED) for p in prompts])
            yield from self.mean_row(case, kind, self.compare(b, e).tolist())


@register_metric("kl", groups=("gtfree",))
class KL(_Divergence):
    """KL(base ‖ edited) of next-token distributions (edit-locality Eq. 10)."""

    value_range = (0.0, float("inf"))
    identity = 0.0

    def compare(self, base_lp: torch.Tensor, edit_lp: torch.Tensor) -> torch.Tensor:
        return F.kl_divergence(base_lp, edit_lp)


@register_metric("js", groups=("gtfree",))
class JS(_Divergence):
    """Jensen–Shannon divergence of next-token distributions (eps 1e-10)."""

    value_range = (0.0, 0.6931471805599453)  # ln 2
    identity = 0.0

    def __init__(self, eps: float = F.JS_EPS):
        super().__init__(eps=float(eps))
        self.eps = float(eps)

    def compare(self, base_lp: torch.Tensor, edit_lp: torch.Tensor) -> torch.Tensor:
        return F.js_divergence(base_lp, edit_lp, self.eps)


@register_metric("topk", groups=("gtfree",))
class TopK(_Divergence):
    """Top-k overlap |TopK_base ∩ TopK_edited| / k (edit-locality Eq. 11); ``topk`` = k in 1, 5, 10."""

    value_range = (0.0, 1.0)
    identity = 1.0

    direction = "higher"

    def __init__(self, k: int = 5):
        if int(k) < 1:
            raise MetricError(f"topk needs k >= 1, got {k}")
        super().__init__(name=f"topk@{int(k)}", k=int(k))
        self.k = int(k)

    @classmethod
    def from_name(cls, name: str, arg: str | None) -> list[Metric]:
        if arg is None:
            return [cls(k) for k in DEFAULT_KS]
        try:
            k = int(arg)
        except ValueError:
            raise MetricError(f"metric {name!r}: the part after '@' must be an integer k, e.g. 'topk@5'") from None
        return [cls(k)]

    def compare(self, base_lp: torch.Tensor, edit_lp: torch.Tensor) -> torch.Tensor:
        return F.topk_overlap(base_lp, edit_lp, self.k)


@register_metric("nkl", groups=("gtfree",))
class NKL(_Divergence):
    """CounterFact+ NKL as in the paper: KL(unedited ‖ edited), neighbourhood prompts, full vocabulary."""

    value_range = (0.0, float("inf"))
    identity = 0.0

    kinds = (NEIGHBORHOOD_KIND,)

    def compare(self, base_lp: torch.Tensor, edit_lp: torch.Tensor) -> torch.Tensor:
        return F.kl_divergence(base_lp, edit_lp)


@register_metric("nkl_code", groups=("gtfree",))
class NKLCode(_Divergence):
    """CounterFact+ NKL as the released code computes it: KL(edited ‖ unedited) / |V|."""

    value_range = (0.0, float("inf"))
    identity = 0.0

    kinds = (NEIGHBORHOOD_KIND,)

    def compare(self, base_lp: torch.Tensor, edit_lp: torch.Tensor) -> torch.Tensor:
        return F.nkl_code(base_lp, edit_lp)


# ================================================================================================ CounterFact+
def cfplus_prefix(case: "EditCase") -> str:
    """The CounterFact+ prefix: ``f"{rewrite.prompt.format(subject)} {target_new}. "``."""
    return f"{case.rewrite.text} {case.rewrite.target_new}. "


def cfplus_probes(case: "EditCase", need_targets: bool) -> list[tuple[str, "Probe"]]:
    """``(prefixed prompt, probe)`` for the case's neighbourhood probes."""
    prefix = cfplus_prefix(case)
    return [(prefix + p.prompt, p) for p in case.probes_of(NEIGHBORHOOD_KIND)
            if not need_targets or (p.target and p.foil)]


class _CFPlusContrast(Metric):
    groups = ("gtfree",)
    probe_kinds = (NEIGHBORHOOD_KIND,)  # named when the cases have none (evaluate warns)

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        for prompt, p in cfplus_probes(case, True):
            yield EDITED, Score(prompt, p.target)  # type: ignore[arg-type]
            yield EDITED, Score(prompt, p.foil)  # type: ignore[arg-type]

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        vals = [F.contrastive(answers.score(prompt, p.target), answers.score(prompt, p.foil))[self.index]  # type: ignore[arg-type]
                for prompt, p in cfplus_probes(case, True)]
        yield from self.mean_row(case, NEIGHBORHOOD_KIND, vals)

    index = 0


@register_metric("cfplus_ns", groups=("gtfree",))
class CFPlusNS(_CFPlusContrast):
    """CounterFact+ neighbourhood score: P*(o_c) > P*(o*) on edit-prefixed neighbourhood prompts."""

    value_range = (0.0, 1.0)

    index = 0


@register_metric("cfplus_nm", groups=("gtfree",))
class CFPlusNM(_CFPlusContrast):
    """CounterFact+ neighbourhood magnitude: P*(o_c) − P*(o*) on edit-prefixed neighbourhood prompts."""

    value_range = (-1.0, 1.0)

    index = 1


@register_metric("cfplus_nkl", groups=("gtfree",))
class CFPlusNKL(Metric):
    """CounterFact+ NKL: KL(unedited ‖ edited) of next-token distributions on edit-prefixed neighbourhood prompts."""

    value_range = (0.0, float("inf"))
    identity = 0.0

    groups = ("gtfree",)
    direction = "lower"
    probe_kinds = (NEIGHBORHOOD_KIND,)  # named when the cases have none (evaluate warns)

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        for prompt, _ in cfplus_probes(case, False):
            yield BASE, NextToken(prompt)
            yield EDITED, NextToken(prompt)

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        prompts = list(dict.fromkeys(pr for pr, _ in cfplus_probes(case, False)))
        if prompts:
            b = torch.stack([answers.next_token(p, on=BASE) for p in prompts])
            e = torch.stack([answers.next_token(p, on=EDITED) for p in prompts])
            yield from self.mean_row(case, NEIGHBORHOOD_KIND, F.kl_divergence(b, e).tolist())


# ================================================================================================ no cases
def gtfree_scores(base: "System", edited: "System", prompts: Sequence[str],
                  ks: Sequence[int] = DEFAULT_KS, js_eps: float = F.JS_EPS) -> dict[str, torch.Tensor]:
    """KL(base‖edited), JS and top-k overlaps on arbitrary prompts (no cases, no targets).

    One batched ``next_token_logprobs`` call per system (one only when ``edited is base``).

    Returns:
        ``{"kl": [n], "js": [n], "topk@1": [n], ...}`` float64 tensors, one value per prompt.
    """
    prompts = list(prompts)
    if not prompts:
        raise EditlensError("gtfree_scores needs at least one prompt")
    b = base.next_token_logprobs(prompts).float()
    e = b if edited is base else edited.next_token_logprobs(prompts).float()
    out = {"kl": F.kl_divergence(b, e), "js": F.js_divergence(b, e, js_eps)}
    for k in ks:
        out[f"topk@{int(k)}"] = F.topk_overlap(b, e, int(k))
    return out
