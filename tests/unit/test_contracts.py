"""The method and metric contracts (editlens.testing) over every registered method and metric, and each check
failing on a deliberately broken method or metric."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import editlens
import editlens.edit.base as edit_base
import editlens.evaluate.core as eval_core
from editlens.edit.base import Edit, Editor, WeightSnapshot, register_method, registered_methods
from editlens.edit.rome import ROME, ROMEHParams
from editlens.evaluate.core import BASE, EDITED, Metric, NextToken, Row, Score, registered_metrics
from editlens.evaluate.system import ModelSystem
from editlens.testing import ContractError, ContractSkip, check_method, check_metric, plain_value, to_toml
from tests.conftest import shipped_methods, shipped_metrics


@pytest.fixture(autouse=True)
def _stats_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDITLENS_STATS_DIR", str(tmp_path_factory.getbasetemp() / "stats"))


# ============================================================================ every registered method and metric
@pytest.mark.parametrize("method", shipped_methods())
def test_every_registered_method_keeps_the_contract(method):
    report = check_method(method)
    assert report["method"] == method and report["evk_align"] in ("applied", "refused")
    from editlens.edit import get_method
    from editlens.edit.trained import TrainableEditor

    trained = issubclass(get_method(method), TrainableEditor)  # trained methods add the trained-editor checks
    assert len(report["checks"]) == 7 + trained
    assert any(c.startswith("trained:") for c in report["checks"]) == trained


@pytest.mark.parametrize("method", ["rome", "alphaedit", "ft-l", "grace"])
def test_contract_on_the_gpt2_layout(method):
    """Conv1D weights ([in, out]) and a GPT-2 block: the undo contracts hold there too."""
    check_method(method, editlens.load_model("tiny-gpt2"))


@pytest.mark.parametrize("metric", shipped_metrics())
def test_every_registered_metric_keeps_the_contract(metric):
    try:
        report = check_metric(metric)
    except ContractSkip as e:
        pytest.skip(e.reason)
    assert report["rows"] > 0


def test_evk_align_refused_before_any_work_by_methods_without_an_optimisation(tiny_llama):
    from editlens.edit.evk_align import EvkAlign

    cases = [editlens.testing.edit_cases(1)[0]]
    for method in ("grace", "wise", "ike", "scr"):
        with pytest.raises(editlens.errors.MethodError, match=f"method '{method}' does not take evk_align"):
            editlens.edit(tiny_llama, cases, method, evk_align=EvkAlign())
    assert tiny_llama._state == []


def test_plain_value_and_toml():
    import numpy as np

    assert plain_value({"a": [1, 2.0, "x", None, True]}) and not plain_value(np.float64(1.0))
    assert not plain_value(torch.tensor(1.0)) and not plain_value({1: 2})
    assert to_toml({"a": (1, 2), "b": None, "c": "q\"", "d": float("inf")}) == '"a" = [1, 2]\n"c" = "q\\""\n"d" = inf\n'


# ============================================================================ broken methods
@pytest.fixture()
def registered():
    """Register throw-away methods/metrics for one test, then forget them."""
    names: list[tuple[str, str]] = []

    def method(name: str, cls: type) -> str:
        register_method(name)(cls)
        names.append(("method", name))
        return name

    def metric(name: str, cls: type) -> str:
        eval_core.register_metric(name)(cls)
        names.append(("metric", name))
        return name

    yield method, metric
    for kind, name in names:
        (edit_base._METHODS if kind == "method" else eval_core._REGISTRY).pop(name, None)


class _UlpOffUndo(ROME):
    """undo() leaves one weight one ulp off."""

    def apply(self, lm, cases, hparams, **kw):
        e = super().apply(lm, cases, hparams, **kw)
        inner = e.undo

        def undo():
            inner()
            with torch.no_grad():
                w = lm.module(lm.arch.mlp_out_at(0)).weight.view(-1)
                w[3] = torch.nextafter(w[3], torch.tensor(math.inf, dtype=w.dtype))

        e.undo = undo
        return e


class _TensorDiagnostics(ROME):
    def apply(self, lm, cases, hparams, **kw):
        e = super().apply(lm, cases, hparams, **kw)
        e.diagnostics["update_norm"] = torch.tensor(1.0)
        return e


@dataclass
class _DtypeHParams(ROMEHParams):
    compute_dtype: Any = torch.float32


class _DtypeHP(ROME):
    hparams_class = _DtypeHParams


@dataclass
class _LaxHParams(ROMEHParams):
    def replace(self, **overrides):  # drops what it does not know
        return super().replace(**{k: v for k, v in overrides.items() if k in self.field_names()})


class _LaxHP(ROME):
    hparams_class = _LaxHParams


class _RunSnapshotIgnored(ROME):
    """Sequential steps save tensors in a throw-away snapshot instead of the run's."""

    @staticmethod
    def snapshot_for(sequence):
        return WeightSnapshot()


class _EvkIgnored(ROME):
    def apply(self, lm, cases, hparams, *, evk_align=None, **kw):
        return super().apply(lm, cases, hparams, evk_align=None, **kw)


class _OneCaseOnly(ROME):
    def apply(self, lm, cases, hparams, **kw):
        if len(cases) > 1:
            raise IndexError("only one case supported")
        return super().apply(lm, cases, hparams, **kw)


class _DoesNothing(Editor):
    hparams_class = ROMEHParams

    def apply(self, lm, cases, hparams, *, evk_align=None, progress=True, sequence=None):
        return Edit(ModelSystem(lm), self.name, cases, hparams, {}, lm=lm, undoable=sequence is None)


@pytest.mark.parametrize("cls, match", [
    (_UlpOffUndo, r"undo\(\) of the edit of 1 case\(s\) did not restore every tensor bit for bit: "
                  r"param:model\.layers\.0\.mlp\.down_proj\.weight \(1 element\(s\) differ, max \|diff\| [0-9.e-]+\)"),
    (_TensorDiagnostics, r"edit of 1 case\(s\): diagnostics must be plain Python values .*'update_norm' = Tensor"),
    (_DtypeHP, r"hyperparameters round-trip: compute_dtype = torch\.float32 \(dtype\) cannot be written in a spec"),
    (_LaxHP, r"an unknown hyperparameter \(no_such_hyperparameter_for_the_contract=1\) was accepted"),
    (_RunSnapshotIgnored, r"undo\(\) of a 3-step sequential run did not restore every tensor bit for bit"),
    (_EvkIgnored, r"evk_align was accepted but never called"),
    (_OneCaseOnly, r"edit of 2 case\(s\): raised IndexError: only one case supported"),
    (_DoesNothing, r"the edit of 1 case\(s\) changed nothing"),
], ids=lambda v: v.__name__.strip("_") if isinstance(v, type) else "")
def test_check_method_fails_on_a_broken_method(registered, cls, match):
    method, _ = registered
    name = method(f"contract-{cls.__name__.strip('_').lower()}", cls)
    lm = editlens.load_model("tiny-llama")
    with pytest.raises(ContractError, match=match) as err:
        check_method(name, lm)
    assert f"check_method({name!r})" in str(err.value)


def test_check_method_unknown_name_names_the_registry():
    with pytest.raises(ContractError, match="unknown editing method 'no-such-method'; registered methods: .*rome"):
        check_method("no-such-method")


# ============================================================================ broken metrics
class _Base(Metric):
    value_range = (0.0, 1.0)

    def case_requests(self, case):
        yield EDITED, NextToken(case.rewrite.text)


class _StatefulMetric(_Base):
    """Rows depend on how many times rows() ran: bulk and naive disagree."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def rows(self, cases, answers):
        self.calls += 1
        for c in cases:
            answers.next_token(c.rewrite.text)
            yield Row(c.case_id, "rewrite", self.name, 1.0 / self.calls)


class _OutOfRange(_Base):
    def case_rows(self, case, answers):
        yield Row(case.case_id, "rewrite", self.name, float(answers.next_token(case.rewrite.text).max()))


class _ThreeFields(_Base):
    def case_rows(self, case, answers):
        answers.next_token(case.rewrite.text)
        yield (case.case_id, "rewrite", 0.5)


class _EmptyKind(_Base):
    def case_rows(self, case, answers):
        answers.next_token(case.rewrite.text)
        yield Row(case.case_id, "", self.name, 0.5)


class _NoRange(Metric):
    def case_requests(self, case):
        yield EDITED, NextToken(case.rewrite.text)

    def case_rows(self, case, answers):
        answers.next_token(case.rewrite.text)
        yield Row(case.case_id, "rewrite", self.name, 0.5)


class _WrongIdentity(_Base):
    """1 - top-1 agreement with the base, but declares identity 1 (it is 0)."""

    identity = 1.0

    def case_requests(self, case):
        yield BASE, NextToken(case.rewrite.text)
        yield EDITED, NextToken(case.rewrite.text)

    def case_rows(self, case, answers):
        a = answers.next_token(case.rewrite.text, on=BASE).argmax()
        b = answers.next_token(case.rewrite.text, on=EDITED).argmax()
        yield Row(case.case_id, "rewrite", self.name, float(a != b))


class _NoIdentity(_WrongIdentity):
    identity = None


class _NoRows(_Base):
    def case_rows(self, case, answers):
        return ()


@pytest.mark.parametrize("cls, match", [
    (_StatefulMetric, r"bulk evaluation gives 0\.5 for \(.*\) but the naive loop 1\.0"),
    (_OutOfRange, r"value -[0-9.e+]+ of \(.*\) lies outside the declared range \[0\.0, 1\.0\]"),
    (_ThreeFields, r"row 0 is \(.*0\.5\); rows are Row\(case_id, probe_kind, metric, value\)"),
    (_EmptyKind, r"row 0 Row\(.*\) has probe_kind ''; it must be a non-empty str"),
    (_NoRange, r"declares no value_range"),
    (_WrongIdentity, r"the base against itself must give the identity value 1\.0 on every row; got \[\(\("),
    (_NoIdentity, r"compares with the base but declares no identity"),
    (_NoRows, r"no rows on the contract cases"),
], ids=lambda v: v.__name__.strip("_") if isinstance(v, type) else "")
def test_check_metric_fails_on_a_broken_metric(registered, cls, match):
    _, metric = registered
    name = metric(f"contract_{cls.__name__.strip('_').lower()}", cls)
    with pytest.raises(ContractError, match=match) as err:
        check_metric(name)
    assert f"check_metric({name!r})" in str(err.value)


def test_check_metric_skip_states_the_missing_package(registered):
    class NeedsPackage(_Base):
        requires = ("editlens_package_that_does_not_exist",)
        needs = "an embedding model"

    _, metric = registered
    name = metric("contract_needs_package", NeedsPackage)
    with pytest.raises(ContractSkip, match="needs the Python package\\(s\\) editlens_package_that_does_not_exist "
                                           "\\(an embedding model\\)"):
        check_metric(name)


def test_reflection_checked_with_a_reasoning_system(tiny_llama):
    """reflection is skipped on the tiny model (no <think> blocks); on a system that reasons it keeps the contract."""

    class Reasoning(ModelSystem):
        def generate(self, prompts, max_new_tokens=16):
            return ["<think>The answer is Seoul. Or is it Tokyo?</think> Seoul" for _ in prompts]

    from editlens.testing import contract_cases

    cases = [c for c in contract_cases() if c.case_id == "handmade:0"]
    report = check_metric("reflection", cases=cases, system=Reasoning(tiny_llama), base=ModelSystem(tiny_llama))
    assert report["rows"] >= 1


def test_spec_with_evk_align_for_a_method_without_an_optimisation_fails_validation(monkeypatch):
    from editlens.errors import SpecError
    from editlens.runs.runner import check_methods
    from editlens.runs.spec import parse_spec

    text = ('metrics = ["kl"]\n[model]\nname = "tiny-llama"\n[[datasets]]\npath = "synthetic:2"\n'
            '[[methods]]\nname = "grace"\n[methods.evk_align]\nweight = 1.0\n[regime]\nkind = "batch"\nsizes = [1]\n')
    spec = parse_spec(text, "toml", source="s.toml")
    with pytest.raises(SpecError, match=r"s\.toml:8: methods\[0\]\.evk_align: method 'grace' does not take evk_align"):
        check_methods(spec)
    monkeypatch.setattr(edit_base.get_method("grace"), "supports_evk_align", True)  # as before: accepted
    check_methods(spec)
