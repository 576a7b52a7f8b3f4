"""The bulk evaluator: metric registry, request gathering, base-output cache, :class:`Results`.

How a metric works
==================
A metric is a small class registered by name in its own module::

    from editlens.evaluate.core import Metric, NextToken, Score, Generate, BASE, EDITED, Row, register_metric

    @register_metric("my_metric", groups=("gtfree",))
    class MyMetric(Metric):
        '''One-line description (shown by ``editlens eval --list-metrics``).'''
        direction = "lower"            # "higher" / "lower" is better (docs and reports)

        def case_requests(self, case):                 # what it needs, per case
            for probe in case.probes_of("neighborhood"):
                yield BASE, NextToken(probe.prompt)    # next-token log-probs under the base system
                yield EDITED, NextToken(probe.prompt)  # ... and under the evaluated (edited) system

        def case_rows(self, case, answers):            # rows from the answers, per case
            vals = [f(answers.next_token(p.prompt, on=BASE), answers.next_token(p.prompt, on=EDITED))
                    for p in case.probes_of("neighborhood")]
            yield from self.mean_row(case, "neighborhood", vals)

* **Requests** are hashable values: :class:`NextToken` (``prompt`` → log-probs ``[vocab]``), :class:`Score`
  (``prompt, target`` → :class:`~editlens.lm.ops.TeacherForced`), :class:`Generate` (``prompt,
  max_new_tokens`` → greedy continuation text); a metric module may define its own request type by
  subclassing :class:`CustomRequest` (EVK's embedding-perturbed requests do). Each is asked of a *role*: :data:`EDITED` (the system under
  evaluation) or :data:`BASE` (the unedited reference, whose answers are cached).
* The evaluator gathers the requests of every metric over every case, de-duplicates them, and answers them
  with **one System call per request type (per ``max_new_tokens`` for generation) per system**; the system
  packs the prompts into large padded batches. Base answers are cached by ``(base.fingerprint,
  prompt_format, hash of the base request set)`` in an in-memory LRU and, optionally, on disk.
* ``case_rows`` / ``case_requests`` are the per-case convenience hooks. Metrics that are not per case (a
  general-ability benchmark, a dataset-level TF-IDF fit) override :meth:`Metric.requests` and
  :meth:`Metric.rows`, which receive all cases at once; rows may then use any ``case_id`` (e.g. an item id).
* A metric family may be parametrised by the part of the name after ``@`` (``topk@5``): override
  :meth:`Metric.from_name`, which returns the metric instances for a name (``topk`` → k ∈ {1, 5, 10}).
  Each instance has a canonical :attr:`Metric.name` and JSON-able :attr:`Metric.params` (recorded in
  ``Results.meta``).
* ``groups`` puts a metric in named groups (``"gt"``, ``"gtfree"``, ...) that users can request by the
  group name; ``"all"`` expands to every metric that is in at least one group.
* Metric modules are found, not listed: every module of ``editlens.evaluate`` that uses ``@register_metric(``
  and every ``editlens.metrics`` entry point of an installed package (:mod:`editlens.registry`). A module that
  fails to import is reported (warning, ``--list-metrics``, the "unknown metric" error), never skipped silently.

Rows are ``(case_id, probe_kind, metric, value)``; by convention a metric emits one row per case and probe
kind whose value is the mean over that case's probes of that kind (macro-averaging over cases, as
CounterFact and CounterFact+ do). :meth:`Results.summary` then averages rows over cases with standard errors.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator, Mapping, NamedTuple, Sequence, Union

import torch

from editlens.errors import EditlensError, MetricError
from editlens.lm.ops import TeacherForced

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from editlens.data.schema import EditCase
    from editlens.system import System

#: role of the evaluated (edited) system in a request
EDITED = "edited"
#: role of the unedited reference system in a request
BASE = "base"
ROLES = (EDITED, BASE)

DEFAULT_MAX_NEW_TOKENS = 16


# ================================================================================================ requests
@dataclass(frozen=True, order=True)
class NextToken:
    """Next-token log-probabilities after ``prompt`` (answer: float32 tensor ``[vocab]``)."""

    #: what follows the prompt, for the up-front context-length check (:mod:`editlens.lm.context`)
    context_kind: ClassVar[str] = "next_token"

    prompt: str


@dataclass(frozen=True, order=True)
class Score:
    """Teacher-forced scores of ``target`` after ``prompt`` (answer: :class:`~editlens.lm.ops.TeacherForced`)."""

    #: what follows the prompt, for the up-front context-length check (:mod:`editlens.lm.context`)
    context_kind: ClassVar[str] = "score"

    prompt: str
    target: str


@dataclass(frozen=True, order=True)
class Generate:
    """Greedy continuation of ``prompt`` with at most ``max_new_tokens`` new tokens (answer: ``str``)."""

    #: what follows the prompt, for the up-front context-length check (:mod:`editlens.lm.context`)
    context_kind: ClassVar[str] = "generate"

    prompt: str
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS


#: CustomRequest subclasses by "<module>:<qualname>" (filled by CustomRequest.__init_subclass__; closed: a cache
#: file is decoded against it and never makes editlens import or call anything)
_REQUEST_TYPES: dict[str, type] = {}


def _request_type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def registered_request_types() -> dict[str, type]:
    """The :class:`CustomRequest` subclasses defined so far, by ``"<module>:<qualname>"`` (what a base-cache
    entry may name)."""
    return dict(_REQUEST_TYPES)


class CustomRequest:
    """Base of request types defined by a metric module (e.g. :mod:`editlens.evaluate.evk`'s embedding-perturbed
    next-token requests), for needs the three built-in types do not cover.

    A subclass is a frozen, ordered dataclass whose fields are plain values (str, int, float, bool and tuples of
    them) and implements :meth:`answer_group`. The evaluator groups custom requests by type and answers each group
    with one call; a system may answer them itself through an optional method ``answer_custom(requests) -> list``
    (e.g. a system that only replays precomputed base answers). Answers are cached like the built-in ones.

    Defining a subclass registers it under ``"<module>:<qualname>"`` (:func:`registered_request_types`); the
    on-disk base cache decodes only registered types, so a cache file can name nothing else.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REQUEST_TYPES[_request_type_name(cls)] = cls

    @classmethod
    def answer_group(cls, system: "System", requests: Sequence["CustomRequest"]) -> list[Any]:
        """Answers to ``requests`` (all of this type) on ``system``, in order."""
        raise NotImplementedError


Request = Union[NextToken, Score, Generate, CustomRequest]


class Row(NamedTuple):
    """One result row."""

    case_id: str
    probe_kind: str
    metric: str
    value: float


# ================================================================================================ answers
class Answers:
    """Answers to requests, looked up by role; what :meth:`Metric.case_rows` reads."""

    def __init__(self, store: Mapping[str, Mapping[Request, Any]]):
        self._store = store

    def get(self, request: Request, on: str = EDITED) -> Any:
        try:
            return self._store[on][request]
        except KeyError:
            raise MetricError(f"no answer for {request!r} on the {on} system: the metric did not request it") from None

    def next_token(self, prompt: str, on: str = EDITED) -> torch.Tensor:
        """Next-token log-probs ``[vocab]`` after ``prompt``."""
        return self.get(NextToken(prompt), on)

    def score(self, prompt: str, target: str, on: str = EDITED) -> TeacherForced:
        """Teacher-forced scores of ``target`` after ``prompt``."""
        return self.get(Score(prompt, target), on)

    def generate(self, prompt: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, on: str = EDITED) -> str:
        """Greedy continuation of ``prompt``."""
        return self.get(Generate(prompt, max_new_tokens), on)


class OnDemandAnswers(Answers):
    """Answers computed one request at a time when asked (no batching, no caching).

    This is the naive reference the bulk evaluator is checked against (see ``benchmarks/bench_eval.py``).
    """

    def __init__(self, systems: Mapping[str, "System"]):
        super().__init__({})
        self._systems = systems
        self.n_calls = 0

    def get(self, request: Request, on: str = EDITED) -> Any:
        system = self._systems.get(on)
        if system is None:
            raise MetricError(f"no {on} system given")
        self.n_calls += 1
        return _answer(system, [request])[0]


def _answer(system: "System", requests: Sequence[Request]) -> list[Any]:
    """Answer requests of one type (and one ``max_new_tokens``) with one System call."""
    if not requests:
        return []
    first = requests[0]
    if isinstance(first, NextToken):
        lp = system.next_token_logprobs([r.prompt for r in requests])  # type: ignore[union-attr]
        return list(lp.float().unbind(0))
    if isinstance(first, Score):
        scores = [r for r in requests if isinstance(r, Score)]
        fused = [r for r in requests if isinstance(r, NextToken)]  # riding on the Score passes (see _groups_of)
        prompts, targets = [r.prompt for r in scores], [r.target for r in scores]
        if not fused:
            return list(system.teacher_forced(prompts, targets))  # type: ignore[union-attr]
        first_row: dict[str, int] = {}
        for i, r in enumerate(scores):
            first_row.setdefault(r.prompt, i)
        tfs, nexts = system.teacher_forced_with_next_token(  # type: ignore[union-attr]
            prompts, targets, sorted({first_row[r.prompt] for r in fused}))
        return list(tfs) + [nexts[first_row[r.prompt]] for r in fused]
    if isinstance(first, Generate):
        return list(system.generate([r.prompt for r in requests], max_new_tokens=first.max_new_tokens))
    if isinstance(first, CustomRequest):
        own = getattr(system, "answer_custom", None)
        out = own(list(requests)) if callable(own) else type(first).answer_group(system, list(requests))
        return list(out)
    raise MetricError(f"unknown request type {type(first).__name__}")


def _fuses(system: "System | None") -> bool:
    return bool(getattr(system, "fuses_next_token_into_scores", False)) and callable(
        getattr(system, "teacher_forced_with_next_token", None))


def _groups_of(requests: Iterable[Request], system: "System | None" = None) -> list[list[Request]]:
    """Split requests into groups answerable by one System call each (sorted for determinism).

    When ``system`` can (:attr:`ModelSystem.fuses_next_token_into_scores`), a NextToken request whose prompt also
    has a Score request joins the Score group: its answer is read off the teacher-forced pass of that prompt, so
    every prompt goes through the model once."""
    requests = list(requests)
    nxt = sorted(r for r in requests if isinstance(r, NextToken))
    sc: list[Request] = sorted(r for r in requests if isinstance(r, Score))
    if sc and nxt and _fuses(system):
        scored = {r.prompt for r in sc}  # type: ignore[union-attr]
        sc += [r for r in nxt if r.prompt in scored]
        nxt = [r for r in nxt if r.prompt not in scored]
    gens: dict[int, list[Generate]] = {}
    for r in requests:
        if isinstance(r, Generate):
            gens.setdefault(r.max_new_tokens, []).append(r)
    out: list[list[Request]] = [g for g in (nxt, sc) if g]  # type: ignore[misc]
    out += [sorted(gens[n]) for n in sorted(gens)]
    customs: dict[str, list[CustomRequest]] = {}
    for r in requests:
        if isinstance(r, CustomRequest):
            customs.setdefault(f"{type(r).__module__}.{type(r).__qualname__}", []).append(r)
    out += [sorted(customs[k], key=repr) for k in sorted(customs)]
    return out


# ================================================================================================ metrics
class Metric:
    """Base class of metrics (see the module docstring for the protocol).

    Class attributes:
        family: the registered name (set by :func:`register_metric`).
        groups: groups the metric belongs to (``"gt"``, ``"gtfree"``, ...).
        direction: ``"higher"`` or ``"lower"`` is better.
        value_range: ``(low, high)``, closed, that every row value lies in (``-inf``/``inf`` for an open end);
            ``None`` = undeclared, which :func:`editlens.testing.check_metric` rejects.
        aux_ranges: ranges of auxiliary rows, by the end of their metric name (``{"_cos": (-1.0, 1.0)}``).
        identity: the value of every row when the evaluated system is the base itself; required of metrics that
            request the base (``kl`` 0, ``topk`` 1), ``None`` for the others.
        requires: Python packages the metric needs (``check_metric`` skips, saying so, when one is missing).
        needs: a resource beyond a model that the metric needs (a reasoning model, a judge...), stated when
            ``check_metric`` gets no rows from it on a tiny model.

    Instance attributes:
        name: canonical name of this instance (``"topk@5"``); defaults to ``family``.
        params: JSON-able parameters recorded in ``Results.meta``.
    """

    family: ClassVar[str] = ""
    groups: ClassVar[tuple[str, ...]] = ()
    direction: ClassVar[str] = "higher"
    value_range: ClassVar[tuple[float, float] | None] = None
    aux_ranges: ClassVar[Mapping[str, tuple[float, float]]] = {}
    identity: ClassVar[float | None] = None
    requires: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[str | None] = None

    def __init__(self, name: str | None = None, **params: Any):
        self.name = name or self.family
        self.params = dict(params)

    @classmethod
    def from_name(cls, name: str, arg: str | None) -> list["Metric"]:
        """Instances for ``name`` (``arg`` is the part after ``@``; ``None`` when absent)."""
        if arg is not None:
            raise MetricError(f"metric {cls.family!r} takes no '@' parameter (got {name!r})")
        return [cls()]

    @classmethod
    def check_instances(cls) -> list["Metric"]:
        """The instances :func:`editlens.testing.check_metric` checks (default: ``from_name(family, None)``);
        override to check a cheaper but equivalent configuration."""
        return cls.from_name(cls.family, None)

    # ---- per-case hooks (most metrics override these two)
    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        return ()

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        return ()

    # ---- dataset-level hooks (default: loop over cases)
    def requests(self, cases: Sequence["EditCase"]) -> Iterable[tuple[str, Request]]:
        """``(role, request)`` pairs this metric needs over all cases."""
        for case in cases:
            yield from self.case_requests(case)

    def rows(self, cases: Sequence["EditCase"], answers: Answers) -> Iterable[Row]:
        """Result rows over all cases."""
        for case in cases:
            yield from self.case_rows(case, answers)

    # ---- helpers
    def mean_row(self, case: "EditCase", kind: str, values: Sequence[float]) -> Iterator[Row]:
        """One row with the mean of ``values`` (nothing when empty)."""
        vals = [float(v) for v in values]
        if vals:
            yield Row(case.case_id, str(kind), self.name, sum(vals) / len(vals))

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "groups": list(self.groups), "direction": self.direction, **self.params}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, params={self.params!r})"


_REGISTRY: dict[str, type[Metric]] = {}


def register_metric(name: str, groups: Sequence[str] = ()) -> Callable[[type[Metric]], type[Metric]]:
    """Class decorator registering a :class:`Metric` subclass under ``name`` (and in ``groups``)."""
    if not name or "@" in name or "," in name:
        raise MetricError(f"invalid metric name {name!r}")

    def deco(cls: type[Metric]) -> type[Metric]:
        if not (isinstance(cls, type) and issubclass(cls, Metric)):
            raise MetricError(f"@register_metric({name!r}) must decorate a Metric subclass")
        prev = _REGISTRY.get(name)
        if prev is not None and prev.__qualname__ != cls.__qualname__:
            raise MetricError(f"metric {name!r} is already registered by {prev.__module__}.{prev.__qualname__}")
        cls.family = name
        if groups:
            cls.groups = tuple(groups)
        _REGISTRY[name] = cls
        return cls

    return deco


def _adopt_metric(name: str, obj: Any) -> None:
    """Register a class named by an ``editlens.metrics`` entry point under the entry point's name."""
    if not (isinstance(obj, type) and issubclass(obj, Metric)):
        raise MetricError(f"entry point {name!r} must name a module that registers a metric or a Metric subclass, "
                          f"got {obj!r}")
    register_metric(name, groups=obj.groups)(obj)


_DISCOVERY: Any = None


def _discovery() -> Any:
    """The metric modules' :class:`~editlens.registry.Discovery`: every module of ``editlens.evaluate`` that uses
    ``@register_metric(`` and every ``editlens.metrics`` entry point."""
    from editlens.registry import METRICS_GROUP, Discovery

    global _DISCOVERY
    if _DISCOVERY is None:
        _DISCOVERY = Discovery("metric", "editlens.evaluate", "@register_metric(", METRICS_GROUP, lambda: _REGISTRY,
                               _adopt_metric)
    return _DISCOVERY


def registered_metrics(*, refresh: bool = False) -> dict[str, type[Metric]]:
    """Registered metric families (name → class): the built-in metric modules and the ``editlens.metrics`` entry
    points. A module that failed to import is reported by :func:`metric_import_errors` (and warned about).
    ``refresh=True`` looks for entry points again (installed since the first call)."""
    _discovery().ensure(refresh=refresh)
    return dict(sorted(_REGISTRY.items()))


def metric_import_errors() -> list[str]:
    """``"<module or entry point>: <error>"`` for every metric module that failed to import."""
    _discovery().ensure()
    return _discovery().describe_errors()


def metric_groups() -> dict[str, list[str]]:
    """Group name → metric names (``"all"`` = every metric in some group, except those that declare ``needs``:
    they give rows only with a resource or data of their own, e.g. the ``pitfalls`` group on ConflictEdit /
    RoundEdit cases; ask for them by name or group)."""
    reg = registered_metrics()
    groups: dict[str, list[str]] = {}
    for name, cls in reg.items():
        for g in cls.groups:
            groups.setdefault(g, []).append(name)
    groups["all"] = [n for n, c in reg.items() if c.groups and not getattr(c, "needs", None)]
    return groups


def resolve_metrics(names: str | Sequence[str | Metric]) -> list[Metric]:
    """Metric instances for names, groups (``"gt"``, ``"gtfree"``, ``"all"``) or instances.

    Accepts a comma-separated string. Unknown names raise :class:`MetricError` listing the valid ones.
    """
    if isinstance(names, Metric):
        names = [names]
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not isinstance(names, (list, tuple)):
        raise MetricError(f"metrics must be a metric name, a comma-separated string or a list of names / Metric "
                          f"instances, got {type(names).__name__} {names!r}; e.g. metrics=['s_acc', 'kl'] or "
                          f"metrics='gt'")
    for i, item in enumerate(names):
        if not isinstance(item, (str, Metric)) or (isinstance(item, str) and not item.strip()):
            raise MetricError(f"metrics[{i}] must be a metric name or a Metric instance, got "
                              f"{type(item).__name__} {item!r}")
    reg = registered_metrics()
    groups = metric_groups()
    out: dict[str, Metric] = {}

    def add(m: Metric) -> None:
        out.setdefault(m.name, m)

    for item in names:
        if isinstance(item, Metric):
            add(item)
            continue
        name = str(item).strip()
        if name in groups and name not in reg:
            for member in groups[name]:
                for m in reg[member].from_name(member, None):
                    add(m)
            continue
        family, _, arg = name.partition("@")
        cls = reg.get(family)
        if cls is None:
            reg = registered_metrics(refresh=True)  # an entry point installed since the first look
            groups = metric_groups()
            cls = reg.get(family)
        if cls is None:
            raise MetricError(f"unknown metric {name!r}; valid metrics: {', '.join(reg)}; "
                              f"groups: {', '.join(sorted(groups))}" + _discovery().notes())
        for m in cls.from_name(name, arg if "@" in name else None):
            add(m)
    if not out:
        raise MetricError(f"no metrics given; valid metrics: {', '.join(reg)}")
    return list(out.values())


# ================================================================================================ cache
def _answer_nbytes(a: Any) -> int:
    if isinstance(a, torch.Tensor):
        return a.numel() * a.element_size()
    if isinstance(a, TeacherForced):
        return sum(t.numel() * t.element_size() for t in (a.target_ids, a.logprobs, a.argmax_ids))
    return len(str(a)) + 64


def _to_plain(req: Request, a: Any) -> tuple:
    if isinstance(req, CustomRequest):
        import dataclasses

        return ("c", _request_type_name(type(req)),
                tuple(getattr(req, f.name) for f in dataclasses.fields(req)), a)  # type: ignore[arg-type]
    if isinstance(req, NextToken):
        return ("n", req.prompt, a)
    if isinstance(req, Score):
        return ("s", req.prompt, req.target, a.target_ids, a.logprobs, a.argmax_ids)
    return ("g", req.prompt, req.max_new_tokens, a)


def _is_plain(v: Any) -> bool:
    """str, int, float, bool, None, or (nested) tuples/lists of them."""
    if v is None or isinstance(v, (str, int, float, bool)):
        return True
    if isinstance(v, (tuple, list)):
        return all(_is_plain(x) for x in v)
    return False


def _from_plain(t: tuple) -> tuple[Request, Any]:
    """Decode one cache entry. Only request types editlens defines (the built-ins and registered
    :class:`CustomRequest` subclasses) with plain field values are accepted; anything else raises ``ValueError``
    (the caller treats the entry as corrupt). Nothing named in the entry is imported or called except the
    registered dataclass's own constructor."""
    import dataclasses

    if not isinstance(t, (tuple, list)) or not t:
        raise ValueError(f"an entry must be a non-empty tuple, got {type(t).__name__}")
    kind = t[0]
    if kind == "c" and len(t) == 4:
        name, args = t[1], t[2]
        cls = _REQUEST_TYPES.get(name) if isinstance(name, str) else None
        if cls is None or not dataclasses.is_dataclass(cls):
            raise ValueError(f"{str(name)[:100]!r} is not a registered request type")
        if not isinstance(args, (tuple, list)) or not _is_plain(args):
            raise ValueError(f"the fields of a {name} entry are not plain values (str, int, float, bool, tuples)")
        n_fields = len(dataclasses.fields(cls))
        if len(args) != n_fields:
            raise ValueError(f"a {name} entry has {len(args)} field values, the type has {n_fields}")
        args = tuple(tuple(a) if isinstance(a, list) else a for a in args)
        try:
            req = cls(*args)
        except Exception as e:
            raise ValueError(f"a {name} entry does not construct ({type(e).__name__}: {e})") from None
        return req, t[3]
    if kind == "n" and len(t) == 3 and isinstance(t[1], str) and isinstance(t[2], torch.Tensor):
        return NextToken(t[1]), t[2]
    if (kind == "s" and len(t) == 6 and isinstance(t[1], str) and isinstance(t[2], str)
            and all(isinstance(x, torch.Tensor) for x in t[3:6])):
        return Score(t[1], t[2]), TeacherForced(t[3], t[4], t[5])
    if (kind == "g" and len(t) == 4 and isinstance(t[1], str) and isinstance(t[2], int)
            and not isinstance(t[2], bool) and isinstance(t[3], str)):
        return Generate(t[1], t[2]), t[3]
    raise ValueError(f"malformed entry of kind {str(kind)[:20]!r}")


class BaseCache:
    """Cache of base-system answers: an in-memory LRU (bounded in bytes) plus an optional directory.

    Keys are built by :func:`cache_key` from ``(fingerprint, prompt_format, request set)``. Entries on disk
    are ``<key>.pt`` files of plain tensors/strings (loaded with ``weights_only=True``). A file is decoded
    against the request types editlens defines (the built-ins and registered :class:`CustomRequest` subclasses,
    with plain field values); nothing named in it is imported or called. A file that does not load or decode,
    or whose requests differ from the key's, is corrupt: a warning names it, the entry counts as a miss and
    the recomputed answers replace it.

    Args:
        directory: where to persist entries (``None``: memory only).
        max_bytes: memory budget of the LRU (least recently used entries are dropped first).
    """

    def __init__(self, directory: str | os.PathLike | None = None, max_bytes: int = 1 << 30):
        self.directory = None if directory is None else Path(directory)
        self.max_bytes = int(max_bytes)
        self._mem: OrderedDict[str, tuple[dict[Request, Any], int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._mem)

    def get(self, key: str, requests: Iterable[Request] | None = None) -> dict[Request, Any] | None:
        """The answers stored under ``key`` (``None``: a miss). ``requests``: the request set the key was made
        from; a file on disk answering another set is corrupt."""
        if key in self._mem:
            self._mem.move_to_end(key)
            self.hits += 1
            return self._mem[key][0]
        if self.directory is not None:
            path = self.directory / f"{key}.pt"
            if path.is_file():
                answers = self._load(path, None if requests is None else set(requests))
                if answers is not None:
                    self._remember(key, answers)
                    self.hits += 1
                    return answers
        self.misses += 1
        return None

    @staticmethod
    def _load(path: Path, requests: set | None = None) -> dict[Request, Any] | None:
        """The answers of one cache file, or ``None`` (with a warning naming it) when it is corrupt."""
        import warnings

        try:
            plain = torch.load(path, weights_only=True)
        except Exception as e:  # a corrupt entry is recomputed, not fatal
            why = f"unreadable ({str(e).splitlines()[0][:200]})"
        else:
            try:
                if not isinstance(plain, (list, tuple)):
                    raise ValueError(f"expected a list of entries, got {type(plain).__name__}")
                answers = dict(_from_plain(t) for t in plain)
                if requests is not None and set(answers) != requests:
                    raise ValueError(f"it answers {len(answers)} requests, {len(set(answers) - requests)} of them "
                                     f"not asked for, and misses {len(requests - set(answers))} of the "
                                     f"{len(requests)} its key stands for")
            except ValueError as e:
                why = f"not a valid entry ({e})"
            else:
                return answers
        warnings.warn(f"base cache file {path} is {why}: ignored; the base answers are recomputed and the file "
                      "replaced", stacklevel=3)
        return None

    def put(self, key: str, answers: dict[Request, Any]) -> None:
        self._remember(key, answers)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{key}.{os.getpid()}.tmp"
            torch.save([_to_plain(r, a) for r, a in answers.items()], tmp)
            os.replace(tmp, self.directory / f"{key}.pt")

    def _remember(self, key: str, answers: dict[Request, Any]) -> None:
        size = sum(_answer_nbytes(a) for a in answers.values())
        self._mem[key] = (answers, size)
        self._mem.move_to_end(key)
        total = sum(s for _, s in self._mem.values())
        while len(self._mem) > 1 and total > self.max_bytes:
            _, (_, s) = self._mem.popitem(last=False)
            total -= s

    def clear(self) -> None:
        self._mem.clear()


def cache_key(fingerprint: str, prompt_format: str, requests: Iterable[Request]) -> str:
    """Hash of ``(fingerprint, prompt_format, sorted request set)``."""
    h = hashlib.sha256()
    h.update(f"{fingerprint}\0{prompt_format}\0".encode())
    for r in sorted(set(requests), key=lambda r: (type(r).__name__, repr(r))):
        h.update(f"{type(r).__name__}\0{repr(r)}\n".encode())
    return h.hexdigest()[:32]


_DEFAULT_CACHE: BaseCache | None = None


def default_cache() -> BaseCache:
    """The process-wide in-memory base cache used when ``evaluate(cache=True)`` (the default).

    It only memoises base-system answers keyed by content fingerprints, so it never changes results.
    """
    global _DEFAULT_CACHE
    if _DEFAULT_CACHE is None:
        _DEFAULT_CACHE = BaseCache()
    return _DEFAULT_CACHE


def _as_cache(cache: Any) -> BaseCache | None:
    if cache is None or cache is False:
        return None
    if cache is True:
        return default_cache()
    if isinstance(cache, BaseCache):
        return cache
    if isinstance(cache, (str, os.PathLike)):
        return BaseCache(directory=cache)
    raise EditlensError(f"cache must be True/False/None, a BaseCache or a directory path, got {type(cache).__name__}")


# ================================================================================================ frozen base answers
def request_set(metrics: str | Sequence[str | Metric], cases: Sequence["EditCase"],
                roles: Sequence[str] = (BASE,)) -> set[Request]:
    """The distinct requests ``metrics`` make over ``cases`` for the given roles (default: the base's)."""
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise MetricError(f"unknown role(s) {bad!r}; use {EDITED!r} or {BASE!r}")
    out: set[Request] = set()
    for m in resolve_metrics(metrics):
        for role, req in m.requests(list(cases)):
            if role in roles:
                out.add(req)
    return out


def answer_requests(system: "System", requests: Iterable[Request],
                    on_group: Callable[[list[Request]], None] | None = None) -> dict[Request, Any]:
    """Answers to ``requests`` on ``system``: one System call per group (request type, ``max_new_tokens``, custom
    type), the groups and their order sorted, so the batches -- and hence the values -- depend only on the request
    set, never on what was asked before. ``on_group(group)`` is called before each call (progress)."""
    out: dict[Request, Any] = {}
    for group in _groups_of(requests, system):
        if on_group is not None:
            on_group(group)
        out.update(zip(group, _answer(system, group)))
    return out


class FrozenBase:
    """A :class:`~editlens.system.System` that answers from base answers computed once (:func:`freeze_base`).

    Once frozen, the model the answers came from may be edited freely: a frozen base keeps answering as the
    unedited model did. A request it was not frozen with raises :class:`MetricError`. :func:`evaluate` freezes its
    ``base`` this way (cached by :func:`cache_key`); the experiment runner freezes each unit's base request set once
    per run and passes the frozen base as ``base``.

    Attributes:
        answers: request → answer (what the evaluator stores and caches).
        prompt_format: the format the answers were posed in.
        cache_hit: whether :func:`freeze_base` found the answers in its cache.
    """

    def __init__(self, answers: Mapping[Request, Any], fingerprint: str, prompt_format: str = "raw", *,
                 cache_hit: bool = False):
        self.answers = answers
        self.prompt_format = prompt_format
        self.cache_hit = bool(cache_hit)
        self._fingerprint = str(fingerprint)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.answers)

    def _get(self, req: Request) -> Any:
        try:
            return self.answers[req]
        except KeyError:
            raise MetricError(f"internal: the frozen base has no precomputed answer for {req!r}") from None

    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.stack([self._get(NextToken(p)) for p in prompts])

    def teacher_forced(self, prompts: Sequence[str], targets: Sequence[str]) -> list[TeacherForced]:
        return [self._get(Score(p, t)) for p, t in zip(prompts, targets)]

    def target_logprobs(self, prompts: Sequence[str], targets: Sequence[str]) -> list[torch.Tensor]:
        return [tf.logprobs for tf in self.teacher_forced(prompts, targets)]

    def generate(self, prompts: Sequence[str], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[str]:
        return [self._get(Generate(p, int(max_new_tokens))) for p in prompts]

    def answer_custom(self, requests: Sequence[Request]) -> list[Any]:
        """Answers to metric-defined request types (:class:`CustomRequest`)."""
        return [self._get(r) for r in requests]

    def __repr__(self) -> str:
        return f"FrozenBase({len(self.answers)} answers, prompt_format={self.prompt_format!r})"


def freeze_base(system: "System", requests: Iterable[Request], *, cache: Any = None,
                on_group: Callable[[list[Request]], None] | None = None) -> FrozenBase:
    """Answer ``requests`` on ``system`` once (:func:`answer_requests`) and keep them as a :class:`FrozenBase`.

    ``cache`` (as in :func:`evaluate`: ``None``/``False``, ``True``, a :class:`BaseCache` or a directory) is looked
    up and filled under :func:`cache_key` ``(system.fingerprint, system.prompt_format, requests)`` -- the one key of
    base answers in editlens. The frozen base's fingerprint is ``"<system fingerprint>:frozen"``.
    """
    requests = set(requests)
    cache_obj = _as_cache(cache)
    key = cache_key(system.fingerprint, system.prompt_format, requests)
    answers = cache_obj.get(key, requests) if cache_obj is not None else None
    hit = answers is not None
    if answers is None:
        with torch.no_grad():
            answers = answer_requests(system, requests, on_group)
        if cache_obj is not None:
            cache_obj.put(key, answers)
    return FrozenBase(answers, f"{system.fingerprint}:frozen", system.prompt_format, cache_hit=hit)


# ================================================================================================ results
@dataclass
class Results:
    """Tidy evaluation results.

    Attributes:
        rows: ``(case_id, probe_kind, metric, value)`` rows.
        meta: prompt format, system fingerprints, metric names and parameters, timings, cache statistics.
    """

    rows: list[Row] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_pandas(self) -> "pd.DataFrame":
        """DataFrame with columns ``case_id, probe_kind, metric, value``."""
        import pandas as pd

        return pd.DataFrame([tuple(r) for r in self.rows], columns=list(Row._fields)).astype(
            {"case_id": str, "probe_kind": str, "metric": str, "value": float})

    def summary(self) -> "pd.DataFrame":
        """DataFrame ``probe_kind, metric, mean, sem, n``: mean over rows (cases) and its standard error.

        ``sem`` is the sample standard deviation (ddof=1) over ``sqrt(n)``; NaN when ``n < 2``.
        """
        import pandas as pd

        groups: dict[tuple[str, str], list[float]] = {}
        for r in self.rows:
            groups.setdefault((r.probe_kind, r.metric), []).append(float(r.value))
        out = []
        for (kind, metric), vals in groups.items():
            out.append((kind, metric, *mean_sem(vals), len(vals)))
        df = pd.DataFrame(out, columns=["probe_kind", "metric", "mean", "sem", "n"])
        return df.sort_values(["metric", "probe_kind"], kind="stable").reset_index(drop=True)

    def value(self, metric: str, probe_kind: str | None = None) -> float:
        """Mean of one metric (optionally one probe kind) over rows; MetricError when absent."""
        vals = [r.value for r in self.rows if r.metric == metric and (probe_kind is None or r.probe_kind == probe_kind)]
        if not vals:
            raise MetricError(f"no rows for metric {metric!r}" + (f" on {probe_kind!r} probes" if probe_kind else ""))
        return sum(vals) / len(vals)

    def save(self, path: str | os.PathLike) -> Path:
        """Write rows to ``.csv``, ``.parquet`` or ``.json`` (JSON also holds ``meta``)."""
        path = Path(path)
        suffix = path.suffix.lower()
        df = self.to_pandas()
        if suffix == ".csv":
            df.to_csv(path, index=False)
        elif suffix == ".parquet":
            df.to_parquet(path, index=False)
        elif suffix == ".json":
            path.write_text(json.dumps({"meta": self.meta, "rows": [list(r) for r in self.rows]}, indent=1,
                                       default=str))
        else:
            raise EditlensError(f"cannot write results to {path}: use a .csv, .parquet or .json file")
        return path

    def __add__(self, other: "Results") -> "Results":
        return Results(self.rows + other.rows, {**self.meta, **other.meta})


def mean_sem(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (ddof=1; NaN for fewer than 2 values)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    if n < 2:
        return m, math.nan
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


# ================================================================================================ evaluator
def _resolve_format(system: "System", prompt_format: Any) -> str | None:
    """``None`` or the requested format checked and resolved (``auto``: chat when the system's model has a chat
    template; a system without a model keeps its own format). PromptFormatError for an unknown value."""
    if prompt_format is None:
        return None
    from editlens.lm.prompting import check_prompt_format, resolve_prompt_format

    name = check_prompt_format(prompt_format)
    lm = getattr(system, "lm", None)
    if lm is None:
        return getattr(system, "prompt_format", "raw") if name == "auto" else name
    return resolve_prompt_format(name, lm.tokenizer)


def _with_format(system: "System", prompt_format: str | None, role: str) -> "System":
    if prompt_format is None or getattr(system, "prompt_format", "raw") == prompt_format:
        return system
    from editlens.system import ModelSystem

    if type(system) is ModelSystem:
        return system.with_format(prompt_format)  # keeps the weights it is pinned to
    made = getattr(system, "prompt_format", "raw")
    raise MetricError(f"the {role} system ({type(system).__name__}) was made in prompt format {made!r} and is not "
                      "re-posed (what a wrapper edit stores - codebook keys, side memories, in-context prompts - was "
                      f"built for prompts in that format): make it with prompt_format={prompt_format!r} (e.g. "
                      f"editlens.edit(..., prompt_format={prompt_format!r})), or evaluate with "
                      f"prompt_format={made!r}")


@contextlib.contextmanager
def _batch_tokens(systems: Iterable["System"], batch_tokens: int | None) -> Iterator[None]:
    saved = []
    if batch_tokens is not None:
        for s in systems:
            if hasattr(s, "batch_tokens"):
                saved.append((s, s.batch_tokens))
                s.batch_tokens = int(batch_tokens)
    try:
        yield
    finally:
        for s, v in saved:
            s.batch_tokens = v


def _check_cases(cases: Sequence["EditCase"]) -> list["EditCase"]:
    from editlens.data.schema import EditCase

    cases = list(cases)
    seen: set[str] = set()
    for i, c in enumerate(cases):
        if not isinstance(c, EditCase):
            raise EditlensError(f"cases[{i}] is a {type(c).__name__}, not an EditCase")
        if c.case_id in seen:
            raise EditlensError(f"duplicate case_id {c.case_id!r} (cases[{i}]): results rows are keyed by case_id")
        seen.add(c.case_id)
    return cases


def _progress(progress: bool, total: int, desc: str):
    from editlens.progress import enabled

    if not progress or not enabled():  # --quiet (editlens.progress mode "off") silences every bar
        return contextlib.nullcontext(None)
    from editlens.progress import bar

    return bar(total=total, desc=desc, unit="call")


def _bar_step(bar: Any, label: str) -> Callable[[list[Request]], None] | None:
    """``on_group`` for :func:`answer_requests` that advances a progress bar (one step per System call)."""
    if bar is None:
        return None
    started = [False]

    def step(group: list[Request]) -> None:
        if started[0]:
            bar.update(1)
        started[0] = True
        bar.set_postfix_str(f"{label}: {len(group)} {type(group[0]).__name__}")

    return step


def metric_probe_kinds(metric: Metric) -> tuple[str, ...] | None:
    """The probe kinds ``metric`` reads, when it declares them (``probe_kinds``, ``kinds`` or ``kind``)."""
    for attr in ("probe_kinds", "kinds", "kind"):
        v = getattr(metric, attr, None)
        if v:
            return (str(v),) if isinstance(v, str) else tuple(str(k) for k in v)
    return None


def no_rows_message(metrics: Sequence[Metric], cases: Sequence["EditCase"]) -> str:
    present = sorted({k for c in cases for k in c.kinds})
    parts = []
    for m in metrics:
        kinds = metric_probe_kinds(m)
        need = f"needs probes of kind {' / '.join(kinds)}" if kinds else "found none of the probes it reads"
        parts.append(f"metric {m.name!r} ({need})")
    return (f"{len(metrics)} metric(s) produced no rows on these {len(cases)} case(s): " + "; ".join(parts)
            + f". The cases have probe kinds: {', '.join(present) or 'none'}. Use a dataset with those probes "
            f"or drop the metric.")


def evaluate(system: "System", cases: Sequence["EditCase"], base: "System | None" = None,
             metrics: str | Sequence[str | Metric] = ("gt", "gtfree"), batch_tokens: int | None = 4096,
             prompt_format: str | None = None, cache: Any = True, progress: bool = True,
             truncate: str | None = None, chunk_cases: int | None = None,
             on_rows: Callable[[list[Row]], None] | None = None) -> Results:
    """Evaluate ``system`` on ``cases`` with ``metrics`` (bulk, batched, base outputs cached).

    Args:
        system: the system under evaluation (the edited model, a wrapped system, or the base itself).
        cases: the edit cases whose probes are asked.
        base: the unedited reference system; needed by metrics that compare with it (``kl``, ``topk``, ...).
        metrics: metric names, ``@``-parametrised names (``topk@5``), groups (``gt``, ``gtfree``, ``all``) or
            :class:`Metric` instances; a comma-separated string is accepted.
        batch_tokens: token budget of one padded batch, set on the systems for the duration of the call
            (``None`` keeps each system's own setting).
        prompt_format: ``"raw"`` / ``"chat"`` / ``"auto"`` (chat when the model has a chat template; see
            :mod:`editlens.lm.prompting`). A plain :class:`ModelSystem` (the base, a weight edit) is re-posed in
            that format, exactly (its weights do not depend on it); a wrapper edit (GRACE, WISE, IKE, SCR) must have
            been made in it (``editlens.edit(..., prompt_format=...)``), else a :class:`MetricError` says so.
            ``None``: the systems' own format. An unknown value is a :class:`PromptFormatError`.
        cache: ``True`` (process-wide in-memory LRU, the default), ``False``/``None`` (no cache), a
            :class:`BaseCache`, or a directory path (persistent cache there).
        progress: show a tqdm progress bar over the model calls.
        truncate: ``None`` (default): a prompt that does not fit the model's context (with its target, or with the
            new tokens of a generation, in each system's prompt format) is a :class:`ContextLengthError` naming the
            case and the probe, raised before any model call (what IKE/SCR add at call time is checked then). ``"left"``: such prompts lose their oldest tokens (see
            :mod:`editlens.lm.context`); ``meta`` records ``truncate`` and ``truncated_requests``.
        chunk_cases: stream the evaluation over consecutive chunks of at most this many cases (``None``: all
            at once): per-case metrics are answered and turned into rows one chunk at a time, and each chunk's
            answers (next-token distributions ``[vocab]`` per prompt, scores, generations) are dropped before the
            next, so memory does not grow with the number of cases (pass ``cache=False`` or a directory: the
            in-memory cache keeps base answers up to its byte bound). Rows are those of the unchunked call, in
            the same order, up to the floating-point summation order of batched forward passes (prompts are
            batched with other prompts). Metrics that read all cases at once (they override
            :meth:`Metric.requests` / :meth:`Metric.rows`: a TF-IDF fit over every case, a general-ability
            benchmark) are evaluated once over all cases after the chunks. Every prompt's context length is
            checked before the first model call, as without chunks. See :func:`_evaluate_chunked`.
        on_rows: with ``chunk_cases``, called with each chunk's rows as soon as they are computed; the rows are
            then not kept in the returned :class:`Results` (``meta["n_rows"]`` counts them), so a caller that
            writes them out (a store, a file) holds one chunk at a time.

    Returns:
        :class:`Results` with one row per case, probe kind and metric; ``meta`` records the prompt format,
        fingerprints, metric parameters, the number of unique requests, timings and cache use.

    Raises:
        MetricError: unknown metric, or a metric that needs ``base`` when none is given.
        ContextLengthError: a prompt longer than the model's context (without ``truncate="left"``).
    """
    from editlens.lm import context as _ctx

    if chunk_cases is not None or on_rows is not None:
        return _evaluate_chunked(system, cases, base, metrics, batch_tokens=batch_tokens,
                                 prompt_format=prompt_format, cache=cache, progress=progress, truncate=truncate,
                                 chunk_cases=chunk_cases, on_rows=on_rows)
    t0 = time.perf_counter()
    truncate = _ctx.check_truncate(truncate)
    prompt_format = _resolve_format(system, prompt_format)
    cases = _check_cases(cases)
    metric_objs = resolve_metrics(metrics)
    same = base is not None and (base is system)  # before re-posing: one object stays one system
    system = _with_format(system, prompt_format, "evaluated")
    if base is not None:
        base = system if same else _with_format(base, prompt_format, "base")
    if base is not None and base.prompt_format != system.prompt_format:
        raise MetricError(f"the base system poses prompts as {base.prompt_format!r} but the evaluated one as "
                          f"{system.prompt_format!r}; use one prompt format")

    # ---- gather
    wanted: dict[str, set[Request]] = {EDITED: set(), BASE: set()}
    needs_base: list[str] = []
    for m in metric_objs:
        n_base = 0
        for role, req in m.requests(cases):
            if role not in wanted:
                raise MetricError(f"metric {m.name!r} requested role {role!r}; use {EDITED!r} or {BASE!r}")
            wanted[role].add(req)
            n_base += role == BASE
        if n_base:
            needs_base.append(m.name)
    if needs_base and base is None:
        raise MetricError(f"metrics {', '.join(needs_base)} compare with the unedited model: pass base=<System>")
    # every prompt must fit the model's context, in each system's prompt format: checked before any model call
    n_truncated = _ctx.check_requests({EDITED: system, BASE: base if base is not None else system}, wanted, cases,
                                      metric_objs, truncate)

    # ---- answer
    store: dict[str, dict[Request, Any]] = {EDITED: {}, BASE: {}}
    cache_obj = _as_cache(cache)
    cache_hit = None
    fmt = system.prompt_format
    timings: dict[str, float] = {}
    with _batch_tokens([s for s in (system, base) if s is not None], batch_tokens), _ctx.truncation(truncate):
        base_reqs = set(wanted[BASE]) | (set(wanted[EDITED]) if same else set())
        n_groups = len(_groups_of(base_reqs, base)) + (0 if same else len(_groups_of(wanted[EDITED], system)))
        with _progress(progress, n_groups, "evaluate") as bar:
            if base_reqs:
                tb = time.perf_counter()
                frozen = freeze_base(base, base_reqs, cache=cache_obj, on_group=_bar_step(bar, "base"))  # type: ignore[arg-type]
                cache_hit = frozen.cache_hit
                if bar is not None:
                    bar.update(len(_groups_of(base_reqs, base)) if cache_hit else 1)
                store[BASE] = frozen.answers  # type: ignore[assignment]
                timings["base_s"] = time.perf_counter() - tb
            if same:
                store[EDITED] = store[BASE]
            else:
                te = time.perf_counter()
                store[EDITED] = answer_requests(system, wanted[EDITED], _bar_step(bar, "edited"))
                if bar is not None and wanted[EDITED]:
                    bar.update(1)
                timings["edited_s"] = time.perf_counter() - te

    # ---- compute
    tc = time.perf_counter()
    answers = Answers(store)
    rows: list[Row] = []
    empty: list[Metric] = []
    for m in metric_objs:
        n0 = len(rows)
        for r in m.rows(cases, answers):
            rows.append(Row(str(r[0]), str(r[1]), str(r[2]), float(r[3])))
        if len(rows) == n0 and cases:
            empty.append(m)
    if empty:
        warnings.warn(no_rows_message(empty, cases), UserWarning, stacklevel=2)
    timings["metrics_s"] = time.perf_counter() - tc
    timings["total_s"] = time.perf_counter() - t0

    meta = {
        "prompt_format": fmt,
        "system": {"fingerprint": system.fingerprint, "repr": repr(system)},
        "base": None if base is None else {"fingerprint": base.fingerprint, "repr": repr(base)},
        "metrics": {m.name: m.describe() for m in metric_objs},
        "n_cases": len(cases),
        "n_requests": {role: {t.__name__: sum(isinstance(r, t) for r in wanted[role])
                              for t in (NextToken, Score, Generate)} for role in ROLES},
        "batch_tokens": batch_tokens,
        "base_cache_hit": cache_hit,
        "truncate": truncate,
        "truncated_requests": n_truncated,
        "timings": timings,
    }
    return Results(rows, meta)


def streams_per_case(metric: Metric) -> bool:
    """Whether ``metric`` is per case (only the :meth:`Metric.case_requests` / :meth:`Metric.case_rows` hooks, or
    ``per_case = True`` declared by a metric whose own ``rows`` is still a concatenation over cases), so that
    evaluating chunks of cases and concatenating the rows equals evaluating all cases at once."""
    declared = getattr(type(metric), "per_case", None)
    if declared is not None:
        return bool(declared)
    return type(metric).rows is Metric.rows and type(metric).requests is Metric.requests


#: the message pattern of the "no rows" warning (callers that stream chunks silence it per chunk and warn once)
NO_ROWS_PATTERN = r"\d+ metric\(s\) produced no rows"


def _evaluate_chunked(system: "System", cases: Sequence["EditCase"], base: "System | None", metrics: Any, *,
                      batch_tokens: int | None, prompt_format: str | None, cache: Any, progress: bool,
                      truncate: str | None, chunk_cases: int | None,
                      on_rows: Callable[[list[Row]], None] | None) -> Results:
    """:func:`evaluate` streamed over chunks of cases (its ``chunk_cases`` / ``on_rows``).

    Everything that can be refused is refused before the first model call: the chunk size, the cases, the
    metrics, a missing base, and every prompt's context length (each chunk's requests gathered and checked, then
    dropped). Per-case metrics (:func:`streams_per_case`) are then evaluated chunk by chunk with one
    :func:`evaluate` call each; the others once over all cases. Without ``on_rows`` the rows are reordered
    metric-major, as :func:`evaluate` lists them. ``meta`` sums the request counts, timings and truncations of
    the calls; ``base_cache_hit`` is true only when every call hit the cache."""
    import warnings as _w

    from editlens.lm import context as _ctx

    if chunk_cases is None:
        chunk_cases = max(1, len(cases))
    if isinstance(chunk_cases, bool) or not isinstance(chunk_cases, int) or chunk_cases < 1:
        raise EditlensError(f"evaluate: chunk_cases must be an integer >= 1, got {chunk_cases!r}")
    truncate = _ctx.check_truncate(truncate)
    cases = _check_cases(cases)
    metric_objs = resolve_metrics(metrics)
    fmt = _resolve_format(system, prompt_format)
    same = base is not None and base is system
    sys_f = _with_format(system, fmt, "evaluated")
    base_f = None if base is None else (sys_f if same else _with_format(base, fmt, "base"))
    stream = [m for m in metric_objs if streams_per_case(m)]
    whole = [m for m in metric_objs if not streams_per_case(m)]
    # up-front checks over every chunk, before any model call
    chunks = [cases[i:i + chunk_cases] for i in range(0, len(cases), chunk_cases)] or [[]]
    for part, mets in [(c, stream) for c in chunks] + [(cases, whole)]:
        if not mets:
            continue
        wanted: dict[str, set[Request]] = {EDITED: set(), BASE: set()}
        for m in mets:
            for role, req in m.requests(part):
                if role not in wanted:
                    raise MetricError(f"metric {m.name!r} requested role {role!r}; use {EDITED!r} or {BASE!r}")
                if role == BASE and base is None:
                    raise MetricError(f"metrics {m.name} compare with the unedited model: pass base=<System>")
                wanted[role].add(req)
        _ctx.check_requests({EDITED: sys_f, BASE: base_f if base_f is not None else sys_f}, wanted, part, mets,
                            truncate)
        del wanted

    kw = dict(base=base, batch_tokens=batch_tokens, prompt_format=prompt_format, cache=cache, progress=progress,
              truncate=truncate)
    by_metric: dict[str, list[Row]] = {m.name: [] for m in metric_objs}
    n_rows = 0
    counts: dict[str, int] = {m.name: 0 for m in metric_objs}
    metas: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    calls = [(c, stream) for c in chunks if c] + ([(cases, whole)] if whole else [])
    for part, mets in calls:
        if not mets:
            continue
        with _w.catch_warnings():
            _w.filterwarnings("ignore", message=NO_ROWS_PATTERN)  # warned once below, over all cases
            res = evaluate(system, part, metrics=list(mets), **kw)
        metas.append(res.meta)
        for r in res.rows:
            counts[r.metric] = counts.get(r.metric, 0) + 1
        n_rows += len(res.rows)
        if on_rows is not None:
            on_rows(list(res.rows))
        else:
            for r in res.rows:
                by_metric.setdefault(r.metric, []).append(r)
        del res
    empty = [m for m in metric_objs if counts.get(m.name, 0) == 0]
    if empty and cases:
        warnings.warn(no_rows_message(empty, cases), UserWarning, stacklevel=3)
    rows = [] if on_rows is not None else [r for m in metric_objs for r in by_metric.pop(m.name, [])]
    first = metas[0] if metas else {}
    timings: dict[str, float] = {}
    for m in metas:
        for k, v in m.get("timings", {}).items():
            if k != "total_s":
                timings[k] = timings.get(k, 0.0) + float(v)
    timings["total_s"] = time.perf_counter() - t0
    n_req: dict[str, dict[str, int]] = {role: {t.__name__: 0 for t in (NextToken, Score, Generate)} for role in ROLES}
    for m in metas:
        for role, d in m.get("n_requests", {}).items():
            for t, v in d.items():
                n_req[role][t] = n_req[role].get(t, 0) + int(v)
    hits = [m.get("base_cache_hit") for m in metas if m.get("base_cache_hit") is not None]
    meta = {
        "prompt_format": first.get("prompt_format", sys_f.prompt_format),
        "system": first.get("system", {"fingerprint": sys_f.fingerprint, "repr": repr(sys_f)}),
        "base": first.get("base", None if base_f is None else {"fingerprint": base_f.fingerprint,
                                                               "repr": repr(base_f)}),
        "metrics": {m.name: m.describe() for m in metric_objs},
        "n_cases": len(cases),
        "n_requests": n_req,
        "batch_tokens": batch_tokens,
        "base_cache_hit": (all(hits) if hits else None),
        "truncate": truncate,
        "truncated_requests": sum(int(m.get("truncated_requests") or 0) for m in metas),
        "timings": timings,
        "chunk_cases": chunk_cases,
        "n_chunks": len([c for c in chunks if c]),
        "n_rows": n_rows,
        "streamed_metrics": [m.name for m in stream],
        "whole_set_metrics": [m.name for m in whole],
    }
    return Results(rows, meta)


def evaluate_naive(system: "System", cases: Sequence["EditCase"], base: "System | None" = None,
                   metrics: str | Sequence[str | Metric] = ("gt", "gtfree")) -> tuple[Results, int]:
    """Reference evaluation: every request answered alone, when a metric asks for it (no batching, no
    de-duplication, no cache). Returns the results and the number of System calls. Used to check and time
    :func:`evaluate`; not meant for real use."""
    cases = _check_cases(cases)
    metric_objs = resolve_metrics(metrics)
    systems = {EDITED: system} if base is None else {EDITED: system, BASE: base}
    answers = OnDemandAnswers(systems)
    rows = [Row(*r) for m in metric_objs for r in m.rows(cases, answers)]
    return Results(rows, {"prompt_format": system.prompt_format, "metrics": {m.name: m.describe() for m in metric_objs}}), answers.n_calls
