"""EVK-Bench: edit drift measured on embedding-virtualized knowledge (after arXiv 2602.01977).

The EVK paper (Liu, Chen, He, Sun 2026) argues that a fixed list of neighbour prompts sees only a few points of
the knowledge an edit can disturb. It adds Gaussian noise to the *input embeddings* of a fact's prompt — of the
subject tokens, the relation tokens or all tokens — so that every perturbed input is a piece of
"virtual knowledge" near the fact, and compares the model before and after the edit there. The paper's σ values,
sample counts, stability formulas and loss are not available to us (see ``docs/evk.md``); **the definitions below
are ours**.

Virtual samples
---------------
For a prompt (its subject given as a character range, when known):

* spans: ``subject`` = the tokens overlapping the subject's characters; ``relation`` = every other token of the
  prompt (the template words, before and after the subject); ``full`` = all tokens of the prompt. Special tokens
  (BOS) and, for chat or in-context systems, the tokens around the prompt are never perturbed: the prompt is
  located as the *last* occurrence of its text in the system's model input (``system._inputs``), so EVK on
  IKE/SCR-style systems perturbs the **query tokens only**.
* noise: sample ``j`` of a prompt draws ``ε ∈ R^{T×d}`` (T = tokens of the prompt, d = embedding width) from a
  ``torch.Generator`` seeded by ``sha256(seed, prompt, j)``, so the base and the edited systems — any system —
  see exactly the same samples; the same ``ε`` serves every σ and every span (``full`` noise = ``subject`` noise +
  ``relation`` noise).
* scale (our choice; the paper adds ``ε ~ N(0, σ²I)`` in absolute units): token ``t`` of the span becomes

      e'_t = e_t + σ · ‖e_t‖ · ε_t / √d,       so  E‖e'_t − e_t‖² = σ² ‖e_t‖²,

  i.e. σ is the *relative* noise-to-signal ratio of each token's embedding, comparable across models whose
  embedding norms differ by orders of magnitude. Default ladder ``σ ∈ {0.05, 0.1, 0.2, 0.4}`` with
  ``n = 4`` samples each; ``σ = 0`` gives exactly the unperturbed input (one request per prompt).
* the perturbed embeddings go in through a forward hook on the embedding module
  (:func:`editlens.lm.hooks.patch_embeddings`) inside ``system.calling()``; nothing is decoded back to text.

Stability scores (ours)
-----------------------
With ``p_b`` / ``p_e`` the base / edited next-token distributions over the full vocabulary at the end of a
virtual sample ``x̃_{p,j,σ}`` (last prompt token, as in the edit-locality paper §3.5):

* ``evk_kl@<span>:<σ>`` = mean over the case's prompts ``p`` of a probe kind and samples ``j`` of
  ``KL(p_b(·|x̃) ‖ p_e(·|x̃))`` (nats, lower = more stable);
* ``evk_topk@<span>:<σ>`` = mean of ``|TopK(p_b) ∩ TopK(p_e)| / K`` (K = 5 by default; higher = more stable);
* ``evk_kl@<span>`` / ``evk_topk@<span>`` (the *embedding stability*) = the mean of those over the σ ladder
  (σ > 0);
* ``evk_text_kl`` / ``evk_text_topk`` (the *text stability*) = the same comparison on the dataset's text-level
  neighbours (the unperturbed neighbourhood prompts).

Probe kinds (rows): ``rewrite`` — the edit prompt (the edit *should* change it at σ = 0, the σ curve shows how far
the change spreads into its virtual neighbourhood) and ``neighborhood`` — the neighbourhood prompts (whose subject
and relation spans are found by matching the rewrite template; a prompt that does not match has only ``full``).

Efficiency: answers are the final hidden states (input of the LM head, ``[d]`` per sample) plus the LM head of
each system once (:class:`EvkHead`), so a request costs ``d`` floats instead of a vocabulary; distributions are
recomputed when rows are made. Samples of all prompts, spans and σ are packed into large left-padded batches.
Base answers go through the evaluator's cache like any other request (:class:`~editlens.evaluate.core.CustomRequest`).

The spans, noise, perturbation and virtual batches are :mod:`editlens.lm.perturb` (re-exported here), shared with
EVK-Align (:mod:`editlens.edit.evk_align`), which regularises edits on the same virtual samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch

from editlens.errors import MetricError
from editlens.evaluate import functional as F
from editlens.evaluate.core import (BASE, EDITED, Answers, CustomRequest, Metric, NextToken, Request, Row,
                                   register_metric)
from editlens.lm import ops
from editlens.lm.hooks import record_io
from editlens.lm.perturb import (SPANS, VirtualItem, case_prompts, embedding_patch, perturb, sample_noise,  # noqa: F401
                                 sample_seed, span_tokens, subject_range, virtual_batch)

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.system import System
    from editlens.lm.load import LM

DEFAULT_SIGMAS = (0.05, 0.1, 0.2, 0.4)
DEFAULT_SAMPLES = 4
DEFAULT_SEED = 0
DEFAULT_K = 5
EVK_KINDS = ("rewrite", "neighborhood")


# spans, noise, perturbation and virtual batches: editlens.lm.perturb (shared with editlens.edit.evk_align)


def _model_inputs(system: "System", prompts: Sequence[str]) -> list[str]:
    fn = getattr(system, "_inputs", None)
    if fn is None or getattr(system, "lm", None) is None:
        raise MetricError(f"EVK needs a system backed by a model (ModelSystem or a WrappedSystem); "
                          f"{type(system).__name__} has no model inputs")
    return list(fn(list(prompts)))


# ================================================================================================ requests
@dataclass(frozen=True, order=True)
class EvkNext(CustomRequest):
    """The final hidden state (LM-head input, ``[d]`` float32) at the end of virtual sample ``sample`` of ``prompt``
    with noise of relative scale ``sigma`` on ``span``; ``subj_start``/``subj_end`` = the subject's characters in
    ``prompt`` (-1 when unknown; needed by the ``subject``/``relation`` spans)."""

    prompt: str
    span: str
    sigma: float
    sample: int
    seed: int
    subj_start: int = -1
    subj_end: int = -1

    @classmethod
    def answer_group(cls, system: "System", requests: Sequence["EvkNext"]) -> list[torch.Tensor]:
        return list(virtual_hidden(system, requests).unbind(0))


@dataclass(frozen=True, order=True)
class EvkHead(CustomRequest):
    """The system's LM head as one tensor ``[vocab, d + 2]``: weight, bias column, final-logit soft-cap column
    (0 = none); turns :class:`EvkNext` hidden states into next-token distributions (:func:`head_logprobs`)."""

    tag: str = "lm_head"

    @classmethod
    def answer_group(cls, system: "System", requests: Sequence["EvkHead"]) -> list[torch.Tensor]:
        lm = getattr(system, "lm", None)
        if lm is None:
            raise MetricError(f"EVK needs a system backed by a model; {type(system).__name__} has none")
        return [lm_head_tensor(lm) for _ in requests]


def lm_head_tensor(lm: "LM") -> torch.Tensor:
    """``[vocab, d + 2]`` float32 CPU copy of the LM head (see :class:`EvkHead`)."""
    head = lm.module(lm.arch.lm_head)
    w = head.weight.detach().float().cpu()
    out = torch.zeros((w.shape[0], w.shape[1] + 2), dtype=torch.float32)
    out[:, : w.shape[1]] = w
    b = getattr(head, "bias", None)
    if b is not None:
        out[:, w.shape[1]] = b.detach().float().cpu()
    cap = getattr(getattr(lm.model, "config", None), "final_logit_softcapping", None)
    if cap:
        out[:, w.shape[1] + 1] = float(cap)
    return out


def head_logprobs(head: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probs ``[..., vocab]`` from LM-head inputs ``hidden [..., d]`` and an :class:`EvkHead` tensor."""
    d = head.shape[1] - 2
    logits = hidden.float() @ head[:, :d].T + head[:, d]
    cap = float(head[0, d + 1])
    if cap > 0:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


def _canonical(r: EvkNext) -> EvkNext:
    return EvkNext(r.prompt, "full", 0.0, 0, 0) if r.sigma == 0 else r


@torch.no_grad()
def virtual_hidden(system: "System", requests: Sequence[EvkNext]) -> torch.Tensor:
    """LM-head inputs ``[n, d]`` (float32, CPU) of the virtual samples ``requests`` on ``system``.

    Samples are packed into left-padded batches by the system's token budget; the system's prompt format,
    prompt rewriting (``_inputs``) and hooks (``active()``) apply.
    """
    requests = list(requests)
    if not requests:
        return torch.empty((0, 0))
    lm: "LM" = getattr(system, "lm", None)  # type: ignore[assignment]
    prompts = sorted({r.prompt for r in requests})
    texts = dict(zip(prompts, _model_inputs(system, prompts)))
    d = lm.d_model
    enc: dict[str, tuple[list[int], dict[tuple[int, int], dict[str, list[int]]]]] = {}
    items: list[VirtualItem] = []
    for r in requests:
        if r.span not in SPANS:
            raise MetricError(f"EVK span must be one of {SPANS}, got {r.span!r}")
        text = texts[r.prompt]
        if r.prompt not in enc:
            enc[r.prompt] = (ops.encode(lm.tokenizer, text), {})
        ids, spans_by = enc[r.prompt]
        subj = (r.subj_start, r.subj_end) if r.subj_start >= 0 else None
        if subj not in spans_by:
            q0 = text.rfind(r.prompt)
            if q0 < 0:
                raise MetricError(f"EVK: the prompt {r.prompt!r} does not occur in the input {type(system).__name__} "
                                  "gives the model; EVK is defined on the query tokens only")
            spans_by[subj] = span_tokens(lm.tokenizer, text, q0, len(r.prompt), subj)  # type: ignore[index]
        spans = spans_by[subj]  # type: ignore[index]
        if r.span not in spans:
            raise MetricError(f"EVK span {r.span!r} needs the subject of prompt {r.prompt!r} (not found)")
        full = spans["full"]
        if r.sigma == 0:
            items.append(VirtualItem(ids, [], torch.zeros((0, d)), 0.0))
            continue
        eps_full = sample_noise(r.seed, r.prompt, r.sample, len(full), d)
        where = {t: i for i, t in enumerate(full)}
        pos = spans[r.span]
        items.append(VirtualItem(ids, pos, eps_full[[where[t] for t in pos]], float(r.sigma)))
    return forward_hidden(system, items)


def forward_hidden(system: "System", items: Sequence[VirtualItem]) -> torch.Tensor:
    """Run the virtual ``items`` through ``system``'s model (in ``system.calling()``: its pinned weights and hooks),
    return LM-head inputs ``[n, d]``."""
    lm: "LM" = system.lm  # type: ignore[attr-defined]
    budget = int(getattr(system, "batch_tokens", ops.DEFAULT_BATCH_TOKENS))
    out: list[torch.Tensor | None] = [None] * len(items)
    calling = getattr(system, "calling", None) or getattr(system, "active", None)
    head = lm.arch.lm_head
    with (calling() if callable(calling) else _null()):
        for group in ops.plan_batches([len(it.ids) for it in items], budget, max_rows=256):
            batch, Z, S = virtual_batch(lm, [items[i] for i in group])
            with embedding_patch(lm, Z, S), record_io(lm.model, [head], kind="input") as rec:
                lm.model(**batch, logits_to_keep=1, use_cache=False)
            h = rec[head][:, -1, :].float().cpu()
            for r, i in enumerate(group):
                out[i] = h[r]
    return torch.stack(out)  # type: ignore[arg-type]


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def perturbed_next_token_logprobs(system: "System", prompts: Sequence[str], span: str = "full",
                                  sigma: float = 0.1, n_samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED,
                                  subjects: Sequence[tuple[int, int] | None] | None = None) -> torch.Tensor:
    """Next-token log-probs on virtual samples: ``[len(prompts), n_samples, vocab]`` (float32, CPU).

    Args:
        system: a model-backed system (ModelSystem, or a hook/prompt wrapper around one).
        prompts: prompt texts.
        span: ``"subject"``, ``"relation"`` or ``"full"``.
        sigma: relative drift scale (see the module docstring); 0 = the unperturbed prompts.
        n_samples: samples per prompt.
        seed: base seed (same seed → same samples on every system).
        subjects: per prompt, the subject's character range (needed by ``subject``/``relation``); see
            :func:`subject_range`.
    """
    prompts = list(prompts)
    subjects = list(subjects) if subjects is not None else [None] * len(prompts)
    if len(subjects) != len(prompts):
        raise MetricError(f"{len(prompts)} prompts but {len(subjects)} subject ranges")
    reqs = [_canonical(EvkNext(p, span, float(sigma), j, int(seed), *(s if s else (-1, -1))))
            for p, s in zip(prompts, subjects) for j in range(int(n_samples))]
    hidden = virtual_hidden(system, reqs)
    lp = head_logprobs(lm_head_tensor(system.lm), hidden)  # type: ignore[attr-defined]
    return lp.view(len(prompts), int(n_samples), -1)


# ================================================================================================ metrics
def _parse_sigmas(value: Any) -> tuple[float, ...]:
    vals = tuple(float(v) for v in value)
    if not vals or any(v < 0 or not math.isfinite(v) for v in vals):
        raise MetricError(f"EVK sigmas must be non-negative numbers, got {value!r}")
    return vals


def fmt_sigma(s: float) -> str:
    return f"{s:g}"


class EvkStability(Metric):
    """EVK embedding stability on one span: ``evk_kl@<span>`` or ``evk_topk@<span>`` (see module docstring)."""

    groups = ()

    def __init__(self, measure: str = "kl", span: str = "relation", sigmas: Sequence[float] = DEFAULT_SIGMAS,
                 n_samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED, k: int = DEFAULT_K,
                 kinds: Sequence[str] = EVK_KINDS, max_prompts: int | None = None):
        if measure not in ("kl", "topk"):
            raise MetricError(f"EVK measure must be 'kl' or 'topk', got {measure!r}")
        if span not in SPANS:
            raise MetricError(f"EVK span must be one of {', '.join(SPANS)}, got {span!r}")
        if int(n_samples) < 1 or int(k) < 1:
            raise MetricError(f"EVK needs n_samples >= 1 and k >= 1 (got {n_samples}, {k})")
        sig = _parse_sigmas(sigmas)
        base = "evk_kl" if measure == "kl" else ("evk_topk" if int(k) == DEFAULT_K else f"evk_topk{int(k)}")
        super().__init__(name=f"{base}@{span}", measure=measure, span=span, sigmas=list(sig),
                         n_samples=int(n_samples), seed=int(seed), k=int(k), kinds=list(kinds),
                         max_prompts=max_prompts)
        self.measure, self.span, self.sigmas = measure, span, sig
        self.n_samples, self.seed, self.k = int(n_samples), int(seed), int(k)
        self.kinds, self.max_prompts = tuple(kinds), max_prompts
        self.direction = "lower" if measure == "kl" else "higher"  # type: ignore[misc]

    def ladder(self) -> tuple[float, ...]:
        """σ values reported per σ: 0 (the prompt itself) then the ladder."""
        return tuple(dict.fromkeys((0.0, *self.sigmas)))

    def _requests_of(self, prompt: str, subj: tuple[int, int] | None, sigma: float) -> list[EvkNext]:
        s0, s1 = subj if subj else (-1, -1)
        if sigma == 0:
            return [_canonical(EvkNext(prompt, self.span, 0.0, 0, self.seed))]
        return [EvkNext(prompt, self.span, float(sigma), j, self.seed, s0, s1) for j in range(self.n_samples)]

    def _usable(self, subj: tuple[int, int] | None) -> bool:
        return self.span == "full" or subj is not None

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        yield BASE, EvkHead()
        yield EDITED, EvkHead()
        for kind in self.kinds:
            for prompt, subj in case_prompts(case, kind, self.max_prompts):
                if not self._usable(subj):
                    continue
                for sigma in self.ladder():
                    for r in self._requests_of(prompt, subj, sigma):
                        yield BASE, r
                        yield EDITED, r

    def compare(self, base_lp: torch.Tensor, edit_lp: torch.Tensor) -> torch.Tensor:
        if self.measure == "kl":
            return F.kl_divergence(base_lp, edit_lp)
        return F.topk_overlap(base_lp, edit_lp, self.k)

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        hb = answers.get(EvkHead(), on=BASE)
        he = answers.get(EvkHead(), on=EDITED)
        for kind in self.kinds:
            prompts = [(p, s) for p, s in case_prompts(case, kind, self.max_prompts) if self._usable(s)]
            if not prompts:
                continue
            per_sigma: dict[float, float] = {}
            for sigma in self.ladder():
                reqs = [r for p, s in prompts for r in self._requests_of(p, s, sigma)]
                b = head_logprobs(hb, torch.stack([answers.get(r, on=BASE) for r in reqs]))
                e = head_logprobs(he, torch.stack([answers.get(r, on=EDITED) for r in reqs]))
                vals = self.compare(b, e).double()
                # mean over samples per prompt, then over prompts (equal sizes: the plain mean)
                per_sigma[sigma] = float(vals.mean())
                yield Row(case.case_id, kind, f"{self.name}:{fmt_sigma(sigma)}", per_sigma[sigma])
            pos = [v for s, v in per_sigma.items() if s > 0]
            if pos:
                yield Row(case.case_id, kind, self.name, sum(pos) / len(pos))


class EvkText(Metric):
    """EVK text stability: base/edited next-token KL or top-k overlap on the unperturbed neighbourhood prompts."""

    groups = ()

    def __init__(self, measure: str = "kl", k: int = DEFAULT_K, kind: str = "neighborhood"):
        if measure not in ("kl", "topk"):
            raise MetricError(f"EVK measure must be 'kl' or 'topk', got {measure!r}")
        base = "evk_text_kl" if measure == "kl" else ("evk_text_topk" if int(k) == DEFAULT_K else
                                                       f"evk_text_topk{int(k)}")
        super().__init__(name=base, measure=measure, k=int(k), kind=kind)
        self.measure, self.k, self.kind = measure, int(k), kind
        self.direction = "lower" if measure == "kl" else "higher"  # type: ignore[misc]

    def _prompts(self, case: "EditCase") -> list[str]:
        return list(dict.fromkeys(p.prompt for p in case.probes_of(self.kind)))

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        for p in self._prompts(case):
            yield BASE, NextToken(p)
            yield EDITED, NextToken(p)

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        prompts = self._prompts(case)
        if not prompts:
            return
        b = torch.stack([answers.next_token(p, on=BASE) for p in prompts])
        e = torch.stack([answers.next_token(p, on=EDITED) for p in prompts])
        vals = F.kl_divergence(b, e) if self.measure == "kl" else F.topk_overlap(b, e, self.k)
        yield from self.mean_row(case, self.kind, vals.tolist())


def _span_arg(name: str, arg: str | None) -> list[str]:
    if arg is None or arg == "":
        return list(SPANS)
    if arg not in SPANS:
        raise MetricError(f"metric {name!r}: the part after '@' must be a span ({', '.join(SPANS)})")
    return [arg]


class _EvkSpanMetric(EvkStability):
    """An :class:`EvkStability` of one measure, built from a span alone (``cls(span, **kw)``): the registered
    ``evk_kl`` and ``evk_topk``."""

    @classmethod
    def check_instances(cls) -> list[Metric]:
        """Every span, 2 virtual samples per σ (the contract does not depend on the number of samples)."""
        return [cls(s, n_samples=2) for s in SPANS]

    @classmethod
    def from_name(cls, name: str, arg: str | None) -> list[Metric]:
        return [cls(s) for s in _span_arg(name, arg)]


@register_metric("evk_kl")
class EvkKL(_EvkSpanMetric):
    """EVK embedding stability, KL(base ‖ edited) on virtual samples; ``evk_kl@<span>`` (default: every span)."""

    value_range = (0.0, float("inf"))
    identity = 0.0

    direction = "lower"

    def __init__(self, span: str = "relation", **kw: Any):
        super().__init__("kl", span, **kw)


@register_metric("evk_topk")
class EvkTopK(_EvkSpanMetric):
    """EVK embedding stability, top-5 overlap on virtual samples; ``evk_topk@<span>`` (default: every span)."""

    value_range = (0.0, 1.0)
    identity = 1.0

    direction = "higher"

    def __init__(self, span: str = "relation", **kw: Any):
        super().__init__("topk", span, **kw)


@register_metric("evk_text_kl")
class EvkTextKL(EvkText):
    """EVK text stability: KL(base ‖ edited) on the neighbourhood prompts."""

    value_range = (0.0, float("inf"))
    identity = 0.0

    direction = "lower"

    def __init__(self, **kw: Any):
        super().__init__("kl", **kw)


@register_metric("evk_text_topk")
class EvkTextTopK(EvkText):
    """EVK text stability: top-5 overlap on the neighbourhood prompts."""

    value_range = (0.0, 1.0)
    identity = 1.0

    direction = "higher"

    def __init__(self, **kw: Any):
        super().__init__("topk", **kw)


@register_metric("evk")
class Evk(Metric):
    """EVK-Bench: evk_kl / evk_topk on every span plus evk_text_kl / evk_text_topk (``evk@<span>``: one span)."""

    @classmethod
    def from_name(cls, name: str, arg: str | None) -> list[Metric]:
        return evk_metrics(spans=_span_arg(name, arg))

    @classmethod
    def check_instances(cls) -> list[Metric]:
        """One span of each member (``evk_kl`` / ``evk_topk`` check every span)."""
        return evk_metrics(spans=("relation",), n_samples=2)


def evk_metrics(spans: Sequence[str] = SPANS, sigmas: Sequence[float] = DEFAULT_SIGMAS,
                n_samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED, k: int = DEFAULT_K,
                kinds: Sequence[str] = EVK_KINDS, max_prompts: int | None = None) -> list[Metric]:
    """The EVK-Bench metric instances with chosen settings (pass them to :func:`editlens.evaluate`)."""
    out: list[Metric] = []
    for s in spans:
        kw = dict(sigmas=sigmas, n_samples=n_samples, seed=seed, kinds=kinds, max_prompts=max_prompts)
        out.append(EvkKL(s, **kw))
        out.append(EvkTopK(s, k=k, **kw))
    out.append(EvkTextKL())
    out.append(EvkTextTopK(k=k))
    return out


def evk_rows_by_sigma(rows: Iterable[Row]) -> Iterator[tuple[str, str, str, float, Row]]:
    """Split EVK rows into ``(measure name, span, probe kind, σ, row)`` for the per-σ rows (``name@span:σ``)."""
    for r in rows:
        if r.metric.startswith("evk_") and "@" in r.metric and ":" in r.metric:
            base, _, rest = r.metric.partition("@")
            span, _, sig = rest.partition(":")
            yield base, span, r.probe_kind, float(sig), r  # type: ignore[misc]
