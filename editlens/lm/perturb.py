"""Embedding perturbation ("virtual knowledge", after EVK, arXiv 2602.01977): spans of a prompt, seeded noise,
the relative-scale perturbation ``e + σ·‖e‖·ε/√d`` and left-padded batches with the noise patched into the input
embeddings.

Shared by the EVK metrics (:mod:`editlens.evaluate.evk`, which measure drift on perturbed inputs) and by EVK-Align
(:mod:`editlens.edit.evk_align`, which regularises an edit on the same perturbed inputs), so that a method never
imports a metric module and both sides perturb identically. The definitions (spans, noise seeding, scale) are
documented in :mod:`editlens.evaluate.evk` and ``docs/evk.md``.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from editlens.lm import ops
from editlens.lm.hooks import patch_embeddings

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM

#: the perturbed spans of a prompt: its subject tokens, the other (template) tokens, all tokens
SPANS = ("subject", "relation", "full")

__all__ = ["SPANS", "subject_range", "span_tokens", "sample_seed", "sample_noise", "perturb", "VirtualItem",
           "virtual_batch", "embedding_patch", "case_prompts"]


# ================================================================================================ spans
def subject_range(prompt: str, template: str | None = None, subject: str | None = None) -> tuple[int, int] | None:
    """Character range ``[start, end)`` of the subject in ``prompt``, or ``None`` when it cannot be found.

    Tried in order: ``prompt`` is ``template`` filled with ``subject``; ``prompt`` matches the template's text
    before and after ``{}`` (a neighbour with another subject); ``subject`` occurs in ``prompt`` (first occurrence).
    """
    if template and "{}" in template:
        pre, _, suf = template.partition("{}")
        if subject is not None and prompt == pre + subject + suf:
            return len(pre), len(pre) + len(subject)
        if prompt.startswith(pre) and prompt.endswith(suf) and len(prompt) > len(pre) + len(suf):
            start, end = len(pre), len(prompt) - len(suf)
            if prompt[start:end].strip():
                return start, end
    if subject and subject in prompt:
        i = prompt.index(subject)
        return i, i + len(subject)
    return None


def span_tokens(tokenizer: Any, text: str, query_start: int, query_len: int,
                subject: tuple[int, int] | None) -> dict[str, list[int]]:
    """Token indices of the spans of the query ``text[query_start:query_start + query_len]`` inside ``text``.

    ``subject`` is the subject's character range *within the query*. Returns ``{"full": [...], "subject": [...],
    "relation": [...]}`` (``subject``/``relation`` only when ``subject`` is given); tokens without characters
    (special tokens) are never included.
    """
    enc = tokenizer(text, return_offsets_mapping=True)
    q0, q1 = query_start, query_start + query_len
    full = [i for i, (a, b) in enumerate(enc.offset_mapping) if b > a and a < q1 and b > q0]
    out = {"full": full}
    if subject is not None:
        s0, s1 = q0 + subject[0], q0 + subject[1]
        subj = [i for i in full if enc.offset_mapping[i][0] < s1 and enc.offset_mapping[i][1] > s0]
        out["subject"] = subj
        out["relation"] = [i for i in full if i not in set(subj)]
    return out


# ================================================================================================ noise
def sample_seed(seed: int, prompt: str, sample: int) -> int:
    """The generator seed of virtual sample ``sample`` of ``prompt`` (independent of σ, span and system)."""
    h = hashlib.sha256(f"{int(seed)}\0{prompt}\0{int(sample)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def sample_noise(seed: int, prompt: str, sample: int, n_tokens: int, d: int) -> torch.Tensor:
    """Standard normal ``ε`` of shape ``[n_tokens, d]`` (float32, CPU) for one virtual sample."""
    g = torch.Generator(device="cpu")
    g.manual_seed(sample_seed(seed, prompt, sample))
    return torch.randn((n_tokens, d), generator=g, dtype=torch.float32)


def perturb(emb: torch.Tensor, eps: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """``e + σ · ‖e‖ · ε / √d`` per token (``emb`` and ``eps`` ``[..., d]``; σ broadcast over the leading axes).

    Computed in float32 and cast back to ``emb``'s dtype; σ = 0 returns ``emb`` exactly.
    """
    d = emb.shape[-1]
    e32 = emb.float()
    s = sigma if torch.is_tensor(sigma) else torch.tensor(float(sigma))
    s = s.to(e32.device, torch.float32)
    if s.dim() < e32.dim():
        s = s.reshape(*s.shape, *([1] * (e32.dim() - s.dim())))
    delta = s * e32.norm(dim=-1, keepdim=True) * eps.to(e32.device, torch.float32) / math.sqrt(d)
    return emb + delta.to(emb.dtype)


# ================================================================================================ virtual inputs
@dataclass
class VirtualItem:
    """One model input with noise on some of its tokens.

    Attributes:
        ids: token ids of the model input.
        positions: token indices that are perturbed (the span).
        eps: ``[len(positions), d]`` standard normal noise for those tokens.
        sigma: the relative drift scale.
    """

    ids: list[int]
    positions: list[int]
    eps: torch.Tensor
    sigma: float


def virtual_batch(lm: "LM", items: Sequence[VirtualItem]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Left-padded batch of ``items`` plus the noise ``Z [rows, width, d]`` and scale ``S [rows, width]`` tensors."""
    batch = ops.pad_left([it.ids for it in items], ops._pad_id(lm), lm.device)
    rows, width = batch["input_ids"].shape
    d = lm.d_model
    Z = torch.zeros((rows, width, d), dtype=torch.float32)
    S = torch.zeros((rows, width), dtype=torch.float32)
    for r, it in enumerate(items):
        if it.sigma == 0 or not it.positions:
            continue
        cols = torch.tensor(it.positions, dtype=torch.long) + (width - len(it.ids))
        Z[r, cols] = it.eps
        S[r, cols] = float(it.sigma)
    return batch, Z.to(lm.device), S.to(lm.device)


def embedding_patch(lm: "LM", Z: torch.Tensor, S: torch.Tensor):
    """Context manager: the model's token embeddings become :func:`perturb` (``e``, ``Z``, ``S``) in the next
    forward passes (batch shape must match ``Z``)."""
    return patch_embeddings(lm.model, lm.arch.embed, lambda e: perturb(e, Z, S))


# ================================================================================================ prompts of a case
def case_prompts(case: "EditCase", kind: str, max_prompts: int | None = None) -> list[tuple[str, tuple[int, int] | None]]:
    """``(prompt, subject range)`` of a case's prompts of one EVK kind (``rewrite`` or ``neighborhood``)."""
    rw = case.rewrite
    if kind == "rewrite":
        prompts = [rw.text] + [p.prompt for p in case.probes_of("rewrite")]
    else:
        prompts = [p.prompt for p in case.probes_of(kind)]
    prompts = list(dict.fromkeys(prompts))
    if max_prompts is not None:
        prompts = prompts[: int(max_prompts)]
    subj = rw.subject if kind == "rewrite" else None
    return [(p, subject_range(p, rw.prompt, subj)) for p in prompts]
