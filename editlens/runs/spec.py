"""Experiment specs: the schema of a TOML or YAML run spec, its validation, and its expansion into units of work.

A spec says which model, datasets, methods (with hyperparameter overrides), regime (batch sizes or a
sequential schedule with checkpoints), metrics, sweep axes and seeds to run; see ``docs/experiments.md``
for the full format. Every validation error is a :class:`editlens.errors.SpecError` whose message names the key
**and the line** of the file (``spec.toml:12: regime.checkpoints: ...``; the line finder is
:mod:`editlens.runs.spec_lines`); all problems found are reported at once.

Validation lives here, in one place:

* :func:`load_spec` / :func:`parse_spec` — the structure (types, required keys, ranges, sweep axes);
* :func:`check_metrics` — every metric name resolves in the metric registry;
* :func:`check_methods` — every method is registered, every hyperparameter key exists, the values are valid
  (with a model: against the model's defaults, for every sweep point), ``evk_align`` is valid and the method
  takes it;
* :func:`check_model_layers` — every layer index fits the model's depth (read from its config, no weights);
* :func:`load_validated_spec` / :func:`validate_spec` — all of the above, which is what ``editlens bench`` and
  :func:`editlens.runs.runner.run_spec` use (executors call :func:`check_methods` again with the loaded model).

:meth:`Spec.plan` expands methods × sweep points × datasets × seeds × regime sizes into :class:`Unit`s
with stable ids (a hash of the unit's content) and the metadata that the results store keeps
(:meth:`Unit.meta`). :meth:`Spec.describe_plan` is the text for ``--dry-run``.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from editlens.errors import EditlensError, HParamsError, MethodError, MetricError, SpecError
from editlens.runs.spec_lines import KeyPath, Lines, key_str, toml_lines, yaml_lines  # noqa: F401 (re-exported)

try:  # Python 3.11+
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as _toml  # type: ignore[no-redef]

#: a whole-spec check (e.g. the method registry, the model's depth): raises SpecError (with ``issues``) or any
#: EditlensError; it may see a partial spec (``model``/``regime`` None) when other problems were found
SpecCheck = Callable[["Spec"], None]

DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")
#: ``model.prompt_format``: the values of :data:`editlens.lm.prompting.PROMPT_FORMATS` (spelled out here to keep this
#: module import-light; a test checks they are the same). Default ``raw``; ``auto`` = chat when the model's
#: tokenizer has a chat template, else raw, resolved when the model is loaded
PROMPT_FORMATS = ("raw", "chat", "auto")
REGIME_KINDS = ("batch", "sequential")
_TOP_KEYS = ("name", "description", "store", "model", "datasets", "methods", "regime", "metrics", "sweep",
             "seeds", "report")
_MODEL_KEYS = ("name", "device", "dtype", "prompt_format", "device_map", "offload_dir", "max_memory")
_DATASET_KEYS = ("name", "path", "format", "limit", "sample", "seed")
_METHOD_KEYS = ("name", "label", "hparams", "evk_align", "trained", "train")
_TRAIN_KEYS = ("data", "synthetic", "val", "limit", "seed", "hparams")
_REPORT_KEYS = ("title", "html", "out", "ranges", "reference", "groups", "plots", "ref")


# ============================================================================ spec dataclasses
@dataclass(frozen=True)
class ModelSpec:
    """The model to edit: a built-in name, a HF id or a local path (resolved against the spec's folder).

    ``device_map`` / ``offload_dir`` / ``max_memory`` spread the model over several devices
    (:func:`editlens.lm.load.load_model`'s arguments of those names; ``offload_dir`` is absolute, resolved against
    the spec's folder). They are ``None`` when not set and then left out of :meth:`to_dict`, so the fingerprints
    (default run ids, unit ids) of specs without them do not change.
    """

    name: str
    device: str = "auto"
    dtype: str = "auto"
    prompt_format: str = "raw"
    device_map: Any = None
    offload_dir: str | None = None
    max_memory: dict[Any, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The model as plain data (the placement keys only when set)."""
        d = {"name": self.name, "device": self.device, "dtype": self.dtype, "prompt_format": self.prompt_format}
        for k in ("device_map", "offload_dir", "max_memory"):
            v = getattr(self, k)
            if v is not None:
                d[k] = {str(kk): vv for kk, vv in v.items()} if isinstance(v, Mapping) else v  # JSON: str keys
        return d

    def load_kwargs(self) -> dict[str, Any]:
        """The placement arguments of :func:`~editlens.lm.load.load_model` that are set (``{}`` without a map)."""
        if self.device_map is None:
            return {}
        kw: dict[str, Any] = {"device_map": self.device_map if isinstance(self.device_map, str)
                              else dict(self.device_map)}
        if self.offload_dir is not None:
            kw["offload_dir"] = self.offload_dir
        if self.max_memory is not None:
            kw["max_memory"] = dict(self.max_memory)
        return kw


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: a file/folder (``path``) or a synthetic set (``synthetic`` cases).

    ``limit`` keeps the first N records, then ``sample`` draws N of them at random with ``seed``.
    ``path`` is absolute (resolved against the spec's folder); ``source`` is the text written in the spec.
    """

    name: str
    source: str
    path: Path | None = None
    synthetic: int | None = None
    format: str = "auto"
    limit: int | None = None
    sample: int | None = None
    seed: int = 0

    @property
    def max_cases(self) -> int | None:
        """The most cases this dataset can yield, when known without reading it."""
        bounds = [b for b in (self.synthetic, self.limit, self.sample) if b is not None]
        return min(bounds) if bounds else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "path": None if self.path is None else str(self.path),
                "synthetic": self.synthetic, "format": self.format, "limit": self.limit, "sample": self.sample,
                "seed": self.seed}


@dataclass(frozen=True)
class MethodSpec:
    """One method configuration: registry ``name``, unique ``label`` (default: the name), overrides."""

    name: str
    label: str
    hparams: dict[str, Any] = field(default_factory=dict)
    evk_align: dict[str, Any] | None = None
    #: trained methods (mend, malmen, ke, serac): ``{"path": <absolute dir>, "source": <as written>}`` for a saved
    #: editor (``trained = "DIR"``), or ``{"train": {...}}`` for an editor the run trains and caches
    #: (``[methods.train]``: ``data``/``synthetic``, ``val``, ``limit``, ``seed``, ``hparams``); ``None`` otherwise
    trained: dict[str, Any] | None = None


@dataclass(frozen=True)
class RegimeSpec:
    """``batch``: one unit per size in ``sizes`` (all edits applied at once). ``sequential``: edits applied
    ``batch_size`` at a time, evaluated after ``checkpoints`` edits (cumulative counts), each time on the unit's
    first ``eval_cases`` cases (``None``: as many as the first checkpoint; ``--eval-cases`` of ``editlens bench``
    overrides it).

    ``eval_chunk`` (both kinds): evaluate at most this many cases at a time and write each chunk's rows to the
    store at once (:class:`editlens.runs.runner.RunOptions`; ``None``: every case of an evaluation at once)."""

    kind: str
    sizes: tuple[int, ...] = ()
    checkpoints: tuple[int, ...] = ()
    batch_size: int = 1
    eval_cases: int | None = None
    eval_chunk: int | None = None


@dataclass(frozen=True)
class Unit:
    """One independent piece of work: a method at one hyperparameter point on one dataset with one seed
    and one regime size. ``id`` is stable: a hash of everything else (see :meth:`content`)."""

    id: str
    method: str
    label: str
    hparams: dict[str, Any]
    evk_align: dict[str, Any] | None
    dataset: DatasetSpec
    seed: int
    regime: str
    n_edits: int
    checkpoints: tuple[int, ...]
    batch_size: int
    sweep: dict[str, Any]
    metrics: tuple[str, ...]
    #: the trained editor of a trained method (see :attr:`MethodSpec.trained`), else ``None``
    trained: dict[str, Any] | None = None

    @property
    def steps(self) -> tuple[int, ...]:
        """Evaluation points in number of edits (batch: ``(n_edits,)``)."""
        return self.checkpoints

    def meta(self) -> dict[str, Any]:
        """JSON-able metadata for the store (``units.meta_json``; columns of ``Store.rows_with_meta``)."""
        return {"method": self.method, "label": self.label, "hparams": dict(self.hparams),
                "evk_align": self.evk_align, "dataset": self.dataset.name, "dataset_source": self.dataset.source,
                "seed": self.seed, "regime": self.regime, "n_edits": self.n_edits,
                "checkpoints": list(self.checkpoints), "batch_size": self.batch_size, "sweep": dict(self.sweep),
                "metrics": list(self.metrics), **({"trained": _trained_identity(self.trained)} if self.trained
                                                  else {})}


def _trained_identity(trained: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a unit's trained editor in its id and metadata: the training settings (data by source and
    content hash), or the saved editor's ``sha256`` (from its ``editor.json``, so the same editor moved elsewhere
    keeps the id and another editor at the same path does not)."""
    if "train" in trained:
        t = dict(trained["train"])
        t.pop("data_path", None)
        t.pop("val_path", None)
        return {"train": t}
    sha = None
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        sha = json.loads((Path(trained["path"]) / "editor.json").read_text()).get("sha256")
    return {"source": trained.get("source"), "sha256": sha}


def _content_hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


@dataclass
class Spec:
    """A validated experiment spec. Build it with :func:`load_spec` or :func:`parse_spec`."""

    model: ModelSpec
    datasets: list[DatasetSpec]
    methods: list[MethodSpec]
    regime: RegimeSpec
    metrics: list[str]
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    report: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    description: str | None = None
    store: Path | None = None
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    lines: Lines = field(default_factory=Lines, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-able data (what the store keeps in ``runs.spec_json``)."""
        return {
            "name": self.name, "description": self.description,
            "model": self.model.to_dict(),
            "datasets": [d.to_dict() for d in self.datasets],
            "methods": [{"name": m.name, "label": m.label, "hparams": m.hparams, "evk_align": m.evk_align,
                         **({"trained": _trained_identity(m.trained)} if m.trained else {})}
                        for m in self.methods],
            "regime": {"kind": self.regime.kind, "sizes": list(self.regime.sizes),
                       "checkpoints": list(self.regime.checkpoints), "batch_size": self.regime.batch_size,
                       # only when set: the fingerprints (default run ids) of specs without it do not change
                       **({"eval_cases": self.regime.eval_cases} if self.regime.eval_cases is not None else {}),
                       **({"eval_chunk": self.regime.eval_chunk} if self.regime.eval_chunk is not None else {})},
            "metrics": list(self.metrics), "sweep": {k: list(v) for k, v in self.sweep.items()},
            "seeds": list(self.seeds), "report": self.report,
        }

    def fingerprint(self) -> str:
        """A short hash of :meth:`to_dict` (a default run id suffix)."""
        return _content_hash(self.to_dict())

    def default_run_id(self) -> str:
        """``<name or file stem>-<fingerprint>``."""
        base = self.name or (self.source.stem if self.source else "run")
        return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', base)}-{self.fingerprint()}"

    def sweep_points(self, method: MethodSpec) -> list[dict[str, Any]]:
        """Cartesian product of the sweep axes of ``method`` (``[{}]`` when it has none), in spec order."""
        axes = [(k, v) for k, v in self.sweep.items() if k.split(".", 1)[0] == method.label]
        if not axes:
            return [{}]
        return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]

    def plan(self) -> list[Unit]:
        """Expand methods × sweep points × datasets × seeds × regime sizes into units (spec order)."""
        units: list[Unit] = []
        if self.regime.kind == "batch":
            regimes = [(n, (n,), n) for n in self.regime.sizes]
        else:
            cps = tuple(self.regime.checkpoints)
            regimes = [(cps[-1], cps, self.regime.batch_size)]
        for m in self.methods:
            for point in self.sweep_points(m):
                hp, evk = merge_point(m, point)
                for ds in self.datasets:
                    for seed in self.seeds:
                        for n, cps, bs in regimes:
                            content = {"method": m.name, "label": m.label, "hparams": hp, "evk_align": evk,
                                       "dataset": {k: v for k, v in ds.to_dict().items() if k != "path"},
                                       "seed": seed, "regime": self.regime.kind, "n_edits": n,
                                       "checkpoints": list(cps), "batch_size": bs, "metrics": list(self.metrics),
                                       "model": self.model.to_dict()}
                            if m.trained:  # only then: the ids of units without a trained editor do not change
                                content["trained"] = _trained_identity(m.trained)
                            uid = f"{m.label}-{_content_hash(content)}"
                            units.append(Unit(uid, m.name, m.label, hp, evk, ds, seed, self.regime.kind, n, cps,
                                              bs, dict(point), tuple(self.metrics), m.trained))
        return units

    def plan_summary(self) -> dict[str, Any]:
        """Counts for ``--dry-run``: units, edits, evaluation points, metric evaluations, per method."""
        units = self.plan()
        per_method: dict[str, dict[str, int]] = {}
        for u in units:
            d = per_method.setdefault(u.label, {"units": 0, "edits": 0, "evaluations": 0})
            d["units"] += 1
            d["edits"] += u.n_edits
            d["evaluations"] += len(u.steps)
        evaluations = sum(len(u.steps) for u in units)
        return {"units": len(units), "edits": sum(u.n_edits for u in units), "evaluations": evaluations,
                "metric_evaluations": evaluations * len(self.metrics),
                "case_evaluations": sum(sum(u.steps) for u in units), "per_method": per_method}

    def describe_plan(self) -> str:
        """A human-readable description of the plan (for ``--dry-run``)."""
        s = self.plan_summary()
        lines = [f"spec: {self.source or '<string>'}" + (f" ({self.name})" if self.name else ""),
                 f"model: {self.model.name} (device={self.model.device}, dtype={self.model.dtype}"
                 + (f", device_map={self.model.device_map!r}" if self.model.device_map is not None else "")
                 + (f", offload_dir={self.model.offload_dir}" if self.model.offload_dir is not None else "")
                 + (f", max_memory={self.model.max_memory!r}" if self.model.max_memory is not None else "") + ")",
                 "datasets: " + ", ".join(f"{d.name} [{d.source}]" for d in self.datasets),
                 f"regime: {self.regime.kind} " + (
                     f"sizes={list(self.regime.sizes)}" if self.regime.kind == "batch"
                     else f"checkpoints={list(self.regime.checkpoints)} batch_size={self.regime.batch_size}"),
                 f"metrics: {', '.join(self.metrics)}", f"seeds: {self.seeds}"]
        if self.sweep:
            lines.append("sweep: " + "; ".join(f"{k} = {v}" for k, v in self.sweep.items()))
        lines.append(f"units: {s['units']} = " + " + ".join(
            f"{m.label}: {len(self.sweep_points(m))} point(s) x {len(self.datasets)} dataset(s) x "
            f"{len(self.seeds)} seed(s) x {len(self.regime.sizes) if self.regime.kind == 'batch' else 1} size(s)"
            for m in self.methods))
        lines.append(f"edits: {s['edits']} in total")
        lines.append(f"evaluation points: {s['evaluations']} ({s['metric_evaluations']} metric evaluations, "
                     f"{s['case_evaluations']} case evaluations)")
        for label, d in s["per_method"].items():
            lines.append(f"  {label}: {d['units']} units, {d['edits']} edits, {d['evaluations']} evaluation points")
        return "\n".join(lines)


def merge_point(method: MethodSpec, point: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Apply one sweep point (``{"label.param": v}``) to a method's overrides.

    ``label.evk_align.<key>`` axes go into the method's ``evk_align`` table; every other axis sets
    ``hparams[param]``. Returns ``(hparams, evk_align)``.
    """
    hp = dict(method.hparams)
    evk = None if method.evk_align is None else dict(method.evk_align)
    for axis, v in point.items():
        param = axis.split(".", 1)[1]
        if param.startswith("evk_align."):
            evk = dict(evk or {})
            evk[param[len("evk_align."):]] = v
        else:
            hp[param] = v
    return hp, evk


# ============================================================================ loading and validation
@dataclass(frozen=True)
class SpecIssue:
    key: str
    line: int | None
    message: str


class _Checker:
    def __init__(self, source: str, lines: Lines) -> None:
        self.source = source
        self.lines = lines
        self.issues: list[SpecIssue] = []

    def err(self, path: Sequence[Any], message: str, line: int | None = None) -> None:
        if line is None:
            line = self.lines.lookup(path)
        self.issues.append(SpecIssue(key_str(path) or "<top level>", line, message))

    def raise_if_any(self) -> None:
        if not self.issues:
            return
        msgs = [f"{self.source}:{i.line}: {i.key}: {i.message}" if i.line else f"{self.source}: {i.key}: {i.message}"
                for i in self.issues]
        text = msgs[0] if len(msgs) == 1 else f"{len(msgs)} problems in spec {self.source}:\n  " + "\n  ".join(msgs)
        e = SpecError(text)
        e.issues = list(self.issues)  # type: ignore[attr-defined]
        e.key = self.issues[0].key  # type: ignore[attr-defined]
        e.line = self.issues[0].line  # type: ignore[attr-defined]
        e.path = self.source  # type: ignore[attr-defined]
        raise e

    # -- typed getters: return the value or None (after recording an error)
    def table(self, d: Mapping, path: KeyPath, allowed: Sequence[str]) -> bool:
        node = _get(d, path)
        if not isinstance(node, Mapping):
            self.err(path, f"must be a table, got {_tname(node)}")
            return False
        for k in node:
            if k not in allowed:
                hint = _close(str(k), allowed)
                if path and k in _TOP_KEYS:
                    hint = (f" ({k!r} is a top-level key: in TOML, write it before the first [table] header, "
                            "or it belongs to the table above it)")
                self.err(path + (k,), f"unknown key{hint}; allowed keys: {', '.join(allowed)}")
        return True

    def string(self, v: Any, path: KeyPath, choices: Sequence[str] | None = None) -> str | None:
        if not isinstance(v, str) or not v.strip():
            self.err(path, f"must be a non-empty string, got {_tname(v)} {v!r}")
            return None
        if choices is not None and v not in choices:
            self.err(path, f"must be one of {', '.join(choices)}; got {v!r}")
            return None
        return v

    def pos_int(self, v: Any, path: KeyPath, minimum: int = 1) -> int | None:
        if isinstance(v, bool) or not isinstance(v, int):
            self.err(path, f"must be an integer, got {_tname(v)} {v!r}")
            return None
        if v < minimum:
            self.err(path, f"must be >= {minimum}, got {v}")
            return None
        return v

    def int_list(self, v: Any, path: KeyPath, minimum: int = 1, unique: bool = True) -> list[int] | None:
        if not isinstance(v, list) or not v:
            self.err(path, f"must be a non-empty list of integers, got {_tname(v)} {v!r}")
            return None
        out = []
        for i, x in enumerate(v):
            if isinstance(x, bool) or not isinstance(x, int):
                self.err(path + (i,), f"must be an integer, got {_tname(x)} {x!r}")
                return None
            if x < minimum:
                self.err(path + (i,), f"must be >= {minimum}, got {x}")
                return None
            out.append(x)
        if unique and len(set(out)) != len(out):
            self.err(path, f"has duplicate values {sorted({x for x in out if out.count(x) > 1})}")
            return None
        return out


def _get(d: Any, path: KeyPath) -> Any:
    for p in path:
        d = d[p]
    return d


def _tname(v: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "a boolean", type(None): "nothing"}.get(type(v), type(v).__name__)


def _close(word: str, choices: Sequence[str]) -> str:
    import difflib

    m = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {m[0]!r}?)" if m else ""


def load_spec(path: str | Path, *, checks: Sequence[SpecCheck] = ()) -> Spec:
    """Read a spec file (``.toml``, ``.yaml`` or ``.yml``) and validate its structure (and ``checks``). Raises
    :class:`SpecError` listing every problem found, each as ``file:line: key: ...``. The full validation, with the
    metric and method registries and the model's depth, is :func:`load_validated_spec`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise SpecError(f"spec {path}: unknown spec format {path.suffix!r}; use .toml, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"spec {path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"spec {path}: not UTF-8 text: {e}") from None
    return parse_spec(text, "toml" if suffix == ".toml" else "yaml", base_dir=path.resolve().parent,
                      source=path, checks=checks)


def parse_spec(text: str, fmt: str = "toml", *, base_dir: str | Path = ".", source: str | Path | None = None,
               checks: Sequence[SpecCheck] = ()) -> Spec:
    """Parse and validate spec text (``fmt`` ``"toml"`` or ``"yaml"``); relative paths use ``base_dir``.

    All problems are collected before raising: the structural ones, then those of each of ``checks`` (which also
    run when the structure has problems, on what could be parsed), in one :class:`SpecError` whose ``issues``
    lists them (file order).
    """
    src = str(source) if source is not None else f"<{fmt} spec>"
    if fmt == "toml":
        try:
            data = _toml.loads(text)
        except _toml.TOMLDecodeError as e:
            raise SpecError(f"{src}: invalid TOML: {e}") from None
        lines = toml_lines(text)
        dups: list[tuple[KeyPath, int]] = []
    elif fmt == "yaml":
        import yaml

        try:
            data = yaml.safe_load(text)
            lines, dups = yaml_lines(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise SpecError(f"{src}{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    else:
        raise SpecError(f"{src}: unknown spec format {fmt!r}; use 'toml' or 'yaml'")
    if data is None:
        data = {}
    ck = _Checker(src, lines)
    for p, ln in dups:
        ck.err(p, "duplicate key", line=ln)
    if not isinstance(data, dict):
        ck.err((), f"the spec must be a table/mapping at the top level, got {_tname(data)}", line=1)
        ck.raise_if_any()
    spec = _validate(data, ck, Path(base_dir), Path(source) if source is not None else None)
    partial = bool(ck.issues)
    n_structural = len(ck.issues)
    try:
        _run_checks(ck, spec, checks)
    except Exception:
        if not partial:
            raise
        # a check tripping over a partial spec: the structural problems are what the user must fix first
        del ck.issues[n_structural:]
    if ck.issues:
        ck.issues[:] = sorted(dict.fromkeys(ck.issues), key=lambda i: (i.line is None, i.line or 0))
    ck.raise_if_any()
    return spec


_SIZE_RE = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*$", re.IGNORECASE)
_MEM_DEVICE_RE = re.compile(r"^(\d+|cpu|disk|mps|xpu|cuda:\d+)$")


def _placement(m: Mapping[str, Any], ck: _Checker, base: Path, device: str) -> tuple[Any, str | None, dict | None]:
    """``[model] device_map / offload_dir / max_memory``: checked (errors name the key), ``offload_dir`` resolved
    against the spec's folder, ``max_memory`` keys that are GPU indices made integers."""
    dmap = m.get("device_map")
    if "device_map" in m:
        from editlens.lm.placement import device_map_problem

        problem = device_map_problem(dmap) if isinstance(dmap, (str, Mapping)) else (
            f"must be a string such as \"auto\" or a table {{module path = device}}, got {_tname(dmap)} {dmap!r}")
        if problem is not None:
            ck.err(("model", "device_map"), problem)
            dmap = None
        elif device != "auto":
            ck.err(("model", "device_map"), f"a device map places every module itself: leave model.device unset "
                                            f"(it is {device!r})")
            dmap = None
        elif isinstance(dmap, Mapping):
            dmap = dict(dmap)
    offload = None
    if "offload_dir" in m:
        v = ck.string(m["offload_dir"], ("model", "offload_dir"))
        if v is not None:
            offload = str((base / Path(v).expanduser()).resolve())
            if Path(offload).exists() and not Path(offload).is_dir():
                ck.err(("model", "offload_dir"), f"{offload} exists and is not a folder")
                offload = None
    mem = None
    if "max_memory" in m:
        v = m["max_memory"]
        if not isinstance(v, Mapping) or not v:
            ck.err(("model", "max_memory"), "must be a non-empty table {device = size} such as "
                                            f"{{0 = \"10GiB\", cpu = \"30GiB\"}}, got {_tname(v)} {v!r}")
        else:
            mem = {}
            for key, size in v.items():
                if not _MEM_DEVICE_RE.match(str(key)):
                    ck.err(("model", "max_memory", key), "not a device: use a GPU index (\"0\"), cpu, disk, mps, "
                                                         "xpu or cuda:N")
                    continue
                ok = (isinstance(size, int) and not isinstance(size, bool) and size > 0) or (
                    isinstance(size, str) and _SIZE_RE.match(size) is not None)
                if not ok:
                    ck.err(("model", "max_memory", key), f"must be a number of bytes > 0 or a size such as "
                                                         f"\"10GiB\" / \"500MB\", got {_tname(size)} {size!r}")
                    continue
                mem[int(key) if str(key).isdigit() else str(key)] = size.strip() if isinstance(size, str) else size
    if dmap is None and "device_map" not in m:
        for k in ("offload_dir", "max_memory"):
            if k in m:
                ck.err(("model", k), "only used with model.device_map (e.g. device_map = \"auto\")")
        return None, None, None
    return dmap, offload, mem or None


def _validate(d: dict, ck: _Checker, base: Path, source: Path | None) -> Spec | None:
    for k in d:
        if k not in _TOP_KEYS:
            ck.err((k,), f"unknown top-level key{_close(str(k), _TOP_KEYS)}; allowed: {', '.join(_TOP_KEYS)}")
    for req in ("model", "datasets", "methods", "regime", "metrics"):
        if req not in d:
            ck.err((req,), "required key is missing", line=1)
    name = ck.string(d["name"], ("name",)) if "name" in d else None
    description = d.get("description")
    if description is not None and not isinstance(description, str):
        ck.err(("description",), "must be a string")
    store = None
    if "store" in d and ck.string(d["store"], ("store",)):
        store = (base / d["store"]).resolve()

    # ---- model
    model = None
    if "model" in d:
        if isinstance(d["model"], str):
            m = {"name": d["model"]}
        elif ck.table(d, ("model",), _MODEL_KEYS):
            m = d["model"]
        else:
            m = None
        if m is not None:
            mname = ck.string(m.get("name"), ("model", "name")) if "name" in m else None
            if "name" not in m:
                ck.err(("model", "name"), "required key is missing", line=ck.lines.lookup(("model",)))
            device = ck.string(m.get("device", "auto"), ("model", "device")) or "auto"
            if device != "auto":
                from editlens.lm.load import device_problem

                problem = device_problem(device)
                if problem is not None:
                    ck.err(("model", "device"), problem)
            dtype = ck.string(m.get("dtype", "auto"), ("model", "dtype"), DTYPES) or "auto"
            pfmt = ck.string(m.get("prompt_format", "raw"), ("model", "prompt_format")) or "raw"
            if pfmt not in PROMPT_FORMATS:
                ck.err(("model", "prompt_format"), "must be one of " + ", ".join(repr(v) for v in PROMPT_FORMATS)
                       + f" (auto = chat when the model's tokenizer has a chat template, else raw); got {pfmt!r}")
                pfmt = "raw"
            if mname:
                local = base / mname
                if mname.startswith("~"):
                    mname = str(Path(mname).expanduser())
                elif not mname.startswith("/") and (mname.startswith(".") or local.exists()):
                    mname = str(local.resolve())
                from editlens.lm.load import model_name_problem

                problem = model_name_problem(mname)
                if problem is not None:
                    ck.err(("model", "name") if isinstance(m, dict) and m is d["model"] else ("model",), problem)
                model = ModelSpec(mname, device, dtype, pfmt, *_placement(m, ck, base, device))

    # ---- datasets
    datasets: list[DatasetSpec] = []
    if "datasets" in d:
        v = d["datasets"]
        if isinstance(v, dict):
            v = [v]
            d["datasets"] = v
        if not isinstance(v, list) or not v:
            ck.err(("datasets",), f"must be a non-empty list of tables ([[datasets]]), got {_tname(v)}")
        else:
            for i, _ in enumerate(v):
                ds = _dataset(d, ("datasets", i), ck, base)
                if ds is not None:
                    datasets.append(ds)
            names = [x.name for x in datasets]
            for i, x in enumerate(datasets):
                if names.count(x.name) > 1 and names.index(x.name) != i:
                    ck.err(("datasets", i), f"dataset name {x.name!r} is used twice; give one of them a `name`")

    # ---- methods
    methods: list[MethodSpec] = []
    if "methods" in d:
        v = d["methods"]
        if not isinstance(v, list) or not v:
            ck.err(("methods",), f"must be a non-empty list of tables ([[methods]]), got {_tname(v)}")
        else:
            for i, _ in enumerate(v):
                ms = _method(d, ("methods", i), ck, base)
                if ms is not None:
                    methods.append(ms)
            labels = [x.label for x in methods]
            for i, x in enumerate(methods):
                if labels.count(x.label) > 1 and labels.index(x.label) != i:
                    ck.err(("methods", i), f"method label {x.label!r} is used twice; give each configuration a "
                                           "distinct `label`")

    # ---- regime
    regime = None
    if "regime" in d and ck.table(d, ("regime",), ("kind", "sizes", "checkpoints", "batch_size", "eval_cases",
                                                   "eval_chunk")):
        r = d["regime"]
        chunk = ck.pos_int(r["eval_chunk"], ("regime", "eval_chunk")) if "eval_chunk" in r else None
        kind = ck.string(r.get("kind"), ("regime", "kind"), REGIME_KINDS) if "kind" in r else None
        if "kind" not in r:
            ck.err(("regime", "kind"), "required key is missing (batch or sequential)",
                   line=ck.lines.lookup(("regime",)))
        if kind == "batch":
            for k in ("checkpoints", "batch_size", "eval_cases"):
                if k in r:
                    ck.err(("regime", k), f"only for kind = \"sequential\"; a batch regime uses `sizes`")
            if "sizes" not in r:
                ck.err(("regime", "sizes"), "required for kind = \"batch\" (e.g. sizes = [100, 1000])",
                       line=ck.lines.lookup(("regime",)))
            else:
                sizes = ck.int_list(r["sizes"], ("regime", "sizes"))
                if sizes:
                    regime = RegimeSpec("batch", sizes=tuple(sizes), eval_chunk=chunk)
        elif kind == "sequential":
            if "sizes" in r:
                ck.err(("regime", "sizes"), "only for kind = \"batch\"; a sequential regime uses `checkpoints`")
            bs = ck.pos_int(r.get("batch_size", 1), ("regime", "batch_size"))
            k_eval = ck.pos_int(r["eval_cases"], ("regime", "eval_cases")) if "eval_cases" in r else None
            if "checkpoints" not in r:
                ck.err(("regime", "checkpoints"), "required for kind = \"sequential\" (e.g. [1, 10, 100])",
                       line=ck.lines.lookup(("regime",)))
            else:
                cps = ck.int_list(r["checkpoints"], ("regime", "checkpoints"), unique=False)
                if cps:
                    bad = [i for i in range(1, len(cps)) if cps[i] <= cps[i - 1]]
                    if bad:
                        ck.err(("regime", "checkpoints"), f"must be strictly increasing positive integers; "
                                                          f"got {cps} ({cps[bad[0]]} after {cps[bad[0] - 1]})")
                    elif bs:
                        off = [c for c in cps if c % bs]
                        if off:
                            ck.err(("regime", "checkpoints"), f"must be multiples of batch_size={bs}; {off} are not")
                        elif k_eval is not None and k_eval > cps[-1]:
                            ck.err(("regime", "eval_cases"), f"the evaluation sample ({k_eval} cases) is larger than "
                                                             f"the number of edits of a unit ({cps[-1]}, the last "
                                                             "checkpoint); only edited cases can be evaluated")
                        else:
                            regime = RegimeSpec("sequential", checkpoints=tuple(cps), batch_size=bs,
                                                eval_cases=k_eval, eval_chunk=chunk)
        if regime is not None:
            need = max(regime.sizes or regime.checkpoints)
            key = ("regime", "sizes" if regime.kind == "batch" else "checkpoints")
            for i, ds in enumerate(datasets):
                if ds.max_cases is not None and need > ds.max_cases:
                    ck.err(key, f"needs {need} edits but dataset {ds.name!r} (datasets[{i}]) yields at most "
                                f"{ds.max_cases} cases")

    # ---- metrics
    metrics: list[str] = []
    if "metrics" in d:
        v = d["metrics"]
        if not isinstance(v, list) or not v:
            ck.err(("metrics",), f"must be a non-empty list of metric names, got {_tname(v)} {v!r}")
        else:
            for i, x in enumerate(v):
                if ck.string(x, ("metrics", i)):
                    if x in metrics:
                        ck.err(("metrics", i), f"metric {x!r} is listed twice")
                    else:
                        metrics.append(x)

    # ---- seeds
    seeds = [0]
    if "seeds" in d:
        s = ck.int_list(d["seeds"], ("seeds",), minimum=0)
        if s:
            seeds = s

    # ---- sweep
    sweep: dict[str, list[Any]] = {}
    if "sweep" in d and ck.table(d, ("sweep",), list(d["sweep"]) if isinstance(d["sweep"], dict) else []):
        labels = {m.label: m for m in methods}
        for axis, values in d["sweep"].items():
            path = ("sweep", axis)
            if not isinstance(axis, str) or "." not in axis or axis.startswith(".") or axis.endswith("."):
                ck.err(path, "a sweep axis must be named \"method.param\" (e.g. \"memit.mom2_update_weight\")")
                continue
            mlabel, param = axis.split(".", 1)
            if methods and mlabel not in labels:
                ck.err(path, f"method {mlabel!r} is not in the spec's methods (labels: {', '.join(labels)})")
                continue
            if not isinstance(values, list) or not values:
                ck.err(path, f"must be a non-empty list of values, got {_tname(values)} {values!r}")
                continue
            kinds = set()
            ok = True
            for i, x in enumerate(values):
                if isinstance(x, bool) or not isinstance(x, (int, float, str)):
                    ck.err(path + (i,), f"sweep values must be numbers or strings, got {_tname(x)} {x!r}")
                    ok = False
                    break
                kinds.add("string" if isinstance(x, str) else "number")
            if not ok:
                continue
            bad = [x for x in values if isinstance(x, float) and not math.isfinite(x)]
            if bad:
                ck.err(path, f"sweep values must be finite numbers; got {', '.join(map(repr, bad))} in {values!r}")
                continue
            if len(kinds) > 1:
                ck.err(path, f"mixes numbers and strings: {values!r}; use one type per axis")
                continue
            if len(set(values)) != len(values):
                ck.err(path, f"has duplicate values {values!r}")
                continue
            m = labels.get(mlabel)
            if m is not None:
                target = m.evk_align or {} if param.startswith("evk_align.") else m.hparams
                pkey = param[len("evk_align."):] if param.startswith("evk_align.") else param
                if pkey in target:
                    ck.err(path, f"{param!r} is also set in methods[{methods.index(m)}]; set it in one place only")
                    continue
            sweep[axis] = list(values)

    # ---- report
    report: dict[str, Any] = {}
    if "report" in d and ck.table(d, ("report",), _REPORT_KEYS):
        r = d["report"]
        for k in ("title", "html", "out", "ref"):  # ref: the paired table's reference system (a method label)
            if k in r:
                ck.string(r[k], ("report", k))
        if isinstance(r.get("ref"), str) and r["ref"].strip() and methods:  # checked now, not after the run
            known = [x.label for x in methods]
            if r["ref"].split(" | ")[0] not in known:
                ck.err(("report", "ref"), f"{r['ref']!r} is not a method label of this spec; labels: "
                                          f"{', '.join(known)} (a sweep point is 'label | param=value')")
        if "reference" in r:
            ck.string(r["reference"], ("report", "reference"), ("reg_value", "delta_k"))
        if "plots" in r and not isinstance(r["plots"], bool):
            ck.err(("report", "plots"), f"must be true or false, got {r['plots']!r}")
        if "ranges" in r:
            if not isinstance(r["ranges"], dict):
                ck.err(("report", "ranges"), "must be a table of metric = [low, high]")
            else:
                for mk, rng in r["ranges"].items():
                    if (not isinstance(rng, list) or len(rng) != 2
                            or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in rng)
                            or not rng[0] < rng[1]):
                        ck.err(("report", "ranges", mk), f"must be [low, high] numbers with low < high, got {rng!r}")
        if "groups" in r:
            if not isinstance(r["groups"], dict):
                ck.err(("report", "groups"), "must be a table of group name = [metric, ...]")
            else:
                for g, ms in r["groups"].items():
                    if not isinstance(ms, list) or not all(isinstance(x, str) for x in ms):
                        ck.err(("report", "groups", g), f"must be a list of metric names, got {ms!r}")
        report = dict(r)

    # with problems, a partial spec (model / regime may be None) still goes to the registry checks, so that
    # every problem of the file is reported at once
    return Spec(model=model, datasets=datasets, methods=methods, regime=regime, metrics=metrics, sweep=sweep,
                seeds=seeds, report=report, name=name, description=description, store=store, source=source,
                raw=d, lines=ck.lines)


_SYNTH = re.compile(r"^synthetic:(.*)$")


def _dataset(d: dict, path: KeyPath, ck: _Checker, base: Path) -> DatasetSpec | None:
    if not ck.table(d, path, _DATASET_KEYS):
        return None
    t = _get(d, path)
    n0 = len(ck.issues)
    if "path" not in t:
        ck.err(path + ("path",), "required key is missing (a file, a folder or \"synthetic:N\")",
               line=ck.lines.lookup(path))
        return None
    src = ck.string(t["path"], path + ("path",))
    if src is None:
        return None
    fpath = None
    synthetic = None
    m = _SYNTH.match(src)
    if m:
        try:
            synthetic = int(m.group(1))
            if synthetic < 1:
                raise ValueError
        except ValueError:
            ck.err(path + ("path",), f"\"synthetic:N\" needs a positive integer N, got {src!r}")
    else:
        fpath = (base / src).expanduser()
        if not fpath.exists():
            ck.err(path + ("path",), f"dataset file {src!r} not found (looked for {fpath.resolve()})")
        fpath = fpath.resolve()
    fmt = ck.string(t.get("format", "auto"), path + ("format",)) or "auto"
    limit = ck.pos_int(t["limit"], path + ("limit",)) if "limit" in t else None
    sample = ck.pos_int(t["sample"], path + ("sample",)) if "sample" in t else None
    seed = ck.pos_int(t.get("seed", 0), path + ("seed",), minimum=0)
    if limit and sample and sample > limit:
        ck.err(path + ("sample",), f"sample={sample} is larger than limit={limit}")
    if synthetic and limit and limit > synthetic:
        ck.err(path + ("limit",), f"limit={limit} is larger than the synthetic set ({synthetic} cases)")
    name = ck.string(t["name"], path + ("name",)) if "name" in t else None
    if name is None:
        name = f"synthetic-{synthetic}" if synthetic else (fpath.stem if fpath else src)
    if len(ck.issues) > n0:
        return None
    return DatasetSpec(name=name, source=src, path=fpath, synthetic=synthetic, format=fmt, limit=limit,
                       sample=sample, seed=seed or 0)


def _method(d: dict, path: KeyPath, ck: _Checker, base: Path) -> MethodSpec | None:
    if not ck.table(d, path, _METHOD_KEYS):
        return None
    t = _get(d, path)
    n0 = len(ck.issues)
    if "name" not in t:
        ck.err(path + ("name",), "required key is missing (the method's registry name, e.g. \"memit\")",
               line=ck.lines.lookup(path))
        return None
    name = ck.string(t["name"], path + ("name",))
    label = ck.string(t["label"], path + ("label",)) if "label" in t else name
    if label and "." in label:
        ck.err(path + ("label" if "label" in t else "name",), f"must not contain '.' ({label!r}); sweep axes use "
                                                              "\"label.param\"")
    hp = t.get("hparams", {})
    if not isinstance(hp, dict):
        ck.err(path + ("hparams",), f"must be a table of hyperparameter overrides, got {_tname(hp)}")
    evk = t.get("evk_align")
    if evk is not None and not isinstance(evk, dict):
        ck.err(path + ("evk_align",), f"must be a table, got {_tname(evk)}")
    trained = _trained_table(t, path, ck, base)
    if len(ck.issues) > n0 or not name or not label:
        return None
    return MethodSpec(name=name, label=label, hparams=dict(hp), evk_align=None if evk is None else dict(evk),
                      trained=trained)


def _trained_table(t: Mapping[str, Any], path: KeyPath, ck: _Checker, base: Path) -> dict[str, Any] | None:
    """The ``trained = "DIR"`` / ``[methods.train]`` of a method table (structure and paths only; whether the
    method is a trained one is checked by :func:`check_methods`)."""
    if "trained" in t and "train" in t:
        ck.err(path + ("train",), "give either trained = \"DIR\" (a saved editor) or a [methods.train] table, not "
                                  "both")
        return None
    if "trained" in t:
        src = ck.string(t["trained"], path + ("trained",))
        if src is None:
            return None
        d = (base / src).expanduser()
        if not d.is_dir():
            ck.err(path + ("trained",), f"trained editor {src!r} not found (looked for the directory {d.resolve()}; "
                                        "`editlens train --out DIR` writes one)")
            return None
        return {"path": str(d.resolve()), "source": src}
    if "train" not in t:
        return None
    tp = path + ("train",)
    if not isinstance(t["train"], dict):
        ck.err(tp, f"must be a table ([methods.train]), got {_tname(t['train'])}")
        return None
    tt = t["train"]
    for k in tt:
        if k not in _TRAIN_KEYS:
            ck.err(tp + (k,), f"unknown key; allowed: {', '.join(_TRAIN_KEYS)}")
    n0 = len(ck.issues)
    out: dict[str, Any] = {}
    if ("data" in tt) == ("synthetic" in tt):
        ck.err(tp, "give the training cases as data = \"FILE\" or synthetic = N (one of the two)")
    if "data" in tt:
        src = ck.string(tt["data"], tp + ("data",))
        if src is not None:
            f = (base / src).expanduser()
            if not f.is_file():
                ck.err(tp + ("data",), f"training data {src!r} not found (looked for {f.resolve()})")
            else:
                out["data"] = src
                out["data_path"] = str(f.resolve())
                out["data_sha256"] = _file_sha256(f)
    if "synthetic" in tt:
        n = ck.pos_int(tt["synthetic"], tp + ("synthetic",))
        if n is not None:
            out["synthetic"] = n
    if "val" in tt:
        src = ck.string(tt["val"], tp + ("val",))
        if src is not None:
            f = (base / src).expanduser()
            if not f.is_file():
                ck.err(tp + ("val",), f"validation data {src!r} not found (looked for {f.resolve()})")
            else:
                out["val"] = src
                out["val_path"] = str(f.resolve())
                out["val_sha256"] = _file_sha256(f)
    if "limit" in tt:
        out["limit"] = ck.pos_int(tt["limit"], tp + ("limit",))
    out["seed"] = ck.pos_int(tt.get("seed", 0), tp + ("seed",), minimum=0) or 0
    hp = tt.get("hparams", {})
    if not isinstance(hp, dict):
        ck.err(tp + ("hparams",), f"must be a table of training hyperparameters, got {_tname(hp)}")
    out["hparams"] = dict(hp) if isinstance(hp, dict) else {}
    if len(ck.issues) > n0:
        return None
    return {"train": out}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _run_checks(ck: "_Checker", spec: "Spec", checks) -> None:
    """Run each check on ``spec``; a SpecError's issues and any other EditlensError are recorded on ``ck``."""
    for check in checks:
        try:
            check(spec)
        except SpecError as e:
            _absorb(ck, e, ())
        except EditlensError as e:
            ck.err((), str(e))


def _absorb(ck: _Checker, e: SpecError, path: KeyPath) -> None:
    issues = getattr(e, "issues", None)
    if issues:
        ck.issues.extend(issues)
    else:
        ck.err(path, str(e))


#: hyperparameters that hold layer indices (an int or a list of ints), in every method
LAYER_KEYS = ("layer", "layers")


def _counts_from_end(method: str) -> bool:
    """Whether ``method`` accepts negative layer indices (counted from the last layer, as GRACE and WISE do)."""
    try:
        from editlens.edit.base import get_method

        return hasattr(get_method(method).hparams_class, "layer_index")
    except EditlensError:
        return False


def check_model_layers(spec: Spec) -> None:
    """Check every layer index set in the spec (``layer`` / ``layers`` of each method, and their sweep axes)
    against the depth of the spec's model, read from its configuration only (see
    :func:`editlens.lm.load.model_n_layers`; no weights are loaded). Nothing is checked when the depth cannot be
    known without a download. Raises :class:`SpecError` naming each key and line."""
    if spec.model is None or not spec.methods:
        return
    from editlens.lm.load import model_n_layers

    n = model_n_layers(spec.model.name)
    if not n:
        return
    ck = _Checker(str(spec.source) if spec.source is not None else "<spec>", spec.lines)
    for i, m in enumerate(spec.methods):
        relative = None
        for point in spec.sweep_points(m):
            hp, _ = merge_point(m, point)
            for key in LAYER_KEYS:
                if key not in hp:
                    continue
                v = hp[key]
                vals = list(v) if isinstance(v, (list, tuple)) else [v]
                ints = [x for x in vals if isinstance(x, int) and not isinstance(x, bool)]
                if relative is None and any(x < 0 for x in ints):
                    relative = _counts_from_end(m.name)
                lo = -n if relative else 0
                bad = [x for x in ints if not lo <= x < n]
                if not bad:
                    continue
                axis = f"{m.label}.{key}"
                path: KeyPath = ("sweep", axis) if axis in spec.sweep else ("methods", i, "hparams", key)
                span = f"{-n}..{n - 1}, negative counts from the last" if relative else f"0..{n - 1}"
                msg = (f"method {m.name!r}: layer {bad[0]} is outside the model {spec.model.name!r} "
                       f"({n} layers: {span})")
                if not any(x.key == key_str(path) and x.message == msg for x in ck.issues):
                    ck.err(path, msg)
    ck.raise_if_any()


# ============================================================================ registry checks
#: method names that mean "edit nothing, evaluate the unedited model"
BASELINE_NAMES = ("none", "pre-edit")


def _source(spec: Spec) -> str:
    return str(spec.source) if spec.source is not None else "<spec>"


def check_metrics(spec: Spec) -> None:
    """Every metric name of ``spec`` must resolve in the metric registry (errors name the key and the line)."""
    from editlens.evaluate.core import resolve_metrics

    ck = _Checker(_source(spec), spec.lines)
    for i, name in enumerate(spec.metrics):
        try:
            resolve_metrics([name])
        except MetricError as e:
            ck.err(("metrics", i), str(e))
    ck.raise_if_any()


def _param_path(spec: Spec, i: int, param: str) -> KeyPath:
    axis = f"{spec.methods[i].label}.{param}"
    if axis in spec.sweep:
        return ("sweep", axis)
    return ("methods", i, "hparams", param)


def check_methods(spec: Spec, lm: Any = None) -> None:
    """Check every method and hyperparameter of ``spec`` against the editing registry.

    Without ``lm``: method names, hyperparameter keys, ``evk_align`` and the values that can be checked without a
    model (types, ranges). With ``lm`` (an :class:`~editlens.lm.LM`): the model's defaults with the overrides
    applied, for every sweep point (e.g. a layer beyond the model's depth). Raises :class:`SpecError` naming the
    key (``methods[0].hparams.foo`` or ``sweep."memit.mom2_update_weight"``) and the line; all problems at once.
    """
    from editlens.edit.base import get_method

    ck = _Checker(_source(spec), spec.lines)

    def add(path: KeyPath, msg: str) -> None:
        issue = SpecIssue(key_str(path), spec.lines.lookup(path), msg)
        if issue not in ck.issues:
            ck.issues.append(issue)

    for i, m in enumerate(spec.methods):
        if m.name.lower() in BASELINE_NAMES:
            if m.hparams or any(k.split(".", 1)[0] == m.label for k in spec.sweep) or m.evk_align:
                add(("methods", i), f"method {m.name!r} edits nothing: it takes no hparams, evk_align or sweep")
            continue
        try:
            cls = get_method(m.name)
        except MethodError as e:
            add(("methods", i, "name"), str(e))
            continue
        _check_trained_method(cls, m, i, lm, add)
        hcls = cls.hparams_class
        names = set(hcls.field_names())
        bad_keys = False
        for point in spec.sweep_points(m):
            hp, _ = merge_point(m, point)
            for k in hp:
                if k not in names:
                    add(_param_path(spec, i, k), f"unknown hyperparameter {k!r} for method {m.name!r}; valid keys: "
                                                 f"{', '.join(sorted(names))}")
                    bad_keys = True
        if bad_keys:
            continue
        for point in spec.sweep_points(m):
            hp, evk = merge_point(m, point)
            if evk:
                msg = _check_evk(evk) if cls.supports_evk_align else (
                    f"method {m.name!r} does not take evk_align (it has no value optimisation or fine-tuning loss)")
                if msg is not None:
                    add(("methods", i, "evk_align"), msg)
            for key, msg in _check_values(hcls, hp, lm):  # every bad override, not only the first
                add(_param_path(spec, i, key) if key else ("methods", i, "hparams"), f"method {m.name!r}: {msg}")
    ck.raise_if_any()


def _check_trained_method(cls: Any, m: MethodSpec, i: int, lm: Any, add: Callable[[KeyPath, str], None]) -> None:
    """A trained method needs ``trained`` or ``[methods.train]`` (whose hyperparameters are checked against its
    training hyperparameters); other methods take neither. With ``lm``, a saved editor must be one of this method
    for this model."""
    from editlens.edit.trained import TrainableEditor, TrainedEditor

    if not issubclass(cls, TrainableEditor):
        if m.trained:
            add(("methods", i, "train" if "train" in m.trained else "trained"),
                f"method {m.name!r} is not a trained method (it edits directly); remove this key")
        return
    if not m.trained:
        add(("methods", i), f"method {m.name!r} edits with a trained editor: give trained = \"DIR\" (saved by "
                            f"`editlens train --out DIR`) or a [methods.train] table (data = \"FILE\" or synthetic = "
                            "N, optional val, limit, seed, hparams) that the run trains once and caches")
        return
    if "train" in m.trained:
        tcls = cls.TrainHParams
        hp = m.trained["train"].get("hparams", {})
        names = set(tcls.field_names())
        unknown = [k for k in hp if k not in names]
        for k in unknown:
            add(("methods", i, "train", "hparams", k), f"unknown training hyperparameter {k!r} for method "
                                                       f"{m.name!r}; valid keys: {', '.join(sorted(names))}")
        if not unknown:
            if "method" not in tcls.__dict__:
                tcls.method = cls.name
            for key, msg in _check_values(tcls, hp, lm):
                add(("methods", i, "train", "hparams", key) if key else ("methods", i, "train", "hparams"),
                    f"method {m.name!r} (training): {msg}")
        return
    try:
        te = TrainedEditor.load(m.trained["path"])
        if te.method != cls.name:
            add(("methods", i, "trained"), f"the editor in {m.trained['source']!r} was trained for method "
                                           f"{te.method!r}, not {cls.name!r}")
        elif lm is not None:
            te.check_model(lm)
    except EditlensError as e:
        add(("methods", i, "trained"), str(e))


def _check_evk(evk: Mapping[str, Any]) -> str | None:
    """The error message of an invalid ``evk_align`` table, else ``None``."""
    from editlens.edit.evk_align import from_config

    try:
        from_config(dict(evk))
    except EditlensError as e:
        return str(e)
    except (TypeError, ValueError) as e:
        return f"invalid evk_align settings: {e}"
    return None


def _check_values(hcls: Any, hp: Mapping[str, Any], lm: Any) -> list[tuple[str | None, str]]:
    """``(key or None, message)`` of every invalid override (``[]`` when they are valid together)."""
    def attempt(base_factory: Callable[[], Any], overrides: Mapping[str, Any]) -> str | None:
        try:
            base_factory().replace(**dict(overrides))
        except (HParamsError, MethodError) as e:
            return str(e)
        except (TypeError, ValueError) as e:  # a method's validate() tripping over a bad type
            return f"invalid value: {e}"
        return None

    factory = (lambda: hcls.for_model(lm)) if lm is not None else hcls
    try:
        base_ok = attempt(factory, {}) is None
    except Exception:  # pragma: no cover - defaults that cannot be built without a model
        base_ok = False
    if not base_ok:
        return []  # the generic defaults are not valid by themselves: values are checked once a model is loaded
    msg = attempt(factory, hp)
    if msg is None:
        return []
    # the keys responsible (one override at a time), each with its own message and line
    bad = [(k, m) for k, m in ((k, attempt(factory, {k: v})) for k, v in hp.items()) if m is not None]
    return bad or [(None, msg)]


#: the registry checks of a full validation, in the order they run (their issues are reported in file order)
REGISTRY_CHECKS: tuple[SpecCheck, ...] = (check_metrics, check_methods, check_model_layers)


def load_validated_spec(path: str | Path) -> Spec:
    """:func:`load_spec` plus the metric and method/hyperparameter registries and the model's depth
    (:data:`REGISTRY_CHECKS`).

    Raises:
        SpecError: the message names the file, the line and the key of every problem, all at once.
    """
    return load_spec(path, checks=REGISTRY_CHECKS)


def validate_spec(spec: Spec) -> Spec:
    """Run the registry checks (:data:`REGISTRY_CHECKS`) on an already built :class:`Spec`; returns it.

    Raises:
        SpecError: every problem at once, each with its key and line.
    """
    ck = _Checker(_source(spec), spec.lines)
    _run_checks(ck, spec, REGISTRY_CHECKS)
    if ck.issues:
        ck.issues[:] = sorted(dict.fromkeys(ck.issues), key=lambda i: (i.line is None, i.line or 0))
    ck.raise_if_any()
    return spec
