"""Trained editors (MEND, MALMEN, KE, SERAC): the joint between training an editor and editing with it.

A trained editing method is an :class:`Editor` subclass of :class:`TrainableEditor`. It has two sets of typed
hyperparameters: ``TrainHParams`` (how the editor is trained: steps, learning rate, network size...) and its
ordinary ``hparams_class`` (how an edit is made with a trained editor). Training produces a :class:`TrainedEditor`,
a plain container of tensors and JSON that is saved as ``editor.safetensors`` + ``editor.json`` (never pickle: a
saved editor never makes editlens run code) and records the fingerprint of the base model it was trained for.

Use::

    te = editlens.train("mend", lm, cases, val_cases=val)        # editlens.edit.train
    te.save("editors/mend-smollm2")
    e = editlens.edit(lm, new_cases, method="mend", trained="editors/mend-smollm2")

:func:`train` checks everything it can before any work: the method is trainable, the training (and validation)
cases carry the probes the method trains on (``train_needs``: an error names the case and the missing probe kind),
the hyperparameters are known and valid. It then calls the method's :meth:`TrainableEditor.fit` under the model's
lock and checks that training left the model's weights as they were (methods train on copies or restore them).

Writing a trained method (contract for implementers): subclass :class:`TrainableEditor`, set ``TrainHParams``
(an :class:`~editlens.edit.base.HParams` dataclass) and ``train_needs``, implement :meth:`~TrainableEditor.fit`
(return a :class:`TrainedEditor` with every learned tensor in ``tensors``), :meth:`~TrainableEditor.apply` (read
``self.trained``) and :meth:`~TrainableEditor.contract_train_overrides` (settings that make training on a tiny random
model take seconds, used by :func:`editlens.testing.check_method`). :func:`check_finite`, :class:`EarlyStopping`,
:func:`progress_bar` and :func:`data_hash` are helpers for the training loop.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import torch

from editlens.edit.base import Editor, HParams, _model_lock, get_method
from editlens.errors import EditlensError, HParamsError, MethodError, TrainingError

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM

__all__ = ["TrainedEditor", "TrainableEditor", "TrainingError", "train", "resolve_trained", "check_finite",
           "EarlyStopping", "progress_bar", "data_hash", "check_training_cases", "trainable_methods",
           "EDITOR_JSON", "EDITOR_TENSORS", "FORMAT_VERSION"]

#: file names of a saved editor
EDITOR_JSON = "editor.json"
EDITOR_TENSORS = "editor.safetensors"
#: version of the saved-editor format (bumped when the layout changes; older files are refused with a message)
FORMAT_VERSION = 1
_JSON_KEYS = ("format", "method", "hparams", "base_fingerprint", "model_name", "meta", "tensors", "sha256")


def _plain_json(v: Any, where: str) -> Any:
    """``v`` as plain JSON (dict/list/str/int/float/bool/None); non-finite floats become strings; anything else is an
    error naming ``where`` (a saved editor holds no objects that would need code to read back)."""
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, Mapping):
        return {str(k): _plain_json(x, f"{where}.{k}") for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain_json(x, f"{where}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return _plain_json(v.item(), where)
    raise EditlensError(f"trained editor: {where} is a {type(v).__name__}, which cannot be saved as JSON; keep "
                        "tensors in TrainedEditor.tensors and plain values in meta/hparams")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class TrainedEditor:
    """What training a method produced: its learned tensors, the training hyperparameters, and the base model.

    Attributes:
        method: the registered method name (``"mend"``...).
        hparams: the training hyperparameters (plain JSON values).
        base_fingerprint: ``lm.base_fingerprint`` of the model the editor was trained for; :meth:`check_model`
            refuses another model.
        model_name: ``lm.name`` of that model (for messages).
        tensors: every learned tensor, by flat name (saved with safetensors).
        meta: plain JSON: loss curve, validation figures, numbers of cases, data hash, wall time...
    """

    method: str
    hparams: dict[str, Any]
    base_fingerprint: str
    model_name: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ identity
    def check_model(self, lm: "LM") -> None:
        """Raise :class:`EditlensError` when ``lm`` is not the model this editor was trained for."""
        fp = getattr(lm, "base_fingerprint", None)
        if fp != self.base_fingerprint:
            raise EditlensError(
                f"this {self.method!r} editor was trained for model {self.model_name!r} (weights fingerprint "
                f"{self.base_fingerprint}); it cannot edit {getattr(lm, 'name', '?')!r} (fingerprint {fp}): a trained "
                f"editor is tied to the weights it was trained on; train one for this model with "
                f"editlens.train({self.method!r}, lm, cases) or `editlens train --method {self.method} --model ...`")

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name``, with an error naming the editor's tensors when it is missing."""
        if name not in self.tensors:
            shown = ", ".join(sorted(self.tensors)[:12])
            raise EditlensError(f"trained {self.method!r} editor has no tensor {name!r} (it has: {shown}"
                                f"{', ...' if len(self.tensors) > 12 else ''}); was it saved by another version?")
        return self.tensors[name]

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike, *, force: bool = False) -> Path:
        """Write ``editor.safetensors`` and ``editor.json`` into ``directory`` (created; atomically replaced).

        Refuses a non-empty directory that is not a saved editor unless ``force``."""
        from safetensors.torch import save_file

        d = Path(directory).expanduser()
        if d.exists() and not d.is_dir():
            raise EditlensError(f"cannot save the trained editor: {d} exists and is not a directory")
        if d.is_dir() and any(d.iterdir()) and not force:
            names = {p.name for p in d.iterdir()}
            if not names <= {EDITOR_JSON, EDITOR_TENSORS}:
                raise EditlensError(f"cannot save the trained editor: {d} is not empty and holds other files "
                                    f"({', '.join(sorted(names)[:6])}); choose a new directory or pass force=True")
        for k, t in self.tensors.items():
            if not isinstance(t, torch.Tensor):
                raise EditlensError(f"trained editor tensor {k!r} is a {type(t).__name__}, not a torch.Tensor")
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=d.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); a saved editor is an ordinary directory
        try:
            tensors = {k: t.detach().to("cpu").contiguous() for k, t in self.tensors.items()}
            save_file(tensors, str(tmp / EDITOR_TENSORS))
            doc = {"format": FORMAT_VERSION, "method": self.method,
                   "hparams": _plain_json(self.hparams, "hparams"),
                   "base_fingerprint": self.base_fingerprint, "model_name": self.model_name,
                   "meta": _plain_json(self.meta, "meta"),
                   "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                               for k, t in sorted(tensors.items())},
                   "sha256": _sha256_file(tmp / EDITOR_TENSORS)}
            (tmp / EDITOR_JSON).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
            if d.is_dir():  # replace the files of an existing editor: tensors first, the JSON (with its sha256) last
                for name in (EDITOR_TENSORS, EDITOR_JSON):
                    os.replace(tmp / name, d / name)
            else:
                os.replace(tmp, d)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TrainedEditor":
        """Read a saved editor (no code runs: JSON and safetensors only). Errors name the file and the field."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory).expanduser()
        jpath, tpath = d / EDITOR_JSON, d / EDITOR_TENSORS
        if not d.is_dir():
            raise EditlensError(f"no trained editor at {d}: not a directory (expected {EDITOR_JSON} and "
                                f"{EDITOR_TENSORS}, written by TrainedEditor.save or `editlens train --out`)")
        for p in (jpath, tpath):
            if not p.is_file():
                raise EditlensError(f"no trained editor at {d}: {p.name} is missing (a saved editor has "
                                    f"{EDITOR_JSON} and {EDITOR_TENSORS})")
        try:
            doc = json.loads(jpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EditlensError(f"{jpath}: not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise EditlensError(f"{jpath}: expected a JSON object, got {type(doc).__name__}")
        missing = [k for k in _JSON_KEYS if k not in doc]
        if missing:
            raise EditlensError(f"{jpath}: missing field(s) {', '.join(missing)}")
        if doc["format"] != FORMAT_VERSION:
            raise EditlensError(f"{jpath}: field 'format' is {doc['format']!r}; this editlens reads format "
                                f"{FORMAT_VERSION} (retrain the editor with this version)")
        for k, kind in (("method", str), ("base_fingerprint", str), ("model_name", str), ("sha256", str),
                        ("hparams", dict), ("meta", dict), ("tensors", dict)):
            if not isinstance(doc[k], kind):
                raise EditlensError(f"{jpath}: field {k!r} must be a {kind.__name__}, got {type(doc[k]).__name__}")
        digest = _sha256_file(tpath)
        if digest != doc["sha256"]:
            raise EditlensError(f"{tpath}: content does not match the sha256 recorded in {EDITOR_JSON} "
                                "(the file was changed or truncated after saving)")
        try:
            tensors = load_file(str(tpath))
        except (SafetensorError, OSError, ValueError) as e:
            raise EditlensError(f"{tpath}: not a readable safetensors file ({e})") from None
        if set(tensors) != set(doc["tensors"]):
            raise EditlensError(f"{jpath}: field 'tensors' lists {sorted(doc['tensors'])[:6]}... but "
                                f"{EDITOR_TENSORS} holds {sorted(tensors)[:6]}...")
        return cls(method=doc["method"], hparams=doc["hparams"], base_fingerprint=doc["base_fingerprint"],
                   model_name=doc["model_name"], tensors=dict(tensors), meta=doc["meta"])

    def __repr__(self) -> str:
        n = sum(t.numel() for t in self.tensors.values())
        return (f"TrainedEditor(method={self.method!r}, model={self.model_name!r}, tensors={len(self.tensors)} "
                f"({n:,} values))")


class TrainableEditor(Editor):
    """Base class of the trained editing methods (see the module docstring)."""

    #: typed training hyperparameters (``HParams`` subclass with ``RANGES`` and ``ARCH_DEFAULTS``)
    TrainHParams: ClassVar[type[HParams]] = HParams
    #: probe kinds every training (and validation) case must carry
    train_needs: ClassVar[tuple[str, ...]] = ("paraphrase", "neighborhood")
    #: the editor made by training; set by :func:`editlens.edit.edit` / ``edit_sequential`` from ``trained=``
    trained: "TrainedEditor | None" = None

    def fit(self, lm: "LM", cases: Sequence["EditCase"], val_cases: Sequence["EditCase"] | None, hp: HParams, *,
            progress: bool, seed: int) -> TrainedEditor:
        """Train the editor on ``cases`` (validate on ``val_cases``); the model's weights must be left unchanged."""
        raise NotImplementedError

    def contract_train_overrides(self) -> dict[str, Any]:
        """``TrainHParams`` overrides that make training on a tiny random model take seconds (contract checks)."""
        return {}

    def train_hparams(self, lm: "LM", overrides: Mapping[str, Any] | None = None) -> HParams:
        """The training hyperparameters for ``lm`` with ``overrides`` (unknown key -> :class:`HParamsError`)."""
        cls = self.TrainHParams
        if cls is HParams:
            raise MethodError(f"trainable method {self.name!r} declares no TrainHParams")
        if "method" not in cls.__dict__:  # name the method in error messages about its training hyperparameters
            cls.method = self.name
        hp = cls.for_model(lm)
        if overrides:
            hp = hp.replace(**dict(overrides))
        else:
            hp.validate()
        return hp


def trainable_methods() -> list[str]:
    """Names of the registered methods that edit with a trained editor."""
    from editlens.edit.base import registered_methods

    return [m for m in registered_methods() if issubclass(get_method(m), TrainableEditor)]


def _trainable(method: str) -> TrainableEditor:
    if not isinstance(method, str):
        raise MethodError(f"method must be a name (str), got {type(method).__name__}; e.g. train('mend', lm, cases)")
    editor = get_method(method)()
    if not isinstance(editor, TrainableEditor):
        raise MethodError(f"method {method!r} is not trained before editing (it edits directly with "
                          f"editlens.edit); trainable methods: {', '.join(trainable_methods()) or 'none'}")
    return editor


def check_training_cases(method: str, cases: Any, needs: Sequence[str], *, what: str = "training") -> list["EditCase"]:
    """The cases as a list, or a :class:`TrainingError` naming the first case that lacks a probe kind in ``needs``
    (or is not an :class:`~editlens.data.schema.EditCase`)."""
    from editlens.data.schema import EditCase

    if isinstance(cases, EditCase):
        cases = [cases]
    try:
        cases = list(cases)
    except TypeError:
        raise TrainingError(f"{what} cases for {method!r} must be a list of EditCase, got "
                            f"{type(cases).__name__}") from None
    if not cases:
        raise TrainingError(f"no {what} cases for {method!r} (editlens.synthetic_cases(n) makes some)")
    for i, c in enumerate(cases):
        if not isinstance(c, EditCase):
            raise TrainingError(f"{what} case {i} for {method!r} is a {type(c).__name__}, not an EditCase")
        for kind in needs:
            if not c.probes.get(kind):
                raise TrainingError(
                    f"{what} case {i} (case_id {c.case_id!r}) has no {kind!r} probe, which {method!r} trains on "
                    f"(it needs: {', '.join(needs)}); use data that has them (CounterFact, ZsRE, "
                    f"editlens.synthetic_cases) or drop the case")
    return cases


def data_hash(cases: Sequence["EditCase"]) -> str:
    """A content hash of a list of cases (order matters): what a cached editor was trained on."""
    h = hashlib.sha256()
    for c in cases:
        h.update(json.dumps(dataclasses.asdict(c), sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def check_finite(value: float, *, step: int, what: str) -> None:
    """Raise :class:`TrainingError` when a training loss is NaN or infinite (naming the step and the loss)."""
    v = float(value)
    if not math.isfinite(v):
        raise TrainingError(f"training stopped at step {step}: {what} is {v} (lower the learning rate, check the "
                            "data; nothing was saved)")


class EarlyStopping:
    """Stop when the validation loss has not improved by more than ``min_delta`` for ``patience`` checks."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        if int(patience) < 1:
            raise HParamsError(f"early-stopping patience must be >= 1, got {patience}")
        self.patience, self.min_delta = int(patience), float(min_delta)
        self.best = math.inf
        self.best_step = -1
        self.bad = 0
        self.checks = 0

    def update(self, val_loss: float) -> bool:
        """Record a validation loss; ``True`` when training should stop."""
        v = float(val_loss)
        if v < self.best - self.min_delta:
            self.best, self.best_step, self.bad = v, self.checks, 0
        else:
            self.bad += 1
        self.checks += 1
        return self.bad >= self.patience


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *a: Any, **k: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over ``total`` steps, or a no-op object with the same ``update/set_postfix/close``."""
    if not enabled:
        return _NoBar()
    from editlens.progress import bar

    return bar(total=total, desc=desc, unit="step")


def resolve_trained(editor: Editor, lm: "LM", trained: Any) -> None:
    """Give ``editor`` its trained state from ``trained`` (a directory or a :class:`TrainedEditor`), after checking
    that it is an editor of this method for this model. For untrained methods ``trained`` must be ``None``."""
    if not isinstance(editor, TrainableEditor):
        if trained is not None:
            raise MethodError(f"method {editor.name!r} does not take trained= (it is not a trained editor; "
                              f"trainable methods: {', '.join(trainable_methods())})")
        return
    if trained is None:
        raise MethodError(
            f"method {editor.name!r} edits with a trained editor: pass trained=<directory or TrainedEditor>. Train "
            f"one with te = editlens.train({editor.name!r}, lm, cases) (cases with paraphrase and neighbourhood "
            f"probes; editlens.synthetic_cases(300) when you have none) and te.save(dir), or on the command line "
            f"`editlens train --method {editor.name} --model M --data train.json --out DIR`")
    te = trained if isinstance(trained, TrainedEditor) else TrainedEditor.load(trained)
    if te.method != editor.name:
        raise MethodError(f"the trained editor passed to method {editor.name!r} was trained for method "
                          f"{te.method!r}")
    te.check_model(lm)
    editor.trained = te


def train(method: str, lm: "LM", cases: Sequence["EditCase"], *, val_cases: Sequence["EditCase"] | None = None,
          progress: bool = True, seed: int = 0, **hparams: Any) -> TrainedEditor:
    """Train the editor of ``method`` on ``cases`` for ``lm``; returns a :class:`TrainedEditor` (save it with
    :meth:`TrainedEditor.save`, edit with ``editlens.edit(lm, cases, method, trained=...)``).

    Args:
        cases: training cases; each needs the probe kinds of the method's ``train_needs`` (rewrite, paraphrases,
            neighbourhood prompts). ``editlens.synthetic_cases(n)`` makes some.
        val_cases: validation cases (validation figures and early stopping); by default the method holds out a part
            of ``cases`` as its ``TrainHParams`` say.
        progress: a progress bar over the training steps.
        seed: seeds the editor's initialisation and the order of the data.
        **hparams: training hyperparameter overrides (unknown key -> :class:`HParamsError`).

    Raises:
        MethodError: the method is not trainable. TrainingError: a case lacks a probe the method trains on
        (named), or a loss became NaN/inf (the step is named). HParamsError: a bad hyperparameter. All before any
        work except the NaN check.
    """
    from editlens.lm.load import weights_fingerprint

    editor = _trainable(method)
    cases = check_training_cases(editor.name, cases, editor.train_needs)
    if val_cases is not None:
        val_cases = check_training_cases(editor.name, val_cases, editor.train_needs, what="validation")
    hp = editor.train_hparams(lm, hparams)
    t0 = time.perf_counter()
    with _model_lock(lm):
        before = weights_fingerprint(lm.model)
        torch.manual_seed(seed)
        te = editor.fit(lm, cases, val_cases, hp, progress=progress, seed=seed)
        if weights_fingerprint(lm.model) != before:
            raise TrainingError(f"training {editor.name!r} changed the model's weights (a method must train on a "
                                "copy or restore them); this is a bug in the method")
    if not isinstance(te, TrainedEditor):
        raise MethodError(f"{editor.name}.fit returned {type(te).__name__}, not a TrainedEditor")
    te.hparams = dict(te.hparams) or hp.to_dict()
    te.meta.setdefault("n_train", len(cases))
    te.meta.setdefault("n_val", len(val_cases) if val_cases is not None else None)
    te.meta.setdefault("data_hash", data_hash(cases))
    te.meta.setdefault("seed", seed)
    te.meta["train_wall_time_s"] = time.perf_counter() - t0
    try:
        from importlib.metadata import version

        te.meta.setdefault("editlens_version", version("editlens"))
    except Exception:  # pragma: no cover - not installed as a distribution (source tree on sys.path)
        pass
    return te
