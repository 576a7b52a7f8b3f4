"""The embedded SmolLM2: offline loading, real answers, batched ops, tokenizer boundaries, the CLI."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import editlens
from editlens.lm import ops

pytestmark = pytest.mark.integration


def test_loads_offline_as_llama(smollm):
    assert type(smollm.model).__name__ == "LlamaForCausalLM"
    assert smollm.n_layers == 30 and smollm.d_model == 576
    assert smollm.dtype == torch.float32
    assert smollm.has_chat_template
    # the cached reload is bit-identical to the first load (same content fingerprint)
    assert smollm.weights_fingerprint() == smollm.base_fingerprint


def test_real_greedy_answers(smollm):
    got = ops.generate(smollm, ["The Eiffel Tower is located in the city of", "The capital of France is"],
                       max_new_tokens=5)
    assert got[0].strip().startswith("Paris") and got[1].strip().startswith("Paris")


def test_batched_equals_unbatched_on_real_model(smollm):
    prompts = ["The capital of France is", "Hi",
               "Question: Which language is spoken in Brazil? Answer:", "The Eiffel Tower is located in the city of"]
    targets = ["Paris", "there", "Portuguese", "Rome, Italy"]
    b = ops.next_token_logprobs(smollm, prompts)
    s = torch.cat([ops.next_token_logprobs(smollm, [p]) for p in prompts])
    # 30 float32 layers over differently padded shapes: probabilities agree to 1e-5, log-probs to 1e-5 relative
    torch.testing.assert_close(b.exp(), s.exp(), atol=1e-5, rtol=0)
    torch.testing.assert_close(b, s, atol=1e-4, rtol=1e-5)
    tb = ops.teacher_forced(smollm, prompts, targets)
    for p, t, x in zip(prompts, targets, tb):
        y = ops.teacher_forced(smollm, [p], [t])[0]
        torch.testing.assert_close(x.logprobs.exp(), y.logprobs.exp(), atol=1e-5, rtol=0)
        assert torch.equal(x.argmax_ids, y.argmax_ids)
    assert ops.generate(smollm, prompts, 6) == [ops.generate(smollm, [p], 6)[0] for p in prompts]


def test_chat_format_prefills_the_statement(smollm):
    sys_chat = editlens.ModelSystem(smollm, prompt_format="chat")
    assert sys_chat.prompt_format == "chat" and sys_chat.fingerprint != editlens.ModelSystem(smollm).fingerprint
    text = sys_chat.format.apply("The capital of France is")
    assert text.endswith("<|im_start|>assistant\nThe capital of France is")
    assert sys_chat.generate(["The capital of France is"], 4)[0].strip().startswith("Paris")


def test_target_tokens_on_real_tokenizer(smollm):
    tok = smollm.tokenizer
    p, t = ops.target_token_ids(tok, "The capital of France is", "Paris")
    assert tok.decode(t) == " Paris" and tok.decode(p) == "The capital of France is"


def test_cli_models_and_help():
    from editlens.cli.main import cli

    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0 and "demo" in r.output and "models" in r.output
    r = CliRunner().invoke(cli, ["models"])
    assert r.exit_code == 0 and "smollm2-135m" in r.output and "installed" in r.output
