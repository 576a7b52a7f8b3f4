"""The one thing editlens evaluates: a :class:`System`.

A base model, a weight-edited model, a GRACE-wrapped model and an SCR prompter all answer the same batched
calls, so every metric applies to every method unchanged. Metrics never learn which method made a system.

* :meth:`System.next_token_logprobs` — log-probabilities of the next token after each prompt ``[n, vocab]``.
* :meth:`System.teacher_forced` — per-token log-probs (and argmax predictions) of a target after a prompt.
* :meth:`System.target_logprobs` — the log-prob part of :meth:`teacher_forced` (ARCHITECTURE.md's call).
* :meth:`System.generate` — greedy continuations.

:class:`ModelSystem` serves a plain :class:`~editlens.lm.LM`. :class:`WrappedSystem` is the base for
systems that rewrite prompts (IKE, SCR) or add module hooks for the duration of each call (GRACE, WISE):
override :meth:`WrappedSystem.transform_prompts` and/or :meth:`WrappedSystem.active` .
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence, runtime_checkable

import torch

from editlens.lm import ops
from editlens.lm.ops import TeacherForced
from editlens.lm.prompting import PromptFormat, format_prompts

if TYPE_CHECKING:  # pragma: no cover
    from editlens.lm import LM


@runtime_checkable
class System(Protocol):
    """What every evaluated system provides (always batched)."""

    #: identifies the system's behaviour (model weights + method state); used as a cache key
    fingerprint: str
    #: the prompt format this system poses prompts in (recorded with results)
    prompt_format: str

    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor: ...

    def teacher_forced(self, prompts: Sequence[str], targets: Sequence[str]) -> list[TeacherForced]: ...

    def target_logprobs(self, prompts: Sequence[str], targets: Sequence[str]) -> list[torch.Tensor]: ...

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 16) -> list[str]: ...


class ModelSystem:
    """A :class:`System` backed by a plain language model.

    Args:
        lm: the loaded model (see :func:`editlens.load_model`).
        prompt_format: ``"raw"`` (prompt text as is), ``"chat"`` (chat template, the prompt pre-filled as
            the start of the assistant's reply; only for models with a chat template) or ``"auto"`` (chat when the
            tokenizer has a chat template, else raw; see :mod:`editlens.lm.prompting`). The system records the
            resolved name in :attr:`prompt_format`.
        batch_tokens: token budget of one padded batch (rows × padded length).
        fingerprint: override the fingerprint (defaults to the weights' fingerprint at construction).

    A ModelSystem is *pinned* to the weights the model has when the system is created (``lm.state``): if an edit
    later changes the weights in place, the system's calls still see its own weights (the edit's snapshot is
    swapped in for the duration of the call, see :meth:`editlens.lm.LM.state_view`). So
    ``base = ModelSystem(lm); e = editlens.edit(lm, cases); evaluate(e.system, cases, base=base)`` compares the
    edited model with the true unedited one, never the edited model with itself.

    Every call holds the model's re-entrant lock (see :class:`editlens.lm.LM`), so systems of one model may be
    called from several threads while the model is edited and undone: the calls and the edits are serialised.
    """

    def __init__(self, lm: "LM", prompt_format: str | PromptFormat = "raw", batch_tokens: int = 4096,
                 fingerprint: str | None = None):
        self.lm = lm
        self.format = PromptFormat.parse(prompt_format, lm.tokenizer)
        self.prompt_format = self.format.name
        self.batch_tokens = int(batch_tokens)
        self._fingerprint = fingerprint
        self.model_state: tuple[str, ...] = tuple(getattr(lm, "state", ()))

    @property
    def fingerprint(self) -> str:
        base = self._fingerprint or self.lm.fingerprint_of(self.model_state)
        return base if self.prompt_format == "raw" else f"{base}:{self.prompt_format}"

    def pinned(self) -> contextlib.AbstractContextManager:
        """Context in which the model has this system's weights (no-op when nothing changed since creation).

        It holds the model's lock (:attr:`editlens.lm.LM.lock`) throughout, so another thread cannot edit, undo or
        swap the weights meanwhile."""
        return self.lm.state_view(self.model_state)

    def locked(self) -> contextlib.AbstractContextManager:
        """The model's re-entrant lock (a no-op context for a model object without one)."""
        lock = getattr(self.lm, "lock", None)
        return lock if lock is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The model's lock plus this system's pinned weights, without :meth:`active` (for subclasses whose calls
        install their hooks themselves, e.g. GRACE's teacher forcing)."""
        with self.locked(), self.pinned():
            yield

    # ------------------------------------------------------------------ hooks for subclasses
    def transform_prompts(self, prompts: Sequence[str]) -> list[str]:
        """Rewrite prompts before they reach the model (identity here; IKE/SCR override)."""
        return list(prompts)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Context active around every model call (no-op here; hook-based methods override)."""
        yield

    def _inputs(self, prompts: Sequence[str]) -> list[str]:
        return format_prompts(self.format, self.transform_prompts(prompts), self.lm.tokenizer)

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """Context for running ``self.lm.model`` directly as this system: its pinned weights plus :meth:`active`.

        Code that bypasses the System calls (EVK's embedding-level forwards, lm-evaluation-harness) must use this,
        not :meth:`active` alone, or a base system created before an in-place edit would see the edited weights.
        Prompt rewriting (IKE/SCR) is *not* applied here; use :meth:`_inputs` for that.

        The model's lock is held for the whole context: concurrent calls of systems of one model (from several
        threads) and edits or undos of that model run one at a time, so a call never sees half-swapped weights or
        another system's hooks."""
        with self.locked(), self.pinned(), self.active():
            yield

    _calling = calling

    def with_format(self, prompt_format: str | PromptFormat) -> "ModelSystem":
        """The same plain system (same pinned weights, fingerprint override and batch size) posing prompts in
        ``prompt_format``. Only for plain :class:`ModelSystem` (wrappers carry their own state)."""
        if type(self) is not ModelSystem:
            raise TypeError(f"{type(self).__name__}.with_format is not supported; build it with the format")
        new = ModelSystem(self.lm, prompt_format=prompt_format, batch_tokens=self.batch_tokens,
                          fingerprint=self._fingerprint)
        new.model_state = self.model_state
        return new

    # ------------------------------------------------------------------ System calls
    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        with self._calling():
            return ops.next_token_logprobs(self.lm, self._inputs(prompts), batch_tokens=self.batch_tokens)

    def teacher_forced(self, prompts: Sequence[str], targets: Sequence[str]) -> list[TeacherForced]:
        with self._calling():
            return ops.teacher_forced(self.lm, self._inputs(prompts), list(targets), batch_tokens=self.batch_tokens)

    def teacher_forced_with_next_token(self, prompts: Sequence[str], targets: Sequence[str],
                                       next_token_rows: Sequence[int]
                                       ) -> tuple[list[TeacherForced], dict[int, torch.Tensor]]:
        """:meth:`teacher_forced` plus the next-token log-probabilities after ``prompts[i]`` for the rows in
        ``next_token_rows``, from the same forward passes (see :func:`editlens.lm.ops.teacher_forced_with_next_token`).
        The evaluator uses it only when :attr:`fuses_next_token_into_scores` is true."""
        with self._calling():
            return ops.teacher_forced_with_next_token(self.lm, self._inputs(prompts), list(targets),
                                                      next_token_rows, batch_tokens=self.batch_tokens)

    @property
    def fuses_next_token_into_scores(self) -> bool:
        """Whether a prompt's next-token distribution may be read off a teacher-forced pass of that prompt.

        True when this class answers both calls with the plain model operations (possibly on rewritten prompts, as
        IKE and SCR do): the attention is causal, so the first target position *is* the next-token distribution.
        False for a class that overrides :meth:`next_token_logprobs` or :meth:`teacher_forced` (e.g. GRACE/WISE,
        whose adaptors act on positions that differ between the two)."""
        cls = type(self)
        return (cls.next_token_logprobs is ModelSystem.next_token_logprobs
                and cls.teacher_forced is ModelSystem.teacher_forced)

    def target_logprobs(self, prompts: Sequence[str], targets: Sequence[str]) -> list[torch.Tensor]:
        return [tf.logprobs for tf in self.teacher_forced(prompts, targets)]

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 16) -> list[str]:
        with self._calling():
            return ops.generate(self.lm, self._inputs(prompts), max_new_tokens=max_new_tokens,
                                batch_tokens=self.batch_tokens)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.lm.name!r}, prompt_format={self.prompt_format!r})"


class WrappedSystem(ModelSystem):
    """Base class of systems that wrap a model: override :meth:`transform_prompts` or :meth:`active`.

    ``state_fingerprint`` should describe the wrapper's state (e.g. a hash of the stored facts) so that
    cached outputs are never confused with the base system's.
    """

    def __init__(self, base: ModelSystem, state_fingerprint: str):
        super().__init__(base.lm, prompt_format=base.format, batch_tokens=base.batch_tokens)
        self.base = base
        self.state_fingerprint = state_fingerprint

    @property
    def fingerprint(self) -> str:  # type: ignore[override]
        h = hashlib.sha256(f"{self.base.fingerprint}|{type(self).__name__}|{self.state_fingerprint}".encode())
        return h.hexdigest()[:16]
