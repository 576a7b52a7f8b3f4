"""SERAC (editlens/edit/serac.py) on tiny random models.

Independent checks: the scope classifier against values computed by hand from hand-built embeddings; routing through
the system with a fixed (hand-built) encoder; out-of-scope answers bit for bit the base model's (logits, scores,
generations, KL exactly 0 through the evaluator); in-scope answers equal to the counterfactual model computed
independently (the LoRA update merged into a copy of the weights); save/load bit for bit; undo; sequential;
refusals.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import editlens
from editlens.edit import retrieval, serac
from editlens.edit.serac import (CLF_TENSORS, SeracEditor, SeracSystem, init_classifier, pair_logits, route,
                                 scope_logits)
from editlens.edit.trained import TrainedEditor, train
from editlens.errors import EditlensError, HParamsError, MethodError, TrainingError
from editlens.lm import ops
from editlens.system import ModelSystem
from editlens.testing import _copy, _diff, _hook_count, edit_cases


# ------------------------------------------------------------------------------------------------ helpers
class FixedEncoder:
    """A hand-built encoder: each known text has a fixed vector (unit-normalised), unknown texts are an error."""

    def __init__(self, table: dict[str, list[float]], name: str = "fixed-test"):
        self.table = {k: np.asarray(v, dtype=np.float32) for k, v in table.items()}
        self.name = name

    def encode(self, texts):
        out = np.stack([self.table[t] for t in texts]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def hand_editor(lm, encoder_spec: str, dim: int, *, scale: float = 10.0, offset: float = -5.0, seed: int = 0,
                layers=(1,)) -> TrainedEditor:
    """A SERAC editor built by hand: identity projections (scope = σ(scale·cos + offset)), random LoRA factors."""
    from editlens.lm.arch import in_out_features

    t = init_classifier(dim, 0)
    t["clf.scale"] = torch.tensor([float(scale)])
    t["clf.offset"] = torch.tensor([float(offset)])
    g = torch.Generator().manual_seed(seed)
    paths = [lm.arch.mlp_out_at(l) for l in layers]
    for p in paths:
        d_in, d_out = in_out_features(lm.module(p))
        t[f"cf.{p}.lora_A"] = (0.3 * torch.randn(2, d_in, generator=g)).contiguous()
        t[f"cf.{p}.lora_B"] = (0.3 * torch.randn(d_out, 2, generator=g)).contiguous()
    meta = {"encoder": encoder_spec, "encoder_dim": dim, "lora_paths": paths, "lora_rank": 2, "lora_alpha": 4.0,
            "context_template": serac.CONTEXT_TEMPLATE}
    return TrainedEditor("serac", {}, lm.base_fingerprint, lm.name, t, meta)


def merged_reference(lm, te: TrainedEditor, texts):
    """Next-token log-probs of the counterfactual model computed independently: ΔW = (α/r)·B·A merged into the
    weights (no peft), plain ops on the context texts, then the weights put back."""
    scale = te.meta["lora_alpha"] / te.meta["lora_rank"]
    saved = {}
    try:
        with torch.no_grad():
            for p in te.meta["lora_paths"]:
                w = lm.module(p).weight
                saved[p] = w.detach().clone()
                A, B = te.tensors[f"cf.{p}.lora_A"], te.tensors[f"cf.{p}.lora_B"]
                w.add_(scale * (B @ A))
        return ops.next_token_logprobs(lm, texts)
    finally:
        with torch.no_grad():
            for p, w0 in saved.items():
                lm.module(p).weight.copy_(w0)


CASES = edit_cases(3)  # Alice Smith / Bob Jones / Carol White; neighbour "Eve Black lives in the city of"


def fixed_table():
    """Edit statements e_i = unit vector i; in-scope prompts near their edit; out-of-scope prompts far from all."""
    tab: dict[str, list[float]] = {}
    for i, c in enumerate(CASES):
        v = [0.0] * 6
        v[i] = 1.0
        tab[c.rewrite.statement] = v
        w = [0.05] * 6
        w[i] = 1.0
        tab[c.rewrite.text] = w                                     # cos with e_i ≈ 0.99
        for p in c.probes_of("paraphrase"):
            tab[p.prompt] = w
    tab["Eve Black lives in the city of"] = [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]   # orthogonal to every edit
    tab["Zed Quux works for"] = [0.2, 0.0, 0.0, 0.0, 1.0, 0.0]              # cos with e_0 ≈ 0.196
    return tab


@pytest.fixture()
def fixed_encoder(monkeypatch):
    enc = FixedEncoder(fixed_table())
    monkeypatch.setitem(retrieval._SHARED, ("fixed-test", "cpu"), enc)
    return enc


# ------------------------------------------------------------------------------------------------ classifier by hand
def test_scope_logits_by_hand():
    d = 3
    t = init_classifier(d, 0)
    t["clf.scale"] = torch.tensor([4.0])
    t["clf.offset"] = torch.tensor([-1.0])
    # non-identity projections: P_e doubles the first axis, P_x swaps axes 0/1 and adds a bias
    t["clf.edit_proj.weight"] = torch.tensor([[2.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    t["clf.input_proj.weight"] = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]])
    t["clf.input_proj.bias"] = torch.tensor([0.0, 0.0, 1.0])
    E = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    X = torch.tensor([[1.0, 2.0, 0.0]])
    # by hand: P_e e0 = (2,1,0), P_e e1 = (0,0,1); P_x x = (2,1,0) + (0,0,1) = (2,1,1)
    # cos((2,1,1),(2,1,0)) = 5 / (sqrt(6) sqrt(5)); cos((2,1,1),(0,0,1)) = 1 / sqrt(6)
    want = [4.0 * 5.0 / (math.sqrt(6) * math.sqrt(5)) - 1.0, 4.0 / math.sqrt(6) - 1.0]
    got = scope_logits(t, E, X)
    assert got.shape == (1, 2)
    assert got[0].tolist() == pytest.approx(want, abs=1e-6)
    # pair_logits is the diagonal of the full matrix
    X2 = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]])
    full = scope_logits(t, E, X2)
    assert pair_logits(t, E, X2).tolist() == pytest.approx(torch.diagonal(full).tolist(), abs=1e-6)


def test_route_by_hand():
    probs = torch.tensor([[0.2, 0.7, 0.6],    # best edit 1, above 0.5
                          [0.5, 0.1, 0.3],    # best exactly at the threshold: out (strict >)
                          [0.9, 0.9, 0.1],    # tie: the earliest edit
                          [0.0, 0.0, 0.0]])
    idx, best = route(probs, 0.5)
    assert idx.tolist() == [1, -1, 0, -1]
    assert best.tolist() == pytest.approx([0.7, 0.5, 0.9, 0.0])
    idx, best = route(torch.zeros((2, 0)), 0.5)  # empty memory: nothing in scope
    assert idx.tolist() == [-1, -1]


def test_init_classifier_is_the_raw_cosine():
    t = init_classifier(5, 0)
    E, X = torch.randn(3, 5), torch.randn(4, 5)
    cos = torch.nn.functional.normalize(X, dim=-1) @ torch.nn.functional.normalize(E, dim=-1).T
    assert torch.allclose(scope_logits(t, E, X), 10.0 * cos - 5.0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ the system
def test_routing_with_hand_built_embeddings(tiny_llama, fixed_encoder):
    te = hand_editor(tiny_llama, "fixed-test", 6, scale=10.0, offset=-5.0)  # in scope iff cos > 0.5
    e = editlens.edit(tiny_llama, CASES, method="serac", trained=te)
    try:
        sysm = e.system
        assert isinstance(sysm, SeracSystem) and len(sysm) == 3
        prompts = [c.rewrite.text for c in CASES] + ["Eve Black lives in the city of", "Zed Quux works for"]
        idx, best = sysm.scope(prompts)
        assert idx.tolist() == [0, 1, 2, -1, -1]
        cos = 1.0 / math.sqrt(1 + 5 * 0.05 ** 2)
        p_in = 1 / (1 + math.exp(-(10 * cos - 5)))
        p_far = 1 / (1 + math.exp(-(10 * 0.2 / math.sqrt(1.04) - 5)))
        assert best.tolist() == pytest.approx([p_in] * 3 + [1 / (1 + math.exp(5)), p_far], abs=1e-5)
        assert e.diagnostics["rewrite_in_scope"] == 1.0 and e.diagnostics["memory_size"] == 3
        # a higher threshold puts everything out of scope
        e2 = editlens.edit(tiny_llama, CASES[:1], method="serac", trained=te, threshold=0.9999)
        assert e2.system.scope([CASES[0].rewrite.text])[0].tolist() == [-1]
        e2.undo()
    finally:
        e.undo()


def test_out_of_scope_bit_identical_in_scope_counterfactual(tiny_llama, fixed_encoder):
    lm = tiny_llama
    base = ModelSystem(lm)
    te = hand_editor(lm, "fixed-test", 6)
    before = _copy(lm)
    hooks = _hook_count(lm)
    e = editlens.edit(lm, CASES, method="serac", trained=te)
    s = e.system
    out = ["Eve Black lives in the city of", "Zed Quux works for"]
    inn = [c.rewrite.text for c in CASES]
    mixed = [inn[0], out[0], inn[1], out[1], inn[2]]
    # next-token log-probs: out-of-scope rows are the base's own, bit for bit, alone and in a mixed batch
    assert torch.equal(s.next_token_logprobs(out), base.next_token_logprobs(out))
    lp_mixed, lp_base_mixed = s.next_token_logprobs(mixed), base.next_token_logprobs(mixed)
    for r in (1, 3):
        assert torch.equal(lp_mixed[r], lp_base_mixed[r])
    # in-scope rows: the counterfactual model on "<statement>\n<prompt>", computed independently (merged weights)
    ctx = [f"{c.rewrite.statement}\n{c.rewrite.text}" for c in CASES]
    ref = merged_reference(lm, te, ctx)
    got = lp_mixed[[0, 2, 4]]
    assert torch.allclose(got, ref, atol=1e-4)
    assert not torch.allclose(got, lp_base_mixed[[0, 2, 4]], atol=1e-3)  # the counterfactual model differs
    # teacher forcing and generation
    targets = ["Berlin", "Paris", "Rome", "London", "Oslo"]
    tf_s, tf_b = s.teacher_forced(mixed, targets), base.teacher_forced(mixed, targets)
    for r in (1, 3):
        assert torch.equal(tf_s[r].logprobs, tf_b[r].logprobs) and torch.equal(tf_s[r].argmax_ids, tf_b[r].argmax_ids)
    ref_tf = ops.teacher_forced(lm, [ctx[0]], [targets[0]])  # base model without adapters on the context: differs
    assert not torch.allclose(tf_s[0].logprobs, ref_tf[0].logprobs, atol=1e-4)
    g_s, g_b = s.generate(mixed, max_new_tokens=4), base.generate(mixed, max_new_tokens=4)
    assert g_s[1] == g_b[1] and g_s[3] == g_b[3]
    # fused call routes the same way
    tfs, nxt = s.teacher_forced_with_next_token(mixed, targets, [0, 1])
    assert torch.equal(nxt[1], base.teacher_forced_with_next_token(mixed, targets, [1])[1][1])
    assert torch.allclose(nxt[0], ref[0], atol=1e-4)
    # the model itself is untouched by the calls: no weight, module or hook changed
    assert not _diff(lm, before) and _hook_count(lm) == hooks
    assert not any("lora" in n for n, _ in lm.model.named_modules())
    e.undo()


def test_kl_exactly_zero_out_of_scope_through_evaluator(tiny_llama, fixed_encoder):
    from editlens.data.schema import Probe

    lm = tiny_llama
    base = ModelSystem(lm)
    te = hand_editor(lm, "fixed-test", 6)
    e = editlens.edit(lm, CASES, method="serac", trained=te)
    # the cases' neighbourhood prompt ("Eve Black ...") is out of scope; add another out-of-scope probe kind
    cases = [c.with_probes("other_attribution", [Probe("Zed Quux works for", "Acme", None)]) for c in CASES]
    res = editlens.evaluate(e.system, cases, base=base, metrics=["kl", "t_acc", "topk@5"], progress=False,
                            cache=False)
    df = res.to_pandas()
    oos = df[df.probe_kind.isin(["neighborhood", "other_attribution"])]
    kl = oos[oos.metric == "kl"].value
    assert len(kl) == 6 and (kl == 0.0).all()
    assert (oos[oos.metric == "topk@5"].value == 1.0).all()
    rw = df[(df.probe_kind == "rewrite") & (df.metric == "kl")].value
    assert len(rw) == 3 and (rw > 1e-4).all()  # in scope: the counterfactual model answers
    e.undo()
    assert len(e.system) == 0


def test_evk_requests_are_routed(tiny_llama, fixed_encoder):
    """Metric-defined requests with a prompt (EVK's virtual samples) go to the counterfactual model in scope and to
    the base, bit for bit, out of scope."""
    lm = tiny_llama
    base = ModelSystem(lm)
    te = hand_editor(lm, "fixed-test", 6)
    e = editlens.edit(lm, CASES, method="serac", trained=te)
    cases = [CASES[0]]
    res = editlens.evaluate(e.system, cases, base=base, metrics=["evk_kl@full"], progress=False, cache=False)
    df = res.to_pandas()
    nb = df[(df.probe_kind == "neighborhood")].value
    rw = df[(df.probe_kind == "rewrite")].value
    assert len(nb) and len(rw)
    assert (nb == 0.0).all()          # out of scope: the base's own perturbed answers
    assert (rw.abs() > 1e-6).any()    # in scope: the counterfactual model's
    e.undo()


def test_undo_and_fingerprint(tiny_llama, fixed_encoder):
    lm = tiny_llama
    te = hand_editor(lm, "fixed-test", 6)
    fp_lm = lm.fingerprint
    e = editlens.edit(lm, CASES, method="serac", trained=te)
    fp_edit = e.system.fingerprint
    e2 = editlens.edit(lm, CASES[:1], method="serac", trained=te)
    assert e2.system.fingerprint != fp_edit  # another memory, another fingerprint
    e.undo()
    assert len(e.system) == 0 and e.system.scope([CASES[0].rewrite.text])[0].tolist() == [-1]
    assert torch.equal(e.system.next_token_logprobs([CASES[0].rewrite.text]),
                       ModelSystem(lm).next_token_logprobs([CASES[0].rewrite.text]))
    assert lm.fingerprint == fp_lm
    e.undo()  # a second undo does nothing
    e2.undo()


def test_sequential_adds_to_memory(tiny_llama, fixed_encoder):
    lm = tiny_llama
    te = hand_editor(lm, "fixed-test", 6)
    seen = []

    def cb(step, n, run):
        seen.append((n, len(run.system), run.system.scope([c.rewrite.text for c in CASES])[0].tolist()))

    run = editlens.edit.edit_sequential(lm, CASES, "serac", trained=te, callback=cb)
    assert seen == [(1, 1, [0, -1, -1]), (2, 2, [0, 1, -1]), (3, 3, [0, 1, 2])]
    sysm = run.system
    run.undo()
    assert len(sysm) == 0


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def trained_tiny():
    lm = editlens.load_model("tiny-llama")
    cases = editlens.synthetic_cases(24)
    te = train("serac", lm, cases, progress=False, **SeracEditor().contract_train_overrides())
    return lm, te


def test_training_learns_and_records(trained_tiny):
    lm, te = trained_tiny
    m = te.meta
    assert te.method == "serac" and te.base_fingerprint == lm.base_fingerprint
    assert set(CLF_TENSORS) <= set(te.tensors)
    assert [k for k in te.tensors if k.startswith("cf.")] == [f"cf.{lm.arch.mlp_out_at(1)}.lora_A",
                                                              f"cf.{lm.arch.mlp_out_at(1)}.lora_B"]
    # classifier: the training BCE fell, and validation BCE was recorded for every epoch run
    curve = m["clf_loss_curve"]
    assert curve[-1] < curve[0] and len(m["clf_val_bce_curve"]) == m["clf_epochs_run"] == len(curve)
    # counterfactual model: trained (B no longer zero) and the validation NLL improved on the untrained adapters
    assert float(te.tensors[f"cf.{lm.arch.mlp_out_at(1)}.lora_B"].abs().sum()) > 0
    assert m["val_cf_nll"] < m["val_cf_nll_before"]
    assert m["n_train_cases"] + m["n_val_cases"] == 24 and m["n_val_cases"] == 3


def test_save_load_round_trip_bit_for_bit(trained_tiny, tmp_path):
    lm, te = trained_tiny
    te.save(tmp_path / "ed")
    back = TrainedEditor.load(tmp_path / "ed")
    assert set(back.tensors) == set(te.tensors)
    for k, t in te.tensors.items():
        assert back.tensors[k].dtype == t.dtype and torch.equal(back.tensors[k], t), k
    assert back.meta["lora_paths"] == te.meta["lora_paths"] and back.meta["encoder"] == te.meta["encoder"]
    cases = editlens.synthetic_cases(4, seed=3)
    prompts = [p.prompt for c in cases for k in ("rewrite", "paraphrase", "neighborhood") for p in c.probes_of(k)]
    e1 = editlens.edit(lm, cases, method="serac", trained=te)
    a = e1.system.next_token_logprobs(prompts)
    r1 = e1.system.scope(prompts)
    e1.undo()
    e2 = editlens.edit(lm, cases, method="serac", trained=str(tmp_path / "ed"))
    b = e2.system.next_token_logprobs(prompts)
    r2 = e2.system.scope(prompts)
    e2.undo()
    assert torch.equal(a, b) and torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
    assert e1.system.fingerprint == e2.system.fingerprint


def test_editor_for_another_model_refused(trained_tiny):
    _, te = trained_tiny
    other = editlens.load_model("tiny-gpt2")
    with pytest.raises(EditlensError) as err:
        editlens.edit(other, edit_cases(1), method="serac", trained=te)
    assert "tiny-llama" in str(err.value) and "tiny-gpt2" in str(err.value)


def test_without_trained_says_how_to_train(tiny_llama):
    with pytest.raises(MethodError, match="train"):
        editlens.edit(tiny_llama, edit_cases(1), method="serac")


def test_bad_training_input_refused_before_work(tiny_llama):
    cases = editlens.synthetic_cases(4)
    with pytest.raises(HParamsError, match="lora_modules"):
        train("serac", tiny_llama, cases, progress=False, lora_modules=["nope"])
    with pytest.raises(HParamsError, match="lora_layers"):
        train("serac", tiny_llama, cases, progress=False, lora_layers=[99], encoder="hashing:16")
    with pytest.raises(HParamsError, match="threshold"):
        editlens.edit(tiny_llama, cases[:1], method="serac", trained=object(), threshold=1.5)
    bare = [cases[0].with_probes("paraphrase", [])]
    with pytest.raises(TrainingError, match="paraphrase"):
        train("serac", tiny_llama, bare, progress=False)


class NanEncoder:
    """An encoder whose embeddings are NaN: the classifier's first BCE loss is NaN."""

    name = "nan-test"

    def encode(self, texts):
        return np.full((len(texts), 8), np.nan, dtype=np.float32)


def test_nan_loss_stops_training(tiny_llama, monkeypatch):
    monkeypatch.setitem(retrieval._SHARED, ("nan-test", "cpu"), NanEncoder())
    cases = editlens.synthetic_cases(6)
    with pytest.raises(TrainingError, match=r"step 1: the scope classifier's BCE loss is nan"):
        train("serac", tiny_llama, cases, progress=False, encoder="nan-test", clf_epochs=2, cf_epochs=1,
              lora_layers=[1], lora_modules=["mlp_out"])
