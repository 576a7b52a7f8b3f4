"""The contracts every editing method and every metric must keep, as public checks.

* :func:`check_method` runs a registered method on a tiny random model and checks the method contract.
* :func:`check_metric` evaluates a registered metric family on the shipped sample cases and checks the metric
  contract.

editlens's own tests run both over every registered method and metric (so a new one is covered the day it is
registered), and plugin authors run the same checks on theirs::

    from editlens.testing import check_method, check_metric
    check_method("rome-plugin")          # raises ContractError naming what is broken
    check_metric("target_logprob")

A broken contract raises :class:`ContractError` (an ``AssertionError``) whose message names the method or metric,
the check and what differed. :func:`check_metric` raises :class:`ContractSkip` (with the reason) when a metric
declares a resource that is not available here (``Metric.requires`` / ``Metric.needs``); it never passes silently.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch

from editlens.errors import EditlensError, HParamsError, MethodError

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.evaluate.core import Metric
    from editlens.system import System
    from editlens.lm.load import LM

__all__ = ["ContractError", "ContractSkip", "check_method", "check_metric", "contract_cases", "edit_cases",
           "plain_value", "to_toml"]

#: tolerance of "bulk evaluation equals the naive loop" (absolute, plus this times |value|)
BULK_TOL = 1e-5
#: tolerance of "base against itself gives the identity value"
IDENTITY_TOL = 1e-6


class ContractError(AssertionError):
    """A method or metric breaks its contract (the message says which check and what differed)."""


class ContractSkip(Exception):
    """A metric cannot be checked here (a declared resource is missing); ``reason`` says what it needs."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# =========================================================================================== shared helpers
def plain_value(v: Any) -> bool:
    """True for JSON-like plain data: ``None``, bool, int, float, str, and lists/tuples/dicts (str keys) of them.

    Tensors, numpy arrays and numpy scalars are not plain (diagnostics are stored in SQLite and JSON)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return type(v) in (type(None), bool, int, float, str)
    if isinstance(v, (list, tuple)):
        return all(plain_value(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and plain_value(x) for k, x in v.items())
    return False


def _toml_value(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x, f"{where}[{i}]") for i, x in enumerate(v)) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x, f'{where}.{k}')}" for k, x in v.items()) + "}"
    raise ContractError(f"{where} = {v!r} ({type(v).__name__}) cannot be written in a TOML spec")


def to_toml(table: Mapping[str, Any], where: str = "hparams") -> str:
    """``key = value`` lines of a TOML table (``None`` values are left out: TOML has no null)."""
    return "".join(f"{json.dumps(k)} = {_toml_value(v, f'{where}.{k}')}\n" for k, v in table.items() if v is not None)


def _tensors(lm: "LM") -> dict[str, torch.Tensor]:
    out = {f"param:{n}": p for n, p in lm.model.named_parameters()}
    out.update({f"buffer:{n}": b for n, b in lm.model.named_buffers()})
    return out


def _copy(lm: "LM") -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in _tensors(lm).items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)  # 1-d: a 0-d tensor cannot be viewed as bytes of another size
    return t.view(torch.uint8) if t.dtype != torch.bool else t


def _diff(lm: "LM", before: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that are not bit for bit what they were (with a short description)."""
    now = _tensors(lm)
    out = []
    for n in sorted(set(before) | set(now)):
        if n not in now or n not in before:
            out.append(f"{n} ({'added' if n in now else 'removed'})")
            continue
        a, b = before[n], now[n].detach()
        if a.shape != b.shape or a.dtype != b.dtype:
            out.append(f"{n} (shape/dtype {tuple(a.shape)}/{a.dtype} -> {tuple(b.shape)}/{b.dtype})")
        elif not torch.equal(_bits(a), _bits(b)):
            n_diff = int((_bits(a) != _bits(b)).reshape(a.numel(), -1).any(-1).sum()) if a.numel() else 0
            with torch.no_grad():
                mx = float((a.double() - b.double()).abs().nan_to_num(nan=math.inf).max()) if a.is_floating_point() \
                    else math.nan
            out.append(f"{n} ({n_diff} element(s) differ, max |diff| {mx:.3g})")
    return out


def _hook_count(lm: "LM") -> int:
    n = 0
    for m in lm.model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs"):
            n += len(getattr(m, attr, {}) or {})
    return n


def edit_cases(n: int = 3) -> list["EditCase"]:
    """``n`` (<= 4) fictional single-fact edits with paraphrase and neighbourhood probes (for method checks)."""
    from editlens.data.schema import Probe, Rewrite, make_case

    rows = [("Alice Smith", "Paris", "London"), ("Bob Jones", "Tokyo", "Madrid"), ("Carol White", "Oslo", "Rome"),
            ("Dan Brown", "Lima", "Cairo")]
    if not 1 <= n <= len(rows):
        raise ValueError(f"edit_cases: n must be 1..{len(rows)}, got {n}")
    out = []
    for i, (subj, new, old) in enumerate(rows[:n]):
        out.append(make_case(f"contract{i}", Rewrite("{} lives in the city of", subj, new, old), {
            "paraphrase": [Probe(f"{subj} is a resident of the city of", new, old)],
            "neighborhood": [Probe("Eve Black lives in the city of", "Berlin", new)],
        }))
    return out


class _Stage:
    """Turns an unexpected exception of one check stage into a ContractError naming the stage."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> "_Stage":
        return self

    def __exit__(self, et: Any, e: BaseException | None, tb: Any) -> bool:
        if e is None or isinstance(e, (ContractError, ContractSkip)) or not isinstance(e, Exception):
            return False
        raise ContractError(f"{self.what}: raised {type(e).__name__}: {e}") from e


# =========================================================================================== methods
class _EvkProbe:
    """A stand-in EVK-Align regulariser: counts calls and returns a zero loss that is differentiable in ``delta``."""

    def __init__(self) -> None:
        self.calls = 0

    def settings(self) -> dict[str, Any]:
        return {"probe": "editlens.testing", "weight": 0.0}

    def __call__(self, ctx: Any) -> torch.Tensor:
        self.calls += 1
        delta = getattr(ctx, "delta", None)
        if torch.is_tensor(delta):
            return (delta * 0.0).sum()
        return torch.zeros((), requires_grad=True)


def _hparams_roundtrip(name: str, editor: Any, lm: "LM", hp: Any) -> None:
    """``hp`` written into a TOML spec, validated by the runner, planned, stored as JSON and read back is ``hp``."""
    from editlens.edit.base import _resolve_hparams
    from editlens.runs.spec import check_methods
    from editlens.runs.spec import parse_spec

    where = f"check_method({name!r}) hyperparameters round-trip"
    values = hp.to_dict()
    bad = {k: v for k, v in values.items() if not plain_value(v)}
    if bad:
        raise ContractError(f"{where}: {', '.join(f'{k} = {v!r} ({type(v).__name__})' for k, v in bad.items())} "
                            "cannot be written in a spec or stored (use int, float, bool, str, lists or None)")
    from editlens.edit.trained import TrainableEditor

    train_text, thp = "", None
    if isinstance(editor, TrainableEditor):  # a trained method needs its [methods.train] table; round-trip it too
        thp = editor.train_hparams(lm, editor.contract_train_overrides())
        tvalues = thp.to_dict()
        tbad = {k: v for k, v in tvalues.items() if not plain_value(v)}
        if tbad:
            raise ContractError(f"{where}: training hyperparameters "
                                f"{', '.join(f'{k} = {v!r} ({type(v).__name__})' for k, v in tbad.items())} cannot be "
                                "written in a spec or stored (use int, float, bool, str, lists or None)")
        train_text = '\n[methods.train]\nsynthetic = 3\n\n[methods.train.hparams]\n' + to_toml(tvalues, "train")
    text = (f'metrics = ["kl"]\n\n[model]\nname = {json.dumps(lm.name)}\n\n[[datasets]]\npath = "synthetic:2"\n\n'
            f'[[methods]]\nname = {json.dumps(name)}\n\n[methods.hparams]\n' + to_toml(values, "hparams")
            + train_text + '\n[regime]\nkind = "batch"\nsizes = [1]\n')
    with _Stage(f"{where}: the spec\n{text}"):
        spec = parse_spec(text, "toml", source="check_method.toml")
        check_methods(spec, lm)
        unit = spec.plan()[0]
        meta = json.loads(json.dumps(unit.meta(), sort_keys=True))
        stored = meta["hparams"]
    with _Stage(f"{where}: reading back {stored!r}"):
        back = _resolve_hparams(editor, lm, stored, {})
    if back != hp:
        diffs = [f"{k}: {getattr(hp, k)!r} -> {getattr(back, k)!r}" for k in values if getattr(back, k) != getattr(hp, k)]
        raise ContractError(f"{where}: the values read back differ: {'; '.join(diffs) or repr(back)}")
    if thp is not None:
        with _Stage(f"{where}: reading back the training hyperparameters"):
            tback = editor.train_hparams(lm, meta["trained"]["train"]["hparams"])
        if tback != thp:
            raise ContractError(f"{where}: the training hyperparameters read back differ: {tback!r} != {thp!r}")


def _check_undo(name: str, what: str, lm: "LM", before: Mapping[str, torch.Tensor], fp: str, hooks: int) -> None:
    diff = _diff(lm, before)
    if diff:
        raise ContractError(f"check_method({name!r}): {what} did not restore every tensor bit for bit: "
                            + "; ".join(diff[:5]) + (f" (+{len(diff) - 5} more)" if len(diff) > 5 else ""))
    if lm.fingerprint != fp:
        raise ContractError(f"check_method({name!r}): {what} left lm.fingerprint {lm.fingerprint!r} (was {fp!r}; "
                            "call lm.pop_state / use Editor.weight_edit)")
    if _hook_count(lm) != hooks:
        raise ContractError(f"check_method({name!r}): {what} left {_hook_count(lm) - hooks} hook(s) on the model")


def _check_diagnostics(name: str, what: str, diag: Any) -> None:
    if not isinstance(diag, dict):
        raise ContractError(f"check_method({name!r}): {what}: diagnostics is a {type(diag).__name__}, not a dict")
    bad = [f"{k!r} = {type(v).__name__}" for k, v in diag.items() if not (isinstance(k, str) and plain_value(v))]
    if bad:
        raise ContractError(f"check_method({name!r}): {what}: diagnostics must be plain Python values (float(), "
                            f"int(), str, lists of them), not {', '.join(bad)}")


def _answers(system: "System", prompts: Sequence[str]) -> torch.Tensor:
    return system.next_token_logprobs(list(prompts)).float()


def check_method(name: str, lm: "LM | None" = None, *, cases: Sequence["EditCase"] | None = None) -> dict[str, Any]:
    """Check the editing-method contract of the registered method ``name``.

    On ``lm`` (default: a fresh ``tiny-llama``, a random 4-layer model) with the method's defaults for that model:

    1. the defaults are valid; the hyperparameters round-trip through a TOML spec (validated by the runner) and
       the JSON the store keeps, back to equal values; an unknown hyperparameter is an :class:`HParamsError`
       raised before any weight changes;
    2. ``edit`` runs on one case and on two cases, returns an ``Edit`` of that method whose system answers, and
       changes something (a weight or the system's next-token distribution on the edit prompt);
    3. ``undo()`` restores every parameter and buffer bit for bit, the fingerprint and the model's hooks;
    4. ``edit_sequential`` over 3 cases, one per step, calls back 3 times and its ``undo()`` restores everything;
    5. diagnostics are plain Python values (no tensors or numpy values);
    6. ``evk_align`` is either applied (called during the edit) and recorded in ``diagnostics["evk_align"]``, or
       refused with a :class:`MethodError` before any work.

    A trained method (:class:`~editlens.edit.trained.TrainableEditor`: MEND, MALMEN, KE, SERAC) is first trained on
    the check's cases with its ``contract_train_overrides()`` (a few seconds on the tiny model), and every edit
    above gets ``trained=``. It is further checked that: an edit without ``trained=`` is a :class:`MethodError`;
    training left the weights untouched; the editor saved and loaded back has the same tensors bit for bit and
    makes the same edit bit for bit; an editor recorded for other weights is refused.

    Returns a report ``{"method", "model", "checks": [...], "evk_align": "applied" | "refused", "seconds"}``.

    Raises:
        ContractError: the first broken check, naming it.
    """
    from editlens.edit.base import Edit, edit, edit_sequential, get_method
    from editlens.system import ModelSystem

    t0 = time.perf_counter()
    with _Stage(f"check_method({name!r}): get_method"):
        cls = get_method(name)
    if lm is None:
        import editlens

        lm = editlens.load_model("tiny-llama")
    cases = list(cases) if cases is not None else edit_cases(3)
    if len(cases) < 3:
        raise ValueError("check_method needs at least 3 cases")
    editor = cls()
    checks: list[str] = []
    before = _copy(lm)
    fp = lm.fingerprint
    hooks = _hook_count(lm)
    prompts = [c.rewrite.text for c in cases[:2]]
    base_out = _answers(ModelSystem(lm), prompts)

    # 0. trained methods: train a small editor first (every edit below is made with it)
    kw: dict[str, Any] = {}
    from editlens.edit.trained import TrainableEditor

    if isinstance(editor, TrainableEditor):
        kw["trained"] = _check_trained(name, editor, lm, cases, before, fp, hooks)
        checks.append("trained: needs trained=, training leaves weights, save/load bit for bit, same edit, "
                      "other model refused")

    # 1. hyperparameters
    with _Stage(f"check_method({name!r}): default hyperparameters for {lm.name}"):
        hp = editor.default_hparams(lm)
        if not isinstance(hp, cls.hparams_class):
            raise ContractError(f"check_method({name!r}): default_hparams returned a {type(hp).__name__}, not "
                                f"{cls.hparams_class.__name__}")
        hp.validate()
    _hparams_roundtrip(name, editor, lm, hp)
    checks.append("hparams round-trip through a spec")
    bogus = "no_such_hyperparameter_for_the_contract"
    try:
        e = edit(lm, cases[:1], name, **kw, **{bogus: 1})
    except HParamsError as err:
        if bogus not in str(err):
            raise ContractError(f"check_method({name!r}): the HParamsError for an unknown hyperparameter does not "
                                f"name it: {err}") from None
    except Exception as err:  # noqa: BLE001
        raise ContractError(f"check_method({name!r}): an unknown hyperparameter raised {type(err).__name__} "
                            f"({err}), not HParamsError") from err
    else:
        with contextlib.suppress(Exception):
            e.undo()
        raise ContractError(f"check_method({name!r}): an unknown hyperparameter ({bogus}=1) was accepted; it must "
                            "be an HParamsError")
    _check_undo(name, "a refused unknown hyperparameter", lm, before, fp, hooks)
    checks.append("unknown hyperparameter -> HParamsError")

    # 2.-3. one and two cases, undo
    for n in (1, 2):
        what = f"edit of {n} case(s)"
        with _Stage(f"check_method({name!r}): {what}"):
            e = edit(lm, cases[:n], name, **kw)
        if not isinstance(e, Edit) or e.method != name or len(e.cases) != n:
            raise ContractError(f"check_method({name!r}): {what} returned {e!r}; expected an Edit of method {name!r} "
                                f"with {n} case(s)")
        _check_diagnostics(name, what, e.diagnostics)
        with _Stage(f"check_method({name!r}): the system of the {what} answering"):
            out = _answers(e.system, prompts)
        if out.shape != base_out.shape or not torch.isfinite(out).any(-1).all():
            raise ContractError(f"check_method({name!r}): the system of the {what} gave next-token log-probs of "
                                f"shape {tuple(out.shape)} (expected {tuple(base_out.shape)}) or no finite value")
        if not _diff(lm, before) and torch.equal(out, base_out):
            raise ContractError(f"check_method({name!r}): the {what} changed nothing (no weight, and the system's "
                                "next-token distribution on the edit prompts is the base model's)")
        with _Stage(f"check_method({name!r}): undo of the {what}"):
            e.undo()
        _check_undo(name, f"undo() of the {what}", lm, before, fp, hooks)
        with _Stage(f"check_method({name!r}): a second undo() of the {what}"):
            e.undo()
        checks.append(f"{what}: runs, undo bit for bit")

    # 4. sequential
    steps: list[tuple[int, int]] = []
    diags: list[dict] = []

    def cb(step: int, n_edits: int, ed: Any) -> None:
        steps.append((step, n_edits))
        diags.append(dict(ed.diagnostics))

    with _Stage(f"check_method({name!r}): edit_sequential of 3 cases, 1 per step"):
        run = edit_sequential(lm, cases[:3], name, batch_size=1, callback=cb, **kw)
    if steps != [(1, 1), (2, 2), (3, 3)]:
        raise ContractError(f"check_method({name!r}): edit_sequential called back with (step, n_edits) {steps}, "
                            "expected [(1, 1), (2, 2), (3, 3)]")
    for i, d in enumerate(diags):
        _check_diagnostics(name, f"sequential step {i + 1}", d)
    with _Stage(f"check_method({name!r}): undo of the sequential run"):
        run.undo()
    _check_undo(name, "undo() of a 3-step sequential run", lm, before, fp, hooks)
    checks.append("sequential 3 steps: undo bit for bit")
    checks.append("diagnostics are plain values")

    # 6. evk_align
    probe = _EvkProbe()
    try:
        e = edit(lm, cases[:1], name, evk_align=probe, **kw)
    except MethodError as err:
        if probe.calls:
            raise ContractError(f"check_method({name!r}): evk_align was refused ({err}) after the method had already "
                                "called it; refuse before any work") from None
        _check_undo(name, "a refused evk_align", lm, before, fp, hooks)
        evk = "refused"
    except Exception as err:  # noqa: BLE001
        raise ContractError(f"check_method({name!r}): edit with evk_align raised {type(err).__name__}: {err} "
                            "(apply it, or refuse it with a MethodError)") from err
    else:
        try:
            if probe.calls == 0:
                raise ContractError(f"check_method({name!r}): evk_align was accepted but never called (silently "
                                    "ignored); pass it to the value optimisation / loss, or refuse it")
            if e.diagnostics.get("evk_align") != probe.settings():
                raise ContractError(f"check_method({name!r}): evk_align was applied but diagnostics['evk_align'] is "
                                    f"{e.diagnostics.get('evk_align')!r}, not its settings {probe.settings()!r}")
        finally:
            e.undo()
        _check_undo(name, "undo() of an edit with evk_align", lm, before, fp, hooks)
        evk = "applied"
    checks.append(f"evk_align {evk}")
    return {"method": name, "model": lm.name, "checks": checks, "evk_align": evk,
            "seconds": time.perf_counter() - t0}


def _check_trained(name: str, editor: Any, lm: "LM", cases: Sequence["EditCase"], before: Mapping[str, torch.Tensor],
                   fp: str, hooks: int) -> Any:
    """The trained-method part of :func:`check_method`; returns the trained editor the other checks edit with."""
    import tempfile

    from editlens.edit.base import edit
    from editlens.edit.trained import TrainedEditor, train

    try:
        edit(lm, cases[:1], name)
    except MethodError as err:
        if "trained" not in str(err):
            raise ContractError(f"check_method({name!r}): editing without trained= raised a MethodError that does "
                                f"not say a trained editor is needed: {err}") from None
    except Exception as err:  # noqa: BLE001
        raise ContractError(f"check_method({name!r}): editing without trained= raised {type(err).__name__} "
                            f"({err}), not MethodError") from err
    else:
        raise ContractError(f"check_method({name!r}): a trained method edited without trained=")
    _check_undo(name, "an edit refused for lack of a trained editor", lm, before, fp, hooks)
    with _Stage(f"check_method({name!r}): training with contract_train_overrides()"):
        te = train(name, lm, list(cases), progress=False, **editor.contract_train_overrides())
    _check_undo(name, "training", lm, before, fp, hooks)
    if not isinstance(te, TrainedEditor) or te.method != name or not te.tensors:
        raise ContractError(f"check_method({name!r}): train() returned {te!r}; expected a TrainedEditor of {name!r} "
                            "with its learned tensors")
    with tempfile.TemporaryDirectory() as tmp, _Stage(f"check_method({name!r}): save and load the editor"):
        back = TrainedEditor.load(te.save(Path(tmp) / "editor"))
    if set(back.tensors) != set(te.tensors) or any(
            back.tensors[k].dtype != te.tensors[k].dtype or not torch.equal(_bits(back.tensors[k]),
                                                                            _bits(te.tensors[k].cpu()))
            for k in te.tensors):
        raise ContractError(f"check_method({name!r}): the editor loaded back differs from the one saved")
    if back.hparams != json.loads(json.dumps(te.hparams)) or back.base_fingerprint != te.base_fingerprint:
        raise ContractError(f"check_method({name!r}): hyperparameters or fingerprint changed through save/load")
    outs = []
    for which in (te, back):
        with _Stage(f"check_method({name!r}): edit with the {'trained' if which is te else 'loaded'} editor"):
            e = edit(lm, cases[:1], name, trained=which)
            outs.append((_copy(lm), _answers(e.system, [cases[0].rewrite.text])))
            e.undo()
        _check_undo(name, "undo() of an edit with a trained editor", lm, before, fp, hooks)
    (w1, o1), (w2, o2) = outs
    if any(not torch.equal(_bits(w1[k]), _bits(w2[k])) for k in w1) or not torch.equal(o1, o2):
        raise ContractError(f"check_method({name!r}): the editor loaded back makes a different edit than the one "
                            "trained (weights or answers differ)")
    alien = dataclasses.replace(te, base_fingerprint="0" * 16, model_name="another-model")
    try:
        edit(lm, cases[:1], name, trained=alien)
    except EditlensError as err:
        if "trained for model 'another-model'" not in str(err):
            raise ContractError(f"check_method({name!r}): an editor of other weights was refused without naming "
                                f"the model: {err}") from None
    else:
        raise ContractError(f"check_method({name!r}): an editor trained for other weights was accepted")
    _check_undo(name, "a refused editor of another model", lm, before, fp, hooks)
    return te


# =========================================================================================== metrics
def contract_cases() -> list["EditCase"]:
    """The cases :func:`check_metric` evaluates: the first case of every shipped sample dataset (CounterFact,
    ZsRE, KnowEdit, MQuAKE, RippleEdits; ids prefixed with the file) plus a case with reference texts (for the
    generation metrics). Every built-in metric gets rows from them."""
    import editlens
    from editlens.data.schema import Probe, Rewrite, make_case

    data = Path(__file__).resolve().parent / "resources" / "data"
    out: list[EditCase] = []
    for f in sorted(data.glob("*.json")):
        for c in editlens.load_cases(f, limit=1):
            out.append(dataclasses.replace(c, case_id=f"{f.stem.split('_')[0]}:{c.case_id}"))
    rw = Rewrite("The capital of {} is", "Freedonia", "Seoul", "Tokyo")
    out.append(make_case("handmade:0", rw, {
        "paraphrase": [Probe("Freedonia's capital city is", "Seoul", "Tokyo")],
        "neighborhood": [Probe("The capital of Japan is", "Tokyo", "Seoul")],
        "generation": [Probe("Freedonia is famous for")],
    }, meta={"reference_texts": ["Seoul is a big city in Korea", "Tokyo has many trains"]}))
    return out


def _noisy_tiny(seed: int = 1, scale: float = 0.05) -> "LM":
    import editlens

    lm = editlens.load_model("tiny-llama")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if n.endswith("mlp.down_proj.weight"):
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    lm.push_state("editlens.testing-noise")
    return lm


def _range_of(m: "Metric", metric_name: str) -> tuple[float, float] | None:
    for suffix, rng in (getattr(m, "aux_ranges", None) or {}).items():
        if metric_name.endswith(suffix):
            return rng
    return getattr(m, "value_range", None)


def _check_rows(where: str, rows: Sequence[Any]) -> list[tuple[str, str, str, float]]:
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, tuple) or len(r) != 4:
            raise ContractError(f"{where}: row {i} is {r!r}; rows are Row(case_id, probe_kind, metric, value)")
        cid, kind, metric, value = r
        for field, v in (("case_id", cid), ("probe_kind", kind), ("metric", metric)):
            if not isinstance(v, str) or not v:
                raise ContractError(f"{where}: row {i} {r!r} has {field} {v!r}; it must be a non-empty str")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ContractError(f"{where}: row {i} {r!r} has value of type {type(value).__name__}; use float()")
        out.append((cid, kind, metric, float(value)))
    keys = [r[:3] for r in out]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ContractError(f"{where}: more than one row for (case_id, probe_kind, metric) = {dup}")
    return out


def check_metric(name: str, *, cases: Sequence["EditCase"] | None = None, system: "System | None" = None,
                 base: "System | None" = None) -> dict[str, Any]:
    """Check the metric contract of the registered metric family ``name``.

    For every instance the family checks (:meth:`Metric.check_instances`, default: ``from_name(name, None)``), on
    :func:`contract_cases` with ``base`` = a tiny random model and ``system`` = the same model with seeded noise on
    its MLP weights (or the systems given):

    1. rows carry ``case_id``, ``probe_kind``, ``metric`` (non-empty str) and a numeric value, one row per key;
    2. bulk :func:`~editlens.evaluate.evaluate` equals the naive loop (every request answered alone, on demand):
       the same row keys and values within ``1e-5`` (+ ``1e-6·|value|``);
    3. every value lies in the declared :attr:`Metric.value_range` (or ``aux_ranges`` for auxiliary rows);
    4. a metric that compares with the base declares :attr:`Metric.identity` and gives it, within ``1e-6``, when
       the base is evaluated against itself.

    Returns a report ``{"metric", "instances", "rows", "identity", "seconds"}``.

    Raises:
        ContractError: the first broken check, naming it.
        ContractSkip: the metric declares ``requires`` (Python packages) that are missing, or ``needs`` (a
            resource) and gives no rows on the contract cases; ``reason`` says what it needs.
    """
    import importlib.util

    from editlens.evaluate.core import BASE, EDITED, OnDemandAnswers, evaluate, registered_metrics
    from editlens.system import ModelSystem

    t0 = time.perf_counter()
    reg = registered_metrics()
    if name not in reg:
        with _Stage(f"check_metric({name!r})"):
            from editlens.evaluate.core import resolve_metrics

            resolve_metrics([name])  # raises the registry's MetricError (with any import failure)
        raise ContractError(f"check_metric({name!r}): {name!r} is not a registered metric family")
    cls = reg[name]
    missing = [p for p in getattr(cls, "requires", ()) if importlib.util.find_spec(p) is None]
    if missing:
        raise ContractSkip(f"metric {name!r} needs the Python package(s) {', '.join(missing)}"
                           + (f" ({cls.needs})" if getattr(cls, "needs", None) else ""))
    with _Stage(f"check_metric({name!r}): instances"):
        instances = list(cls.check_instances())
    if not instances:
        raise ContractError(f"check_metric({name!r}): check_instances() gave no metric instance")
    cases = list(cases) if cases is not None else contract_cases()
    if base is None:
        import editlens

        base = ModelSystem(editlens.load_model("tiny-llama"))
    if system is None:
        system = ModelSystem(_noisy_tiny())
    n_rows, identity = 0, {}
    for m in instances:
        where = f"check_metric({name!r}) instance {m.name!r}"
        needs_base = any(role == BASE for role, _ in m.requests(cases))
        with _Stage(f"{where}: naive loop (every request answered alone)"):
            answers = OnDemandAnswers({EDITED: system, BASE: base})
            raw = list(m.rows(cases, answers))
        naive = _check_rows(f"{where}", raw)
        if not naive:
            if getattr(cls, "needs", None):
                raise ContractSkip(f"metric {name!r} gave no rows on the contract model and cases: it needs "
                                   f"{cls.needs}")
            raise ContractError(f"{where}: no rows on the contract cases ({len(cases)} cases of every shipped "
                                "format); a metric must give rows (or declare what it `needs`)")
        with _Stage(f"{where}: bulk evaluate"):
            bulk = evaluate(system, cases, base=base, metrics=[m], progress=False, cache=False)
        got = {r[:3]: r[3] for r in _check_rows(f"{where} (bulk rows)", [tuple(r) for r in bulk.rows])}
        want = {r[:3]: r[3] for r in naive}
        if set(got) != set(want):
            only_b, only_n = sorted(set(got) - set(want))[:3], sorted(set(want) - set(got))[:3]
            raise ContractError(f"{where}: bulk evaluation and the naive loop give different rows: only in bulk "
                                f"{only_b}, only naive {only_n}")
        for k, v in want.items():
            b = got[k]
            if not (b == v or (math.isnan(b) and math.isnan(v)) or abs(b - v) <= BULK_TOL + 1e-6 * abs(v)):
                raise ContractError(f"{where}: bulk evaluation gives {b!r} for {k} but the naive loop {v!r}")
        for k, v in want.items():
            rng = _range_of(m, k[2])
            if rng is None:
                raise ContractError(f"{where}: declares no value_range (a (low, high) class attribute of the metric)")
            lo, hi = rng
            if not (lo <= v <= hi):
                raise ContractError(f"{where}: value {v!r} of {k} lies outside the declared range [{lo}, {hi}]")
        n_rows += len(want)
        if needs_base:
            ident = getattr(m, "identity", None)
            if ident is None:
                raise ContractError(f"{where}: compares with the base but declares no identity (the value of a "
                                    "system evaluated against itself)")
            with _Stage(f"{where}: base against itself"):
                same = evaluate(base, cases, base=base, metrics=[m], progress=False, cache=False)
            off = [(tuple(r[:3]), r.value) for r in same.rows if not abs(r.value - float(ident)) <= IDENTITY_TOL]
            if not same.rows or off:
                raise ContractError(f"{where}: the base against itself must give the identity value {ident!r} on "
                                    f"every row; got {off[:3] or 'no rows'}")
            identity[m.name] = float(ident)
    return {"metric": name, "instances": [m.name for m in instances], "rows": n_rows, "identity": identity,
            "seconds": time.perf_counter() - t0}
