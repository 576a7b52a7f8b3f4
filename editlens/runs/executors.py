"""Executors: where the units of a run execute. Only the driver (:func:`editlens.runs.runner.run_spec`) writes
the store; an executor hands it :class:`~editlens.runs.runner.StepResult` objects through a ``sink``.

* :class:`LocalExecutor` (``"local"``, the default): in this process; the model is loaded once and every unit
  runs on it in plan order (each unit leaves the weights bit-for-bit as it found them). Checkpoints of
  sequential units are committed as they are reached, so a killed run loses at most one evaluation.
* :class:`RayExecutor` (``"ray"``, optional extra: ``pip install editlens[ray]``): every unit is one Ray task
  that reserves ``num_gpus`` = 1 when the spec's model device is CUDA (``"auto"``: when the cluster has GPUs),
  loads the model and the dataset itself, runs the unit exactly as the local executor does, and returns its
  StepResults; the driver commits them as tasks finish (a sequential unit's checkpoints are committed when its
  task returns). Results equal the local executor's: base answers are computed per unit request set in both.
  Dataset files and the model must be readable from the workers (same paths). A streamed evaluation
  (``RunOptions.eval_chunk``) is refused: its rows go to the store chunk by chunk, which a task cannot do.

An executor has ``name``, ``prepare(spec, options) -> model fingerprint`` (loads or probes the model and checks
the spec's hyperparameters against it) and ``run(spec, units, options, sink, *, done_steps, progress)``.
"""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from editlens.errors import EditlensError, SpecError

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    from editlens.lm.load import LM
    from editlens.runs.runner import RunOptions, StepResult
    from editlens.runs.spec import Spec, Unit

__all__ = ["LocalExecutor", "RayExecutor", "get_executor", "load_spec_model", "EXECUTORS"]

EXECUTORS = ("local", "ray")


def _device_arg(device: str) -> str | None:
    return None if device in (None, "", "auto") else device


def _dtype_arg(dtype: str) -> str | None:
    return None if dtype in (None, "", "auto") else dtype


def prompt_format_of(spec: "Spec", lm: "LM") -> str:
    """The prompt format the run's edits and evaluations use: the spec's ``model.prompt_format`` resolved on the
    loaded model (``auto`` = chat when its tokenizer has a chat template, else raw; see
    :mod:`editlens.lm.prompting`). PromptFormatError for ``chat`` on a model without a chat template."""
    from editlens.lm.prompting import resolve_prompt_format

    return resolve_prompt_format(spec.model.prompt_format or "raw", lm.tokenizer, "model.prompt_format")


def load_spec_model(spec: "Spec", device: str | None = None) -> "LM":
    """Load the spec's model (``device`` overrides the spec's). With ``[model] device_map`` the model is spread
    over devices by accelerate (``offload_dir`` / ``max_memory`` passed along) and ``device`` is not used: the
    map places every module."""
    from editlens.lm.load import load_model

    placement = spec.model.load_kwargs()
    if placement:
        return load_model(spec.model.name, dtype=_dtype_arg(spec.model.dtype), **placement)
    return load_model(spec.model.name, device=device if device is not None else _device_arg(spec.model.device),
                      dtype=_dtype_arg(spec.model.dtype))


class LocalExecutor:
    """Run units one after the other in this process, on one model loaded once.

    Args:
        lm: an already loaded (unedited) model to use instead of loading the spec's.

    ``resume_dir`` (set by :func:`~editlens.runs.runner.run_spec` to a folder beside the store): where a sequential
    unit saves its state at each committed checkpoint, so that a killed run resumes there instead of re-applying
    its edits (see :func:`~editlens.runs.runner.execute_unit`).
    """

    name = "local"

    def __init__(self, lm: "LM | None" = None):
        self.lm = lm
        self.resume_dir: "Path | None" = None

    def prepare(self, spec: "Spec", options: "RunOptions") -> str:
        from editlens.runs.spec import check_methods

        if self.lm is None:
            self.lm = load_spec_model(spec)
        elif self.lm.fingerprint != self.lm.base_fingerprint:
            raise EditlensError("the model given to the runner is currently edited; undo its edits first")
        check_methods(spec, self.lm)
        prompt_format_of(spec, self.lm)  # 'chat' on a model without a chat template fails before any unit
        return self.lm.base_fingerprint

    def run(self, spec: "Spec", units: Sequence["Unit"], options: "RunOptions", sink: Callable[["StepResult"], None],
            *, done_steps: Mapping[str, set] | None = None, progress: bool = True) -> None:
        from editlens.runs.runner import BaseAnswers, dataset_cases, execute_unit

        assert self.lm is not None, "prepare() first"
        fmt = prompt_format_of(spec, self.lm)
        base = BaseAnswers(fmt, options.batch_tokens)
        data: dict[str, list] = {}
        for u in units:
            if u.dataset.name not in data:
                data[u.dataset.name] = dataset_cases(u.dataset)
            if progress:
                print(f"  running {u.id} ({u.method}, {u.regime}, {u.n_edits} edits, dataset {u.dataset.name}, "
                      f"seed {u.seed}{', sweep ' + str(u.sweep) if u.sweep else ''})", file=sys.stderr, flush=True)
            execute_unit(self.lm, u, data[u.dataset.name], options, sink, done_steps=(done_steps or {}).get(u.id, ()),
                         base_answers=base, prompt_format=fmt, resume_dir=self.resume_dir)


# ============================================================================================ Ray
def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise EditlensError("the ray executor needs Ray: pip install editlens[ray]  (or pip install ray)") from None
    return ray


def _task_device(spec: "Spec", num_gpus: float) -> str:
    dev = spec.model.device or "auto"
    if num_gpus > 0:
        return "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned
    return "cpu" if dev in ("auto", "") else dev


def _ray_prepare(spec: "Spec", device: str, threads: int | None) -> tuple[str | None, str | None]:
    """Ray task: load the model, check the spec's hyperparameters on it; (fingerprint, error message)."""
    import torch

    from editlens.runs.spec import check_methods

    if threads:
        torch.set_num_threads(threads)
    try:
        lm = load_spec_model(spec, device=device)
        check_methods(spec, lm)
        prompt_format_of(spec, lm)
    except EditlensError as e:
        return None, f"{type(e).__name__}: {e}"
    return lm.base_fingerprint, None


def _ray_unit(spec: "Spec", unit: "Unit", options: "RunOptions", done: Sequence[int], device: str,
              threads: int | None) -> tuple[list, str | None]:
    """Ray task: run one unit on a freshly loaded model; (StepResults, error message)."""
    import torch

    from editlens.runs.executors import load_spec_model as _load, prompt_format_of as _fmt
    from editlens.runs.runner import BaseAnswers, dataset_cases, execute_unit

    if threads:
        torch.set_num_threads(threads)
    out: list = []
    try:
        lm = _load(spec, device=device)
        fmt = _fmt(spec, lm)
        execute_unit(lm, unit, dataset_cases(unit.dataset), options, out.append, done_steps=done,
                     base_answers=BaseAnswers(fmt, options.batch_tokens), prompt_format=fmt)
    except EditlensError as e:
        return out, f"{type(e).__name__}: {e}"
    return out, None


class RayExecutor:
    """One Ray task per unit (see the module docstring).

    Args:
        address: Ray cluster address (``None``: connect to ``RAY_ADDRESS`` or start a local instance).
        num_cpus: CPUs reserved per task (also the torch thread count of the task).
        init_kwargs: extra arguments for ``ray.init`` when this executor starts Ray.
        max_retries: how often a unit whose worker process died is run again (from its start) before the run fails.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int = 1, init_kwargs: Mapping[str, Any] | None = None,
                 max_retries: int = 3):
        self.ray = _import_ray()
        self.address = address
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
            raise EditlensError(f"ray executor: max_retries must be an integer >= 0, got {max_retries!r}")
        self.max_retries = max_retries
        self.num_cpus = int(num_cpus)
        self.init_kwargs = dict(init_kwargs or {})
        self.num_gpus = 0.0
        self._started = False

    def _init(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            kw = {"ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": False}
            kw.update(self.init_kwargs)
            if self.address is not None:
                kw["address"] = self.address
            ray.init(**kw)
            self._started = True

    def shutdown(self) -> None:
        """Stop the Ray instance if this executor started it."""
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
            self._started = False

    def _gpus_for(self, spec: "Spec") -> float:
        dev = spec.model.device or "auto"
        if dev.startswith("cuda"):
            return 1.0
        if dev == "auto":
            return 1.0 if self.ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        return 0.0

    def prepare(self, spec: "Spec", options: "RunOptions") -> str:
        if getattr(options, "eval_chunk", None) is not None:
            raise EditlensError(
                f"eval_chunk = {options.eval_chunk}: a streamed evaluation writes each chunk's rows to the store as "
                "it is computed, and only the driver writes the store, while a Ray task hands its unit's results "
                "back when it ends (they would all be held in memory anyway); run a streamed evaluation with the "
                "local executor, or drop [regime] eval_chunk / --eval-chunk to use Ray")
        self._init()
        self.num_gpus = self._gpus_for(spec)
        fn = self.ray.remote(_ray_prepare).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus)
        fp, err = self.ray.get(fn.remote(spec, _task_device(spec, self.num_gpus), self.num_cpus))
        if err is not None:
            raise SpecError(err.split(": ", 1)[1]) if err.startswith("SpecError") else EditlensError(err)
        return fp

    def run(self, spec: "Spec", units: Sequence["Unit"], options: "RunOptions", sink: Callable[["StepResult"], None],
            *, done_steps: Mapping[str, set] | None = None, progress: bool = True) -> None:
        ray = self.ray
        # a task whose worker dies (killed, out of memory, node lost) is run again from the start of its unit, up to
        # max_retries times: only the driver writes the store and a unit's results come back with its task, so a
        # retried unit adds nothing twice. Errors raised by editlens inside a task are returned, never retried.
        fn = ray.remote(_ray_unit).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                           max_retries=self.max_retries, retry_exceptions=False)
        device = _task_device(spec, self.num_gpus)
        pending = {fn.remote(spec, u, options, sorted((done_steps or {}).get(u.id, ())), device, self.num_cpus): u
                   for u in units}
        t0 = time.perf_counter()
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    u = pending.pop(ref)
                    try:
                        results, err = ray.get(ref)
                    except Exception as e:  # a crash inside the task (not an EditlensError)
                        raise EditlensError(f"ray task of unit {u.id} failed: {e}") from None
                    for r in results:
                        sink(r)
                    if err is not None:
                        raise EditlensError(f"unit {u.id}: {err}")
                    if progress:
                        print(f"  ray: unit {u.id} returned {len(results)} step(s) "
                              f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)


def get_executor(executor: str | Any = "local", *, lm: "LM | None" = None) -> Any:
    """An executor object for a name (``"local"``, ``"ray"``) or the object itself."""
    if not isinstance(executor, str):
        return executor
    if executor == "local":
        return LocalExecutor(lm)
    if executor == "ray":
        if lm is not None:
            raise EditlensError("a preloaded model cannot be shipped to the ray executor; pass lm=None")
        return RayExecutor()
    raise EditlensError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
