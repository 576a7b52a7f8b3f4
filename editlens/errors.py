"""Exceptions raised by editlens.

Every error editlens raises on bad input derives from :class:`EditlensError`, so callers can catch one
class; the message always says what to fix (which file, which record, which field, which key).
"""
from __future__ import annotations

from typing import Any


class EditlensError(Exception):
    """Base class of every editlens error."""


class DataFormatError(EditlensError):
    """A dataset file or record is malformed.

    The message names the file, the record index and the field when they are known.
    """

    def __init__(self, message: str, *, path: Any = None, record: int | None = None, field: str | None = None):
        self.path = None if path is None else str(path)
        self.record = record
        self.field = field
        where = []
        if self.path is not None:
            where.append(f"file {self.path}")
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field {field!r}")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class ModelLoadError(EditlensError):
    """A model could not be found or loaded."""


class UnsupportedArchitectureError(EditlensError):
    """The model class has no registered :class:`editlens.lm.arch.Arch`."""


class HParamsError(EditlensError):
    """Unknown or invalid hyperparameter for an editing method."""


class MethodError(EditlensError):
    """Unknown editing method, or a method used in a way it does not support."""


class TrainingError(EditlensError):
    """Training a trained editor (MEND, MALMEN, KE, SERAC) failed: a case lacks a probe the method trains on (the
    message names the case and the probe kind), or a loss became NaN/inf (the message names the step)."""


class MetricError(EditlensError):
    """Unknown metric, or a metric that cannot run on the given cases or system."""


class PromptFormatError(EditlensError):
    """An unknown prompt format (allowed: ``raw``, ``chat``, ``auto``), or ``chat`` for a model without a chat
    template (see :mod:`editlens.lm.prompting`)."""


class SpecError(EditlensError):
    """An experiment spec is invalid; the message names the key (and line when known)."""


class StoreError(EditlensError):
    """The results store is unreadable or inconsistent."""


class StoreBusyError(StoreError):
    """Another process is writing the results store (it holds the store's lock)."""


class ContextLengthError(EditlensError):
    """A prompt (with its target or generated tokens) is longer than the model's context.

    Attributes (``None`` when unknown): ``n_tokens`` (positions needed), ``context`` (the model's context length),
    ``case_id`` and ``probe`` (e.g. ``"paraphrase[1]"``) when the up-front check of an evaluation or edit found it.
    """

    def __init__(self, message: str, *, n_tokens: int | None = None, context: int | None = None,
                 case_id: str | None = None, probe: str | None = None):
        super().__init__(message)
        self.n_tokens = n_tokens
        self.context = context
        self.case_id = case_id
        self.probe = probe
