"""Causal tracing (Meng et al., NeurIPS 2022, "Locating and Editing Factual Associations in GPT", §2.1).

Three runs of the model on one factual prompt:

* **clean**: the prompt as it is; every hidden state h_i^(l) (and every MLP / attention output) is recorded,
  and P(o), the probability of the answer's first token after the prompt, is ``p_clean``;
* **corrupted**: the embeddings of the subject's tokens get Gaussian noise ε ~ N(0, ν²) added (ν = ``noise``,
  by default 3 × the standard deviation of the model's input embeddings), ``samples`` independent draws;
  the probability of the same token, averaged over the draws, is ``p_corrupt``;
* **corrupted-with-restoration**: the corrupted run, except that one state is set back to its clean value —
  for ``kind="hidden"`` the output of block l at token i (the residual stream), for ``kind="mlp"`` /
  ``kind="attn"`` the MLP / attention module outputs at token i in a window of ``window`` layers around l
  (layers ``max(0, l - window // 2)`` to ``min(L, l + ceil(window / 2)) - 1``, as the paper's code).
  ``Trace.scores[i, l]`` is the probability of the answer token in that run (mean over the noise draws).

The indirect effect of a state is ``scores[i, l] - p_corrupt``; the total effect is ``p_clean - p_corrupt``.

The same noise draws (seeded by ``seed``) are used for every restoration (common random numbers), as the
paper's code does, so that differences between cells are not noise-sampling differences.

**Batching and reuse** (what :func:`causal_trace` does, exactly equivalent to :func:`causal_trace_reference`,
the paper's one-restoration-per-forward loop): all restorations of a prompt × noise draws run in batches whose
peak ``rows × tokens`` stays within ``batch_tokens``. With ``reuse=True`` (default) the restoration's rows join
the batch only where they start to differ from the corrupted run: a ``hidden`` restoration at layer l is a copy
of the corrupted rows made at block l's output, an ``mlp``/``attn`` restoration is copied at the input of the
first block of its window; the layers below are computed once per batch for the corrupted rows instead of once
per restoration. The batch therefore grows as the forward pass goes up the layers (a block-output hook appends
rows); this needs the per-batch tensors the model builds before its first block (rotary position embeddings,
the causal mask) to broadcast over rows, which holds when the prompt is fed alone without padding (what is done
here) and is checked by the tests for every built-in architecture family. Every operation of a transformer
acts on each row on its own, so a row computes the same values in a bigger batch; the tests check that the
scores are bit-identical to the reference loop on the tiny models (on other hardware/BLAS combinations, a
matrix product's rounding may depend on the number of rows: then they agree to float rounding).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from editlens.errors import EditlensError
from editlens.lm import hooks
from editlens.lm.ops import DEFAULT_BATCH_TOKENS, encode, target_token_ids, token_span
from editlens.lm.context import fit_ids

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM

KINDS = ("hidden", "mlp", "attn")


class TraceError(EditlensError):
    """Bad input to causal tracing (unknown kind, subject not in the prompt, bad window/samples/noise...)."""


# ------------------------------------------------------------------------------------------------ result
@dataclass
class Trace:
    """The result of :func:`causal_trace` for one prompt.

    Attributes:
        prompt: the prompt traced (subject filled in).
        subject: the corrupted subject string.
        answer: the answer whose first token's probability is recorded (as given, or the model's greedy token).
        answer_id: that token's id.
        tokens: the prompt's tokens as strings (``len(tokens) == scores.shape[0]``).
        subject_range: ``(first, last + 1)`` token indices of the subject.
        kind: ``"hidden"``, ``"mlp"`` or ``"attn"``.
        scores: ``[tokens, layers]`` P(answer) with the state at (token, layer) restored (mean over noise draws).
        p_clean: P(answer) of the clean run.
        p_corrupt: P(answer) of the corrupted run without restoration (mean over noise draws).
        noise: the noise standard deviation used; samples, window, seed: as passed.
        known: whether the answer's token is the model's greedy prediction on the clean prompt.
    """

    prompt: str
    subject: str
    answer: str
    answer_id: int
    tokens: list[str]
    subject_range: tuple[int, int]
    kind: str
    scores: np.ndarray
    p_clean: float
    p_corrupt: float
    noise: float
    samples: int
    window: int
    seed: int
    known: bool
    case_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[1])

    @property
    def indirect_effect(self) -> np.ndarray:
        """``scores - p_corrupt`` (the paper's indirect effect of each state)."""
        return self.scores - self.p_corrupt

    @property
    def total_effect(self) -> float:
        """``p_clean - p_corrupt``."""
        return self.p_clean - self.p_corrupt

    def to_pandas(self):
        """Tidy rows: one per (token, layer) with the score, indirect effect and the trace's constants."""
        import pandas as pd

        a, b = self.subject_range
        rows = []
        for i, tok in enumerate(self.tokens):
            for l in range(self.n_layers):
                rows.append({"case_id": self.case_id, "kind": self.kind, "token_index": i, "token": tok,
                             "is_subject": a <= i < b, "category": token_category(i, self.subject_range,
                                                                                 len(self.tokens)),
                             "layer": l, "score": float(self.scores[i, l]),
                             "indirect_effect": float(self.scores[i, l] - self.p_corrupt),
                             "p_clean": self.p_clean, "p_corrupt": self.p_corrupt, "answer": self.answer,
                             "known": self.known})
        return pd.DataFrame(rows)

    def plot(self, path: str | Path | None = None, ax: Any = None, title: str | None = None):
        """Draw the heatmap of the paper's Figure 1: tokens down, layers across, subject tokens marked with ``*``.

        Writes ``path`` (any format matplotlib knows from the suffix) when given; returns the figure."""
        from editlens.localize.plots import plot_trace

        return plot_trace(self, path, ax=ax, title=title)


def token_category(i: int, subject_range: tuple[int, int], n_tokens: int) -> str | None:
    """The token category of the paper's average-effect figure for token ``i``, or ``None`` (tokens before the
    subject). A one-token subject's token is ``"last subject token"`` (also counted as the first one by
    :func:`token_categories`); the prompt's last token is ``"last token"`` unless it is a subject token."""
    return (token_categories(i, subject_range, n_tokens) or [None])[-1]


CATEGORIES = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
              "further tokens", "last token")


def token_categories(i: int, subject_range: tuple[int, int], n_tokens: int) -> list[str]:
    """All categories token ``i`` counts in (see :data:`CATEGORIES`)."""
    a, b = subject_range
    last = n_tokens - 1
    out = []
    if a <= i < b:
        if i == a:
            out.append("first subject token")
        if a < i < b - 1:
            out.append("middle subject tokens")
        if i == b - 1:
            out.append("last subject token")
        return out
    if i < a:
        return out
    if i == last:
        return ["last token"]
    if i == b:
        return ["first subsequent token"]
    return ["further tokens"]


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class _Prepared:
    prompt: str
    subject: str
    answer: str | None
    ids: list[int]
    span: tuple[int, int]
    case_id: str | None


def _check_args(kind: str, samples: Any, window: Any, noise: Any, seed: Any, batch_tokens: Any) -> None:
    if kind not in KINDS:
        raise TraceError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    for name, v, lo in (("samples", samples, 1), ("window", window, 1), ("batch_tokens", batch_tokens, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise TraceError(f"{name} must be an integer >= {lo}, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TraceError(f"seed must be an integer, got {seed!r}")
    if noise is not None:
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
            raise TraceError(f"noise must be a finite number >= 0 (the noise standard deviation) or None "
                             f"(3 x the std of the input embeddings), got {noise!r}")


def _prepare(lm: "LM", case_or_prompt: Any, subject: str | None, target: str | None) -> _Prepared:
    from editlens.data.schema import EditCase

    case_id = None
    if isinstance(case_or_prompt, EditCase):
        rw = case_or_prompt.rewrite
        prompt = rw.text
        subject = rw.subject if subject is None else subject
        target = rw.target_true if target is None else target
        case_id = case_or_prompt.case_id
    elif isinstance(case_or_prompt, str):
        prompt = case_or_prompt
        if subject is None:
            raise TraceError(f"prompt {prompt!r}: give subject= (the words whose embeddings are corrupted)")
    else:
        raise TraceError(f"expected an EditCase or a prompt string, got {type(case_or_prompt).__name__}")
    where = f"case {case_id!r}" if case_id is not None else f"prompt {prompt!r}"
    if not isinstance(subject, str) or not subject.strip():
        raise TraceError(f"{where}: subject must be a non-empty string, got {subject!r}")
    if not prompt.strip():
        raise TraceError(f"{where}: empty prompt")
    if subject not in prompt:
        raise TraceError(f"{where}: subject {subject!r} does not occur in the prompt {prompt!r}")
    if target is not None and (not isinstance(target, str) or not target.strip()):
        raise TraceError(f"{where}: target must be a non-empty string or None, got {target!r}")
    start = prompt.index(subject)
    ids = fit_ids(lm, encode(lm.tokenizer, prompt), 0, what="prompt", index=0, text=prompt, allow_truncation=False)
    try:
        span = token_span(lm.tokenizer, prompt, start, start + len(subject))
    except EditlensError as e:
        raise TraceError(f"{where}: {e}") from None
    if span[1] > len(ids):
        raise TraceError(f"{where}: subject tokens {span} lie outside the prompt's {len(ids)} tokens")
    return _Prepared(prompt, subject, target, ids, span, case_id)


@torch.no_grad()
def embedding_std(lm: "LM") -> float:
    """Standard deviation of all entries of the input embedding matrix (float64; times the module's
    ``embed_scale`` where it has one, e.g. Gemma 3's scaled embeddings).

    The paper uses the std of the embeddings of the dataset's subject tokens; editlens uses all token embeddings so
    that a trace does not depend on which other facts are traced (see docs/localize.md)."""
    emb = lm.module(lm.arch.embed)
    w = emb.weight.detach().double()
    scale = getattr(emb, "embed_scale", None)
    std = float(w.std(unbiased=False))
    return std * (float(scale) if scale is not None else 1.0)


def _window_layers(kind: str, layer: int, window: int, n_layers: int) -> range:
    if kind == "hidden":
        return range(layer, layer + 1)
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def _module_names(lm: "LM", kind: str) -> list[str]:
    arch = lm.arch
    fn = {"hidden": arch.block, "mlp": arch.mlp_at, "attn": arch.attn_at}[kind]
    return [fn(l) for l in range(lm.n_layers)]


@torch.no_grad()
def _clean_run(lm: "LM", ids: list[int], kind: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Next-token probabilities ``[vocab]`` (float32) and the clean states of every layer ``[T, d]``."""
    names = _module_names(lm, kind)
    x = torch.tensor([ids], dtype=torch.long, device=lm.device)
    with hooks.record_io(lm.model, names, kind="output") as rec:
        out = lm.model(input_ids=x, logits_to_keep=1, use_cache=False)
    probs = torch.softmax(out.logits[0, -1].float(), dim=-1)
    return probs, [rec[n][0].clone() for n in names]


def _noise(lm: "LM", samples: int, n_subj: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn((samples, n_subj, lm.d_model), generator=g, dtype=torch.float32)
    return (eps * scale).to(device=lm.device, dtype=lm.dtype)


def _answer_probs(logits: torch.Tensor, answer_id: int) -> torch.Tensor:
    return torch.softmax(logits[:, -1].float(), dim=-1)[:, answer_id]


def _mean(p: torch.Tensor) -> float:
    return float(p.double().mean())


# ------------------------------------------------------------------------------------------------ engine
@dataclass
class _Restoration:
    token: int
    layer: int
    window: range
    join: int  # rows are appended at the output of this block (-1: present from the start)


def _run_chunk(lm: "LM", ids: list[int], span: tuple[int, int], kind: str, noise: torch.Tensor,
               clean: list[torch.Tensor], rests: Sequence[_Restoration], answer_id: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward pass: ``samples`` corrupted rows + ``samples`` rows per restoration (joining at ``join``).

    Returns the corrupted rows' answer probabilities ``[samples]`` and each restoration's ``[samples]``."""
    samples = noise.shape[0]
    L = lm.n_layers
    a, b = span
    # row layout: [corrupted rows] then each restoration's block of `samples` rows, in order of joining
    order = sorted(range(len(rests)), key=lambda r: (rests[r].join, r))
    start_rows: dict[int, int] = {}
    n0 = samples
    for r in order:
        if rests[r].join < 0:
            start_rows[r] = n0
            n0 += samples
    joins: dict[int, list[int]] = {}
    for r in order:
        if rests[r].join >= 0:
            joins.setdefault(rests[r].join, []).append(r)
    cursor = {"n": n0}
    patches: dict[int, list[tuple[int, int]]] = {}  # layer -> [(restoration, token)]
    for r, rs in enumerate(rests):
        for l in rs.window:
            patches.setdefault(l, []).append((r, rs.token))

    def rows_of(r: int) -> slice:
        return slice(start_rows[r], start_rows[r] + samples)

    def corrupt(e: torch.Tensor) -> torch.Tensor:
        e = e.clone()
        reps = e.shape[0] // samples
        e[:, a:b] = e[:, a:b] + noise.repeat(reps, 1, 1).to(e.dtype)
        return e

    def restore(l: int):
        def fn(h: torch.Tensor) -> torch.Tensor:
            todo = [(r, t) for r, t in patches.get(l, ()) if r in start_rows]
            if not todo:
                return h
            h = h.clone()
            for r, t in todo:
                h[rows_of(r), t] = clean[l][t].to(h.dtype)
            return h
        return fn

    def block_out(l: int):
        patch = restore(l) if kind == "hidden" else None

        def fn(h: torch.Tensor) -> torch.Tensor:
            new = joins.get(l)
            if new:
                h = torch.cat([h] + [h[:samples]] * len(new), dim=0)
                for r in new:
                    start_rows[r] = cursor["n"]
                    cursor["n"] += samples
            return patch(h) if patch is not None else h
        return fn

    x = torch.tensor([ids], dtype=torch.long, device=lm.device).expand(n0, -1)
    with contextlib.ExitStack() as stack:
        stack.enter_context(hooks.patch_embeddings(lm.model, lm.arch.embed, corrupt))
        for l in range(L):
            if kind != "hidden" and patches.get(l):
                name = lm.arch.mlp_at(l) if kind == "mlp" else lm.arch.attn_at(l)
                stack.enter_context(hooks.patch_output(lm.model, name, restore(l)))
            if kind == "hidden" and (patches.get(l) or joins.get(l)) or joins.get(l):
                stack.enter_context(hooks.patch_output(lm.model, lm.arch.block(l), block_out(l)))
        out = lm.model(input_ids=x, logits_to_keep=1, use_cache=False)
    p = _answer_probs(out.logits, answer_id)
    if p.shape[0] != cursor["n"]:
        raise EditlensError(f"internal error: {p.shape[0]} output rows for {cursor['n']} planned rows")
    return p[:samples], [p[rows_of(r)] for r in range(len(rests))]


def _plan(n_tokens: int, n_layers: int, kind: str, window: int, reuse: bool,
          tokens: Sequence[int] | None = None) -> list[_Restoration]:
    out = []
    for i in (range(n_tokens) if tokens is None else tokens):
        for l in range(n_layers):
            w = _window_layers(kind, l, window, n_layers)
            join = (l if kind == "hidden" else w.start - 1) if reuse else -1
            out.append(_Restoration(i, l, w, join))
    return out


def _chunks(rests: list[_Restoration], samples: int, n_tokens: int, batch_tokens: int, max_rows: int
            ) -> list[list[int]]:
    """Restorations grouped (in order of joining layer) so that the peak rows × tokens stays in the budget."""
    per = max(1, min(batch_tokens // max(1, samples * n_tokens) - 1, max_rows // samples - 1))
    order = sorted(range(len(rests)), key=lambda r: (rests[r].join, rests[r].token, rests[r].layer))
    return [order[k:k + per] for k in range(0, len(order), per)]


def causal_trace(lm: "LM", case_or_prompt: "EditCase | str", *, subject: str | None = None,
                 target: str | None = None, kind: str = "hidden", noise: float | None = None, samples: int = 10,
                 window: int = 10, seed: int = 0, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 reuse: bool = True) -> Trace:
    """Causal trace of one factual prompt (see the module docstring for the three runs).

    Args:
        case_or_prompt: an :class:`~editlens.data.EditCase` (prompt = its rewrite's prompt with the subject, subject
            = its subject, target = its ``target_true``) or a prompt string (then ``subject`` is required).
        subject: the substring of the prompt whose token embeddings are corrupted (first occurrence).
        target: the answer; its first token's probability is recorded. ``None``: the case's true object, or for a
            prompt (or a case without one) the model's greedy next token.
        kind: ``"hidden"`` (block outputs), ``"mlp"`` or ``"attn"`` (module outputs in a window of layers).
        noise: standard deviation of the Gaussian noise; ``None``: 3 × the std of the input embeddings.
        samples: noise draws (rows per restoration). window: layers restored together for ``mlp``/``attn``.
        seed: seed of the noise draws. batch_tokens: peak ``rows × tokens`` per forward pass.
        reuse: let restorations join the batch where they start to differ from the corrupted run (see above).

    Raises:
        TraceError: before any forward pass, for an unknown kind, a subject not in the prompt, a window or samples
            below 1, a negative or non-finite noise, a missing subject for a plain prompt.
    """
    _check_args(kind, samples, window, noise, seed, batch_tokens)
    prep = _prepare(lm, case_or_prompt, subject, target)
    with lm.lock:
        return _trace(lm, prep, kind, noise, samples, window, seed, batch_tokens, reuse, loop=False)


def causal_trace_reference(lm: "LM", case_or_prompt: "EditCase | str", *, subject: str | None = None,
                           target: str | None = None, kind: str = "hidden", noise: float | None = None,
                           samples: int = 10, window: int = 10, seed: int = 0) -> Trace:
    """The paper's procedure as its code runs it: one forward pass (the ``samples`` corrupted rows) per restored
    state. Same result as :func:`causal_trace` (the benchmark's baseline and the tests' reference)."""
    _check_args(kind, samples, window, noise, seed, 1)
    prep = _prepare(lm, case_or_prompt, subject, target)
    with lm.lock:
        return _trace(lm, prep, kind, noise, samples, window, seed, 1, False, loop=True)


def _answer_id(lm: "LM", prep: _Prepared, probs_clean: torch.Tensor) -> tuple[int, str]:
    if prep.answer is None:
        aid = int(probs_clean.argmax())
        return aid, lm.tokenizer.decode([aid])
    _, t_ids = target_token_ids(lm.tokenizer, prep.prompt, prep.answer)
    if not t_ids:
        raise TraceError(f"target {prep.answer!r} has no tokens after prompt {prep.prompt!r}")
    return int(t_ids[0]), prep.answer


def _trace(lm: "LM", prep: _Prepared, kind: str, noise: float | None, samples: int, window: int, seed: int,
           batch_tokens: int, reuse: bool, loop: bool, tokens: Sequence[int] | None = None) -> Trace:
    """The trace of one prepared prompt. ``tokens``: restore only these token positions (their rows of
    ``scores``; the other rows are NaN), e.g. the last subject token for :mod:`editlens.localize.layers`."""
    from editlens.lm.ops import _max_rows

    L, T = lm.n_layers, len(prep.ids)
    scale = 3.0 * embedding_std(lm) if noise is None else float(noise)
    probs_clean, clean = _clean_run(lm, prep.ids, kind)
    answer_id, answer = _answer_id(lm, prep, probs_clean)
    eps = _noise(lm, samples, prep.span[1] - prep.span[0], scale, seed)
    rests = _plan(T, L, kind, window, reuse and not loop, tokens)
    scores = np.zeros((T, L), dtype=np.float64) if tokens is None else np.full((T, L), np.nan)
    if loop:
        p_corrupt = _mean(_run_chunk(lm, prep.ids, prep.span, kind, eps, clean, [], answer_id)[0])
        for rs in rests:
            _, (p,) = _run_chunk(lm, prep.ids, prep.span, kind, eps, clean, [rs], answer_id)
            scores[rs.token, rs.layer] = _mean(p)
    else:
        p_corrupt = None
        for chunk in _chunks(rests, samples, T, batch_tokens, _max_rows(lm)):
            pc, ps = _run_chunk(lm, prep.ids, prep.span, kind, eps, clean, [rests[r] for r in chunk], answer_id)
            if p_corrupt is None:
                p_corrupt = _mean(pc)
            for r, p in zip(chunk, ps):
                scores[rests[r].token, rests[r].layer] = _mean(p)
    toks = [lm.tokenizer.decode([t]) for t in prep.ids]
    return Trace(prompt=prep.prompt, subject=prep.subject, answer=answer, answer_id=answer_id, tokens=toks,
                 subject_range=prep.span, kind=kind, scores=scores, p_clean=float(probs_clean[answer_id]),
                 p_corrupt=float(p_corrupt), noise=scale, samples=samples, window=window, seed=seed,
                 known=int(probs_clean.argmax()) == answer_id, case_id=prep.case_id)
