"""The editing API: typed hyperparameters, reversible :class:`Edit` handles, the :class:`Editor` registry.

Every editing method is an :class:`Editor` subclass registered by name with :func:`register_method` in its own
module (``editlens/edit/<method>.py``) and has a typed :class:`HParams` dataclass with per-architecture
defaults. Users call :func:`edit` (one batch) or :func:`edit_sequential` (batch after batch).

Writing a method (contract for implementers)
--------------------------------------------
``apply(lm, cases, hparams, *, evk_align=None, progress=True, sequence=None) -> Edit``

* Weight-editing methods compute their deltas and finish with :meth:`Editor.weight_edit`, which saves every
  touched tensor once in a :class:`WeightSnapshot` (the run's snapshot when ``sequence`` is given), adds the
  deltas in place, calls ``lm.push_state(tag)`` so ``lm.fingerprint`` reflects the new weights, and returns an
  :class:`Edit` whose ``system`` is a :class:`~editlens.system.ModelSystem`.
* Wrapper methods (GRACE, WISE, IKE, SCR) build ``Edit(system=<WrappedSystem>, ..., on_undo=...)`` themselves.
* ``sequence`` is the per-run :class:`SequenceState` made by :meth:`Editor.begin_sequence` when the edit is
  one step of :func:`edit_sequential`. Methods that accumulate state across steps (AlphaEdit's previous keys,
  EMMET, PRUNE, GRACE codebooks...) keep it in ``sequence.data`` (fixed-size tensors, never per-step lists),
  and wrapper methods set ``sequence.on_undo`` (a single callable, replaced at every step) to remove what the
  whole run added. In sequence mode the returned step :class:`Edit` is not undoable by itself: the run's
  :class:`Edit` from :func:`edit_sequential` is.
* ``evk_align``: optional EVK-Align regulariser (see :mod:`editlens.edit.locate`, ``extra_loss``); methods
  that optimise values pass it to :func:`editlens.edit.locate.compute_values` and record
  ``diagnostics["evk_align"]`` (:func:`evk_settings`).
* Diagnostics are plain Python scalars: ``"delta_norm/<layer>"`` (Frobenius ||ΔW||), ``"dk_norm/<layer>"``
  (||ΔW K0|| on preserved keys, see :mod:`editlens.edit.stats`), ``"loss/..."``, ``"wall_time_s"``.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import time
import uuid
import warnings
from dataclasses import dataclass, field, fields, replace as dc_replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence, TypeVar

import torch

from editlens.errors import HParamsError, MethodError
from editlens.lm.context import check_rewrites

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.system import ModelSystem, System
    from editlens.lm.load import LM

H = TypeVar("H", bound="HParams")

#: model-name fragments recognised for per-model defaults (checked in this order, lower-case substring match)
_MODEL_KEYS = ("smollm2-135m", "smollm2", "gpt2-xl", "gpt2-large", "gpt2-medium", "gpt-j", "gptj", "llama-3",
               "llama3", "llama-2", "llama", "qwen2.5", "qwen2", "mistral", "gemma")


def model_keys(lm: "LM") -> list[str]:
    """Lookup keys for per-architecture defaults, most specific first.

    ``tiny`` for the built-in random models, then recognised fragments of the model name (e.g.
    ``"smollm2-135m"``, ``"gpt2-xl"``), then the architecture family (``gpt2``, ``gptj``, ``llama``, ``qwen2``,
    ...), then ``"default"``.
    """
    name = str(getattr(lm, "name", "")).lower()
    keys: list[str] = []
    if name.startswith("tiny-"):
        keys.append("tiny")
    keys += [k for k in _MODEL_KEYS if k in name]
    fam = lm.arch.family
    keys.append(fam)
    if fam in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo"):
        keys.append("llama")  # llama-like blocks share the llama defaults unless a method says otherwise
    keys.append("default")
    return keys


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric hyperparameter: an interval (bounds open or closed) plus optional special
    values outside it (e.g. ``-1`` = "the variant's default"). Non-finite values are never allowed."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    also: tuple[float, ...] = ()

    def __contains__(self, v: float) -> bool:
        if v in self.also:
            return True
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def describe(self) -> str:
        if self.lo == -math.inf and self.hi == math.inf:
            text = "a finite number"
        elif self.hi == math.inf:
            text = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.lo == -math.inf:
            text = f"{'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            text = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        return text + "".join(f" or {a:g}" for a in self.also)


#: ``> 0``
POSITIVE = Range(0.0, lo_open=True)
#: ``>= 0``
NON_NEGATIVE = Range(0.0)
#: ``(0, 1]``
FRACTION = Range(0.0, 1.0, lo_open=True)
#: any finite number
FINITE = Range()


def _numeric_annotation(ann: Any) -> str | None:
    """``"float"`` / ``"int"`` for a field annotated as such (optionally ``| None``), else ``None``."""
    text = str(ann).replace("typing.", "").replace(" ", "")
    for kind in ("float", "int"):
        if text in (kind, f"{kind}|None", f"None|{kind}", f"Optional[{kind}]", f"<class'{kind}'>"):
            return kind
    return None


def _check_number(method: str, key: str, v: Any, kind: str | None, rng: "Range | None") -> None:
    """Raise :class:`HParamsError` when ``v`` is a boolean where a number is expected, a non-finite number, or
    outside ``rng``."""
    if v is None:
        return
    if isinstance(v, bool):
        if kind is not None:
            raise HParamsError(f"hyperparameter {key!r} of method {method!r} must be a number, got the boolean {v!r}")
        return
    if isinstance(v, numbers.Real):
        x = float(v)
        if not math.isfinite(x):
            raise HParamsError(f"hyperparameter {key!r} of method {method!r} must be a finite number, got {x!r}")
        if kind == "int" and not float(v).is_integer():
            raise HParamsError(f"hyperparameter {key!r} of method {method!r} must be an integer, got {v!r}")
        if rng is not None and x not in rng:
            raise HParamsError(f"hyperparameter {key!r} of method {method!r} must be {rng.describe()}, got {v!r}")
    elif kind is not None:
        raise HParamsError(f"hyperparameter {key!r} of method {method!r} must be a number, got {v!r}")


@dataclass
class HParams:
    """Base class of every method's typed hyperparameters.

    Subclasses are dataclasses whose field defaults are the generic defaults, plus an optional class
    attribute ``ARCH_DEFAULTS: dict[key, dict | Callable[[LM], dict]]`` keyed by the strings of
    :func:`model_keys` (``"tiny"``, ``"smollm2-135m"``, ``"gpt2-xl"``, ``"gptj"``, ``"llama"``...): the first key
    that matches the model gives its overrides. ``method`` (class attribute) names the method in error messages.

    Value checks: ``RANGES: dict[field, Range]`` (class attribute, merged along the class hierarchy, a subclass
    overriding its parents) declares the allowed interval of each numeric field; every ``float`` field must have
    one. Whenever an instance is made (construction, :meth:`replace`, :meth:`for_model`, a spec's sweep point
    checked at ``--dry-run``), :meth:`check_values` rejects with an :class:`HParamsError` naming the field: a
    non-finite number (``nan``, ``inf``) in any numeric field or list, a boolean where a number is expected
    (``v_lr=True``), and a value outside its range. :meth:`validate` adds each method's own rules.
    """

    method: ClassVar[str] = "?"
    ARCH_DEFAULTS: ClassVar[Mapping[str, Any]] = {}
    RANGES: ClassVar[Mapping[str, Range]] = {}

    def __post_init__(self) -> None:
        self.check_values()

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def value_ranges(cls) -> dict[str, Range]:
        """The declared :class:`Range` of each numeric field (``RANGES`` merged along the class hierarchy)."""
        out: dict[str, Range] = {}
        for klass in reversed(cls.__mro__):
            out.update(klass.__dict__.get("RANGES", {}) or {})
        return out

    @classmethod
    def float_fields(cls) -> list[str]:
        """Names of the fields annotated ``float``."""
        return [f.name for f in fields(cls) if _numeric_annotation(f.type) == "float"]

    def check_values(self) -> None:
        """Generic checks of every field (see the class docstring); raises :class:`HParamsError` naming it."""
        ranges = self.value_ranges()
        for f in fields(self):
            v = getattr(self, f.name)
            kind = _numeric_annotation(f.type)
            if isinstance(v, (list, tuple)):
                for x in v:
                    _check_number(self.method, f.name, x, None, None)
                    if isinstance(x, bool):
                        raise HParamsError(f"hyperparameter {f.name!r} of method {self.method!r} must hold "
                                           f"numbers, got the boolean {x!r}")
                continue
            _check_number(self.method, f.name, v, kind, ranges.get(f.name))

    @classmethod
    def for_model(cls: type[H], lm: "LM") -> H:
        """Defaults for ``lm``'s architecture (see ``ARCH_DEFAULTS``), validated."""
        hp = cls()
        for key in model_keys(lm):
            if key in cls.ARCH_DEFAULTS:
                over = cls.ARCH_DEFAULTS[key]
                if callable(over):
                    over = over(lm)
                hp = hp.replace(**dict(over))
                break
        hp = hp._resolve(lm)
        return hp

    def _resolve(self: H, lm: "LM") -> H:
        """Hook: fill values that depend on the model (e.g. layer lists relative to ``n_layers``)."""
        return self

    def replace(self: H, **overrides: Any) -> H:
        """A copy with ``overrides`` applied.

        Raises:
            HParamsError: an unknown key (naming it, the method and the valid keys) or an invalid value.
        """
        names = self.field_names()
        for key in overrides:
            if key not in names:
                raise HParamsError(
                    f"unknown hyperparameter {key!r} for method {self.method!r}; valid keys: {', '.join(sorted(names))}")
        clean = {k: _coerce(self.method, k, getattr(self, k), v) for k, v in overrides.items()}
        new = dc_replace(self, **clean)
        new.validate()
        return new

    def validate(self) -> None:
        """Hook: raise :class:`HParamsError` naming the key when a value is invalid."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _coerce(method: str, key: str, current: Any, value: Any) -> Any:
    """Light type coercion for values read from TOML/YAML/CLI (ints for floats, lists for tuples)."""
    if value is None or current is None:
        return value
    try:
        if isinstance(current, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if isinstance(current, (int, float)) and isinstance(value, bool):
            raise HParamsError(f"hyperparameter {key!r} of method {method!r} must be a number, got the boolean "
                               f"{value!r}")
        if isinstance(current, float):
            value = float(value)
            if not math.isfinite(value):
                raise HParamsError(f"hyperparameter {key!r} of method {method!r} must be a finite number, got "
                                   f"{value!r}")
            return value
        if isinstance(current, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(current, (tuple, list)):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            if current and isinstance(current[0], int):
                value = [int(v) for v in value]
            return type(current)(value)
        if isinstance(current, str):
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise HParamsError(f"hyperparameter {key!r} of method {method!r}: expected a value like {current!r}, "
                           f"got {value!r}") from None
    return value


class WeightSnapshot:
    """Copies of tensors taken before their first modification, restored bit for bit.

    ``save`` clones a tensor only the first time its name is seen (also across the steps of a sequential run),
    so memory is one copy per touched tensor whatever the number of edits.
    """

    def __init__(self) -> None:
        self._saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def save(self, name: str, param: torch.Tensor) -> None:
        if name not in self._saved:
            self._saved[name] = (param, param.detach().clone())

    def __contains__(self, name: str) -> bool:
        return name in self._saved

    def __len__(self) -> int:
        return len(self._saved)

    @property
    def names(self) -> list[str]:
        return list(self._saved)

    def original(self, name: str) -> torch.Tensor:
        """The saved (original) value of ``name``."""
        return self._saved[name][1]

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(live tensor, saved original)`` pairs (used by :meth:`editlens.lm.LM.state_view`)."""
        return list(self._saved.values())

    @torch.no_grad()
    def restore(self) -> None:
        """Copy every saved tensor back in place (bit for bit)."""
        for param, saved in self._saved.values():
            param.copy_(saved)

    def clear(self) -> None:
        self._saved.clear()


@dataclass
class SequenceState:
    """Per-run state of a sequential editing run (made by :meth:`Editor.begin_sequence`).

    Attributes:
        snapshot: the run's snapshot (each tensor cloned once for the whole run).
        step: number of batches applied so far.
        n_edits: number of cases applied so far.
        data: method-specific accumulated state (fixed-size tensors, e.g. AlphaEdit's ``K_p K_pᵀ`` per layer).
        tag: the current fingerprint tag of the run (replaced at every step; see :func:`edit_sequential`).
        on_undo: optional callable run by the run's :meth:`Edit.undo` (wrapper methods).
        seed: base seed of the run.
    """

    snapshot: WeightSnapshot = field(default_factory=WeightSnapshot)
    step: int = 0
    n_edits: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    tag: str | None = None
    on_undo: Callable[[], None] | None = None
    seed: int = 0

    def kept(self, key: str, make: Callable[[], Any], clear: Callable[[Any], Callable[[], None]]) -> Any:
        """The run's object under ``data[key]``, made by ``make()`` on the first step; the run's undo then
        calls ``clear(obj)()`` (wrapper methods keep one system for the whole run)."""
        obj = self.data.get(key)
        if obj is None:
            obj = self.data[key] = make()
            self.on_undo = clear(obj)
        return obj


class Edit:
    """A reversible edit.

    Attributes:
        system: the edited system (a ModelSystem for weight edits, a WrappedSystem for GRACE/WISE/IKE/SCR).
        method: the method name.
        cases: the cases applied (for a sequential run: all of them).
        hparams: the hyperparameters used.
        diagnostics: plain scalars (``delta_norm/<layer>``, ``dk_norm/<layer>``, ``loss/...``, ``wall_time_s``, ...).
    """

    def __init__(self, system: "System", method: str, cases: Sequence["EditCase"], hparams: HParams,
                 diagnostics: dict[str, Any] | None = None, *, lm: "LM | None" = None,
                 snapshot: WeightSnapshot | None = None, tag: str | None = None,
                 on_undo: Callable[[], None] | None = None, undoable: bool = True):
        self.system = system
        self.method = method
        self.cases = list(cases)
        self.hparams = hparams
        self.diagnostics: dict[str, Any] = dict(diagnostics or {})
        self.lm = lm
        self._snapshot = snapshot
        self.tag = tag
        self._on_undo = on_undo
        self._undoable = undoable
        self.undone = False

    def undo(self) -> None:
        """Restore every touched tensor bit for bit (and ``lm.pop_state``); a second call does nothing.

        Raises:
            MethodError: this is one step of a sequential run (undo the run's Edit), or a later weight edit
                of the same model is still applied (undo that one first).
        """
        with _model_lock(self.lm if self.lm is not None else getattr(self.system, "lm", None)):
            self._undo()

    def _undo(self) -> None:
        if self.undone:
            return
        if not self._undoable:
            raise MethodError(f"this {self.method} edit is one step of a sequential run; undo the Edit returned by "
                              "edit_sequential instead")
        if self.lm is not None and self.tag is not None:
            stack = getattr(self.lm, "_state", [])
            if self.tag in stack and stack[-1] != self.tag:
                raise MethodError(f"cannot undo this {self.method} edit while a later edit of the same model is "
                                  f"applied ({stack[-1]!r}); undo edits in reverse order")
        if self._snapshot is not None:
            self._snapshot.restore()
            self._snapshot.clear()
        if self._on_undo is not None:
            self._on_undo()
        if self.lm is not None and self.tag is not None:
            self.lm.pop_state(self.tag)
        self.undone = True

    def save_pretrained(self, directory: Any, *, force: bool = False, verify: bool = True) -> Any:
        """Write the edited model as a standard Hugging Face checkpoint (``model.safetensors``, ``config.json``,
        tokenizer files, plus ``editlens.json`` naming the base model, the method, its hyperparameters and the
        case ids) that :func:`editlens.load_model` and ``AutoModelForCausalLM.from_pretrained`` read back with
        bit-identical weights (checked after writing when ``verify``). The weights saved are this edit's, even
        when later edits of the model are applied (its system is pinned to them). See
        :func:`editlens.lm.checkpoint.save_checkpoint`; returns the directory.

        Raises:
            MethodError: the method does not put its edit in the weights (GRACE, WISE, IKE, SCR: a weights
                checkpoint would be the unedited model), or this edit was undone.
            EditlensError: ``directory`` is a file, or a non-empty directory without ``force``.
        """
        from editlens.lm.checkpoint import check_save_target, save_checkpoint
        from editlens.system import ModelSystem

        system = self.system
        lm = self.lm if self.lm is not None else getattr(system, "lm", None)
        if type(system) is not ModelSystem or self._snapshot is None or lm is None:
            raise MethodError(
                f"{self.method} keeps its edit outside the model's weights ({type(system).__name__}: a codebook, "
                "side memory, retrieved facts or a prompt consulted at call time), so a weights checkpoint would be "
                "the unedited model; save_pretrained works for weight-editing methods (ft, rome, memit, alphaedit, "
                "emmet, rect, prune, pmet)")
        if self.undone:
            raise MethodError(f"this {self.method} edit was undone; there are no edited weights to save")
        check_save_target(directory, force)
        meta = {"method": self.method, "n_cases": len(self.cases), "case_ids": [c.case_id for c in self.cases],
                "hparams": self.hparams.to_dict() if hasattr(self.hparams, "to_dict") else repr(self.hparams)}
        return save_checkpoint(lm, directory, force=force, state=system.model_state, metadata=meta, verify=verify)

    @property
    def prompt_format(self) -> str:
        """The prompt format the edit was made in and its :attr:`system` poses prompts in (``raw`` / ``chat``)."""
        return getattr(self.system, "prompt_format", "raw")

    def __repr__(self) -> str:
        return f"Edit(method={self.method!r}, cases={len(self.cases)}, undone={self.undone})"


def _model_lock(lm: Any) -> Any:
    """``lm.lock`` (see :class:`editlens.lm.LM`: edits, undos and system calls of one model are serialised), or a
    no-op context for an object without one."""
    lock = getattr(lm, "lock", None)
    return lock if lock is not None else contextlib.nullcontext()


class Editor:
    """Base class of editing methods (see the module docstring for the contract)."""

    name: ClassVar[str] = "?"
    hparams_class: ClassVar[type[HParams]] = HParams
    #: whether ``apply`` passes ``evk_align`` to its value optimisation / loss; when false, :func:`edit` and
    #: :func:`edit_sequential` refuse an ``evk_align`` with a MethodError before any work (never silently ignored)
    supports_evk_align: ClassVar[bool] = False
    #: whether the method can edit a model whose weights are partly offloaded by accelerate (``load_model(...,
    #: device_map=...)`` with ``"disk"``, or ``"cpu"`` beside a GPU): it reads and writes weights only through
    #: ``weight_param`` / ``add_now`` / ``weight_edit`` (see :mod:`editlens.lm.placement`)
    supports_offloaded_weights: ClassVar[bool] = False
    #: whether the method's edit lives in the model's weights (``Edit.save_pretrained`` can write it); ``False``
    #: for wrapper methods, so ``editlens edit --save`` refuses them before editing; ``None`` = not declared
    #: (checked on the Edit)
    edits_weights: ClassVar[bool | None] = None
    #: the prompt format of the edit being made (a resolved :class:`~editlens.lm.prompting.PromptFormat` or
    #: ``"raw"``), set by :func:`edit` / :func:`edit_sequential` from their ``prompt_format``. A method builds its
    #: edit's system with :meth:`base_system` and poses its own training / context prompts through
    #: ``system.format`` (GRACE, WISE, IKE, SCR), so the edit is made in the format it is evaluated in.
    prompt_format: Any = "raw"

    def base_system(self, lm: "LM") -> "ModelSystem":
        """A :class:`~editlens.system.ModelSystem` of ``lm`` posing prompts in this edit's :attr:`prompt_format`
        (what a method's ``Edit.system`` wraps or is)."""
        from editlens.system import ModelSystem

        return ModelSystem(lm, prompt_format=self.prompt_format)

    def default_hparams(self, lm: "LM") -> HParams:
        return self.hparams_class.for_model(lm)

    def begin_sequence(self, lm: "LM", hparams: HParams, *, seed: int = 0) -> SequenceState:
        """Create the per-run state of a sequential run (override to pre-fill ``data``)."""
        return SequenceState(seed=seed)

    def apply(self, lm: "LM", cases: Sequence["EditCase"], hparams: HParams, *, evk_align: Any = None,
              progress: bool = True, sequence: SequenceState | None = None) -> Edit:
        raise NotImplementedError

    # ------------------------------------------------------------------ helper for weight edits
    @staticmethod
    def snapshot_for(sequence: SequenceState | None) -> WeightSnapshot:
        """The snapshot to save tensors in: the run's when ``sequence`` is given, else a new one."""
        return sequence.snapshot if sequence is not None else WeightSnapshot()

    @staticmethod
    def add_now(lm: "LM", snapshot: WeightSnapshot, module_name: str, delta: torch.Tensor) -> None:
        """Save the module's weight in ``snapshot`` (first time only) and add ``delta`` ``[out, in]`` in place.

        For methods whose later steps must see earlier updates (MEMIT's layer after layer, ROME's fact after fact);
        finish with ``weight_edit(..., snapshot=snapshot, applied=True)``.
        """
        from editlens.lm.arch import add_delta, weight_param

        module = lm.module(module_name)
        snapshot.save(module_name, weight_param(module))
        add_delta(module, delta)

    def weight_edit(self, lm: "LM", cases: Sequence["EditCase"], hparams: HParams,
                    deltas: Mapping[str, torch.Tensor], diagnostics: dict[str, Any] | None = None,
                    sequence: SequenceState | None = None, *, snapshot: WeightSnapshot | None = None,
                    applied: bool = False) -> Edit:
        """Add ``deltas`` (``{module path: ΔW [out, in]}``) to the weights and return the reversible :class:`Edit`.

        Each module's weight is saved once in the snapshot (the run's when ``sequence`` is given) before it is
        modified. With ``applied=True`` the deltas were already added with :meth:`add_now` into ``snapshot`` and
        are only used for the fingerprint. The fingerprint tag is a hash of the method, the hyperparameters, the
        cases and the deltas' float64 sums, so the same edit of the same weights gives the same fingerprint.

        After the update every changed tensor is checked (see :meth:`_check_written`): non-finite values undo the
        edit and raise :class:`MethodError`; an update that changes nothing warns (:class:`NoOpEditWarning`) and
        sets ``diagnostics["zero_delta"]`` (``False`` otherwise).
        """
        from editlens.lm.arch import add_delta, weight_param

        snap = snapshot if snapshot is not None else self.snapshot_for(sequence)
        h = hashlib.sha256(f"{self.name}|{hparams!r}|".encode())
        for key in _rewrite_keys(cases):
            h.update(key.encode())
        sums = []
        for name, delta in deltas.items():
            if not applied:
                module = lm.module(name)
                snap.save(name, weight_param(module))
                add_delta(module, delta)
            d64 = delta.detach().double()
            sums.append(torch.stack([d64.sum(), (d64 * d64).sum()]))
        if sums:
            h.update(torch.stack(sums).cpu().numpy().tobytes())
        diagnostics = dict(diagnostics or {})
        self._check_written(lm, snap, deltas, sequence, diagnostics)
        tag = f"{self.name}:{h.hexdigest()[:16]}"
        if sequence is not None:
            # edit_sequential pushes the run's state and replaces this system by one pinned to it
            return Edit(self.base_system(lm), self.name, cases, hparams, diagnostics, lm=lm, tag=tag,
                        undoable=False)
        lm.push_state(tag, snap)
        return Edit(self.base_system(lm), self.name, cases, hparams, diagnostics, lm=lm, snapshot=snap, tag=tag)


    def _check_written(self, lm: "LM", snap: WeightSnapshot, deltas: Mapping[str, torch.Tensor],
                       sequence: SequenceState | None, diagnostics: dict[str, Any]) -> None:
        """Check the tensors an edit wrote.

        * A non-finite value (nan, inf) in any edited weight: the edit is undone (a single edit's snapshot is
          restored bit for bit; in a sequential run :func:`edit_sequential` restores the run's) and
          :class:`MethodError` names the modules and the count of bad values.
        * An update that changes nothing (every delta exactly zero, or - for a single edit - every edited weight
          bit for bit its original): :class:`NoOpEditWarning` and ``diagnostics["zero_delta"] = True``.
        """
        from editlens.lm.arch import weight_param

        bad: dict[str, int] = {}
        for name in deltas:
            w = weight_param(lm.module(name)).detach()
            n_bad = int((~torch.isfinite(w)).sum())
            if n_bad:
                bad[name] = n_bad
        if bad:
            if sequence is None:
                snap.restore()
                snap.clear()
            where = ", ".join(f"{k} ({v} of {weight_param(lm.module(k)).numel()} values)" for k, v in bad.items())
            raise MethodError(f"{self.name}: the edit wrote non-finite values (nan/inf) into {where}; it was undone "
                              "(the weights are restored bit for bit). Check the hyperparameters (learning rates, "
                              "mom2_update_weight, clamp_norm_factor) and the second-moment statistics")
        zero = all(int(torch.count_nonzero(d)) == 0 for d in deltas.values())
        if not zero and sequence is None:
            zero = all(name in snap and torch.equal(weight_param(lm.module(name)), snap.original(name))
                       for name in deltas)
        diagnostics["zero_delta"] = bool(zero)
        if zero:
            warnings.warn(f"{self.name}: the edit changed no weight ("
                          f"{'its update is zero or too small to change any weight' if deltas else 'no module was updated'}"
                          "); diagnostics['zero_delta'] is True. Either the model already met the edit's "
                          "objective (e.g. every loss below the early-stop threshold) or a hyperparameter made the "
                          "update vanish (e.g. a learning rate so large that it overflows and is clamped to nothing)",
                          NoOpEditWarning, stacklevel=3)


class NoOpEditWarning(UserWarning):
    """A weight edit changed no weight (its update is exactly zero); see ``diagnostics["zero_delta"]``."""


_METHODS: dict[str, type[Editor]] = {}


def _adopt_method(name: str, obj: Any) -> None:
    """Register a class named by an ``editlens.methods`` entry point under the entry point's name."""
    if not (isinstance(obj, type) and issubclass(obj, Editor)):
        raise MethodError(f"entry point {name!r} must name a module that registers a method or an Editor subclass, "
                          f"got {obj!r}")
    register_method(name)(obj)


def _discovery():
    from editlens.registry import METHODS_GROUP, Discovery

    global _DISCOVERY
    if _DISCOVERY is None:
        _DISCOVERY = Discovery("method", "editlens.edit", "@register_method(", METHODS_GROUP, lambda: _METHODS,
                               _adopt_method)
    return _DISCOVERY


_DISCOVERY = None


def register_method(name: str) -> Callable[[type[Editor]], type[Editor]]:
    """Class decorator registering an :class:`Editor` under ``name`` (lower case).

    Built-in methods are found by scanning ``editlens.edit``; third-party ones through the ``editlens.methods``
    entry-point group (see :mod:`editlens.registry` and ``docs/adding-a-method.md``)."""
    key = name.lower()

    def deco(cls: type[Editor]) -> type[Editor]:
        if not (isinstance(cls, type) and issubclass(cls, Editor)):
            raise MethodError(f"register_method({name!r}) must decorate an Editor subclass")
        prev = _METHODS.get(key)
        if prev is not None and (prev.__module__, prev.__qualname__) != (cls.__module__, cls.__qualname__):
            # a plugin (or a second module) must not silently replace a method; re-importing a module is fine
            raise MethodError(f"method {key!r} is already registered by {prev.__module__}.{prev.__qualname__}")
        cls.name = key
        hcls = cls.hparams_class
        # name the method in the class's own attribute only: setting it on a shared base class (HParams itself, or
        # a parent another method registered first) would rename that method in every error message
        if hcls is not HParams and hcls.__dict__.get("method", "?") == "?":
            hcls.method = key
        _METHODS[key] = cls
        return cls

    return deco


def registered_methods(*, refresh: bool = False) -> list[str]:
    """Names of the registered methods: the built-in method modules and the ``editlens.methods`` entry points.

    A module that failed to import is reported by :func:`method_import_errors` (and warned about), not listed.
    ``refresh=True`` looks for entry points again (installed since the first call)."""
    _discovery().ensure(refresh=refresh)
    return sorted(_METHODS)


def method_import_errors() -> list[str]:
    """``"<module or entry point>: <error>"`` for every method module that failed to import."""
    _discovery().ensure()
    return _discovery().describe_errors()


def get_method(name: str) -> type[Editor]:
    """The :class:`Editor` class registered as ``name``.

    Raises:
        MethodError: unknown name (listing the registered names and any method module that failed to import).
    """
    key = str(name).lower()
    disc = _discovery()
    disc.ensure()
    if key not in _METHODS:
        disc.ensure(refresh=True)  # an entry point installed since the first look
    if key not in _METHODS:
        raise MethodError(f"unknown editing method {name!r}; registered methods: {', '.join(sorted(_METHODS))}"
                          + disc.notes())
    return _METHODS[key]


def evk_settings(evk_align: Any) -> Any:
    """What to record as ``diagnostics["evk_align"]``: ``None``, the object's ``settings()``/``to_dict()``, or repr."""
    if evk_align is None:
        return None
    for attr in ("settings", "to_dict"):
        fn = getattr(evk_align, attr, None)
        if callable(fn):
            return fn()
    return repr(evk_align)


def _resolve_hparams(editor: Editor, lm: "LM", hparams: HParams | Mapping[str, Any] | None,
                     overrides: Mapping[str, Any]) -> HParams:
    if hparams is None:
        hp = editor.default_hparams(lm)
    elif isinstance(hparams, Mapping):
        hp = editor.default_hparams(lm).replace(**dict(hparams))
    elif isinstance(hparams, editor.hparams_class):
        hp = hparams
    else:
        raise HParamsError(f"method {editor.name!r} expects {editor.hparams_class.__name__}, got "
                           f"{type(hparams).__name__}")
    if overrides:
        hp = hp.replace(**dict(overrides))
    else:
        hp.validate()
    return hp


def _set_trained(editor: Editor, lm: "LM", trained: Any) -> None:
    """Give a trained method its editor (checked against the method and the model); refuse ``trained`` elsewhere."""
    from editlens.edit.trained import resolve_trained

    resolve_trained(editor, lm, trained)


def _check_offload_support(editor: Editor, lm: "LM") -> None:
    if getattr(lm, "device_map", None) is None or editor.supports_offloaded_weights:
        return
    from editlens.lm.placement import offloaded_modules

    off = offloaded_modules(lm.model)
    if off:
        ok = sorted(n for n, cls in _METHODS.items() if cls.supports_offloaded_weights)
        raise MethodError(f"method {editor.name!r} cannot edit a model with offloaded weights ({len(off)} modules, "
                          f"e.g. {off[0]!r}, are kept in accelerate's weights map, not on a device): it reads or "
                          f"trains weights directly. Methods that can: {', '.join(ok)}; or load the model with a "
                          f"device_map that keeps every module on a device")


def _check_evk_support(editor: Editor, evk_align: Any) -> None:
    if evk_align is not None and not editor.supports_evk_align:
        raise MethodError(f"method {editor.name!r} does not take evk_align: EVK-Align regularises a value "
                          "optimisation or a fine-tuning loss (rome, memit, alphaedit, emmet, pmet, prune, rect, ft), "
                          f"which {editor.name!r} does not have")


def _check_cases(cases: Any) -> list["EditCase"]:
    from editlens.data.schema import EditCase

    if isinstance(cases, EditCase):
        return [cases]
    cases = list(cases)
    for i, c in enumerate(cases):
        if not isinstance(c, EditCase):
            raise MethodError(f"case {i} is a {type(c).__name__}, not an EditCase (see editlens.data.schema)")
    if not cases:
        raise MethodError("no cases to edit")
    return cases


def _set_prompt_format(editor: Editor, lm: "LM", prompt_format: Any) -> Any:
    """Resolve ``prompt_format`` on ``lm`` (``auto`` -> raw/chat, see :mod:`editlens.lm.prompting`) and give it to
    ``editor``; :class:`~editlens.errors.PromptFormatError` for an unknown value or ``chat`` without a template."""
    from editlens.lm.prompting import PromptFormat

    editor.prompt_format = PromptFormat.parse(prompt_format, lm.tokenizer)
    return editor.prompt_format


def _check_system_format(editor: Editor, result: Edit, fmt: Any) -> None:
    """A method must honour the edit's prompt format (a system in another format would silently evaluate an edit
    made for other prompts); the edit is undone before the :class:`MethodError`."""
    got = getattr(result.system, "prompt_format", "raw")
    if got != fmt.name:
        with contextlib.suppress(Exception):
            result.undo()
        raise MethodError(f"method {editor.name!r} returned a system posing prompts as {got!r} although "
                          f"prompt_format={fmt.name!r} was asked (the edit was undone); a method builds its system "
                          "with Editor.base_system(lm), which honours the edit's format")


def edit(lm: "LM", cases: Sequence["EditCase"] | "EditCase", method: str = "memit",
         hparams: HParams | Mapping[str, Any] | None = None, *, evk_align: Any = None, progress: bool = False,
         prompt_format: Any = "raw", trained: Any = None, **overrides: Any) -> Edit:
    """Apply ``method`` to ``lm`` for all ``cases`` in one batch; returns a reversible :class:`Edit`.

    Args:
        hparams: an ``HParams`` instance of the method, a mapping of overrides of the model's defaults, or
            ``None`` for the defaults of ``lm``'s architecture.
        evk_align: optional EVK-Align regulariser passed to the method's value optimisation.
        trained: for the trained methods (MEND, MALMEN, KE, SERAC; see :mod:`editlens.edit.trained`): the trained
            editor, a :class:`~editlens.edit.trained.TrainedEditor` or the directory it was saved in; it must have
            been trained for this model. Other methods refuse it.
        prompt_format: ``"raw"`` (default), ``"chat"`` or ``"auto"`` (chat when the tokenizer has a chat template;
            see :mod:`editlens.lm.prompting`). ``Edit.system`` poses prompts in it, and the wrapper methods build
            their edit in it (GRACE/WISE train on the prompts as posed, IKE/SCR write their context in the chat
            turn); weight-editing methods compute their update as their papers do, on the raw rewrite prompts (the
            weights do not depend on how later prompts are posed). Evaluate a wrapper edit in the format it was
            made in.
        **overrides: hyperparameter overrides (unknown key -> :class:`HParamsError`).

    Raises:
        PromptFormatError: an unknown ``prompt_format``, or ``chat`` for a model without a chat template (before
            any work).
    """
    editor, fmt, cases, hp = _prepare(lm, cases, method, hparams, overrides, evk_align, prompt_format, trained,
                                      "edit(lm, cases, 'memit')")
    t0 = time.perf_counter()
    with _model_lock(lm):  # no other thread edits, undoes or reads the weights while this edit is computed
        result = editor.apply(lm, cases, hp, evk_align=evk_align, progress=progress)
        _check_system_format(editor, result, fmt)
    result.diagnostics["wall_time_s"] = time.perf_counter() - t0
    result.diagnostics.setdefault("evk_align", evk_settings(evk_align))
    return result


def _prepare(lm: "LM", cases: Any, method: Any, hparams: Any, overrides: Mapping[str, Any], evk_align: Any,
             prompt_format: Any, trained: Any, example: str) -> tuple["Editor", Any, list, HParams]:
    """The checks and set-up shared by :func:`edit` and :func:`edit_sequential`, all before any work: the method
    (a registered name), the prompt format, EVK-Align and offloading support, the cases and their context length,
    the hyperparameters, the trained editor. Returns ``(editor, prompt format, cases, hparams)``."""
    if not isinstance(method, str):
        raise MethodError(f"method must be a name (str), got {type(method).__name__}; e.g. {example}")
    editor = get_method(method)()
    fmt = _set_prompt_format(editor, lm, prompt_format)
    _check_evk_support(editor, evk_align)
    _check_offload_support(editor, lm)
    cases = _check_cases(cases)
    check_rewrites(lm, cases, fmt)  # every rewrite fits the model's context (ContextLengthError names the case)
    hp = _resolve_hparams(editor, lm, hparams, overrides)
    _set_trained(editor, lm, trained)
    return editor, fmt, cases, hp


def edit_sequential(lm: "LM", cases: Sequence["EditCase"], method: str, *, batch_size: int = 1,
                    hparams: HParams | Mapping[str, Any] | None = None, checkpoints: Iterable[int] = (),
                    callback: Callable[[int, int, Edit], Any] | None = None, evk_align: Any = None,
                    progress: bool = False, seed: int = 0, prompt_format: Any = "raw", trained: Any = None,
                    resume: Mapping[str, Any] | None = None, **overrides: Any) -> Edit:
    """Edit batch after batch (``batch_size`` cases each), in order; returns the run's reversible :class:`Edit`.

    ``callback(step, n_edits, edit_so_far)`` is called after the batch at which ``n_edits`` first reaches each
    value in ``checkpoints`` (numbers of edits; empty = after every batch). ``edit_so_far.system`` is the
    current edited system and ``edit_so_far.diagnostics`` the last step's diagnostics plus ``n_edits``,
    ``step`` and the cumulative ``wall_time_s``. Its ``undo()`` restores the original weights.

    Memory stays flat over long runs: every tensor is cloned once into the run's snapshot, per-step Edits are
    dropped, the fingerprint tag is replaced (not stacked) at each step.

    ``prompt_format`` (``raw`` / ``chat`` / ``auto``) is the run's, as for :func:`edit`: every step is made in it and
    every ``edit_so_far.system`` poses prompts in it. ``trained`` is the trained editor of a trained method, as for
    :func:`edit`.

    ``resume``: a run's state after some of its steps, as :func:`load_sequence` reads it from a file that
    :func:`save_sequence` wrote (at a checkpoint, from ``edit_so_far``): the run goes on from there — the edited
    weights, the method's accumulated state and the random-number state are restored, the first ``n_edits``
    cases are not edited again — and ends exactly as the uninterrupted run would (bit for bit: tested for every
    weight-editing method). ``lm`` must be unedited, and method, cases, batch size, seed and hyperparameters
    those of the saved run (checked; :class:`MethodError` otherwise). Checkpoints at or before the resumed
    point are not called back.
    """
    if batch_size < 1:
        raise MethodError(f"batch_size must be >= 1, got {batch_size}")
    editor, fmt, cases, hp = _prepare(lm, cases, method, hparams, overrides, evk_align, prompt_format, trained,
                                      "edit_sequential(lm, cases, 'memit')")
    state = editor.begin_sequence(lm, hp, seed=seed)
    marks = sorted({int(c) for c in checkpoints})
    run_id = uuid.uuid4().hex[:8]
    total = 0.0
    run_edit: Edit | None = None
    next_mark = 0
    first = 0
    if resume is not None:
        total = _resume_sequence(lm, editor, hp, state, resume, cases, batch_size, seed)
        first = state.n_edits
        next_mark = sum(1 for m in marks if m <= first)
        system = editor.base_system(lm)  # built after the run's tag was pushed: pinned to the resumed weights
        run_edit = _RunEdit(system, editor.name, cases, hp, {"n_edits": state.n_edits, "step": state.step,
                                                             "wall_time_s": total, "resumed_at": state.n_edits},
                            lm=lm, state=state)
        run_edit.tag = state.tag
    bar = None
    if progress:
        from editlens.progress import bar as progress_bar

        bar = progress_bar(total=len(cases), desc=f"{editor.name} sequential", unit="edit")
        if first:
            bar.update(first)
    try:
        for start in range(first, len(cases), batch_size):
            batch = cases[start:start + batch_size]
            t0 = time.perf_counter()
            # each step (computation, weight update, new fingerprint tag) runs under the model's lock; the
            # callback runs outside it
            with _model_lock(lm):
                step_edit = editor.apply(lm, batch, hp, evk_align=evk_align, progress=False, sequence=state)
                if getattr(step_edit.system, "prompt_format", "raw") != fmt.name:  # the run is undone below
                    raise MethodError(f"method {editor.name!r} returned a system posing prompts as "
                                      f"{getattr(step_edit.system, 'prompt_format', 'raw')!r} although "
                                      f"prompt_format={fmt.name!r} was asked (the run was undone); a method builds "
                                      "its system with Editor.base_system(lm), which honours the edit's format")
                total += time.perf_counter() - t0
                state.step += 1
                state.n_edits += len(batch)
                # replace the run's fingerprint tag so lm.fingerprint reflects the weights after this step
                new_tag = f"{editor.name}:seq:{run_id}:" + hashlib.sha256(
                    f"{state.tag}|{step_edit.tag}".encode()).hexdigest()[:16]
                if state.tag is not None:
                    lm.pop_state(state.tag)
                lm.push_state(new_tag, state.snapshot)
                state.tag = new_tag
            diag = dict(step_edit.diagnostics)
            diag.update(n_edits=state.n_edits, step=state.step, wall_time_s=total,
                        evk_align=evk_settings(evk_align))
            system = step_edit.system
            if type(system).__name__ == "ModelSystem":
                # pin the step's system to the weights after this step (the tag was just pushed)
                from editlens.system import ModelSystem

                system = ModelSystem(lm, prompt_format=system.format, batch_tokens=system.batch_tokens)
            if run_edit is None:
                run_edit = _RunEdit(system, editor.name, cases, hp, diag, lm=lm, state=state)
            else:
                run_edit.system = system
                run_edit.diagnostics = diag
            run_edit.tag = new_tag
            del step_edit
            if bar is not None:
                bar.update(len(batch))
            if callback is not None:
                if not marks:
                    callback(state.step, state.n_edits, run_edit)
                else:
                    hit = False
                    while next_mark < len(marks) and state.n_edits >= marks[next_mark]:
                        next_mark += 1
                        hit = True
                    if hit:
                        callback(state.step, state.n_edits, run_edit)
    except BaseException:
        # leave the model as it was before the run
        with _model_lock(lm):
            if run_edit is not None:
                run_edit.undo()
            else:
                state.snapshot.restore()
                if state.on_undo is not None:
                    state.on_undo()
        raise
    finally:
        if bar is not None:
            bar.close()
    assert run_edit is not None
    return run_edit


class SequenceResumeError(MethodError):
    """``edit_sequential(..., resume=...)`` was given the state of another run (or the model is edited); raised
    before any weight is touched."""


#: the ``format`` entry of a file written by :func:`save_sequence`
SEQUENCE_FORMAT = "editlens sequence checkpoint v1"
_PLAIN_LEAVES = (str, int, float, bool, type(None))


def _is_plain(obj: Any) -> bool:
    """Whether ``obj`` is tensors, numbers, strings and None in dicts, lists and tuples (what a file read with
    ``torch.load(weights_only=True)`` may hold)."""
    if isinstance(obj, (torch.Tensor,) + _PLAIN_LEAVES):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_is_plain(x) for x in obj)
    if type(obj) is dict:
        return all(_is_plain(k) and _is_plain(v) for k, v in obj.items())
    return False


def _rewrite_keys(cases: Sequence["EditCase"]) -> Iterator[str]:
    """``case_id|prompt|subject|target_new`` of every rewrite, in order: what identifies the edited facts (in an
    edit's fingerprint tag and a saved sequential run)."""
    for c in cases:
        for r in c.rewrites:
            yield f"{c.case_id}|{r.prompt}|{r.subject}|{r.target_new}"


def _cases_digest(cases: Sequence["EditCase"]) -> str:
    h = hashlib.sha256()
    for key in _rewrite_keys(cases):
        h.update(f"{key}\n".encode())
    return h.hexdigest()[:16]


def sequence_payload(run: Edit) -> dict[str, Any] | None:
    """What :func:`save_sequence` writes for a sequential run (``edit_so_far`` of :func:`edit_sequential`), or
    ``None`` when the run cannot be saved: a method that keeps its edits outside the weights (GRACE, WISE, MELO,
    SERAC, IKE, SCR: their memories are objects, not tensors) or a model with offloaded weights."""
    state = getattr(run, "state", None)
    lm = run.lm
    if not isinstance(state, SequenceState) or state.on_undo is not None or lm is None:
        return None
    if getattr(lm, "device_map", None):
        return None
    if not _is_plain(state.data):
        return None
    weights = {name: live.detach().clone() for name, (live, _) in state.snapshot._saved.items()}
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if getattr(lm.device, "type", "cpu") == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(lm.device)
    return {"format": SEQUENCE_FORMAT, "method": run.method, "hparams": repr(run.hparams),
            "base_fingerprint": lm.base_fingerprint, "step": state.step, "n_edits": state.n_edits,
            "seed": state.seed, "cases": _cases_digest(list(run.cases)[:state.n_edits]), "tag": state.tag,
            "wall_time_s": float(run.diagnostics.get("wall_time_s", 0.0)), "weights": weights,
            "data": state.data, "rng": rng}


def save_sequence(run: Edit, path: Any, **extra: Any) -> bool:
    """Write the state of a sequential run (``edit_so_far`` in :func:`edit_sequential`'s callback) to ``path``,
    atomically, for :func:`load_sequence` / ``edit_sequential(..., resume=...)``: the edited weights (the tensors
    the run changed), the method's accumulated state (``SequenceState.data``: AlphaEdit's ``K_p K_pᵀ``, LoRA's
    adapters, the cached statistics...), the random-number state and what identifies the run (method,
    hyperparameters, seed, the edited cases, the base model). Plain ``torch.save`` of tensors and plain
    containers only, read back with ``weights_only=True`` (a file never makes editlens run code). ``extra``
    plain values are stored beside (e.g. the runner's unit id). Returns ``False`` (nothing written) for a run
    :func:`sequence_payload` cannot save."""
    import os
    import tempfile
    from pathlib import Path

    payload = sequence_payload(run)
    if payload is None:
        return False
    payload["extra"] = dict(extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=str(path.parent))
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def load_sequence(path: Any, map_location: Any = None) -> dict[str, Any]:
    """Read a file written by :func:`save_sequence` (``torch.load(weights_only=True)``: tensors and plain
    containers only). Raises :class:`MethodError` naming the file when it cannot be read or is not one."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is refused with its reason
        raise MethodError(f"sequence checkpoint {path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != SEQUENCE_FORMAT:
        raise MethodError(f"sequence checkpoint {path}: not an editlens sequence checkpoint")
    for key, typ in (("step", int), ("n_edits", int), ("weights", dict), ("data", dict), ("rng", dict)):
        if not isinstance(obj.get(key), typ):
            raise MethodError(f"sequence checkpoint {path}: field {key!r} is missing or not a {typ.__name__}")
    return obj


def _resume_sequence(lm: "LM", editor: "Editor", hp: HParams, state: SequenceState, saved: Mapping[str, Any],
                     cases: Sequence["EditCase"], batch_size: int, seed: int) -> float:
    """Put a saved run's state (:func:`load_sequence`) into ``lm`` and ``state`` (see ``edit_sequential``'s
    ``resume``); returns the run's wall time so far. Everything is checked before the weights are touched."""
    from editlens.lm.arch import weight_param

    def refuse(why: str) -> MethodError:
        return SequenceResumeError(f"edit_sequential(resume=...): {why}")

    n, step = int(saved["n_edits"]), int(saved["step"])
    if saved.get("method") != editor.name:
        raise refuse(f"the saved run is of method {saved.get('method')!r}, not {editor.name!r}")
    if saved.get("hparams") != repr(hp):
        raise refuse(f"the saved run's hyperparameters differ: {saved.get('hparams')} vs {hp!r}")
    if int(saved.get("seed", -1)) != int(seed):
        raise refuse(f"the saved run has seed {saved.get('seed')}, not {seed}")
    if not 0 < n <= len(cases) or step * batch_size != n:
        raise refuse(f"the saved run is at {n} edits in {step} steps: not a point of a run of {len(cases)} cases "
                     f"in batches of {batch_size}")
    if saved.get("cases") != _cases_digest(cases[:n]):
        raise refuse(f"the saved run edited other cases than the first {n} given")
    if saved.get("base_fingerprint") != lm.base_fingerprint:
        raise refuse("the saved run is of another model (base fingerprint differs)")
    if lm.fingerprint != lm.base_fingerprint:
        raise refuse("the model is edited; resume on the unedited model")
    weights = dict(saved["weights"])
    live = {}
    for name, value in weights.items():
        try:
            param = weight_param(lm.module(name))
        except Exception as e:  # noqa: BLE001
            raise refuse(f"the saved weight {name!r} is not a module weight of this model ({e})") from None
        if not isinstance(value, torch.Tensor) or value.shape != param.shape or value.dtype != param.dtype:
            raise refuse(f"the saved weight {name!r} does not match the model's ({tuple(param.shape)}, {param.dtype})")
        live[name] = param
    with _model_lock(lm), torch.no_grad():
        for name, param in live.items():
            state.snapshot.save(name, param)
            param.copy_(weights[name].to(param.device))
        state.data.clear()
        state.data.update(saved["data"])
        state.step, state.n_edits, state.tag = step, n, str(saved.get("tag"))
        lm.push_state(state.tag, state.snapshot)
    rng = saved["rng"]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and getattr(lm.device, "type", "cpu") == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], lm.device)
    return float(saved.get("wall_time_s", 0.0))


class _RunEdit(Edit):
    """The Edit of a sequential run: undo restores the run's snapshot and runs ``state.on_undo``."""

    def __init__(self, system: "System", method: str, cases: Sequence["EditCase"], hparams: HParams,
                 diagnostics: dict[str, Any], *, lm: "LM", state: SequenceState):
        super().__init__(system, method, cases, hparams, diagnostics, lm=lm, snapshot=state.snapshot, tag=state.tag)
        self.state = state

    def _undo(self) -> None:
        if self.undone:
            return
        self._on_undo = self.state.on_undo
        self.tag = self.state.tag
        super()._undo()
        self.state.data.clear()
