"""Prompts longer than the model's context: a ContextLengthError naming the case, the probe, the token count and the
context length, before any work; left truncation only when asked for, and recorded with the results.

The tiny test models have 256 positions. Before the fix GPT-2 crashed with a raw IndexError (position embedding
lookup) and LLaMA silently scored 1,600 tokens against its 256-position context (RoPE has no table to overflow).
"""
from __future__ import annotations

import pytest
import torch

import editlens
from editlens.data import synthetic_cases
from editlens.data.schema import Probe
from editlens.errors import ContextLengthError, EditlensError
from editlens.evaluate.core import evaluate
from editlens.evaluate.system import ModelSystem
from editlens.lm import ops

FILLER = "Some background. " * 200


def _long_case(lm):
    c = synthetic_cases(2)[1]
    long = FILLER + c.rewrite.text
    n = len(ops.encode(lm.tokenizer, long))
    assert n > 1000  # far beyond the 256 positions
    return c.with_probes("paraphrase", [Probe("Short one?", c.rewrite.target_new), Probe(long, c.rewrite.target_new)]), n


class _Calls:
    """Counts forward passes of a model (to check that nothing ran before the error)."""

    def __init__(self, model):
        self.n = 0
        self.h = model.register_forward_pre_hook(self._hook)

    def _hook(self, *a):
        self.n += 1

    def close(self):
        self.h.remove()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_evaluate_names_case_probe_tokens_and_context_before_any_work(name):
    lm = editlens.load_model(name)
    assert ops.context_length(lm) == 256
    case, n = _long_case(lm)
    cases = synthetic_cases(3)[:1] + [case]
    s = ModelSystem(lm)
    calls = _Calls(lm.model)
    try:
        with pytest.raises(ContextLengthError) as ei:
            evaluate(s, cases, base=s, metrics=["t_acc", "kl"], progress=False, cache=False)
    finally:
        calls.close()
    msg = str(ei.value)
    assert f"case {case.case_id!r}" in msg and "paraphrase[1]" in msg and "256" in msg, msg
    assert str(n) in msg and "truncate='left'" in msg, msg
    assert calls.n == 0  # raised before the first forward pass
    assert ei.value.case_id == case.case_id and ei.value.probe == "paraphrase[1]"
    assert ei.value.n_tokens >= n and ei.value.context == 256


def test_ops_check_every_call_before_running(tiny_gpt2):
    """The central check in lm.ops: whatever calls the model operations (a custom System, a metric) gets the error,
    not an IndexError or a silent score."""
    lm = tiny_gpt2
    long = FILLER + "The end is"
    calls = _Calls(lm.model)
    try:
        for call in (lambda: ops.next_token_logprobs(lm, ["short", long]),
                     lambda: ops.teacher_forced(lm, ["short", long], [" a", " b"]),
                     lambda: ops.generate(lm, [long]),
                     lambda: ops.capture(lm, [long], [lm.arch.mlp_out_at(0)], [-1])):
            with pytest.raises(ContextLengthError, match=r"prompt 1|prompt 0") as ei:
                call()
            assert "256" in str(ei.value)
        # generation needs room for the new tokens too
        p = "word " * 100
        k = len(ops.encode(lm.tokenizer, p))
        assert k <= 256
        with pytest.raises(ContextLengthError, match="new tokens"):
            ops.generate(lm, [p], max_new_tokens=256 - k + 2)
    finally:
        calls.close()
    assert calls.n == 0


def test_forward_guard_catches_direct_model_calls(tiny_llama):
    """Code that runs the model itself (editing methods' own forwards) hits the guard installed at load time."""
    ids = torch.ones((1, 300), dtype=torch.long)
    with pytest.raises(ContextLengthError, match="300 positions.*256"):
        tiny_llama.model(input_ids=ids)
    tiny_llama.model(input_ids=ids[:, :256])  # the full context is fine


def test_truncate_left_is_opt_in_exact_and_recorded(tiny_llama):
    lm = tiny_llama
    case, n = _long_case(lm)
    s = ModelSystem(lm)
    with pytest.raises(EditlensError, match="truncate"):
        evaluate(s, [case], base=s, metrics=["t_acc"], progress=False, cache=False, truncate="middle")
    res = evaluate(s, [case], base=s, metrics=["t_acc", "kl"], progress=False, cache=False, truncate="left")
    assert res.meta["truncate"] == "left"
    assert res.meta["truncated_requests"] >= 1
    # the truncated score is the model's score on the last tokens that fit (the target kept whole)
    long = case.probes["paraphrase"][1].prompt
    target = case.probes["paraphrase"][1].target
    with ops.truncation("left"):
        tf = ops.teacher_forced(lm, [long], [target])[0]
    p_ids, t_ids = ops.target_token_ids(lm.tokenizer, long, target)
    seq = (p_ids + t_ids[:-1])[-256:]
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([seq])).logits[0, -len(t_ids):].float()
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(t_ids)[:, None])[:, 0]
    assert torch.allclose(tf.logprobs, ref, atol=1e-5)
    # without truncation nothing changed: the short prompts give the same values either way
    short = [c for c in synthetic_cases(2)[:1]]
    a = evaluate(s, short, base=s, metrics=["t_acc"], progress=False, cache=False).to_pandas()
    b = evaluate(s, short, base=s, metrics=["t_acc"], progress=False, cache=False, truncate="left").to_pandas()
    assert a.equals(b)


def test_edit_checks_rewrites_before_touching_weights(tiny_llama):
    lm = tiny_llama
    c = synthetic_cases(1)[0]
    from dataclasses import replace

    long = replace(c, rewrite=replace(c.rewrite, prompt=FILLER + c.rewrite.prompt))
    fp = lm.fingerprint
    calls = _Calls(lm.model)
    try:
        with pytest.raises(ContextLengthError, match=f"case {c.case_id!r}.*rewrite.*256"):
            editlens.edit(lm, [long], "rome")
    finally:
        calls.close()
    assert calls.n == 0 and lm.fingerprint == fp


def test_runner_records_truncation(tmp_path, tiny_llama):
    from editlens.runs.runner import RunOptions

    assert "truncate" not in RunOptions().to_dict()  # existing runs keep their recorded options (resumable)
    assert RunOptions(truncate="left").to_dict()["truncate"] == "left"
    with pytest.raises(EditlensError, match="truncate"):
        RunOptions(truncate="right")


def test_bench_names_the_case_before_any_unit_and_truncates_when_asked(tmp_path):
    """`editlens bench`: a too long probe fails the run before any unit is committed; --truncate left runs it and
    the option is recorded with the run."""
    import textwrap

    from click.testing import CliRunner

    from editlens.cli.main import cli
    from editlens.data import save_cases
    from editlens.runs.store import Store

    lm = editlens.load_model("tiny-llama")
    case, n = _long_case(lm)
    save_cases(synthetic_cases(3)[:1] + [case], tmp_path / "cases.jsonl")
    spec = tmp_path / "s.toml"
    spec.write_text(textwrap.dedent("""
        name = "ctx"
        model = "tiny-llama"
        metrics = ["t_acc", "kl"]

        [[datasets]]
        path = "cases.jsonl"

        [[methods]]
        name = "none"

        [regime]
        kind = "batch"
        sizes = [2]
    """).lstrip())
    store = tmp_path / "s.sqlite"
    res = CliRunner().invoke(cli, ["bench", str(spec), "--store", str(store), "--no-report", "-q"])
    assert res.exit_code != 0
    assert f"case {case.case_id!r}" in res.output and "paraphrase[1]" in res.output and "256" in res.output, res.output
    assert "--truncate left" in res.output
    with Store(store, readonly=True) as st:
        assert len(st.rows()) == 0 and st.finished_units(st.run_ids()[0]) == set()
    res = CliRunner().invoke(cli, ["bench", str(spec), "--store", str(store), "--no-report", "-q", "--truncate",
                                   "left", "--run-id", "ctx-left"])
    assert res.exit_code == 0, res.output
    with Store(store, readonly=True) as st:
        assert st.run_spec("ctx-left")["runner"]["truncate"] == "left"
        rows = st.rows("ctx-left")
        assert set(rows["case_id"]) == {synthetic_cases(3)[0].case_id, case.case_id}


def test_wrapper_prompt_rewriting_is_checked_at_call_time_and_runs_once(tiny_gpt2):
    """What a wrapper adds at call time (IKE/SCR demonstrations) is not re-run by the up-front check (it may
    retrieve or count); the model operations catch a result that does not fit: ContextLengthError, not IndexError."""
    from editlens.evaluate.system import WrappedSystem

    class Padded(WrappedSystem):
        calls = 0

        def transform_prompts(self, prompts):
            type(self).calls += 1
            return [FILLER + p for p in prompts]

    base = ModelSystem(tiny_gpt2)
    s = Padded(base, "padded")
    with pytest.raises(ContextLengthError, match="prompt 0 needs .* context of 256"):
        evaluate(s, synthetic_cases(1), base=base, metrics=["t_acc"], progress=False, cache=False)
    assert Padded.calls == 1
