"""The editing API contract: registry, hyperparameter overrides, reversible edits, sequential runs."""
from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch

from editlens.data.schema import Rewrite, make_case
from editlens.edit import (Edit, Editor, HParams, WeightSnapshot, edit, edit_sequential, get_method,
                           register_method)
from editlens.errors import HParamsError, MethodError


@dataclass
class _AddHParams(HParams):
    layer: int = 1
    scale: float = 1e-3
    ARCH_DEFAULTS = {"tiny": {"layer": 2}}


@register_method("_test_add")
class _AddEditor(Editor):
    """Adds a seeded random delta to one MLP output projection (test only)."""

    hparams_class = _AddHParams

    def apply(self, lm, cases, hparams, *, evk_align=None, progress=True, sequence=None):
        name = lm.arch.mlp_out_at(hparams.layer)
        w = lm.module(name).weight
        g = torch.Generator().manual_seed(len(cases) + (sequence.step if sequence else 0))
        delta = torch.randn(w.shape, generator=g) * hparams.scale
        return self.weight_edit(lm, cases, hparams, {name: delta}, {"delta_norm/0": float(delta.norm())}, sequence)


def _cases(n):
    return [make_case(str(i), Rewrite("{} lives in", f"Person{i}", "Paris")) for i in range(n)]


def _state(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def test_registry_and_unknown_method():
    assert get_method("_test_add") is _AddEditor
    with pytest.raises(MethodError, match="registered methods"):
        get_method("no-such-method")


@pytest.mark.parametrize("fn, example", [(edit, "edit(lm, cases, 'memit')"),
                                         (edit_sequential, "edit_sequential(lm, cases, 'memit')")])
def test_method_and_cases_swapped_is_refused_before_any_work(tiny_llama, fn, example):
    before = _state(tiny_llama)
    with pytest.raises(MethodError, match=r"method must be a name \(str\), got list; e\.g\. " + re.escape(example)):
        fn(tiny_llama, "_test_add", _cases(1))
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.model.state_dict().items())


def test_hparams_for_model_and_unknown_override(tiny_llama):
    hp = _AddHParams.for_model(tiny_llama)
    assert hp.layer == 2
    with pytest.raises(HParamsError, match=r"'bogus'.*_test_add"):
        hp.replace(bogus=1)
    with pytest.raises(HParamsError, match="bogus"):
        edit(tiny_llama, _cases(1), "_test_add", bogus=3)
    assert hp.replace(scale=1).scale == 1.0


def test_edit_undo_bit_for_bit_and_fingerprint(tiny_llama):
    before = _state(tiny_llama)
    fp0 = tiny_llama.fingerprint
    e = edit(tiny_llama, _cases(2), "_test_add", layer=1)
    assert isinstance(e, Edit) and e.diagnostics["wall_time_s"] > 0
    assert e.system.fingerprint != fp0
    w = tiny_llama.module(tiny_llama.arch.mlp_out_at(1)).weight
    assert not torch.equal(w, before["model.layers.1.mlp.down_proj.weight"])
    e.undo()
    assert tiny_llama.fingerprint == fp0
    for k, v in tiny_llama.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    e.undo()  # idempotent


def test_undo_order_enforced(tiny_llama):
    e1 = edit(tiny_llama, _cases(1), "_test_add")
    e2 = edit(tiny_llama, _cases(2), "_test_add")
    with pytest.raises(MethodError, match="reverse order"):
        e1.undo()
    e2.undo()
    e1.undo()


def test_sequential_checkpoints_and_undo(tiny_llama):
    before = _state(tiny_llama)
    fp0 = tiny_llama.fingerprint
    seen = []
    fps = []

    def cb(step, n, ed):
        seen.append((step, n))
        fps.append(ed.system.fingerprint)

    run = edit_sequential(tiny_llama, _cases(7), "_test_add", batch_size=2, checkpoints=[1, 4, 7], callback=cb)
    assert seen == [(1, 2), (2, 4), (4, 7)]
    assert len(set(fps)) == 3 and fp0 not in fps
    assert len(tiny_llama._state) == 1  # the run's tag is replaced, not stacked
    assert run.diagnostics["n_edits"] == 7
    run.undo()
    assert tiny_llama.fingerprint == fp0
    for k, v in tiny_llama.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_snapshot_clones_once():
    p = torch.nn.Parameter(torch.ones(3))
    snap = WeightSnapshot()
    snap.save("p", p)
    with torch.no_grad():
        p.add_(1)
    snap.save("p", p)  # second save keeps the first copy
    snap.restore()
    assert torch.equal(p.data, torch.ones(3))
