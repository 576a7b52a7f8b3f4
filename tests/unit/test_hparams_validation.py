"""Non-finite, boolean and out-of-range hyperparameters are refused before any work; edits that write non-finite
values are undone; edits that change nothing say so; argmax metrics on non-finite logits are NaN (issue 13, items
5 and 14)."""
from __future__ import annotations

import math
import textwrap
import warnings

import pytest
import torch

import editlens
from editlens.data import synthetic_cases
from editlens.edit.base import Editor, HParams, NoOpEditWarning, edit_sequential, get_method, register_method, \
    registered_methods
from editlens.errors import HParamsError, MethodError, SpecError
from editlens.evaluate import functional as F
from editlens.lm.arch import weight_view
from editlens.lm.ops import TeacherForced
from tests.conftest import shipped_methods

BAD = [math.nan, math.inf, -math.inf]


def _hparams_classes():
    out = {}
    for name in shipped_methods():
        out[name] = get_method(name).hparams_class
    assert {"rome", "memit", "alphaedit", "emmet", "ft-m", "grace", "wise", "scr", "pmet", "prune", "rect"} <= set(out)
    return out


def _cases_float_fields():
    return [(m, f) for m, h in _hparams_classes().items() for f in h.float_fields()]


def test_every_float_field_has_a_declared_range():
    missing = [(m, f) for m, h in _hparams_classes().items() for f in h.float_fields() if f not in h.value_ranges()]
    assert not missing, f"float hyperparameters without a declared Range: {missing}"
    assert len(_cases_float_fields()) >= 40  # the registry really was walked


@pytest.mark.parametrize("method,key", _cases_float_fields())
def test_non_finite_and_boolean_values_are_refused_for_every_float_field(method, key):
    hcls = get_method(method).hparams_class
    base = hcls()
    for bad in BAD:
        with pytest.raises(HParamsError, match=rf"'{key}'.*finite"):
            base.replace(**{key: bad})
        with pytest.raises(HParamsError, match=rf"'{key}'.*finite"):
            base.replace(**{key: str(bad)})  # as read from a CLI / YAML string
        with pytest.raises(HParamsError, match=rf"'{key}'"):
            hcls(**{key: bad})  # direct construction is checked too
    with pytest.raises(HParamsError, match=rf"'{key}'.*boolean"):
        base.replace(**{key: True})
    with pytest.raises(HParamsError, match=rf"'{key}'.*boolean"):
        hcls(**{key: True})
    # the declared range is enforced: a value just outside it is refused, the default is inside it
    rng = hcls.value_ranges()[key]
    assert getattr(base, key) in rng
    if rng.lo != -math.inf:
        below = rng.lo if rng.lo_open else rng.lo - 1.0
        if below not in rng.also:
            with pytest.raises(HParamsError, match=rf"'{key}'"):
                base.replace(**{key: below})


def test_int_fields_refuse_booleans_and_non_finite():
    hp = get_method("memit").hparams_class()
    for key in ("v_num_grad_steps", "n_prefixes"):
        with pytest.raises(HParamsError, match=key):
            hp.replace(**{key: True})
        with pytest.raises(HParamsError, match=key):
            hp.replace(**{key: math.inf})
    with pytest.raises(HParamsError, match="layers"):
        hp.replace(layers=[1, True])


def test_issue_examples_are_refused(tiny_llama):
    cases = synthetic_cases(1, seed=0)
    before = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    for method, kw, key in [("memit", {"mom2_update_weight": math.inf}, "mom2_update_weight"),
                            ("rome", {"clamp_norm_factor": math.nan}, "clamp_norm_factor"),
                            ("rome", {"v_lr": math.nan}, "v_lr"),
                            ("rome", {"v_lr": True}, "v_lr"),
                            ("memit", {"layers": [1, 1, 2]}, "layers"),
                            ("pmet", {"layers": [2, 2]}, "layers"),
                            ("grace", {"lr": -1.0}, "lr"),
                            ("wise", {"lr": math.inf}, "lr")]:
        with pytest.raises(HParamsError, match=key):
            editlens.edit(tiny_llama, cases, method=method, **kw)
    assert tiny_llama.state == ()
    for k, v in tiny_llama.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_alphaedit_errors_name_alphaedit_not_memit():
    hp = get_method("alphaedit").hparams_class()
    with pytest.raises(HParamsError, match="'alphaedit'"):
        hp.replace(v_lr=math.nan)


def test_spec_sweep_of_non_finite_values_fails_dry_run(tmp_path):
    from editlens.runs.runner import check_methods
    from editlens.runs.spec import parse_spec

    for axis, values in [("memit.v_lr", "[0.5, nan]"), ("memit.clamp_norm_factor", "[inf]"),
                         ("memit.kl_factor", "[-inf, 1.0]")]:
        text = textwrap.dedent(f"""\
            name = "x"
            metrics = ["kl"]
            [model]
            name = "tiny-llama"
            [[datasets]]
            path = "synthetic:4"
            [[methods]]
            name = "memit"
            [regime]
            kind = "batch"
            sizes = [2]
            [sweep]
            "{axis}" = {values}
            """)
        with pytest.raises(SpecError, match=axis.split(".")[1]):
            spec = parse_spec(text, "toml", base_dir=tmp_path)
            check_methods(spec)
    # a boolean where a number is expected fails too, naming the key
    text = textwrap.dedent("""\
        name = "x"
        metrics = ["kl"]
        [model]
        name = "tiny-llama"
        [[datasets]]
        path = "synthetic:4"
        [[methods]]
        name = "rome"
        hparams = { v_lr = true }
        [regime]
        kind = "batch"
        sizes = [2]
        """)
    with pytest.raises(SpecError, match="v_lr"):
        check_methods(parse_spec(text, "toml", base_dir=tmp_path))


# ------------------------------------------------------------------------------------------------ after the edit
class _FixedHParams(HParams):
    pass


@register_method("_test_fixed_delta")
class _FixedDelta(Editor):
    """Adds ``lm._test_delta_value`` (a float, possibly nan/0) to layer 1's MLP output projection (test only)."""

    hparams_class = _FixedHParams

    def apply(self, lm, cases, hparams, *, evk_align=None, progress=True, sequence=None):
        mod = lm.arch.mlp_out_at(1)
        w = weight_view(lm.module(mod))
        delta = torch.full(w.shape, 0.01)
        delta[0, :8] = lm._test_delta_value
        if lm._test_delta_value == 0.0:
            delta.zero_()
        return self.weight_edit(lm, cases, hparams, {mod: delta}, {}, sequence=sequence)


def _weights(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_edit_writing_non_finite_values_is_undone(tiny_llama, value):
    lm = tiny_llama
    lm._test_delta_value = value
    before = _weights(lm)
    with pytest.raises(MethodError, match=r"non-finite.*mlp.*8 of"):
        editlens.edit(lm, synthetic_cases(1, seed=0), method="_test_fixed_delta")
    assert lm.state == () and lm.weights_fingerprint() == lm.base_fingerprint
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # in a sequential run (second step goes bad) the whole run is undone
    lm._test_delta_value = 0.5

    class Flip:
        n = 0

    def cb(step, n_edits, run):
        lm._test_delta_value = value
    with pytest.raises(MethodError, match="non-finite"):
        edit_sequential(lm, synthetic_cases(2, seed=0), "_test_fixed_delta", callback=cb)
    assert lm.state == ()
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_zero_delta_warns_and_is_in_diagnostics(tiny_llama):
    lm = tiny_llama
    lm._test_delta_value = 0.0
    with pytest.warns(NoOpEditWarning, match="changed no weight"):
        e = editlens.edit(lm, synthetic_cases(1, seed=0), method="_test_fixed_delta")
    assert e.diagnostics["zero_delta"] is True
    e.undo()
    lm._test_delta_value = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoOpEditWarning)
        e = editlens.edit(lm, synthetic_cases(1, seed=0), method="_test_fixed_delta")
    assert e.diagnostics["zero_delta"] is False
    e.undo()


def test_huge_value_learning_rate_gives_a_detected_no_op(tiny_llama):
    """``v_lr=1e30``: the value optimisation overflows and the clamp leaves nothing; that is reported."""
    with pytest.warns(NoOpEditWarning):
        e = editlens.edit(tiny_llama, synthetic_cases(1, seed=0), method="rome", v_lr=1e30)
    assert e.diagnostics["zero_delta"] is True
    e.undo()


# ------------------------------------------------------------------------------------------------ metrics
def _tf(logprobs, argmax, target):
    return TeacherForced(target_ids=torch.tensor(target), logprobs=torch.tensor(logprobs, dtype=torch.float32),
                         argmax_ids=torch.tensor(argmax))


def test_argmax_metrics_on_non_finite_scores_are_nan():
    good = _tf([-0.1, -0.2], [3, 4], [3, 4])
    nan = _tf([math.nan, math.nan], [0, 0], [3, 4])
    ninf = _tf([-math.inf, -0.3], [7, 4], [3, 4])
    assert F.token_accuracy(good) == 1.0
    assert math.isnan(F.token_accuracy(nan)) and math.isnan(F.token_accuracy(ninf))
    assert math.isnan(nan.token_accuracy)
    assert all(math.isnan(x) for x in F.contrastive(nan, good))
    assert all(math.isnan(x) for x in F.contrastive(good, ninf))
    assert F.contrastive(good, _tf([-1.0, -2.0], [3, 4], [5, 6]))[0] == 1.0
    p = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]), -1)
    q = p.clone()
    q[1, 0] = math.nan
    out = F.topk_overlap(p, q, 2)
    assert out[0].item() == 1.0 and math.isnan(out[1].item())


def test_evaluate_on_nan_weights_reports_nan_not_zero(tiny_llama):
    from editlens.evaluate import ModelSystem

    lm = tiny_llama
    cases = synthetic_cases(2, seed=0)
    with torch.no_grad():
        lm.module(lm.arch.mlp_out_at(1)).weight[0, 0] = math.nan
    res = editlens.evaluate(ModelSystem(lm), cases, metrics=["t_acc", "c_acc"], cache=False, progress=False)
    vals = res.to_pandas()["value"]
    assert len(vals) > 0 and vals.isna().all(), vals.tolist()
