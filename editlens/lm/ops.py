"""Batched model operations (left-padded, batched by a token budget).

All functions take an :class:`~editlens.lm.LM` and lists of texts, sort them by length, pack them into
left-padded batches whose ``rows × padded length`` stays within ``batch_tokens``, run the model without
gradients, and return results in the original order. Position ids are computed from the attention mask, so
a prompt gives the same outputs whatever it is batched with, up to float rounding of differently shaped
matrix products: on the tiny test models log-probs agree to 1e-5; on SmolLM2 (30 float32 layers)
probabilities agree to 1e-5 absolute and log-probs to 1e-5 relative (tested).

Only the logits that are needed are computed (``logits_to_keep``): the last position for next-token
distributions, the last ``len(target)`` positions for teacher forcing — with left padding the target tokens of
every row sit at the end.

Context length (:mod:`editlens.lm.context`): every operation checks all its prompts before its first forward pass;
one that does not fit the model's context (with its target, or with the new tokens of a generation) raises
:class:`~editlens.errors.ContextLengthError`, or inside ``with truncation("left")`` loses its oldest tokens.

Target tokenisation (:func:`target_token_ids`): a target is joined to its prompt with one space unless the
prompt ends with whitespace or the target starts with it. The target's tokens are the tokens of
``prompt + sep + target`` after the prompt's own tokens; when the tokenizer merges across the boundary (the
prompt's tokens are not a prefix of the joint tokens), the target is tokenised on its own (``sep + target``,
no special tokens), so the prompt is always scored as the model sees it alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from editlens.errors import EditlensError
from editlens.lm.context import context_length, fit_ids, truncation  # noqa: F401  (re-exported)
from editlens.lm.hooks import record_io

if TYPE_CHECKING:  # pragma: no cover
    from editlens.lm.load import LM

DEFAULT_BATCH_TOKENS = 4096


@dataclass
class TeacherForced:
    """Teacher-forced scores of one target after one prompt.

    Attributes:
        target_ids: the target's token ids ``[m]``.
        logprobs: log P(target token i | prompt, target tokens < i) ``[m]`` (float32).
        argmax_ids: the model's top-1 prediction at each of those positions ``[m]``.
    """

    target_ids: torch.Tensor
    logprobs: torch.Tensor
    argmax_ids: torch.Tensor

    @property
    def total_logprob(self) -> float:
        return float(self.logprobs.sum())

    @property
    def mean_logprob(self) -> float:
        return float(self.logprobs.mean()) if self.logprobs.numel() else 0.0

    @property
    def token_accuracy(self) -> float:
        """Share of target tokens that are the model's top-1 prediction (T-acc)."""
        if self.target_ids.numel() == 0:
            return 0.0
        if not bool(torch.isfinite(self.logprobs).all()):
            return float("nan")  # non-finite logits: the argmax is meaningless (NaN, never 0)
        return float((self.argmax_ids == self.target_ids).float().mean())


# ------------------------------------------------------------------------------------------------ tokenising
def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as the model sees it (with the tokenizer's special tokens)."""
    return list(tokenizer(text).input_ids)


def joint_separator(prompt: str, target: str) -> str:
    """The separator put between a prompt and its target (``" "`` unless whitespace is already there)."""
    if not prompt or prompt[-1].isspace() or (target and target[0].isspace()):
        return ""
    return " "


def target_token_ids(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, target_ids)`` for teacher forcing (see the module docstring for the boundary rule)."""
    if not isinstance(target, str) or not target.strip():
        raise EditlensError(f"empty target for prompt {prompt!r}")
    p_ids = encode(tokenizer, prompt)
    sep = joint_separator(prompt, target)
    full = encode(tokenizer, prompt + sep + target)
    eos = getattr(tokenizer, "eos_token_id", None)
    if full and eos is not None and full[-1] == eos and (not p_ids or p_ids[-1] != eos):
        full = full[:-1]  # tokenizers that append EOS
    if len(full) > len(p_ids) and full[: len(p_ids)] == p_ids:
        return p_ids, full[len(p_ids):]
    t_ids = list(tokenizer(sep + target, add_special_tokens=False).input_ids)
    return p_ids, t_ids


def token_span(tokenizer: Any, text: str, char_start: int, char_end: int) -> tuple[int, int]:
    """Token indices ``[first, last + 1)`` of ``encode(text)`` overlapping the characters ``[char_start, char_end)``.

    Needs a fast tokenizer (offset mapping). Raises when the span covers no token.
    """
    enc = tokenizer(text, return_offsets_mapping=True)
    idx = [i for i, (a, b) in enumerate(enc.offset_mapping) if b > a and a < char_end and b > char_start]
    if not idx:
        raise EditlensError(f"characters [{char_start}, {char_end}) of {text!r} cover no token")
    return idx[0], idx[-1] + 1


def subject_span(tokenizer: Any, template: str, subject: str, prefix: str = "") -> tuple[int, int]:
    """Token span of the subject in ``prefix + template.format(subject)`` (``[first, last + 1)``)."""
    if "{}" not in template:
        raise EditlensError(f"template {template!r} has no '{{}}' for the subject")
    start = len(prefix) + template.index("{}")
    text = prefix + template.replace("{}", subject, 1)
    return token_span(tokenizer, text, start, start + len(subject))


def subject_last_token(tokenizer: Any, template: str, subject: str, prefix: str = "") -> int:
    """Index of the last subject token in ``prefix + template.format(subject)`` (what ROME/MEMIT read)."""
    return subject_span(tokenizer, template, subject, prefix)[1] - 1


# ------------------------------------------------------------------------------------------------ batching
def plan_batches(lengths: Sequence[int], batch_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Group indices (sorted by length) so that ``rows × max length <= batch_tokens`` per group."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        n = max(1, lengths[i])
        new_max = max(cur_max, n)
        if cur and (new_max * (len(cur) + 1) > batch_tokens or (max_rows and len(cur) >= max_rows)):
            batches.append(cur)
            cur, new_max = [], n
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-pad token id lists into ``input_ids``, ``attention_mask`` and ``position_ids``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if len(s):
            ids[r, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[r, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}


def _pad_id(lm: "LM") -> int:
    pid = lm.tokenizer.pad_token_id
    return int(pid if pid is not None else (lm.tokenizer.eos_token_id or 0))


def _max_rows(lm: "LM", keep: int = 1, budget_bytes: int = 512 * 2**20) -> int:
    """Row cap so that the kept logits (rows × keep × vocab floats) stay within ``budget_bytes``."""
    return max(1, budget_bytes // max(1, keep * lm.vocab_size * 4))


def forward_logits(lm: "LM", batch: dict[str, torch.Tensor], keep: int, **extra: Any) -> torch.Tensor:
    """Logits of the last ``keep`` positions of a left-padded batch ``[rows, keep, vocab]`` (float32)."""
    out = lm.model(**batch, logits_to_keep=keep, use_cache=False, **extra)
    return out.logits[:, -keep:, :].float()


# ------------------------------------------------------------------------------------------------ public ops
@torch.no_grad()
def next_token_logprobs(lm: "LM", prompts: Sequence[str], batch_tokens: int = DEFAULT_BATCH_TOKENS) -> torch.Tensor:
    """Log-probabilities of the next token after each prompt, ``[n, vocab]`` float32 on CPU."""
    prompts = list(prompts)
    if not prompts:
        return torch.empty((0, lm.vocab_size))
    ids = [fit_ids(lm, encode(lm.tokenizer, p), 0, what="prompt", index=i, text=p) for i, p in enumerate(prompts)]
    results: list[torch.Tensor | None] = [None] * len(prompts)
    for group in plan_batches([len(s) for s in ids], batch_tokens, _max_rows(lm)):
        batch = pad_left([ids[i] for i in group], _pad_id(lm), lm.device)
        logits = forward_logits(lm, batch, keep=1)[:, -1, :]
        lp = torch.log_softmax(logits, dim=-1).cpu()
        for r, i in enumerate(group):
            results[i] = lp[r]
    return torch.stack(results)  # type: ignore[arg-type]


@torch.no_grad()
def teacher_forced(lm: "LM", prompts: Sequence[str], targets: Sequence[str],
                   batch_tokens: int = DEFAULT_BATCH_TOKENS) -> list[TeacherForced]:
    """Teacher-forced per-token log-probs and argmax predictions of each target after its prompt."""
    return teacher_forced_with_next_token(lm, prompts, targets, (), batch_tokens)[0]


@torch.no_grad()
def teacher_forced_with_next_token(lm: "LM", prompts: Sequence[str], targets: Sequence[str],
                                   next_token_rows: Iterable[int] = (), batch_tokens: int = DEFAULT_BATCH_TOKENS
                                   ) -> tuple[list[TeacherForced], dict[int, torch.Tensor]]:
    """:func:`teacher_forced`, plus the full next-token log-probabilities after ``prompts[i]`` for each ``i`` in
    ``next_token_rows`` (``{i: [vocab] float32 CPU}``).

    The logits at the first target position of a teacher-forced pass are the model's next-token distribution after
    the prompt (the attention is causal and the prompt is tokenised exactly as by :func:`next_token_logprobs`),
    so an evaluation that needs both answers both with one forward pass per sequence. The values equal
    :func:`next_token_logprobs`'s up to float rounding (another batch shape; ~1e-6 in float32)."""
    if len(prompts) != len(targets):
        raise EditlensError(f"{len(prompts)} prompts but {len(targets)} targets")
    want = set(next_token_rows)
    pairs = [target_token_ids(lm.tokenizer, p, t) for p, t in zip(prompts, targets)]
    pairs = [(fit_ids(lm, p, len(t) - 1, what="prompt", index=i, text=prompts[i],
                      reserved_what="target tokens fed after it"), t)
             for i, (p, t) in enumerate(pairs)]
    seqs = [p + t[:-1] for p, t in pairs]
    results: list[TeacherForced | None] = [None] * len(pairs)
    nexts: dict[int, torch.Tensor] = {}
    for group in plan_batches([len(s) for s in seqs], batch_tokens):
        keep = max(len(pairs[i][1]) for i in group)
        # split further when the kept logits would be too large
        cap = _max_rows(lm, keep)
        for start in range(0, len(group), cap):
            sub = group[start:start + cap]
            batch = pad_left([seqs[i] for i in sub], _pad_id(lm), lm.device)
            keep_sub = min(max(len(pairs[i][1]) for i in sub), batch["input_ids"].shape[1])
            lp = torch.log_softmax(forward_logits(lm, batch, keep=keep_sub), dim=-1)
            for r, i in enumerate(sub):
                t_ids = torch.tensor(pairs[i][1], dtype=torch.long, device=lp.device)
                m = len(t_ids)
                rows = lp[r, keep_sub - m:, :]
                results[i] = TeacherForced(target_ids=t_ids.cpu(),
                                           logprobs=rows.gather(-1, t_ids[:, None])[:, 0].cpu(),
                                           argmax_ids=rows.argmax(-1).cpu())
                if i in want:
                    nexts[i] = rows[0].to("cpu", torch.float32, copy=True)  # no view into the batch
    return results, nexts  # type: ignore[return-value]


def target_logprobs(lm: "LM", prompts: Sequence[str], targets: Sequence[str],
                    batch_tokens: int = DEFAULT_BATCH_TOKENS) -> list[torch.Tensor]:
    """Per-token teacher-forced log-probs of each target (see :func:`teacher_forced`)."""
    return [tf.logprobs for tf in teacher_forced(lm, prompts, targets, batch_tokens)]


def _cut(text: str, stop: Iterable[str]) -> str:
    for s in stop:
        if s and s in text:
            text = text[: text.index(s)]
    return text


@torch.no_grad()
def generate(lm: "LM", prompts: Sequence[str], max_new_tokens: int = 16, batch_tokens: int = DEFAULT_BATCH_TOKENS,
             stop: Sequence[str] = ("\n",), skip_leading_newlines: bool = True) -> list[str]:
    """Greedy continuations of each prompt, cut at the first stop string (and at EOS).

    Leading newlines are skipped before the stop strings apply (a model that starts its answer on a new line
    is not judged empty). Returns the continuation text only, without the prompt.
    """
    prompts = list(prompts)
    if not prompts:
        return []
    ids = [fit_ids(lm, encode(lm.tokenizer, p), max(0, max_new_tokens - 1), what="prompt", index=i, text=p,
                   reserved_what=f"positions for {max_new_tokens} new tokens") for i, p in enumerate(prompts)]
    out: list[str] = [""] * len(prompts)
    eos = lm.tokenizer.eos_token_id
    for group in plan_batches([len(s) + max_new_tokens for s in ids], batch_tokens, _max_rows(lm)):
        batch = pad_left([ids[i] for i in group], _pad_id(lm), lm.device)
        batch.pop("position_ids")
        gen = lm.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                pad_token_id=_pad_id(lm), eos_token_id=eos, temperature=None, top_p=None,
                                top_k=None)
        new = gen[:, batch["input_ids"].shape[1]:].cpu()
        for r, i in enumerate(group):
            toks = new[r].tolist()
            if eos is not None and eos in toks:
                toks = toks[: toks.index(eos)]
            text = lm.tokenizer.decode(toks, skip_special_tokens=True)
            if skip_leading_newlines:
                text = text.lstrip("\n")
            out[i] = _cut(text, stop)
    return out


@torch.no_grad()
def capture(lm: "LM", prompts: Sequence[str], modules: Sequence[str], positions: Sequence[int],
            kind: str = "input", batch_tokens: int = DEFAULT_BATCH_TOKENS) -> dict[str, torch.Tensor]:
    """Inputs (or outputs) of ``modules`` at one token position per prompt, in one forward pass per batch.

    Args:
        positions: token index per prompt, counted in the prompt's own tokens (negative counts from the end).
        kind: ``"input"`` (first positional input of the module, e.g. the key of an MLP output projection) or
            ``"output"``.

    Returns:
        ``{module: Tensor[n, d]}`` in float32 on CPU.
    """
    prompts = list(prompts)
    ids = [fit_ids(lm, encode(lm.tokenizer, p), 0, what="prompt", index=i, text=p, allow_truncation=False)
           for i, p in enumerate(prompts)]  # positions count in the prompt's own tokens: never truncated
    if len(positions) != len(prompts):
        raise EditlensError(f"{len(prompts)} prompts but {len(positions)} positions")
    res: dict[str, list[torch.Tensor | None]] = {m: [None] * len(prompts) for m in modules}
    for group in plan_batches([len(s) for s in ids], batch_tokens):
        batch = pad_left([ids[i] for i in group], _pad_id(lm), lm.device)
        width = batch["input_ids"].shape[1]
        with record_io(lm.model, modules, kind=kind) as rec:
            lm.model(**batch, logits_to_keep=1, use_cache=False)
        for r, i in enumerate(group):
            n = len(ids[i])
            p = positions[i] if positions[i] >= 0 else n + positions[i]
            if not 0 <= p < n:
                raise EditlensError(f"position {positions[i]} is outside prompt {i} ({n} tokens)")
            col = width - n + p
            for m in modules:
                res[m][i] = rec[m][r, col].float().cpu()
    return {m: torch.stack(v) for m, v in res.items()}  # type: ignore[arg-type]
