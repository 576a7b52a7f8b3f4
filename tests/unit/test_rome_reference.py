"""ROME as its reference code computes it, and R-ROME (issue 16), against independent computations.

* the rank-one update for each ``update_key``: ``"consistent"`` (R-ROME) and ``"mean"`` equal the solution of the
  constrained least-change problem ``min tr(ΔW C ΔWᵀ)`` s.t. ``ΔW k̄ = r`` solved as a KKT linear system (numpy);
  ``"unprefixed"`` (the reference) equals the reference code's two-vector construction (``u = C⁻¹k̄/‖C⁻¹k̄‖``,
  ``right = (v* − v₀)/(k₀·u)``, ``ΔW = right uᵀ``); when ``k₀`` is nearly orthogonal to ``C⁻¹k̄`` the reference
  update blows up and R-ROME's does not (the paper's disabling edits);
* the two decay forms: values and gradients against their closed forms;
* the value optimisation (decay form, stopping rule, KL, clamp) against a plain per-request, per-prompt loop written
  here from the reference code's description (one forward per prompt, own hooks, no batching or padding), for
  both objectives, with thresholds chosen so that the two stopping rules stop at different steps;
* a ROME / R-ROME edit of a tiny model changes the weight by the closed form built from keys captured here with
  own hooks, for every ``update_key``; r-rome refuses another key; undo is exact.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import editlens
from editlens.data.schema import Rewrite, make_case
from editlens.edit import edit, get_method, locate
from editlens.edit.locate import Place, ValueSettings, decay_term, optimise_values
from editlens.edit.r_rome import RROME
from editlens.edit.rome import ROME, UPDATE_KEYS, rome_key_value, rome_update
from editlens.errors import HParamsError, MethodError
from editlens.lm import ops
from editlens.lm.arch import weight_view

SUBJECTS = ["Alice Smith", "Bob Jones", "Carol White"]


@pytest.fixture(autouse=True)
def _stats_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDITLENS_STATS_DIR", str(tmp_path_factory.getbasetemp() / "stats"))


def _cases(n):
    return [make_case(str(i), Rewrite("{} lives in the city of", SUBJECTS[i], "Paris")) for i in range(n)]


# ------------------------------------------------------------------------------------------------ closed forms
def _random_problem(seed=0, d_in=7, d_out=5):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d_in, 3 * d_in))
    C = A @ A.T / A.shape[1] + 0.1 * np.eye(d_in)
    return (rng.normal(size=(d_out, d_in)), C, rng.normal(size=d_in), rng.normal(size=d_in), rng.normal(size=d_out))


def _kkt_least_change(C, k, r):
    """``argmin tr(X C Xᵀ)`` s.t. ``X k = r``, row by row from the KKT system ``[[2C, k], [kᵀ, 0]]``."""
    n = len(k)
    K = np.zeros((n + 1, n + 1))
    K[:n, :n], K[:n, n], K[n, :n] = 2 * C, k, k
    return np.stack([np.linalg.solve(K, np.r_[np.zeros(n), ri])[:n] for ri in r])


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_rank_one_update_for_each_key_against_independent_solutions():
    W, C, k_bar, k0, delta = _random_problem()
    got = {}
    for key in UPDATE_KEYS:
        k_pin, v = rome_key_value(_t(W), _t(k_bar), _t(k0), _t(delta), key)
        got[key] = rome_update(_t(W), _t(C), _t(k_bar), v, k_pin=k_pin).numpy()
    # R-ROME: the same key k̄ in numerator and denominator → the least change (metric C) with (W+ΔW) k̄ = W k₀ + δ
    np.testing.assert_allclose(got["consistent"], _kkt_least_change(C, k_bar, W @ k0 + delta - W @ k_bar),
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose((W + got["consistent"]) @ k_bar, W @ k0 + delta, rtol=1e-10)
    # editlens's former key: least change with (W+ΔW) k̄ = W k̄ + δ
    np.testing.assert_allclose(got["mean"], _kkt_least_change(C, k_bar, delta), rtol=1e-9, atol=1e-12)
    # the reference: u = C⁻¹k̄ normalised (compute_u), right = (v* − v₀)/(k₀·u) with v* − v₀ = δ (compute_v)
    u = np.linalg.solve(C, k_bar)
    u = u / np.linalg.norm(u)
    np.testing.assert_allclose(got["unprefixed"], np.outer(delta / (k0 @ u), u), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose((W + got["unprefixed"]) @ k0, W @ k0 + delta, rtol=1e-10)
    assert not np.allclose(got["unprefixed"], got["consistent"])  # the keys differ, so do the updates
    # with no prefixes (k₀ = k̄) the three are one update
    same = [rome_update(_t(W), _t(C), _t(k0), v, k_pin=kp).numpy()
            for kp, v in (rome_key_value(_t(W), _t(k0), _t(k0), _t(delta), key) for key in UPDATE_KEYS)]
    np.testing.assert_allclose(same[0], same[1], rtol=1e-12)
    np.testing.assert_allclose(same[0], same[2], rtol=1e-12)
    with pytest.raises(HParamsError, match="update_key"):
        rome_key_value(_t(W), _t(k_bar), _t(k0), _t(delta), "average")


def test_reference_key_blows_up_when_k0_is_nearly_orthogonal_to_the_direction():
    """Gupta et al.'s disabling edits: the reference divides by ``k₀·C⁻¹k̄``; R-ROME by ``k̄·C⁻¹k̄ > 0``."""
    W, C, k_bar, _, delta = _random_problem(seed=1)
    u = np.linalg.solve(C, k_bar)
    w = np.random.default_rng(3).normal(size=len(u))
    k0 = w - (w @ u) / (u @ u) * u + 1e-6 * u  # k₀·C⁻¹k̄ ≈ 0
    norms = {}
    for key in ("unprefixed", "consistent"):
        k_pin, v = rome_key_value(_t(W), _t(k_bar), _t(k0), _t(delta), key)
        norms[key] = float(rome_update(_t(W), _t(C), _t(k_bar), v, k_pin=k_pin).norm())
    assert norms["unprefixed"] > 1e4 * norms["consistent"]


def test_decay_forms_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(4, 6, generator=g, dtype=torch.float64)
    v0 = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    for form in ("reference", "squared"):
        x = d.clone().requires_grad_(True)
        val = decay_term(x, v0, form)
        val.sum().backward()
        n = d.norm(dim=-1, keepdim=True)
        if form == "reference":  # ‖δ‖/‖v₀‖², gradient δ/(‖δ‖ ‖v₀‖²)
            exp_val, exp_grad = n.squeeze(1) / v0 ** 2, d / (n * v0.unsqueeze(1) ** 2)
        else:  # ‖δ‖²/‖v₀‖², gradient 2δ/‖v₀‖²
            exp_val, exp_grad = n.squeeze(1) ** 2 / v0 ** 2, 2 * d / v0.unsqueeze(1) ** 2
        assert torch.allclose(val.detach(), exp_val, rtol=1e-12)
        assert torch.allclose(x.grad, exp_grad, rtol=1e-12)
    z = torch.zeros(2, 3, requires_grad=True)
    decay_term(z, torch.ones(2), "reference").sum().backward()
    assert torch.equal(z.grad, torch.zeros(2, 3))  # the subgradient 0 at δ = 0 (the reference's first step)
    with pytest.raises(MethodError, match="decay"):
        decay_term(d, v0, "cubic")


# ------------------------------------------------------------------------------------------------ the value loop
def _reference_loop(lm, req, place, s: ValueSettings):
    """ROME's value optimisation for one request as the reference code describes it, one prompt per forward."""
    module = lm.module(place.module)
    ref_module = lm.module(place.reference)
    state = {}

    def add_hook(_m, _inp, out):
        if state.get("pos") is None:
            return out
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[0, state["pos"]] = h[0, state["pos"]] + state["delta"].to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def capture_hook(_m, _inp, out):
        state["v0"] = (out[0] if isinstance(out, tuple) else out)[0, state["cap"]].detach().float().clone()

    pos0 = ops.subject_last_token(lm.tokenizer, req.template, req.subject)
    state["cap"] = pos0
    hc = ref_module.register_forward_hook(capture_hook)
    with torch.no_grad():
        lm.model(input_ids=torch.tensor([ops.encode(lm.tokenizer, req.prompt)]), use_cache=False)
    hc.remove()
    v0_norm = state["v0"].norm()
    rows = []
    for p in s.prefixes:
        p_ids, t_ids = ops.target_token_ids(lm.tokenizer, p + req.prompt, req.target)
        rows.append((torch.tensor([p_ids + t_ids[:-1]]), ops.subject_last_token(lm.tokenizer, req.template,
                                                                                req.subject, prefix=p), t_ids))
    kl_ids = ops.encode(lm.tokenizer, s.kl_template.replace("{}", req.subject))
    kl_pos = ops.subject_last_token(lm.tokenizer, s.kl_template, req.subject)
    kl_ids = torch.tensor([kl_ids[: kl_pos + 1]])
    delta = torch.zeros(state["v0"].shape[0], requires_grad=True)
    state["delta"] = delta
    opt = torch.optim.Adam([delta], lr=s.lr)
    kl_init = None
    h = module.register_forward_hook(add_hook)
    steps = 0
    try:
        for it in range(s.steps):
            steps = it + 1
            opt.zero_grad()
            nll = 0.0
            for ids, pos, t_ids in rows:
                state["pos"] = pos
                logits = lm.model(input_ids=ids, use_cache=False).logits[0, -len(t_ids):].float()
                lp = torch.log_softmax(logits, -1)[torch.arange(len(t_ids)), torch.tensor(t_ids)]
                nll = nll - lp.mean() / len(rows)
            state["pos"] = kl_pos
            kl_lp = torch.log_softmax(lm.model(input_ids=kl_ids, use_cache=False).logits[0, -1].float(), -1)
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            kl = (kl_lp.exp() * (kl_lp - kl_init)).sum()
            if s.decay == "reference":
                wd = s.weight_decay * delta.norm() / v0_norm ** 2
            else:
                wd = s.weight_decay * delta.pow(2).sum() / v0_norm ** 2
            total = nll + s.kl_factor * kl + wd
            if s.early_stop_on == "total" and total < s.early_stop_loss:
                break
            if s.early_stop_on == "nll" and not nll > s.early_stop_loss:
                break
            if it == s.steps - 1:
                break
            total.backward()
            opt.step()
            with torch.no_grad():
                max_norm = s.clamp_norm_factor * v0_norm
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
            trace = state.setdefault("trace", [])
            trace.append((float(nll.detach()), float(total.detach())))
    finally:
        h.remove()
    return delta.detach(), steps, state.get("trace", [])


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_value_loop_against_a_per_prompt_reference_loop(model):
    lm = editlens.load_model(model)
    req = locate.requests_from_cases(_cases(1))[0]
    place = Place.mlp(lm, 1)
    base = ValueSettings(prefixes=("", "The day was long. "), steps=8, lr=1.0, kl_factor=0.01, weight_decay=0.01,
                         clamp_norm_factor=50.0, early_stop_loss=0.0)
    _, _, trace = _reference_loop(lm, req, place, base)
    assert len(trace) == base.steps - 1 and all(t > n for n, t in trace[1:])
    # a threshold at which the two rules stop at different steps of this trajectory (the total is never below the
    # NLL, so the NLL rule stops first; a rule that never fires runs all ``steps`` forward passes)
    thr, want = None, None
    for c in sorted({*(n for n, _ in trace), *(t for _, t in trace)}):
        first_nll = next((j + 1 for j, (n, _) in enumerate(trace) if not n > c), None)
        first_tot = next((j + 1 for j, (_, t) in enumerate(trace) if t < c), base.steps)
        if first_nll is not None and first_nll < first_tot:
            thr, want = c, {"nll": first_nll, "total": first_tot}
            break
    assert thr is not None, trace
    for decay in ("reference", "squared"):
        for rule in ("total", "nll"):
            s = dataclasses.replace(base, early_stop_loss=thr, decay=decay, early_stop_on=rule)
            ref, steps, _ = _reference_loop(lm, req, place, s)
            got = optimise_values(lm, [req], [place], s, memo=False)
            assert got.losses["loss/steps"] == steps, (decay, rule, thr)
            assert torch.allclose(got.delta[0].cpu(), ref, rtol=1e-4, atol=1e-5 * s.lr), (
                decay, rule, float((got.delta[0].cpu() - ref).abs().max()))
            if decay == "reference":  # the trajectory of ``base``, stopped where each rule says
                assert steps == want[rule], (rule, steps, want)
    # the two decay forms give different values (not vacuous either)
    a = optimise_values(lm, [req], [place], base, memo=False).delta
    b = optimise_values(lm, [req], [place], dataclasses.replace(base, decay="squared"), memo=False).delta
    assert not torch.allclose(a, b)


# ------------------------------------------------------------------------------------------------ the edit
def _keys(lm, layer, req, prefixes):
    """Input of the MLP output projection at the last subject token of each prefixed prompt (own hook)."""
    module = lm.module(lm.arch.mlp_out_at(layer))
    got = []

    def hook(_m, inp, _out):
        got.append(inp[0][0, state["pos"]].detach().double().clone())

    state = {}
    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for p in prefixes:
                state["pos"] = ops.subject_last_token(lm.tokenizer, req.template, req.subject, prefix=p)
                lm.model(input_ids=torch.tensor([ops.encode(lm.tokenizer, p + req.prompt)]), use_cache=False)
    finally:
        h.remove()
    return torch.stack(got).mean(0), got[prefixes.index("")]


@pytest.mark.parametrize("method, key", [("rome", "unprefixed"), ("rome", "mean"), ("r-rome", "consistent")])
def test_rome_edit_is_the_closed_form_of_independently_captured_keys(method, key):
    lm = editlens.load_model("tiny-llama")
    case = _cases(1)
    hp = get_method(method).hparams_class.for_model(lm)
    if method == "rome":
        hp = hp.replace(update_key=key)
    assert hp.update_key == key
    name = lm.arch.mlp_out_at(hp.layer)
    W0 = weight_view(lm.module(name)).detach().clone().double()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    cov, prefixes = locate.prepare(lm, hp, [hp.layer])
    assert len(prefixes) > 1
    req = locate.requests_from_cases(case)[0]
    k_bar, k0 = _keys(lm, hp.layer, req, list(prefixes))
    delta = optimise_values(lm, [req], [Place.mlp(lm, hp.layer)], ValueSettings.from_hparams(hp, prefixes)).delta[0]
    e = edit(lm, case, method, **({"update_key": key} if method == "rome" else {}))
    dW = weight_view(lm.module(name)).detach().double() - W0
    C = cov[hp.layer].double().cpu().numpy()
    kb, k0n, d, Wn = k_bar.numpy(), k0.numpy(), delta.double().cpu().numpy(), W0.cpu().numpy()
    if key == "unprefixed":
        u = np.linalg.solve(C, kb)
        expected = np.outer(d / (k0n @ u), u)
    else:
        r = d + Wn @ (k0n - kb) if key == "consistent" else d
        expected = _kkt_least_change(C, kb, r)
    assert np.linalg.norm(expected) > 0
    err = np.linalg.norm(dW.cpu().numpy() - expected) / np.linalg.norm(expected)
    assert err < 1e-4, err
    # the other keys give other updates (the test tells them apart)
    pin = {"unprefixed": k0, "consistent": k_bar, "mean": k_bar}[key]
    target = W0 @ (k_bar if key == "mean" else k0) + delta.double()
    assert torch.allclose((W0 + dW) @ pin, target, rtol=1e-4, atol=1e-5)
    e.undo()
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_r_rome_is_rome_with_the_consistent_key():
    assert issubclass(RROME, ROME) and get_method("r-rome") is RROME
    assert get_method("rome").hparams_class().update_key == "unprefixed"
    assert get_method("r-rome").hparams_class().update_key == "consistent"
    lm = editlens.load_model("tiny-llama")
    with pytest.raises(HParamsError, match="update_key.*'r-rome'.*use method 'rome'"):
        edit(lm, _cases(1), "r-rome", update_key="unprefixed")
    with pytest.raises(HParamsError, match="update_key"):
        edit(lm, _cases(1), "rome", update_key="averaged")
    with pytest.raises(HParamsError, match="v_decay"):
        edit(lm, _cases(1), "rome", v_decay="l1")
    with pytest.raises(HParamsError, match="early_stop_on"):
        edit(lm, _cases(1), "memit", early_stop_on="kl")
