"""Models, architectures and batched ops on tiny random models."""
from __future__ import annotations

import pytest
import torch

import editlens
from editlens.errors import EditlensError, ModelLoadError, UnsupportedArchitectureError
from editlens.lm import ops
from editlens.lm.arch import add_delta, arch_for, in_out_features, register_arch, weight_view
from editlens.lm.load import TINY_MODELS

PROMPTS = ["The Eiffel Tower is in", "Hi", "Question: What is the capital of Japan? Answer:",
           "The mother tongue of the writer was"]
TARGETS = ["Paris", "there friend", "Tokyo", "French and English"]


@pytest.mark.parametrize("name", TINY_MODELS)
def test_arch_modules_exist_with_expected_shapes(name):
    lm = editlens.load_model(name)
    a = lm.arch
    d = lm.d_model
    names = dict(lm.model.named_modules())
    for i in range(lm.n_layers):
        for path in (a.mlp_in_at(i), a.mlp_out_at(i), a.attn_out_at(i), a.mlp_at(i), a.attn_at(i), a.block(i)):
            assert path in names, path
        d_in, d_out = in_out_features(lm.module(a.mlp_out_at(i)))
        assert d_out == d and d_in > d  # MLP output projection maps the hidden MLP width back to d_model
        mi_in, mi_out = in_out_features(lm.module(a.mlp_in_at(i)))
        assert mi_in == d and mi_out == d_in
        assert in_out_features(lm.module(a.attn_out_at(i)))[1] == d
    assert lm.module(a.embed).weight.shape == (lm.vocab_size, d)
    assert a.final_norm in names
    head = lm.module(a.lm_head)
    assert head.weight.shape == (lm.vocab_size, d)


def test_tiny_models_are_seeded_and_fingerprinted():
    a = editlens.load_model("tiny-llama")
    b = editlens.load_model("tiny-llama")
    c = editlens.load_model("tiny-llama", seed=1)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    for (n1, p1), (_, p2) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p1, p2), n1


def test_fingerprint_tracks_weight_changes(tiny_llama):
    fp = tiny_llama.weights_fingerprint()
    w = weight_view(tiny_llama.module(tiny_llama.arch.mlp_out_at(1)))
    old = w[0, 0].item()
    with torch.no_grad():
        w[0, 0] += 1e-3
    assert tiny_llama.weights_fingerprint() != fp
    with torch.no_grad():
        w[0, 0] = old
    assert tiny_llama.weights_fingerprint() == fp
    tiny_llama.push_state("edit-1")
    assert tiny_llama.fingerprint != tiny_llama.base_fingerprint
    tiny_llama.pop_state("edit-1")
    assert tiny_llama.fingerprint == tiny_llama.base_fingerprint


def test_conv1d_weight_view_and_delta(tiny_gpt2):
    mod = tiny_gpt2.module(tiny_gpt2.arch.mlp_out_at(0))
    assert type(mod).__name__ == "Conv1D"
    w = weight_view(mod)
    d_in, d_out = in_out_features(mod)
    assert w.shape == (d_out, d_in)
    x = torch.randn(3, d_in)
    before = mod(x)
    delta = torch.randn(d_out, d_in) * 0.01
    add_delta(mod, delta)
    after = mod(x)
    torch.testing.assert_close(after - before, x @ delta.T, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-neox"])
def test_batched_equals_unbatched(name):
    lm = editlens.load_model(name)
    batched = ops.next_token_logprobs(lm, PROMPTS, batch_tokens=10_000)
    single = torch.cat([ops.next_token_logprobs(lm, [p]) for p in PROMPTS])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    tf_b = ops.teacher_forced(lm, PROMPTS, TARGETS)
    for p, t, b in zip(PROMPTS, TARGETS, tf_b):
        s = ops.teacher_forced(lm, [p], [t])[0]
        assert torch.equal(s.target_ids, b.target_ids)
        torch.testing.assert_close(s.logprobs, b.logprobs, atol=1e-5, rtol=0)
        assert torch.equal(s.argmax_ids, b.argmax_ids)
    gen_b = ops.generate(lm, PROMPTS, max_new_tokens=5, stop=())
    gen_s = [ops.generate(lm, [p], max_new_tokens=5, stop=())[0] for p in PROMPTS]
    assert gen_b == gen_s
    # tiny batches (token budget forces one row per batch) give the same answers
    torch.testing.assert_close(ops.next_token_logprobs(lm, PROMPTS, batch_tokens=1), batched, atol=1e-5, rtol=0)


def test_teacher_forced_matches_full_forward(tiny_llama):
    """Per-token log-probs equal a hand-made unpadded forward pass over prompt + target."""
    lm = tiny_llama
    prompt, target = "The capital of Japan is", "Tokyo and Kyoto"
    p_ids, t_ids = ops.target_token_ids(lm.tokenizer, prompt, target)
    ids = torch.tensor([p_ids + t_ids])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids).logits[0].float(), -1)
    expected = torch.stack([logp[len(p_ids) - 1 + j, t] for j, t in enumerate(t_ids)])
    tf = ops.teacher_forced(lm, [prompt], [target])[0]
    torch.testing.assert_close(tf.logprobs, expected, atol=1e-5, rtol=0)
    assert tf.target_ids.tolist() == t_ids
    assert lm.tokenizer.decode(t_ids) == " " + target


def test_target_boundary_rules(tiny_llama):
    tok = tiny_llama.tokenizer
    p, t = ops.target_token_ids(tok, "The capital is ", "Paris")  # prompt already ends with a space
    assert tok.decode(t) == "Paris"
    p2, t2 = ops.target_token_ids(tok, "The capital is", "Paris")
    assert tok.decode(t2) == " Paris"
    assert ops.joint_separator("a", " b") == "" and ops.joint_separator("a", "b") == " "
    with pytest.raises(EditlensError, match="empty target"):
        ops.target_token_ids(tok, "The capital is", "  ")


def test_subject_last_token(tiny_llama):
    tok = tiny_llama.tokenizer
    template, subject = "The mother tongue of {} is", "Danielle Darrieux"
    first, end = ops.subject_span(tok, template, subject)
    text = template.format(subject)
    enc = tok(text, return_offsets_mapping=True)
    pieces = tok.decode(enc.input_ids[first:end])
    assert pieces.strip() == subject
    assert ops.subject_last_token(tok, template, subject) == end - 1
    # with a context prefix the index shifts by the prefix's tokens
    idx = ops.subject_last_token(tok, template, subject, prefix="Hello there. ")
    assert tok.decode(tok("Hello there. " + text).input_ids[idx]).strip() == tok.decode(enc.input_ids[end - 1]).strip()


def test_capture_inputs_at_positions(tiny_llama):
    lm = tiny_llama
    mod = lm.arch.mlp_out_at(2)
    got = ops.capture(lm, PROMPTS, [mod], positions=[-1, 0, 3, -2])
    for i, (p, pos) in enumerate(zip(PROMPTS, [-1, 0, 3, -2])):
        single = ops.capture(lm, [p], [mod], positions=[pos])[mod][0]
        torch.testing.assert_close(got[mod][i], single, atol=1e-5, rtol=0)
    with pytest.raises(EditlensError, match="outside prompt"):
        ops.capture(lm, ["Hi"], [mod], positions=[50])


def test_plan_batches_respects_budget():
    lengths = [5, 1, 9, 3, 3, 7, 2]
    batches = ops.plan_batches(lengths, batch_tokens=12)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 12


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        editlens.load_model(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        editlens.load_model(str(bad))
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="could not read GGUF"):
        editlens.load_model(str(bad_gguf))
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        editlens.load_model("tiny-llama", dtype="float8")
    with pytest.raises(ModelLoadError):
        editlens.load_model(str(tmp_path / "no-such-dir" / "model"))
    assert issubclass(ModelLoadError, EditlensError)


def test_unsupported_architecture_error_names_class_and_registration():
    class Weird(torch.nn.Module):
        pass

    with pytest.raises(UnsupportedArchitectureError) as e:
        arch_for(Weird())
    assert "Weird" in str(e.value) and "register_arch" in str(e.value)
    # registering an Arch makes it supported
    lm = editlens.load_model("tiny-llama")
    register_arch("Weird", lm.arch)
    with pytest.raises(UnsupportedArchitectureError, match="do not exist"):
        arch_for(Weird())


def test_dtype_bfloat16_ops(tiny_llama):
    lm = editlens.load_model("tiny-llama", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    lp = ops.next_token_logprobs(lm, PROMPTS[:2])
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2), atol=1e-3, rtol=0)
