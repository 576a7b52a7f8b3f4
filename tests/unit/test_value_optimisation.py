"""The one value optimisation (``editlens.edit.locate.optimise_values``, issue 14 item 3).

* its memo key covers every field of the frozen :class:`ValueSettings` (walked with ``dataclasses.fields``, so a
  field added later is covered without touching this file), the places and the requests;
* ROME's v* / MEMIT's z with editlens's earlier objective, reached through the named options
  ``decay="squared"``, ``early_stop_on="nll"`` (issue 16 made the reference code's objective the default; see
  ``test_rome_reference.py``), are bit for bit those of the pre-refactor loop (``frozen_values_v1.py``), with
  prefixes, the essence KL, several chunks, partial early stopping and an EVK-Align extra loss;
* PMET's value step is the shared function at PMET's places, and equals the pre-refactor PMET copy;
* the two-place objective against an independent reference (one Adam step = −lr·sign of a gradient computed
  request by request, prompt by prompt);
* bad settings / places are refused before any work.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import editlens
from editlens.data.schema import Rewrite, make_case
from editlens.edit import edit, locate
from editlens.edit.evk_align import EvkAlign
from editlens.edit.locate import Place, ValueSettings, optimise_values, value_memo_key
from editlens.edit.pmet import PMETHParams, pmet_places
from editlens.errors import MethodError
from editlens.lm import ops
from editlens.lm.hooks import add_to_output
from tests.unit import frozen_values_v1 as v1

SUBJECTS = ["Alice Smith", "Bob Jones", "Carol White", "Dan Brown"]


@pytest.fixture(autouse=True)
def _stats_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDITLENS_STATS_DIR", str(tmp_path_factory.getbasetemp() / "stats"))


def _cases(n):
    return [make_case(str(i), Rewrite("{} lives in the city of", SUBJECTS[i], "Paris")) for i in range(n)]


def _requests(n=3):
    return locate.requests_from_cases(_cases(n))


#: fields with a fixed set of values: a different valid value of each
CHOICES = {"reference": "squared", "squared": "reference", "total": "nll", "nll": "total"}
#: editlens's objective before issue 16, as named options (the frozen oracle computes this one)
OLD = dict(decay="squared", early_stop_on="nll")


def _other(value):
    """A different valid value of a settings field (for the real memo miss); by the value's type."""
    if isinstance(value, str) and value in CHOICES:
        return CHOICES[value]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 + 0.01
    if isinstance(value, tuple):
        return value + ("Hello there. ",)
    if isinstance(value, str):
        return value + " now"
    if value is None:
        return "{} is a"
    raise AssertionError(f"no other value for {value!r}: extend _other")


# ------------------------------------------------------------------------------------------------ (a) memo key
def test_memo_key_changes_with_every_settings_field():
    lm = editlens.load_model("tiny-llama")
    reqs, places = _requests(2), [Place.residual(lm, 1)]
    s = ValueSettings(prefixes=("", "The cat. "))
    base = value_memo_key(lm, reqs, places, s)
    assert base == value_memo_key(lm, reqs, places, ValueSettings(prefixes=["", "The cat. "]))
    names = [f.name for f in dataclasses.fields(ValueSettings)]
    assert len(names) >= 9
    for f in dataclasses.fields(ValueSettings):
        # any value at all (a fresh object equals nothing), bypassing validation: the key reads every field
        odd = copy.copy(s)
        object.__setattr__(odd, f.name, object())
        assert value_memo_key(lm, reqs, places, odd) != base, f.name
        # and a real, valid other value
        assert value_memo_key(lm, reqs, places, dataclasses.replace(s, **{f.name: _other(getattr(s, f.name))})) \
            != base, f.name
    assert value_memo_key(lm, reqs, [Place.mlp(lm, 1)], s) != base
    assert value_memo_key(lm, reqs, [Place.residual(lm, 0)], s) != base
    assert value_memo_key(lm, reqs[:1], places, s) != base
    assert value_memo_key(lm, [locate.Request(r.template, r.subject, "Rome") for r in reqs], places, s) != base


def test_memo_recomputes_when_any_settings_field_changes(monkeypatch):
    lm = editlens.load_model("tiny-llama")
    reqs, places = _requests(1), [Place.residual(lm, 1)]
    calls = []
    real = locate._compute_values
    monkeypatch.setattr(locate, "_compute_values", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    s = ValueSettings(prefixes=("",), steps=2, kl_template=None, kl_factor=0.0)
    first = optimise_values(lm, reqs, places, s)
    again = optimise_values(lm, reqs, places, ValueSettings(prefixes=[""], steps=2, kl_template="", kl_factor=0.0))
    assert len(calls) == 1 and torch.equal(first.delta, again.delta)
    again.deltas[0].add_(1.0)  # a caller changing its copy does not change the memo
    assert torch.equal(optimise_values(lm, reqs, places, s).delta, first.delta) and len(calls) == 1
    for f in dataclasses.fields(ValueSettings):
        changed = dataclasses.replace(s, **{f.name: _other(getattr(s, f.name))})
        optimise_values(lm, reqs, places, changed)
        assert calls[-1] == changed, f"{f.name}: the memo served a result computed with other settings"
    assert len(calls) == 1 + len(dataclasses.fields(ValueSettings))


def test_settings_from_hparams_reads_every_hparam():
    hp = PMETHParams()
    s = ValueSettings.from_hparams(hp, ["", "x. "])
    assert s.prefixes == ("", "x. ")
    for f in dataclasses.fields(ValueSettings):
        name = f.metadata["hparam"]
        if name is None:
            continue
        hp2 = dataclasses.replace(hp, **{name: _other(getattr(hp, name))})
        assert getattr(ValueSettings.from_hparams(hp2, [""]), f.name) != getattr(s, f.name), (f.name, name)
    assert ValueSettings.from_hparams(dataclasses.replace(hp, kl_template=""), [""]).kl_template is None


# ------------------------------------------------------------------------------------------------ (c) ROME / MEMIT
CONFIGS = {
    "rome": dict(space="mlp", steps=8, lr=0.5, kl_factor=0.0625, weight_decay=0.5, clamp_norm_factor=4.0,
                 early_stop_loss=0.05),
    "memit": dict(space="residual", steps=8, lr=0.5, kl_factor=0.0625, weight_decay=0.5, clamp_norm_factor=0.75,
                  early_stop_loss=0.05),
    # several chunks; the threshold lies between the requests' NLLs, so some stop early and others go on
    "memit_partial_stop": dict(space="residual", steps=12, lr=1.0, kl_factor=0.1, weight_decay=0.1,
                               clamp_norm_factor=4.0, batch_tokens=40),
}
PARTIAL_STOP = {"tiny-llama": 6.83, "tiny-gpt2": 6.65}


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("config", [*CONFIGS, "rome_evk"])
def test_rome_memit_values_bit_identical_to_the_pre_refactor_loop(model, config):
    lm = editlens.load_model(model)
    reqs = _requests(3)
    prefixes = locate.context_prefixes(lm, 2, 4, seed=0)
    if config == "rome_evk":
        kw = dict(space="mlp", steps=5, early_stop_loss=0.0)
        extra = lambda: EvkAlign(weight=2.0, sigmas=(0.3,), n_samples=2)  # noqa: E731  (stateful: one each)
    else:
        kw = dict(CONFIGS[config])
        extra = lambda: None  # noqa: E731
    if config == "memit_partial_stop":
        kw["early_stop_loss"] = PARTIAL_STOP[model]
    space = kw.pop("space")
    old = v1._compute_values(lm, reqs, 1, prefixes=prefixes, space=space, extra_loss=extra(), **kw)
    place = Place.mlp(lm, 1) if space == "mlp" else Place.residual(lm, 1)
    new = optimise_values(lm, reqs, [place], ValueSettings(prefixes=tuple(prefixes), **kw, **OLD),
                          extra_loss=extra(), memo=False)
    assert torch.equal(new.delta, old.delta) and torch.equal(new.init, old.init)
    assert new.losses == old.losses
    assert old.delta.abs().sum() > 0  # not vacuous: something was optimised
    if config == "memit_partial_stop":  # some requests stopped early, but not all of them
        assert old.losses["loss/steps"] == kw["steps"]
        never = optimise_values(lm, reqs, [place], ValueSettings(prefixes=tuple(prefixes), **{
            **kw, **OLD, "early_stop_loss": 0.0}), memo=False)
        assert not torch.allclose(never.delta, old.delta)
    if config == "rome":  # the shorthand, through the memo, gives the same
        short = locate.compute_values(lm, reqs, 1, prefixes=prefixes, space=space, **kw, **OLD)
        assert torch.equal(short.delta, old.delta)
        # the default (reference) objective is another one: not what the frozen loop computes
        ref = locate.compute_values(lm, reqs, 1, prefixes=prefixes, space=space, **kw)
        assert not torch.equal(ref.delta, old.delta)


# ------------------------------------------------------------------------------------------------ (b) PMET
def test_pmet_value_step_is_the_shared_function(monkeypatch):
    lm = editlens.load_model("tiny-llama")
    seen = []
    real = locate._compute_values

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append((a[2], a[3], out.copy()))
        return out

    monkeypatch.setattr(locate, "_compute_values", spy)
    lm.__dict__.pop("_value_memo", None)
    e = edit(lm, _cases(2), "pmet", layers=[1, 2], progress=False, v_decay="squared", early_stop_on="nll")
    hp = e.hparams
    assert len(seen) == 1
    places, settings, got = seen[0]
    assert places == tuple(pmet_places(lm, 2)) == (Place.mlp(lm, 2), Place.attention(lm, 2))
    prefixes = locate.cached_prefixes(lm, hp.n_prefixes, hp.prefix_length, seed=hp.seed)
    assert settings == ValueSettings.from_hparams(hp, prefixes)
    d = e.diagnostics
    assert d["pmet/delta_mlp_norm"] == float(got.deltas[0].norm(dim=-1).mean())
    assert d["pmet/delta_attn_norm"] == float(got.deltas[1].norm(dim=-1).mean()) > 0
    e.undo()
    # recomputed by the shared function, without the memo: the same bits
    fresh = optimise_values(lm, _requests(2), pmet_places(lm, 2), settings, memo=False)
    for a, b in zip(fresh.deltas + fresh.inits, got.deltas + got.inits):
        assert torch.equal(a, b)
    # and the pre-refactor PMET loop gives those bits too
    assert (settings.decay, settings.early_stop_on) == ("squared", "nll")
    old = v1.compute_pmet_values(lm, _requests(2), 2, **{f.name: getattr(settings, f.name)
                                                          for f in dataclasses.fields(settings)
                                                          if f.name not in OLD})
    assert torch.equal(old.delta_mlp, fresh.deltas[0]) and torch.equal(old.delta_attn, fresh.deltas[1])
    assert torch.equal(old.init_attn, fresh.inits[1]) and old.losses == fresh.losses


def test_two_places_one_adam_step_against_a_reference_gradient():
    """Independent check of the joint objective: at δ = 0 the KL and decay terms have zero gradient, so one Adam
    step moves every element by −lr·g/(|g|+1e-8), g the gradient of the mean target NLL, computed here request by
    request and prompt by prompt (no batching, no padding) with both δ added through hooks."""
    lm = editlens.load_model("tiny-gpt2")
    reqs = _requests(2)
    prefixes = ("", "The day was long. ")
    places = pmet_places(lm, 1)
    lr = 1e-3
    s = ValueSettings(prefixes=prefixes, steps=2, lr=lr, clamp_norm_factor=100.0, early_stop_loss=0.0)
    got = optimise_values(lm, reqs, places, s, memo=False)
    assert got.losses["loss/steps"] == 2
    for i, r in enumerate(reqs):
        leaves = [torch.zeros(g.shape[1], requires_grad=True) for g in got.deltas]
        total = 0.0
        for p in prefixes:
            p_ids, t_ids = ops.target_token_ids(lm.tokenizer, p + r.prompt, r.target)
            pos = ops.subject_last_token(lm.tokenizer, r.template, r.subject, prefix=p)
            ids = torch.tensor([p_ids + t_ids[:-1]])
            rows, at = torch.tensor([0]), torch.tensor([pos])
            with add_to_output(lm.model, places[0].module, leaves[0], rows=rows, positions=at), \
                    add_to_output(lm.model, places[1].module, leaves[1], rows=rows, positions=at):
                logits = lm.model(input_ids=ids, use_cache=False).logits[0, -len(t_ids):].float()
            nll = -torch.log_softmax(logits, -1)[torch.arange(len(t_ids)), torch.tensor(t_ids)].mean()
            total = total + nll / len(prefixes)
        grads = torch.autograd.grad(total, leaves)
        for g, d in zip(grads, got.deltas):
            ref = -lr * g / (g.abs() + 1e-8)
            big = g.abs() > 1e-5
            assert big.sum() > g.numel() // 2
            assert torch.allclose(d[i][big], ref[big], rtol=0, atol=lr * 1e-3)
            assert bool((d[i].abs() <= lr * (1 + 1e-5)).all())


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kw, field", [
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(clamp_norm_factor=-1.0), "clamp_norm_factor"), (dict(kl_factor=-0.1), "kl_factor"),
    (dict(weight_decay=-1), "weight_decay"), (dict(early_stop_loss=-1e-3), "early_stop_loss"),
    (dict(batch_tokens=0), "batch_tokens"), (dict(kl_template="is a"), "kl_template"),
    (dict(prefixes=()), "prefixes"), (dict(prefixes="The"), "prefixes"),
    (dict(decay="l1"), "decay"), (dict(early_stop_on="kl"), "early_stop_on"),
])
def test_bad_settings_name_the_field(kw, field):
    with pytest.raises(MethodError, match=f"'{field}'"):
        ValueSettings(**kw)


def test_bad_places_and_requests_are_refused_before_any_work(monkeypatch):
    lm = editlens.load_model("tiny-llama")
    monkeypatch.setattr(locate, "_compute_values", lambda *a, **k: pytest.fail("work started"))
    reqs, s = _requests(1), ValueSettings()
    with pytest.raises(MethodError, match="no module 'model.nope'"):
        optimise_values(lm, reqs, [Place(1, "model.nope", "model.nope")], s)
    with pytest.raises(MethodError, match="places"):
        optimise_values(lm, reqs, [], s)
    with pytest.raises(MethodError, match="same module"):
        optimise_values(lm, reqs, [Place.mlp(lm, 1), Place.residual(lm, 1)], s)
    with pytest.raises(MethodError, match="no requests"):
        optimise_values(lm, [], [Place.mlp(lm, 1)], s)
    with pytest.raises(MethodError, match="ValueSettings"):
        optimise_values(lm, reqs, [Place.mlp(lm, 1)], dict(steps=2))
    with pytest.raises(MethodError, match="space"):
        locate.compute_values(lm, reqs, 1, space="attention")
