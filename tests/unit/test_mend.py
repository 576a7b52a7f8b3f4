"""MEND (editlens/edit/mend.py) and the shared hyper-network (editlens/edit/hypernet.py), on the tiny random models.

Independent values: autograd's weight gradient (the rank-1 factors must reproduce it), numpy's mean/variance (the
running normalisation), the hand-written identity-initialised edit, bit-exact undo, a save/load round trip in this
process and in a new one.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import editlens
from editlens.edit import hypernet as H
from editlens.edit.trained import TrainedEditor, TrainingError, train
from editlens.errors import EditlensError, MethodError
from editlens.lm.arch import weight_param, weight_view

SMALL = dict(rank=8, epochs=1, max_steps=6, val_every=3, max_val=2, batch_size=1)


@pytest.fixture(scope="module")
def tiny():
    return editlens.load_model("tiny-llama")


@pytest.fixture(scope="module")
def cases():
    return editlens.synthetic_cases(14)


@pytest.fixture(scope="module")
def trained(tiny, cases):
    return train("mend", tiny, cases[:10], progress=False, **SMALL)


def _weights(lm, modules):
    return {m: weight_param(lm.module(m)).detach().clone() for m in modules}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_rank_one_factors_reproduce_autograd_weight_gradient(name):
    """Σ_t δ_t u_tᵀ from capture_factors equals W.grad of the same loss (Conv1D's [in, out] grad transposed)."""
    lm = editlens.load_model(name)
    cs = editlens.synthetic_cases(3)
    layers = H.resolve_layers(lm, [])
    modules = H.edited_modules(lm, layers, H.MODULE_KINDS)
    assert len(modules) == (9 if name == "tiny-llama" else 6)  # gate/up/down vs c_fc/c_proj in the last 3 blocks
    rows = H.make_rows(lm, H.rewrite_pairs(cs))
    factors = H.capture_factors(lm, modules, rows)
    params = [weight_param(lm.module(m)) for m in modules]
    for p in params:
        p.requires_grad_(True)
    try:
        loss = H.row_nll(H.row_logprobs(lm, rows), rows)[0].sum()
        loss.backward()
        for m, p in zip(modules, params):
            U, D = factors[m]
            n_tok = int(rows.inputs["attention_mask"].sum())
            assert U.shape[0] == D.shape[0] == n_tok
            grad = p.grad.T if type(lm.module(m)).__name__ == "Conv1D" else p.grad
            mine = D.T @ U
            assert mine.shape == weight_view(lm.module(m)).shape
            assert float(grad.norm()) > 0
            torch.testing.assert_close(mine, grad, rtol=1e-4, atol=1e-7)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def test_running_moments_match_numpy():
    bank = H.HyperBank([(5, 3)], rank=4, n_blocks=2, edit_lr=1e-3)
    g = torch.Generator().manual_seed(0)
    chunks = [(torch.randn(n, 5, generator=g) * 3 + 1, torch.randn(n, 3, generator=g) * 1e-3) for n in (4, 1, 9)]
    for U, D in chunks:
        bank.update_stats(0, U, D)
    allU = np.concatenate([c[0].numpy() for c in chunks]).astype(np.float64)
    allD = np.concatenate([c[1].numpy() for c in chunks]).astype(np.float64)
    np.testing.assert_allclose(bank.u_mean_0.numpy(), allU.mean(0), rtol=1e-10)
    np.testing.assert_allclose((bank.u_m2_0 / (14 - 1)).numpy(), allU.var(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(bank.d_mean_0.numpy(), allD.mean(0), rtol=1e-10)
    np.testing.assert_allclose((bank.d_m2_0 / (14 - 1)).numpy(), allD.var(0, ddof=1), rtol=1e-10)


def test_untrained_network_is_identity_so_edit_is_normalised_gradient_step():
    """At initialisation (U = 0, scale 1, shift 0) ΔW = −α Σ_t δ̂_t û_tᵀ with the standardised factors (by hand)."""
    bank = H.HyperBank([(6, 4), (4, 6)], rank=3, n_blocks=2, edit_lr=0.5)
    g = torch.Generator().manual_seed(1)
    U, D = torch.randn(7, 6, generator=g), torch.randn(7, 4, generator=g)
    bank.update_stats(0, U, D)
    un = (U - U.double().mean(0).float()) / (U.double().std(0).float() + 1e-7)
    dn = (D - D.double().mean(0).float()) / (D.double().std(0).float() + 1e-7)
    with torch.no_grad():
        torch.testing.assert_close(bank.mend_delta(0, U, D), -0.5 * dn.T @ un, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bank.mend_delta(0, U, D, lr_scale=2.0), -1.0 * dn.T @ un, rtol=1e-5, atol=1e-6)
    assert bank.group == [1, 0] and len(bank.nets) == 2  # one network per shape


def test_untrained_bank_refuses_to_edit():
    bank = H.HyperBank([(6, 4)], rank=3, n_blocks=1, edit_lr=0.5)
    with pytest.raises(MethodError, match="statistics"):
        bank.mend_delta(0, torch.ones(2, 6), torch.ones(2, 4))


def test_training_records_curves_and_validation(trained):
    m = trained.meta
    assert m["n_steps"] == 6 and len(m["loss_curve"]["loss"]) == 6
    assert [v["step"] for v in m["validation"]] == [3, 6]
    assert m["arch"]["kind"] == "mend" and len(m["arch"]["modules"]) == 9
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in trained.tensors.values())
    assert "alpha" in trained.tensors and trained.meta["data_hash"]


def test_edit_lowers_rewrite_nll_of_held_out_cases(tiny, cases, trained):
    """The trained editor's edit moves the model toward target_new on cases it never saw."""
    from editlens.lm.ops import teacher_forced

    held = cases[10:]
    before = [teacher_forced(tiny, [c.rewrite.text], [c.rewrite.target_new])[0].mean_logprob for c in held]
    e = editlens.edit(tiny, held, method="mend", trained=trained)
    after = [teacher_forced(tiny, [c.rewrite.text], [c.rewrite.target_new])[0].mean_logprob for c in held]
    e.undo()
    assert all(a > b for a, b in zip(after, before)), (before, after)


def test_undo_is_bit_exact_and_sequential_works(tiny, cases, trained):
    modules = trained.meta["arch"]["modules"]
    w0 = _weights(tiny, modules)
    fp0 = tiny.fingerprint
    e = editlens.edit(tiny, cases[10:12], method="mend", trained=trained)
    assert tiny.fingerprint != fp0
    changed = [m for m in modules if not torch.equal(weight_param(tiny.module(m)), w0[m])]
    assert len(changed) == len(modules)
    assert all(e.diagnostics[f"delta_norm/{m}"] > 0 for m in modules)
    e.undo()
    assert tiny.fingerprint == fp0
    assert all(torch.equal(weight_param(tiny.module(m)), w0[m]) for m in modules)

    seen = []
    run = editlens.edit.edit_sequential(tiny, cases[10:14], "mend", batch_size=2, trained=trained,
                                        callback=lambda s, n, r: seen.append(n))
    assert seen == [2, 4]
    assert not all(torch.equal(weight_param(tiny.module(m)), w0[m]) for m in modules)
    run.undo()
    assert all(torch.equal(weight_param(tiny.module(m)), w0[m]) for m in modules)


def test_sequential_step_sees_the_previous_edit(tiny, cases, trained):
    """Two sequential single edits differ from the sum of the same two edits made on the unedited model (the
    second gradient is taken on the edited model)."""
    modules = trained.meta["arch"]["modules"]
    w0 = _weights(tiny, modules)
    run = editlens.edit.edit_sequential(tiny, cases[10:12], "mend", batch_size=1, trained=trained)
    seq = {m: weight_param(tiny.module(m)).detach() - w0[m] for m in modules}
    run.undo()
    indep = {m: torch.zeros_like(w0[m]) for m in modules}
    for c in cases[10:12]:
        e = editlens.edit(tiny, [c], method="mend", trained=trained)
        for m in modules:
            indep[m] += weight_param(tiny.module(m)).detach() - w0[m]
        e.undo()
    assert any(not torch.allclose(seq[m], indep[m], atol=1e-7) for m in modules)


def test_save_load_round_trip_bit_for_bit(tiny, cases, trained, tmp_path):
    trained.save(tmp_path / "ed")
    back = TrainedEditor.load(tmp_path / "ed")
    assert set(back.tensors) == set(trained.tensors)
    assert all(torch.equal(back.tensors[k], trained.tensors[k]) for k in trained.tensors)
    assert back.meta["arch"] == trained.meta["arch"] and back.hparams == trained.hparams
    modules = trained.meta["arch"]["modules"]
    e1 = editlens.edit(tiny, cases[12:14], method="mend", trained=trained)
    w1 = _weights(tiny, modules)
    e1.undo()
    e2 = editlens.edit(tiny, cases[12:14], method="mend", trained=tmp_path / "ed")
    w2 = _weights(tiny, modules)
    e2.undo()
    assert all(torch.equal(w1[m], w2[m]) for m in modules)


def test_saved_editor_edits_the_same_in_a_new_process(tiny, cases, trained, tmp_path):
    trained.save(tmp_path / "ed")
    modules = trained.meta["arch"]["modules"]
    e = editlens.edit(tiny, cases[12:14], method="mend", trained=trained)
    here = {m: float(weight_param(tiny.module(m)).double().sum()) for m in modules}
    fp_here = tiny.weights_fingerprint()
    e.undo()
    code = textwrap.dedent(f"""
        import json, torch, editlens
        from editlens.lm.arch import weight_param
        torch.set_num_threads({torch.get_num_threads()})  # the same reductions as here
        lm = editlens.load_model("tiny-llama")
        cs = editlens.synthetic_cases(14)[12:14]
        e = editlens.edit(lm, cs, method="mend", trained={str(tmp_path / 'ed')!r})
        print(json.dumps({{"sums": {{m: float(weight_param(lm.module(m)).double().sum()) for m in {modules!r}}},
                          "fp": lm.weights_fingerprint()}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there["sums"] == here
    assert there["fp"] == fp_here


def test_mend_without_trained_says_how_to_train(tiny, cases):
    with pytest.raises(MethodError, match=r"editlens.train\('mend'"):
        editlens.edit(tiny, cases[:1], method="mend")


def test_editor_for_another_model_is_refused(trained, cases):
    other = editlens.load_model("tiny-gpt2")
    with pytest.raises(EditlensError, match="tiny-llama"):
        editlens.edit(other, cases[:1], method="mend", trained=trained)


def test_training_case_without_paraphrase_is_named(tiny, cases):
    bad = cases[3].with_probes("paraphrase", [])
    with pytest.raises(TrainingError, match=r"case 1 \(case_id 'syn0-3'\).*'paraphrase'"):
        train("mend", tiny, [cases[0], bad], progress=False, **SMALL)


def test_nan_loss_stops_training_with_the_step(tiny, cases):
    with pytest.raises(TrainingError, match="step 0"):
        train("mend", tiny, cases[:4], progress=False, **dict(SMALL, edit_lr=1e38))


def test_bad_training_hparams_are_refused_before_work(tiny, cases):
    from editlens.errors import HParamsError

    with pytest.raises(HParamsError, match="modules"):
        train("mend", tiny, cases[:4], progress=False, modules=["mlp_out", "attn"])
    with pytest.raises(HParamsError, match="rank"):
        train("mend", tiny, cases[:4], progress=False, rank=0)
    with pytest.raises(HParamsError, match="layer 9"):
        train("mend", tiny, cases[:4], progress=False, layers=[9])


def test_gpt2_layout_trains_and_edits():
    """Conv1D weights ([in, out]): the edit lands in the right orientation and undoes bit for bit."""
    lm = editlens.load_model("tiny-gpt2")
    cs = editlens.synthetic_cases(8)
    te = train("mend", lm, cs[:6], progress=False, **dict(SMALL, max_steps=2, val_every=2))
    modules = te.meta["arch"]["modules"]
    assert modules[0].endswith("mlp.c_fc") and te.meta["arch"]["shapes"][0] == [64, 256]
    w0 = _weights(lm, modules)
    e = editlens.edit(lm, cs[6:], method="mend", trained=te)
    assert all(not torch.equal(weight_param(lm.module(m)), w0[m]) for m in modules)
    e.undo()
    assert all(torch.equal(weight_param(lm.module(m)), w0[m]) for m in modules)
