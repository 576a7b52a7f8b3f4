"""Saving edited models, checking model pairs, the weight report and ``editlens audit`` on tiny models.

Independent checks: saved checkpoints are compared tensor by tensor with the in-memory edited weights (through
``load_model`` and through ``transformers`` directly); ΔW statistics against numpy on hand-built tensors whose
rank is known by construction; the rank tolerance against the rounding noise it must ignore."""
from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import editlens
from editlens.audit import (ArchitectureMismatchWarning, TokenizerMismatchError, audit, check_pair,
                            compare_tokenizers, rank_tolerance, tensor_diff, unit_roundoff, weight_diff)
from editlens.cli.basic import sample_data_path
from editlens.cli.main import cli
from editlens.data import synthetic_cases
from editlens.errors import EditlensError, MethodError

EDITED = "model.layers.1.mlp.down_proj.weight"  # ROME's layer on the tiny models


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A ROME edit of tiny-llama (one fact), saved; yields (directory, {name: edited tensor}, base LM)."""
    lm = editlens.load_model("tiny-llama")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    e = editlens.edit(lm, synthetic_cases(1, seed=0), "rome")
    edited = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    d = tmp_path_factory.mktemp("ck") / "rome"
    out = e.save_pretrained(d)
    e.undo()
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    return out, edited, lm


# ------------------------------------------------------------------------------------------------ saving
def test_save_load_bit_identical(saved):
    d, edited, base = saved
    names = sorted(p.name for p in d.iterdir())
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    meta = json.loads((d / "editlens.json").read_text())
    assert meta["method"] == "rome" and meta["base_model"] == "tiny-llama" and meta["tensors_verified"] > 0
    assert meta["edits"] and meta["fingerprint"] != meta["base_fingerprint"]
    lm2 = editlens.load_model(str(d))
    got = dict(lm2.model.named_parameters())
    assert set(got) == set(edited)
    assert all(torch.equal(got[n], edited[n]) for n in edited)
    from transformers import AutoModelForCausalLM

    hf = dict(AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).named_parameters())
    assert all(torch.equal(hf[n], edited[n]) for n in edited)
    # exactly one tensor differs from the base, and it is the edited one
    diff = [n for n, p in base.model.named_parameters() if not torch.equal(p, edited[n])]
    assert diff == [EDITED]
    # same tokenizer
    assert compare_tokenizers(base.tokenizer, lm2.tokenizer) == []


def test_save_is_pinned_to_its_edit(tmp_path):
    """A later edit on top does not leak into the earlier edit's checkpoint; an undone edit cannot be saved."""
    lm = editlens.load_model("tiny-llama")
    cases = synthetic_cases(2, seed=1)
    e1 = editlens.edit(lm, cases[:1], "rome")
    first = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    e2 = editlens.edit(lm, cases[1:], "rome")
    assert not torch.equal(dict(lm.model.named_parameters())[EDITED], first[EDITED])
    e1.save_pretrained(tmp_path / "first")
    got = dict(editlens.load_model(str(tmp_path / "first")).model.named_parameters())
    assert all(torch.equal(got[n], first[n]) for n in first)
    e2.undo()
    e1.undo()
    with pytest.raises(MethodError, match="undone"):
        e1.save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_non_empty_directory_refused_then_forced(saved, tmp_path):
    d, edited, _ = saved
    lm2 = editlens.load_model(str(d))
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    from editlens.lm.checkpoint import save_checkpoint

    with pytest.raises(EditlensError, match=r"busy is not empty \(notes.txt\); refusing to overwrite"):
        save_checkpoint(lm2, target)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    (target / "model-00001-of-00002.safetensors").write_text("stale shard")
    save_checkpoint(lm2, target, force=True)
    names = sorted(p.name for p in target.iterdir())
    assert "notes.txt" in names and "model.safetensors" in names
    assert "model-00001-of-00002.safetensors" not in names  # a stale shard would be loaded with the new weights
    got = dict(editlens.load_model(str(target)).model.named_parameters())
    assert all(torch.equal(got[n], edited[n]) for n in edited)
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(EditlensError, match="not a directory"):
        save_checkpoint(lm2, f, force=True)


def test_wrapper_method_refused(tmp_path):
    lm = editlens.load_model("tiny-llama")
    e = editlens.edit(lm, synthetic_cases(1, seed=0), "grace")
    try:
        with pytest.raises(MethodError, match=r"grace keeps its edit outside the model's weights \(GraceSystem"):
            e.save_pretrained(tmp_path / "g")
    finally:
        e.undo()
    assert not (tmp_path / "g").exists()
    from editlens.edit import get_method

    assert {m for m in ("grace", "wise", "ike", "scr") if get_method(m).edits_weights is False} == {
        "grace", "wise", "ike", "scr"}


def test_cli_edit_save_refusals_come_before_any_work(tmp_path):
    data = str(sample_data_path())
    r = CliRunner().invoke(cli, ["edit", "--model", "tiny-llama", "--data", data, "--limit", "1", "--method", "ike",
                                 "--save", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--save: ike keeps its edit outside the model's weights" in r.output
    assert "editing 1 cases" not in r.output and not (tmp_path / "x").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "a.txt").write_text("x")
    r = CliRunner().invoke(cli, ["edit", "--model", "tiny-llama", "--data", data, "--limit", "1", "--method", "rome",
                                 "--save", str(busy)])
    assert r.exit_code == 2 and "is not empty (a.txt)" in r.output and "--force" in r.output
    assert "editing 1 cases" not in r.output


def test_cli_edit_save_writes_checkpoint(tmp_path):
    data = str(sample_data_path())
    out = tmp_path / "ck"
    r = CliRunner().invoke(cli, ["edit", "--model", "tiny-llama", "--data", data, "--limit", "1", "--method", "rome",
                                 "--metrics", "kl", "--save", str(out)])
    assert r.exit_code == 0, r.output
    assert f"saved the edited model to {out}" in r.output
    base = editlens.load_model("tiny-llama")
    changed = [t.name for t in weight_diff(base, str(out))]
    assert changed == [EDITED]


# ------------------------------------------------------------------------------------------------ pair checks
def test_tokenizer_mismatch_names_the_difference(saved, tmp_path):
    d, _, base = saved
    # a checkpoint whose tokenizer has two tokens' ids swapped (same size, same merges)
    import shutil

    other = tmp_path / "swapped"
    shutil.copytree(d, other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    inv = {i: t for t, i in vocab.items()}
    vocab[inv[300]], vocab[inv[301]] = 301, 300
    (other / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(TokenizerMismatchError) as ei:
        editlens.audit.load_pair("tiny-llama", str(other))
    msg = str(ei.value)
    assert f"token id 300: base has {inv[300]!r}, edited has {inv[301]!r}" in msg
    assert "vocabulary size" not in msg
    # vocabulary size and special tokens
    tok = copy.deepcopy(base.tokenizer)
    tok.add_tokens(["<brand-new-token>"])
    tok.eos_token = "<s>"
    diffs = compare_tokenizers(base.tokenizer, tok)
    n = len(base.tokenizer)
    assert f"vocabulary size: base has {n} tokens, edited has {n + 1}" in diffs
    assert f"token id {n}: base has no token, edited has '<brand-new-token>'" in diffs
    assert "special token eos_token: base has </s>, edited has <s>" in diffs
    # the CLI refuses the pair, naming the difference, before evaluating
    r = CliRunner().invoke(cli, ["eval", "--base", "tiny-llama", "--model", str(other), "--data",
                                 str(sample_data_path()), "--metrics", "kl"])
    assert r.exit_code == 2 and "their tokenizers differ" in r.output and "token id 300" in r.output
    assert "evaluating" not in r.output


def test_tokenisation_difference_named():
    """Same vocabulary and special tokens, different splitting of the same text (a normaliser that lowercases)."""
    a = editlens.load_model("tiny-llama").tokenizer
    b = copy.deepcopy(a)
    from tokenizers import normalizers

    b.backend_tokenizer.normalizer = normalizers.Lowercase()
    diffs = compare_tokenizers(a, b)
    assert len(diffs) == 1 and diffs[0].startswith("tokenisation of the sample text")
    assert "first difference at position 0" in diffs[0]


def test_architecture_difference_warns_and_evaluates():
    base, other = editlens.load_model("tiny-llama"), editlens.load_model("tiny-mistral")
    with pytest.warns(ArchitectureMismatchWarning, match="model class: base is LlamaForCausalLM, edited is "
                                                         "MistralForCausalLM"):
        diffs = check_pair(base, other)
    assert any(d.startswith("config model_type") for d in diffs)
    r = CliRunner().invoke(cli, ["eval", "--base", "tiny-llama", "--model", "tiny-mistral", "--data",
                                 str(sample_data_path()), "--limit", "2", "--metrics", "kl,topk@1"])
    assert r.exit_code == 0, r.output
    assert "warning: tiny-mistral and tiny-llama have different architectures" in r.output
    assert "[edited: tiny-mistral]" in r.output
    with warnings.catch_warnings():
        warnings.simplefilter("error", ArchitectureMismatchWarning)
        assert check_pair(base, editlens.load_model("tiny-llama")) == []


def test_cli_eval_base_rows_match_python(saved, tmp_path):
    """``editlens eval --base B --model E`` gives the rows of evaluate(ModelSystem(E), cases, base=ModelSystem(B))."""
    d, _, _ = saved
    out = tmp_path / "rows.csv"
    data = str(sample_data_path())
    r = CliRunner().invoke(cli, ["eval", "--base", "tiny-llama", "--model", str(d), "--data", data, "--limit", "2",
                                 "--metrics", "kl,topk@5,t_acc", "--out", str(out)])
    assert r.exit_code == 0, r.output
    import pandas as pd

    df = pd.read_csv(out, dtype={"case_id": str})
    from editlens.evaluate import evaluate
    from editlens.system import ModelSystem

    b, e = editlens.load_model("tiny-llama"), editlens.load_model(str(d))
    ref = evaluate(ModelSystem(e), editlens.load_cases(data, limit=2), base=ModelSystem(b),
                   metrics="kl,topk@5,t_acc", progress=False).to_pandas()
    got = df[df.system == "edited"].drop(columns="system").reset_index(drop=True)
    pd.testing.assert_frame_equal(got.sort_values(list(got.columns[:3])).reset_index(drop=True),
                                  ref.sort_values(list(ref.columns[:3])).reset_index(drop=True), check_dtype=False)
    assert (got[got.metric == "kl"].value > 0).any()
    base_rows = df[df.system == "base"]
    assert (base_rows[base_rows.metric == "kl"].value == 0).all()


# ------------------------------------------------------------------------------------------------ weights
def test_tensor_diff_against_numpy_and_known_rank():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g) * 0.05
    u, v = torch.randn(48, 2, generator=g), torch.randn(80, 2, generator=g)
    delta = (u @ v.T) * 1e-2  # rank 2 by construction
    w2 = w + delta  # stored in float32: fl(W + Δ), so W2 − W is Δ plus full-rank rounding noise
    td = tensor_diff("w", w, w2)
    d = w2.numpy().astype(np.float64) - w.numpy().astype(np.float64)
    assert td.status == "changed" and td.shape == (48, 80) and td.dtype == "float32"
    assert td.n_changed == int((w2 != w).sum())
    assert td.fro == pytest.approx(np.linalg.norm(d), rel=1e-12)
    assert td.rel == pytest.approx(np.linalg.norm(d) / np.linalg.norm(w.numpy().astype(np.float64)), rel=1e-12)
    assert td.max_abs == pytest.approx(np.abs(d).max(), rel=1e-12)
    sv = np.linalg.svd(d, compute_uv=False)
    assert sv[2] > 0  # the rounding noise is there (a zero tolerance would call this full rank) ...
    assert td.rank == 2  # ... and the stated tolerance does not count it
    assert td.tol == pytest.approx(max(sv[0] * 80 * np.finfo(np.float64).eps,
                                       unit_roundoff(torch.float32) * np.linalg.norm(w2.numpy().astype(np.float64))))
    assert sv[2] <= td.tol < sv[1]
    np.testing.assert_allclose(td.singular_values, sv[:5], rtol=1e-10, atol=1e-14)  # σ₁·ε₆₄-level SVD error
    # bfloat16 storage: the rounding floor uses its unit roundoff (2^-8)
    wb = w.to(torch.bfloat16)
    wb2 = (wb.float() + delta * 10).to(torch.bfloat16)
    tb = tensor_diff("wb", wb, wb2)
    assert unit_roundoff(torch.bfloat16) == 2.0 ** -8
    assert tb.tol >= 2.0 ** -8 * float(torch.linalg.vector_norm(wb2.double()))
    assert tb.rank == 2
    # unchanged, 1-D and shape changes
    assert tensor_diff("s", w, w.clone()).status == "unchanged"
    b1 = tensor_diff("b", torch.zeros(5), torch.tensor([0.0, 1.0, 0.0, 0.0, 2.0]))
    assert b1.rank is None and b1.n_changed == 2 and b1.rel == float("inf") and b1.fro == pytest.approx(5 ** 0.5)
    assert tensor_diff("x", w, w[:, :10]).status == "shape"
    assert rank_tolerance(2.0, (3, 7), torch.float32, 0.0) == 2.0 * 7 * np.finfo(np.float64).eps


def test_weight_diff_streams_from_files_as_from_models(saved):
    d, _, base = saved
    lm2 = editlens.load_model(str(d))
    from_models = weight_diff(base, lm2)
    base_dir = d.parent / "base-tiny"
    if not base_dir.exists():
        from editlens.lm.checkpoint import save_checkpoint

        save_checkpoint(base, base_dir)
    from_files = weight_diff(base_dir, d)
    assert [t.name for t in from_models] == [t.name for t in from_files] == [EDITED]
    a, b = from_models[0], from_files[0]
    assert (a.rank, a.n_changed, a.fro, a.tol) == (b.rank, b.n_changed, b.fro, b.tol)
    assert a.rank == 1  # one ROME fact: a rank-one update
    full = weight_diff(base, lm2, include_unchanged=True)
    assert len(full) == len(dict(base.model.named_parameters()))
    assert {t.status for t in full} == {"changed", "unchanged"}
    sd = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    sd.pop("model.norm.weight")
    assert [(t.name, t.status) for t in weight_diff(sd, base)] == [("model.norm.weight", "only_edited")]


# ------------------------------------------------------------------------------------------------ audit
def test_audit_identity_is_exactly_zero():
    a, b = editlens.load_model("tiny-llama"), editlens.load_model("tiny-llama")
    rep = audit(a, b)
    assert rep.changed() == [] and rep.weights == []
    for s in rep.drift["prompts"].values():
        assert s["kl_max"] == 0.0 and s["topk@5_mean"] == 1.0 and s["argmax_changed"] == 0
    assert set(rep.drift["prompts"]) == {"neutral", "factual_qa"}
    assert rep.drift["prompts"]["neutral"]["n"] == 30 and rep.drift["prompts"]["factual_qa"]["n"] == 20
    for v in rep.drift["general"].values():
        assert v["base"] == v["edited"]
    assert "0 of 39 parameter tensors changed" in rep.to_markdown()


def test_cli_audit_with_data_json_and_out(saved, tmp_path):
    d, _, _ = saved
    js, md = tmp_path / "a.json", tmp_path / "a.md"
    r = CliRunner().invoke(cli, ["audit", "--base", "tiny-llama", "--model", str(d), "--data", str(sample_data_path()),
                                 "--limit", "2", "--metrics", "kl,topk@5", "--json", str(js), "--out", str(md)])
    assert r.exit_code == 0, r.output
    text = md.read_text()
    assert text.strip() in r.output
    assert "1 of 39 parameter tensors changed" in text and f"| `{EDITED}` | 64×128 |" in text
    assert "## Drift where no edit should reach" in text and "| neutral | 30 |" in text
    assert "## Probe kinds × metrics (counterfact_sample.json, 2 cases)" in text and "| rewrite | kl | 0 |" in text
    rep = json.loads(js.read_text())
    (w,) = rep["weights"]
    assert w["name"] == EDITED and w["rank"] == 1 and w["status"] == "changed"
    assert rep["metadata"]["method"] == "rome"
    assert {r["metric"] for r in rep["table"]} == {"kl", "topk@5"}
    assert len(rep["drift"]["per_prompt"]["neutral"]) == 30
    r = CliRunner().invoke(cli, ["audit", "--base", "tiny-llama", "--model", str(d), "--limit", "2"])
    assert r.exit_code == 2 and "--limit needs --data" in r.output
