"""Run an experiment spec into a results store: batch and sequential regimes, checkpoints, resume.

:func:`run_spec` loads a spec and validates it against the registries (:func:`editlens.runs.spec.load_validated_spec`:
errors name the key and the line), expands it into units (:meth:`Spec.plan`), skips the
units the store already has, and runs the others with an executor (:mod:`editlens.runs.executors`: ``local``
in this process, or ``ray``). Only this driver process writes the store.

One unit
--------
* **batch** regime (``regime.kind = "batch"``): the unit's ``n_edits`` cases are edited at once with
  :func:`editlens.edit.edit`, the edited system is evaluated on those cases with
  :func:`editlens.evaluate.evaluate` against the unedited base, the edit is undone (bit for bit). Rows get
  ``step = 1`` and ``n_edits = N``; all rows and diagnostics are committed in one transaction.
* **sequential** regime: :func:`editlens.edit.edit_sequential` applies the cases ``batch_size`` at a time; at
  each checkpoint (a number of edits) a callback evaluates the edited system on a **fixed evaluation sample**:
  the first ``K`` cases of the unit (``K`` = ``eval_cases``, by default the first checkpoint, so every case of
  the sample has been edited at every checkpoint) with every metric of the spec — per-case metrics (efficacy,
  KL, ...) and general-ability metrics that ignore the cases (perplexity, downstream probes, muting rate,
  whatever the evaluation modules register). Each checkpoint is committed on its own (rows, diagnostics and a
  ``checkpoints`` record in one transaction); the unedited model is evaluated first as step 0 (``n_edits = 0``)
  so curves start from the pre-edit value. Rows get ``step`` = number of edit batches applied.
* the pseudo-method ``none`` (alias ``pre-edit``) edits nothing: it evaluates the unedited model (the
  "pre-edit" row of the papers' tables); in a sequential regime its rows are repeated at every checkpoint.

Determinism and resume
----------------------
Re-running the same spec into the same store resumes it: finished units are skipped; a sequential unit that was
killed goes on from its last committed checkpoint. With the local executor every committed checkpoint but the
last also saves the unit's state (edited weights, the method's accumulated state, the random-number state:
:func:`editlens.edit.save_sequence`) to ``<store>.resume/<run id>/<unit id>.pt``, and the resumed unit starts from
that file (``edit_sequential(..., resume=...)``, bit for bit the uninterrupted run). Without a usable file
(methods whose edits live outside the weights, Ray tasks, a file of another step or unit, a damaged file) the
unit re-applies its edits from the start (the same cases in the same order with the same seed) without
re-evaluating the checkpoints it already committed. A killed and resumed run ends with exactly the rows of an
uninterrupted run because:

* each unit seeds torch with its ``seed`` inside :func:`torch.random.fork_rng` (and passes it to
  ``edit_sequential``); evaluations run inside their own ``fork_rng`` so skipping one does not change the
  random stream seen by the editing method;
* base-model answers are computed per unit *request set* (the requests of all metrics over the unit's
  evaluation cases), on the unedited model, in a fixed order (sorted, the same batches every time), frozen
  (:func:`editlens.evaluate.core.freeze_base`) and kept for the whole run by :class:`BaseAnswers` under the
  evaluator's :func:`~editlens.evaluate.core.cache_key` — units that evaluate the same cases share them, and which
  units ran before does not change a value (with ``eval_chunk``: per chunk, see "Streaming" below);
* the edited system's requests are likewise answered in sorted batches that depend only on the unit.
* the run records the torch thread count it started with (``versions["torch_threads"]``); a resumed run with the
  local executor computes with that count (CPU reductions are split by thread count, so another count would give
  numbers that differ in the last bits).

The unit's cases: the dataset's cases (after its ``limit``/``sample``), in file order for seed 0 and in the
order of a ``random.Random(seed)`` shuffle for any other seed; the first ``n_edits`` of them are edited.

Streaming (``RunOptions.eval_chunk`` = N; ``[regime] eval_chunk``, ``editlens bench --eval-chunk N``)
------------------------------------------------------------------------------------------------------
Without it (the default) an evaluation answers all its cases at once and its rows are committed with the step,
and the base answers of every unit stay in :class:`BaseAnswers` until the run ends. With it, memory does not grow
with the number of cases:

* every evaluation (a batch unit after its edit, the ``none`` unit, step 0 and each checkpoint of a sequential
  unit) runs over consecutive chunks of at most N cases for the per-case metrics
  (:func:`~editlens.evaluate.core.streams_per_case`), then once over all cases for the metrics that read every case
  (general-ability benchmarks, TF-IDF fits). Each chunk's rows go to the driver as a ``StepResult(chunk=True)`` and
  into the store at once, in their own transaction (:meth:`~editlens.runs.store.Store.append_rows`); then the step
  is committed without rows (``streamed=True``: diagnostics plus the checkpoint record, or the ``done`` mark);
* the base answers of a chunk are frozen for that chunk only (the chunk's request set, in its sorted batches;
  :class:`_ChunkBases`), never put in :class:`BaseAnswers`: computed when needed for the unedited model, and, for a
  unit that edits, computed before the edit one chunk at a time and spilled to a private temporary folder (one
  entry in memory), read back chunk by chunk after the edit, and removed with the unit;
* the per-case answers record (:data:`~editlens.runs.answers.ANSWERS_KEY`, the report's per-case view) holds
  every case, so a streamed unit does not store it; the diagnostics gain ``eval_chunk``; a batch unit of staged
  ConflictEdit / RoundEdit records is evaluated as without chunks.

Rows equal those of the unchunked run up to float32 summation order (a chunk's prompts are batched together
instead of all prompts: ~1e-7 in KL), and two runs with the same N give the same rows bit for bit; N is recorded
with the run (resuming with another N is refused). Resume stays exact: rows of a unit that is not done, at a step
without a committed checkpoint, are leftovers of an evaluation that stopped after some chunks; the transaction
that starts the unit again deletes them (:meth:`~editlens.runs.store.Store.start_unit` with ``discard_partial``)
and the unit redoes that step. Only the local executor streams: the Ray executor refuses ``eval_chunk`` (a task
hands its unit's results back when it ends).

Rows are ``(step, n_edits, case_id, probe_kind, metric, value)``; diagnostics come from ``Edit.diagnostics``
(``delta_norm/<layer>``, ``dk_norm/<layer>`` = ||Δ k_j||, losses, ``wall_time_s``) plus ``eval_time_s``; the
unit metadata is :meth:`Unit.meta` plus ``eval_cases`` and the model name.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch

from editlens.errors import EditlensError, SpecError
# spec validation lives in editlens.runs.spec; these names are re-exported for callers of the runner
from editlens.runs.spec import (BASELINE_NAMES, Spec, Unit, check_methods, load_validated_spec,  # noqa: F401
                                validate_spec)

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.evaluate.core import FrozenBase
    from editlens.lm.load import LM
    from editlens.runs.spec import DatasetSpec
    from editlens.runs.store import Store

#: version of the runner's row semantics (recorded with each run)
RUNNER_VERSION = 1

__all__ = ["RunOptions", "StepResult", "BaseAnswers", "run_spec", "prepare_spec", "load_validated_spec",
           "check_methods", "load_unit_cases", "dataset_cases", "execute_unit",
           "default_store_path", "with_device_map", "BASELINE_NAMES", "main"]


# ============================================================================================ options and results
@dataclass(frozen=True)
class RunOptions:
    """Runner settings that change results (recorded with the run; resuming with other values is refused).

    Attributes:
        eval_cases: sequential regime: size ``K`` of the fixed evaluation sample (the unit's first ``K`` cases);
            ``None`` = the first checkpoint.
        baseline: sequential regime: evaluate the unedited model at step 0.
        batch_tokens: token budget of one padded evaluation batch.
        truncate: ``None`` (a prompt longer than the model's context is an error naming the case and probe) or
            ``"left"`` (such prompts lose their oldest tokens; see :mod:`editlens.lm.context`). Recorded with the run
            only when set, so runs recorded before the option existed still resume.
        eval_chunk: stream each evaluation over chunks of at most this many cases, writing every chunk's rows to
            the store at once (see "Streaming" in the module docstring); ``None`` (default): every case of an
            evaluation at once, rows committed with the step. Recorded only when set, like ``truncate``.
    """

    eval_cases: int | None = None
    baseline: bool = True
    batch_tokens: int = 4096
    truncate: str | None = None
    eval_chunk: int | None = None

    def __post_init__(self) -> None:
        from editlens.lm.context import check_truncate

        object.__setattr__(self, "truncate", check_truncate(self.truncate))
        c = self.eval_chunk
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise SpecError(f"eval_chunk must be an integer >= 1 (cases per streamed evaluation chunk), got {c!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("truncate", "eval_chunk"):
            if d[k] is None:
                del d[k]
        return {**d, "runner_version": RUNNER_VERSION}

    def for_spec(self, spec: "Spec") -> "RunOptions":
        """These options with ``eval_cases`` / ``eval_chunk`` taken from the spec's ``[regime]`` when not set here."""
        out = self
        if out.eval_cases is None and spec.regime.eval_cases is not None:
            out = replace(out, eval_cases=spec.regime.eval_cases)
        if out.eval_chunk is None and getattr(spec.regime, "eval_chunk", None) is not None:
            out = replace(out, eval_chunk=spec.regime.eval_chunk)
        return out

    def eval_size(self, unit: Unit) -> int:
        """``K`` for a unit (batch regime: all its cases)."""
        if unit.regime != "sequential":
            return unit.n_edits
        k = self.eval_cases if self.eval_cases is not None else unit.checkpoints[0]
        return max(1, min(int(k), unit.n_edits))


@dataclass
class StepResult:
    """What one evaluation point of a unit produced (what an executor hands to the driver).

    ``final`` marks the unit's last step: the driver then commits it together with the ``done`` mark.
    ``chunk`` marks rows of one chunk of a streamed evaluation (``eval_chunk``): the driver appends them to the store
    at once, in their own transaction, and marks nothing. ``streamed``: the step's rows came before as chunks (this
    result has none): the driver commits the step's diagnostics and its checkpoint / ``done`` mark, keeping them.
    """

    unit: str
    step: int
    n_edits: int
    rows: list[tuple] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    final: bool = False
    chunk: bool = False
    streamed: bool = False


# ============================================================================================ spec
def with_device_map(spec: Spec, device_map: Any) -> Spec:
    """``spec`` with ``[model] device_map`` set to ``device_map`` (the ``--device-map`` override of ``editlens
    bench``); a SpecError names the option when the value is not a device map or the spec pins a ``device``."""
    from editlens.lm.placement import device_map_problem

    problem = device_map_problem(device_map)
    if problem is not None:
        raise SpecError(f"--device-map: {problem}")
    if spec.model.device not in ("auto", "", None):
        raise SpecError(f"--device-map: the spec sets model.device = {spec.model.device!r}; a device map places "
                        "every module itself, so leave model.device unset")
    return replace(spec, model=replace(spec.model, device_map=device_map))


def prepare_spec(spec_or_path: Spec | str | Path) -> Spec:
    """A validated :class:`Spec` from a spec or a path (a given Spec is checked against the registries too:
    :func:`editlens.runs.spec.validate_spec`)."""
    if isinstance(spec_or_path, Spec):
        return validate_spec(spec_or_path)
    return load_validated_spec(spec_or_path)


def default_store_path(spec: Spec) -> Path:
    """The spec's ``store`` key, else ``<spec stem>.sqlite`` beside the spec file (``run.sqlite`` without one)."""
    if spec.store is not None:
        return Path(spec.store)
    if spec.source is not None:
        src = Path(spec.source)
        return src.with_name(src.stem + ".sqlite")
    return Path("run.sqlite")


# ============================================================================================ cases
def dataset_cases(ds: "DatasetSpec") -> list["EditCase"]:
    """All cases of one spec dataset (after its ``limit`` / ``sample``)."""
    from editlens.data import load_cases, synthetic_cases

    if ds.synthetic is not None:
        cases = synthetic_cases(ds.synthetic, seed=ds.seed)
        if ds.limit is not None:
            cases = cases[:ds.limit]
        if ds.sample is not None and ds.sample < len(cases):
            keep = sorted(random.Random(ds.seed).sample(range(len(cases)), ds.sample))
            cases = [cases[i] for i in keep]
        return list(cases)
    fmt = None if ds.format in (None, "auto") else ds.format
    return load_cases(ds.path, format=fmt, limit=ds.limit, sample=ds.sample, seed=ds.seed)


def load_unit_cases(unit: Unit, all_cases: Sequence["EditCase"]) -> list["EditCase"]:
    """The cases a unit edits: the first ``n_edits`` of the dataset (seed 0) or of a seeded shuffle."""
    cases = list(all_cases)
    if unit.seed != 0:
        random.Random(unit.seed).shuffle(cases)
    if unit.n_edits > len(cases):
        raise SpecError(f"unit {unit.id}: needs {unit.n_edits} cases but dataset {unit.dataset.name!r} "
                        f"({unit.dataset.source}) has only {len(cases)}; lower regime sizes/checkpoints")
    return cases[:unit.n_edits]


def judge_endpoint_lines(spec: Spec, units: Sequence[Unit], options: RunOptions) -> list[str]:
    """What the spec's ``ar_judge@URL`` metrics will send where over ``units``: one line per endpoint metric with
    the host, the most prompts it receives and whether an API key is sent
    (:func:`editlens.evaluate.judge.remote_endpoints`); ``[]`` when no metric calls an endpoint."""
    from editlens.evaluate.core import resolve_metrics
    from editlens.evaluate.judge import EndpointJudge, remote_endpoints

    metrics = resolve_metrics(list(spec.metrics))
    if not units or not any(isinstance(getattr(m, "judge", None), EndpointJudge) for m in metrics):
        return []
    all_cases: dict[str, list] = {}
    evaluations = []
    for u in units:
        if u.dataset.name not in all_cases:
            all_cases[u.dataset.name] = dataset_cases(u.dataset)
        cases = load_unit_cases(u, all_cases[u.dataset.name])
        times = 1
        if u.regime == "sequential":  # as execute_unit: baseline at step 0, then each checkpoint (none: once)
            cases = cases[:options.eval_size(u)]
            times = int(options.baseline) + (1 if u.method.lower() in BASELINE_NAMES else len(u.checkpoints))
        evaluations.append((cases, times))
    return remote_endpoints(metrics, evaluations)


# ============================================================================================ base answers
class BaseAnswers:
    """The run's base answers: for each distinct request set of a unit (the requests of all its metrics over its
    evaluation cases), the unedited model's answers frozen once (:func:`editlens.evaluate.core.freeze_base`, in the
    evaluator's sorted batches, so a value never depends on which units ran before) and kept for the whole run in
    a :class:`~editlens.evaluate.core.BaseCache` without a byte bound, under the evaluator's
    :func:`~editlens.evaluate.core.cache_key`."""

    def __init__(self, prompt_format: str = "raw", batch_tokens: int = 4096):
        from editlens.evaluate.core import BaseCache

        self.prompt_format = prompt_format
        self.batch_tokens = batch_tokens
        self._cache = BaseCache(max_bytes=1 << 62)

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, lm: "LM", cases: Sequence["EditCase"], metrics: Sequence[str], *, with_edited: bool) -> "FrozenBase":
        """The frozen base for these cases and metrics (``with_edited``: also the requests of the evaluated role,
        for evaluating the unedited model itself). ``lm`` must be unedited."""
        from editlens.evaluate.core import BASE, EDITED, freeze_base, request_set, resolve_metrics
        from editlens.lm.context import check_requests, current_truncation
        from editlens.system import ModelSystem

        if lm.fingerprint != lm.base_fingerprint:
            raise EditlensError("internal: the base answers must be computed on the unedited model")
        reqs = request_set(list(metrics), cases, (BASE, EDITED) if with_edited else (BASE,))
        live = ModelSystem(lm, prompt_format=self.prompt_format, batch_tokens=self.batch_tokens)
        # prompts longer than the context: ContextLengthError naming the case and probe, before any model call
        check_requests({BASE: live}, {BASE: reqs}, list(cases), resolve_metrics(list(metrics)), current_truncation())
        return freeze_base(live, reqs, cache=self._cache)


# ============================================================================================ one unit
def _rows(results: Any, step: int, n_edits: int) -> list[tuple]:
    return [(step, n_edits, r.case_id, r.probe_kind, r.metric, float(r.value)) for r in results.rows]


def _plain_diagnostics(diag: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in diag.items():
        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 else v.tolist()
        out[str(k)] = v
    dks = [float(v) for k, v in out.items() if k.startswith("dk_norm/") and isinstance(v, (int, float))]
    if dks and "delta_k_mean" not in out:
        out["delta_k_mean"] = sum(dks) / len(dks)  # mean ||Δk_j|| over the edited layers (report's reference)
    return out


def _evaluate(system: Any, cases: Sequence["EditCase"], base: "FrozenBase", metrics: Sequence[str],
              options: RunOptions, fmt: str):
    from editlens.evaluate.core import evaluate

    with torch.random.fork_rng(devices=[]):
        return evaluate(system, list(cases), base=base, metrics=list(metrics), batch_tokens=options.batch_tokens,
                        prompt_format=None if fmt == "raw" else fmt, cache=False, progress=True,
                        truncate=options.truncate)


# ============================================================================================ streamed evaluation
def _chunk_parts(cases: Sequence["EditCase"], metrics: Sequence[str], chunk: int) -> list[tuple[list, list]]:
    """The ``(cases, metric objects)`` evaluations of a streamed evaluation: the per-case metrics
    (:func:`~editlens.evaluate.core.streams_per_case`) over consecutive chunks of at most ``chunk`` cases, then the
    metrics that read all cases at once (a TF-IDF fit over every case, general-ability benchmarks) once over all."""
    from editlens.evaluate.core import resolve_metrics, streams_per_case

    objs = resolve_metrics(list(metrics))
    stream = [m for m in objs if streams_per_case(m)]
    whole = [m for m in objs if not streams_per_case(m)]
    cases = list(cases)
    parts: list[tuple[list, list]] = []
    if stream:
        parts += [(cases[i:i + chunk], stream) for i in range(0, len(cases), chunk)]
    if whole and cases:
        parts.append((cases, whole))
    return parts


class _ChunkBases:
    """The unedited model's answers for each part of a streamed evaluation (:func:`_chunk_parts`), frozen part by
    part in that part's sorted batches (:func:`editlens.evaluate.core.freeze_base`), never all at once.

    Every prompt of every part is checked against the context (both roles, as the model poses it) in the
    constructor, before any model call. ``spill=True`` (the unit edits the model afterwards): each part is frozen
    now and written to a private temporary folder (a :class:`~editlens.evaluate.core.BaseCache` directory keeping
    at most one entry in memory), read back by :meth:`get` after the edit, and the folder is removed by
    :meth:`close`. ``spill=False`` (the model stays unedited): :meth:`get` freezes the part when asked. Nothing goes
    to the run's :class:`BaseAnswers`, so memory holds one part's answers at a time, whatever the number of cases.
    """

    def __init__(self, lm: "LM", parts: Sequence[tuple[list, list]], *, with_edited: bool, prompt_format: str,
                 batch_tokens: int, spill: bool):
        from editlens.evaluate.core import BASE, EDITED, BaseCache, request_set
        from editlens.lm.context import check_requests, current_truncation
        from editlens.system import ModelSystem

        if lm.fingerprint != lm.base_fingerprint:
            raise EditlensError("internal: the base answers must be computed on the unedited model")
        self.lm = lm
        self.parts = list(parts)
        self.roles = (BASE, EDITED) if with_edited else (BASE,)
        self.live = ModelSystem(lm, prompt_format=prompt_format, batch_tokens=batch_tokens)
        for part, mets in self.parts:  # prompts longer than the context: ContextLengthError before any model call
            reqs = request_set(mets, part, (BASE, EDITED))
            check_requests({BASE: self.live}, {BASE: reqs}, part, mets, current_truncation())
            del reqs
        self.dir: str | None = None
        self.cache: Any = None
        if spill:
            import tempfile

            self.dir = tempfile.mkdtemp(prefix="editlens-eval-chunks-")
            self.cache = BaseCache(directory=self.dir, max_bytes=0)  # memory: the last entry only
            try:
                for i in range(len(self.parts)):
                    self._freeze(i)
            except BaseException:
                self.close()
                raise

    def _freeze(self, i: int) -> "FrozenBase":
        from editlens.evaluate.core import freeze_base, request_set

        part, mets = self.parts[i]
        return freeze_base(self.live, request_set(mets, part, self.roles), cache=self.cache)

    def get(self, i: int) -> "FrozenBase":
        """The frozen base of part ``i`` (read back from the folder, or computed now on the unedited model)."""
        from editlens.evaluate.core import FrozenBase, cache_key, request_set

        if self.cache is None:
            if self.lm.fingerprint != self.lm.base_fingerprint:
                raise EditlensError("internal: the base answers must be computed on the unedited model")
            return self._freeze(i)
        part, mets = self.parts[i]
        reqs = request_set(mets, part, self.roles)
        answers = self.cache.get(cache_key(self.live.fingerprint, self.live.prompt_format, reqs), reqs)
        if answers is None:  # pragma: no cover - the folder is private to this unit
            raise EditlensError(f"internal: the frozen base answers of evaluation chunk {i} are missing from "
                                f"{self.dir}")
        return FrozenBase(answers, f"{self.live.fingerprint}:frozen", self.live.prompt_format, cache_hit=True)

    def close(self) -> None:
        if self.dir is not None:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
            self.cache = None

    def __enter__(self) -> "_ChunkBases":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _stream(system: Any, bases: _ChunkBases, options: RunOptions, fmt: str, emit: Callable[[list], None],
            *, self_base: bool = False) -> None:
    """Evaluate ``system`` part by part against ``bases`` (``self_base``: the frozen base is the evaluated system
    too: the unedited model) and hand each part's rows to ``emit`` at once; one part's answers in memory at a time.
    The evaluator's "no rows" warning is given once, over all cases, as without chunks."""
    import warnings

    from editlens.evaluate.core import NO_ROWS_PATTERN, no_rows_message

    counts: dict[str, int] = {}
    metrics: dict[str, Any] = {}
    for i, (part, mets) in enumerate(bases.parts):
        fb = bases.get(i)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=NO_ROWS_PATTERN)
            res = _evaluate(fb if self_base else system, part, fb, mets, options, fmt)
        del fb
        for m in mets:
            metrics.setdefault(m.name, m)
        for r in res.rows:
            counts[r.metric] = counts.get(r.metric, 0) + 1
        emit(res.rows)
        del res
    empty = [m for name, m in metrics.items() if not counts.get(name)]
    all_cases = {c.case_id: c for part, _ in bases.parts for c in part}
    if empty and all_cases:
        warnings.warn(no_rows_message(empty, list(all_cases.values())), UserWarning, stacklevel=2)


def _execute_chunked(lm: "LM", unit: Unit, cases: list, options: RunOptions, sink: Callable[[StepResult], None],
                     done: set, prompt_format: str, trained: Any, evk: Any, is_none: bool,
                     state_dir: Path | None = None) -> None:
    """:func:`execute_unit` with ``options.eval_chunk`` (see "Streaming" in the module docstring); called inside
    the unit's ``fork_rng`` / truncation context, right after the unit's seed is set."""
    from editlens.edit.base import edit

    chunk = int(options.eval_chunk)  # type: ignore[arg-type]
    kw = dict(prompt_format=prompt_format, batch_tokens=options.batch_tokens)

    def emitter(step: int, n_edits: int) -> Callable[[list], None]:
        return lambda rows: sink(StepResult(unit.id, step, n_edits, [(step, n_edits, r.case_id, r.probe_kind,
                                                                      r.metric, float(r.value)) for r in rows],
                                            chunk=True))

    def finish(step: int, n_edits: int, diag: dict, final: bool) -> None:
        diag["eval_chunk"] = chunk
        sink(StepResult(unit.id, step, n_edits, [], diag, final=final, streamed=True))

    if unit.regime != "sequential":
        parts = _chunk_parts(cases, unit.metrics, chunk)
        n = len(cases)
        if is_none:
            bases = _ChunkBases(lm, parts, with_edited=True, spill=False, **kw)
            t0 = time.perf_counter()
            _stream(None, bases, options, prompt_format, emitter(0, 0), self_base=True)
            finish(0, 0, {"eval_time_s": time.perf_counter() - t0}, True)
            return
        with _ChunkBases(lm, parts, with_edited=False, spill=True, **kw) as bases:
            e = edit(lm, cases, unit.method, hparams=dict(unit.hparams), evk_align=evk, prompt_format=prompt_format,
                     trained=trained, progress=True)
            try:
                diag = _plain_diagnostics(e.diagnostics)
                t1 = time.perf_counter()
                _stream(e.system, bases, options, prompt_format, emitter(1, n))
                diag["eval_time_s"] = time.perf_counter() - t1
            finally:
                e.undo()
        finish(1, n, diag, True)
        return

    # ---- sequential: the fixed evaluation sample, streamed at step 0 and at every checkpoint
    sample = cases[:options.eval_size(unit)]
    marks = list(unit.checkpoints)
    bs = unit.batch_size
    step_of = {n: n // bs for n in marks}
    last = marks[-1]
    parts = _chunk_parts(sample, unit.metrics, chunk)
    if is_none:  # the unedited model: evaluated once, its rows repeated at every checkpoint not yet committed
        bases = _ChunkBases(lm, parts, with_edited=True, spill=False, **kw)
        if options.baseline and 0 not in done:
            t0 = time.perf_counter()
            _stream(None, bases, options, prompt_format, emitter(0, 0), self_base=True)
            finish(0, 0, {"eval_time_s": time.perf_counter() - t0}, False)
        todo = [n for n in marks if step_of[n] not in done]
        t0 = time.perf_counter()

        def repeat(rows: list) -> None:
            for n in todo:
                emitter(step_of[n], n)(rows)

        _stream(None, bases, options, prompt_format, repeat, self_base=True)
        for n in todo:
            finish(step_of[n], n, {"eval_time_s": time.perf_counter() - t0}, n == last)
        return

    with _ChunkBases(lm, parts, with_edited=options.baseline, spill=True, **kw) as bases:
        if options.baseline and 0 not in done:
            t0 = time.perf_counter()
            _stream(None, bases, options, prompt_format, emitter(0, 0), self_base=True)
            finish(0, 0, {"eval_time_s": time.perf_counter() - t0}, False)

        def callback(step: int, n_edits: int, so_far: Any) -> None:
            if step in done:
                return
            diag = _plain_diagnostics(so_far.diagnostics)
            t1 = time.perf_counter()
            _stream(so_far.system, bases, options, prompt_format, emitter(step, n_edits))
            diag["eval_time_s"] = time.perf_counter() - t1
            finish(step, n_edits, diag, n_edits == last)

        _run_sequential(lm, unit, cases, callback, done, state_dir, evk, prompt_format, trained)


def execute_unit(lm: "LM", unit: Unit, all_cases: Sequence["EditCase"], options: RunOptions,
                 sink: Callable[[StepResult], None], *, done_steps: Iterable[int] = (),
                 base_answers: BaseAnswers | None = None, prompt_format: str = "raw",
                 resume_dir: Path | None = None) -> None:
    """Run one unit on ``lm`` (unedited on entry and on return) and hand every evaluation point to ``sink``.

    ``done_steps`` are the steps already committed for this unit (resume): they are not re-evaluated, but the
    edits are re-applied so that the later steps start from the same weights — unless ``resume_dir`` holds the
    unit's state saved at its last committed checkpoint (:class:`_SequenceFile`): then the run goes on from
    there. With ``options.eval_chunk`` every
    evaluation is streamed (:func:`_execute_chunked`; a batch unit of staged ConflictEdit / RoundEdit records is
    evaluated as without it).
    """
    from editlens.edit.base import edit
    from editlens.runs.answers import ANSWERS_KEY, CaseAnswers

    done = set(int(s) for s in done_steps)
    if base_answers is None:  # (an empty BaseAnswers is falsy: `or` would drop the one the executor shares)
        base_answers = BaseAnswers(prompt_format, options.batch_tokens)
    cases = load_unit_cases(unit, all_cases)
    is_none = unit.method.lower() in BASELINE_NAMES
    trained = None
    if unit.trained and not is_none:  # a trained method's editor: loaded, or trained once and cached
        from editlens.runs.editors import unit_editor

        trained = unit_editor(lm, unit.method, unit.trained)
    evk = None
    if unit.evk_align:
        from editlens.edit.evk_align import from_config

        evk = from_config(unit.evk_align)

    from editlens.lm.context import truncation

    with torch.random.fork_rng(devices=_rng_devices(lm)), truncation(options.truncate):
        torch.manual_seed(unit.seed)
        if options.eval_chunk is not None:
            from editlens.data.formats.pitfalls import is_staged

            if unit.regime == "sequential" or is_none or not any(is_staged(c) for c in cases):
                _execute_chunked(lm, unit, cases, options, sink, done, prompt_format, trained, evk, is_none,
                                 resume_dir)
                return
        if unit.regime != "sequential":
            fb = base_answers.get(lm, cases, unit.metrics, with_edited=is_none)
            t0 = time.perf_counter()
            if is_none:
                res = _evaluate(fb, cases, fb, unit.metrics, options, prompt_format)
                sink(StepResult(unit.id, 0, 0, _rows(res, 0, 0),
                                {"eval_time_s": time.perf_counter() - t0}, final=True))
                return
            from editlens.data.formats.pitfalls import is_staged

            if any(is_staged(c) for c in cases):  # ConflictEdit / RoundEdit: each record alone, e1 then e2 (Li et al.)
                from editlens.drivers import evaluate_staged

                t1 = time.perf_counter()
                res = evaluate_staged(lm, cases, unit.method, list(unit.metrics), base=fb, hparams=dict(unit.hparams),
                                      evk_align=evk, prompt_format=prompt_format, seed=unit.seed,
                                      batch_tokens=options.batch_tokens, cache=False, trained=trained)
                diag = {"protocol": "staged", "edit_time_s": res.meta["edit_time_s"],
                        "eval_time_s": time.perf_counter() - t1 - res.meta["edit_time_s"]}
                sink(StepResult(unit.id, 1, len(cases), _rows(res, 1, len(cases)), diag, final=True))
                return
            # greedy answers of the base now (the per-case view of the report), of the edited system after the edit
            ans = CaseAnswers(lm, cases, prompt_format=prompt_format, batch_tokens=options.batch_tokens,
                              cache=base_answers._cache)
            e = edit(lm, cases, unit.method, hparams=dict(unit.hparams), evk_align=evk, prompt_format=prompt_format,
                     trained=trained, progress=True)
            try:
                diag = _plain_diagnostics(e.diagnostics)
                t1 = time.perf_counter()
                res = _evaluate(e.system, cases, fb, unit.metrics, options, prompt_format)
                diag["eval_time_s"] = time.perf_counter() - t1
                diag[ANSWERS_KEY] = ans.record(e.system)
            finally:
                e.undo()
            sink(StepResult(unit.id, 1, len(cases), _rows(res, 1, len(cases)), diag, final=True))
            return

        # ---- sequential
        k = options.eval_size(unit)
        sample = cases[:k]
        fb = base_answers.get(lm, sample, unit.metrics, with_edited=options.baseline or is_none)
        marks = list(unit.checkpoints)
        bs = unit.batch_size
        step_of = {n: n // bs for n in marks}
        last = marks[-1]
        if options.baseline and 0 not in done:
            t0 = time.perf_counter()
            res = _evaluate(fb, sample, fb, unit.metrics, options, prompt_format)
            sink(StepResult(unit.id, 0, 0, _rows(res, 0, 0), {"eval_time_s": time.perf_counter() - t0}))
        if is_none:
            t0 = time.perf_counter()
            res = _evaluate(fb, sample, fb, unit.metrics, options, prompt_format)
            for n in marks:
                s = step_of[n]
                if s not in done:
                    sink(StepResult(unit.id, s, n, _rows(res, s, n), {"eval_time_s": time.perf_counter() - t0},
                                    final=n == last))
            return
        def callback(step: int, n_edits: int, so_far: Any) -> None:
            if step in done:
                return
            diag = _plain_diagnostics(so_far.diagnostics)
            t1 = time.perf_counter()
            res = _evaluate(so_far.system, sample, fb, unit.metrics, options, prompt_format)
            diag["eval_time_s"] = time.perf_counter() - t1
            if n_edits == last:
                diag[ANSWERS_KEY] = ans.record(so_far.system)
            sink(StepResult(unit.id, step, n_edits, _rows(res, step, n_edits), diag, final=n_edits == last))

        ans = CaseAnswers(lm, sample, prompt_format=prompt_format, batch_tokens=options.batch_tokens,
                          cache=base_answers._cache)
        _run_sequential(lm, unit, cases, callback, done, resume_dir, evk, prompt_format, trained)


def _run_sequential(lm: "LM", unit: Unit, cases: list, callback: Callable[[int, int, Any], None], done: set[int],
                    state_dir: Path | None, evk: Any, prompt_format: str, trained: Any) -> None:
    """The edits of a sequential unit (both evaluation paths): ``edit_sequential`` with the unit's settings, calling
    ``callback`` at each checkpoint and then saving the unit's state there (:class:`_SequenceFile`), started from
    the state saved at the last committed checkpoint when there is a usable one; the run is undone and its state
    file removed at the end."""
    from editlens.edit.base import edit_sequential

    saved = _SequenceFile(state_dir, unit, done)
    last = unit.checkpoints[-1]

    def checkpoint(step: int, n_edits: int, so_far: Any) -> None:
        callback(step, n_edits, so_far)
        if step not in done:
            saved.save(so_far, step, n_edits == last)

    run = saved.run(lambda resume: edit_sequential(
        lm, cases, unit.method, batch_size=unit.batch_size, hparams=dict(unit.hparams),
        checkpoints=list(unit.checkpoints), callback=checkpoint, evk_align=evk, seed=unit.seed,
        prompt_format=prompt_format, trained=trained, progress=True, resume=resume))
    run.undo()
    saved.remove()


class _SequenceFile:
    """The saved state of one sequential unit (``<resume_dir>/<unit id>.pt``, :func:`editlens.edit.save_sequence`),
    written after each committed checkpoint but the last, so that a killed run resumes a unit at its last
    committed checkpoint instead of re-applying every edit before it.

    On resume the file is used only when it is this unit's and holds exactly the last committed step (a file
    written before a commit that did not happen, or after one whose rows were lost, is ignored); a file that
    cannot be read, or a run state ``edit_sequential`` refuses (another method, cases, seed or hyperparameters:
    :class:`~editlens.edit.base.SequenceResumeError`, raised before any weight is touched), is reported and the
    edits are re-applied as without it. Methods whose edits live outside the weights are never saved (they are
    replayed). The file is removed when the unit is done. ``resume_dir=None`` (Ray tasks): nothing is saved.
    """

    def __init__(self, resume_dir: Path | None, unit: Unit, done: set[int]):
        self.unit = unit
        self.path = None if resume_dir is None else Path(resume_dir) / f"{unit.id}.pt"
        self.resume: dict[str, Any] | None = None
        if self.path is None or not self.path.is_file():
            return
        from editlens.edit.base import load_sequence
        from editlens.errors import MethodError

        why = None
        try:
            got = load_sequence(self.path)
        except MethodError as e:
            why = str(e)
        else:
            extra = got.get("extra") if isinstance(got.get("extra"), dict) else {}
            if extra.get("unit") != unit.id:
                why = f"it is for unit {extra.get('unit')!r}"
            elif not done or int(extra.get("step", -1)) != max(done):
                why = (f"it holds step {extra.get('step')} while the last committed step is "
                       f"{max(done) if done else 'none'}")
            else:
                self.resume = got
        if why is not None:
            print(f"  {unit.id}: not resuming from {self.path} ({why}); re-applying the edits", file=sys.stderr,
                  flush=True)

    def run(self, go: Callable[[Any], Any]) -> Any:
        """``go(resume)``: with the saved state, falling back to ``go(None)`` when it is refused."""
        if self.resume is None:
            return go(None)
        from editlens.edit.base import SequenceResumeError

        try:
            run = go(self.resume)
        except SequenceResumeError as e:
            print(f"  {self.unit.id}: not resuming from {self.path} ({e}); re-applying the edits", file=sys.stderr,
                  flush=True)
            return go(None)
        print(f"  {self.unit.id}: resumed at {self.resume['n_edits']} edits from {self.path}", file=sys.stderr,
              flush=True)
        return run

    def save(self, so_far: Any, step: int, final: bool) -> None:
        if self.path is None or final:
            return
        from editlens.edit.base import save_sequence

        save_sequence(so_far, self.path, unit=self.unit.id, step=int(step))

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            for folder in (self.path.parent, self.path.parent.parent):  # <store>.resume/<run id>/, then <store>.resume/
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty


def _rng_devices(lm: "LM") -> list:
    dev = getattr(lm, "device", None)
    if dev is not None and getattr(dev, "type", "cpu") == "cuda":
        return [dev]
    return []


# ============================================================================================ the driver
def _run_threads(ex: Any) -> int:
    """The torch intra-op thread count the run's computations use (a Ray task's ``num_cpus``, else this
    process's): on CPU, reductions split by thread count, so it is part of what makes results reproducible."""
    import torch

    return int(getattr(ex, "num_cpus", 0) or torch.get_num_threads())


def _resume_threads(st: Any, rid: str, ex: Any, progress: bool) -> int | None:
    """On resume with the local executor: use the thread count the run was started with (recorded as
    ``versions["torch_threads"]``), so the resumed units compute bit for bit what the first process would have.
    Returns the count to restore afterwards, or ``None`` when nothing was changed."""
    import torch

    if getattr(ex, "num_cpus", None):  # Ray tasks set their own count (num_cpus, recorded the same way)
        return None
    runs = st.runs()
    rec = runs.loc[runs["run_id"] == rid, "versions"]
    want = rec.iloc[0].get("torch_threads") if len(rec) and isinstance(rec.iloc[0], dict) else None
    have = torch.get_num_threads()
    if not want or int(want) == have:
        return None
    if progress:
        print(f"run {rid}: started with {int(want)} torch threads, this process has {have}; using {int(want)} so "
              "the resumed units give the same numbers", file=sys.stderr, flush=True)
    torch.set_num_threads(int(want))
    return have


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"runner": str(RUNNER_VERSION)}
    for pkg in ("editlens", "torch", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:  # pragma: no cover
            out[pkg] = "?"
    return out


def _open_store(store: "Store | str | Path | None", spec: Spec) -> tuple["Store", bool]:
    from editlens.runs.store import Store

    if isinstance(store, Store):
        return store, False
    path = Path(store) if store is not None else default_store_path(spec)
    return Store(path), True


class _Committer:
    """The driver's sink: writes each StepResult into the store (only the driver writes)."""

    def __init__(self, store: "Store", run_id: str, metas: Mapping[str, dict], progress: bool, total: int):
        self.store = store
        self.run_id = run_id
        self.metas = metas
        self.progress = progress
        self.total = total
        self.finished = 0
        self.streamed: dict[tuple[str, int], int] = {}  # rows appended so far per (unit, step) of a streamed step
        self.t0 = time.perf_counter()

    def __call__(self, r: StepResult) -> None:
        meta = self.metas[r.unit]
        if r.chunk:  # one chunk of a streamed evaluation: its own transaction, nothing marked
            self.store.append_rows(self.run_id, r.unit, r.rows)
            self.streamed[(r.unit, r.step)] = self.streamed.get((r.unit, r.step), 0) + len(r.rows)
            return
        n_rows = self.streamed.pop((r.unit, r.step), 0) if r.streamed else len(r.rows)
        if r.final:
            self.store.commit_unit(self.run_id, r.unit, r.rows, diagnostics=r.diagnostics, meta=meta, step=r.step)
            self.finished += 1
            if self.progress:
                print(f"[{self.finished}/{self.total}] {r.unit} done: {n_rows} rows at {r.n_edits} edits "
                      f"({time.perf_counter() - self.t0:.1f}s)", file=sys.stderr, flush=True)
        else:
            self.store.commit_step(self.run_id, r.unit, r.step, r.rows, diagnostics=r.diagnostics, meta=meta,
                                   n_edits=r.n_edits, state={"n_edits": r.n_edits, "step": r.step},
                                   replace_rows=not r.streamed)
            if self.progress:
                print(f"      {r.unit} checkpoint step {r.step} ({r.n_edits} edits): {n_rows} rows",
                      file=sys.stderr, flush=True)


def unit_meta(unit: Unit, spec: Spec, options: RunOptions) -> dict[str, Any]:
    """The metadata stored with a unit: :meth:`Unit.meta` plus the model and the evaluation sample size."""
    meta = unit.meta()
    meta["model"] = spec.model.name
    if spec.model.device_map is not None:  # only when set: the metadata of runs without a map does not change
        meta["device_map"] = spec.model.to_dict()["device_map"]
    meta["eval_cases"] = options.eval_size(unit)
    return meta


def unit_state_dir(store_path: str | Path, run_id: str) -> Path:
    """Where the local executor keeps the saved state of a run's unfinished sequential units:
    ``<store>.resume/<run id>/`` beside the store (emptied as units finish)."""
    p = Path(store_path)
    return p.with_name(p.name + ".resume") / run_id


def run_spec(spec_or_path: Spec | str | Path, store: "Store | str | Path | None" = None, executor: str | Any = "local",
             progress: bool = True, *, run_id: str | None = None, options: RunOptions | None = None,
             lm: "LM | None" = None, reuse_units: bool = False) -> str:
    """Run (or resume) an experiment spec into a results store; returns the run id.

    Args:
        spec_or_path: a :class:`Spec` or a spec file (``.toml`` / ``.yaml``).
        store: a :class:`~editlens.runs.store.Store`, a path, or ``None`` for :func:`default_store_path`.
        executor: ``"local"`` (in this process), ``"ray"`` (one Ray task per unit), or an executor object
            (see :mod:`editlens.runs.executors`).
        progress: print one line per finished unit / committed checkpoint to stderr.
        run_id: default :meth:`Spec.default_run_id` (a hash of the spec), so re-running a spec resumes it.
        options: :class:`RunOptions` (evaluation sample size of sequential units, baseline, batch tokens).
        lm: an already loaded model to use with the local executor (must be the spec's model, unedited).
        reuse_units: before running, copy into this run the units that other runs of the same store finished
            with the same work, model fingerprint, versions and runner options
            (:meth:`~editlens.runs.store.Store.reuse_units`): a spec that gains a method, dataset or seed keeps
            the units it had. Each copied unit is printed and marked in its diagnostics.

    Raises:
        SpecError: invalid spec (key and line named), StoreError: the run id exists with another spec/model,
        StoreBusyError: another run is writing the store (it holds :class:`~editlens.runs.store.StoreLock`).
    """
    from editlens.runs.executors import get_executor

    from editlens.runs.store import Store, StoreLock

    spec = prepare_spec(spec_or_path)
    options = (options or RunOptions()).for_spec(spec)
    restore_threads: int | None = None
    # one writing run per store: taken before any work (model loading included); a second run fails here at once
    lock = StoreLock(store.path if isinstance(store, Store) else
                     Path(store) if store is not None else default_store_path(spec)).acquire()
    try:
        ex = get_executor(executor, lm=lm)
        st, owned = _open_store(store, spec)
    except BaseException:
        lock.release()
        raise
    try:
        fingerprint = ex.prepare(spec, options)
        rid = run_id or spec.default_run_id()
        new_run = st.start_run(rid, {**spec.to_dict(), "runner": options.to_dict()},
                               {**_versions(), "torch_threads": _run_threads(ex)}, fingerprint, spec.seeds)
        if not new_run:
            restore_threads = _resume_threads(st, rid, ex, progress)
        units = spec.plan()
        metas = {u.id: unit_meta(u, spec, options) for u in units}
        if reuse_units:
            for uid, src in st.reuse_units(rid, metas).items():
                if progress:
                    print(f"  {uid}: reused from run {src} (same unit, model, versions and runner options)",
                          file=sys.stderr, flush=True)
        finished = st.finished_units(rid)
        todo = [u for u in units if u.id not in finished]
        done_steps = {u.id: {c.step for c in st.checkpoints(rid, u.id)} for u in todo}
        if progress:
            print(f"run {rid}: {len(units)} units, {len(units) - len(todo)} already done, {len(todo)} to run "
                  f"({ex.name} executor) -> {st.path}", file=sys.stderr, flush=True)
        for line in judge_endpoint_lines(spec, todo, options):  # what leaves this machine, always said
            print(f"judge endpoint: {line}", file=sys.stderr, flush=True)
        for u in todo:  # rows a streamed evaluation wrote before the run stopped, at no committed step, go
            dropped = st.start_unit(rid, u.id, metas[u.id], discard_partial=True)
            if dropped and progress:
                print(f"  {u.id}: deleted {dropped} rows of an evaluation that did not finish; redoing it",
                      file=sys.stderr, flush=True)
        if hasattr(ex, "resume_dir"):  # the local executor: sequential units save their state beside the store
            ex.resume_dir = unit_state_dir(st.path, rid)
        sink = _Committer(st, rid, metas, progress, len(todo))
        from editlens.progress import settings as progress_settings

        with progress_settings(quiet=not progress or None):  # bars inside units; off with progress=False
            ex.run(spec, todo, options, sink, done_steps=done_steps, progress=progress)
        return rid
    finally:
        if restore_threads is not None:
            import torch

            torch.set_num_threads(restore_threads)
        if owned:
            st.close()
        lock.release()


# ============================================================================================ python -m entry point
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m editlens.runs.runner SPEC [--store PATH] [--executor local|ray] [--eval-cases K]``."""
    p = argparse.ArgumentParser(prog="python -m editlens.runs.runner", description=run_spec.__doc__.splitlines()[0])
    p.add_argument("spec")
    p.add_argument("--store", default=None)
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--run-id", default=None)
    p.add_argument("--eval-cases", type=int, default=None)
    p.add_argument("--eval-chunk", type=int, default=None)
    p.add_argument("--truncate", choices=["left"], default=None)
    p.add_argument("--device-map", default=None)
    p.add_argument("--reuse-units", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(list(argv) if argv is not None else None)
    try:
        spec: Any = a.spec
        if a.device_map is not None:
            spec = with_device_map(load_validated_spec(a.spec), a.device_map)
        rid = run_spec(spec, a.store, a.executor, progress=not a.quiet, run_id=a.run_id,
                       options=RunOptions(eval_cases=a.eval_cases, truncate=a.truncate,
                                          eval_chunk=a.eval_chunk), reuse_units=a.reuse_units)
    except EditlensError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(rid)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
