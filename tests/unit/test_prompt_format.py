"""``prompt_format`` has one meaning: ``raw``, ``chat`` or ``auto`` (= chat when the tokenizer has a chat template,
else raw), validated wherever it enters (Python APIs, specs), and the edit itself is built in that format.

Every shipped method is edited and evaluated in chat format on a tiny model given a chat template; wrapper
methods (GRACE, WISE, IKE, SCR) are checked to have built their edit from chat-formatted prompts (codebook keys,
side-memory prompts, in-context prompts), and a wrapper edit evaluated in another format than it was made in is
a clear error, while a weight edit (format-independent weights) is re-posed.
"""
from __future__ import annotations

import math
import textwrap

import pytest
import torch

import editlens
from editlens.edit import edit, edit_sequential
from editlens.errors import EditlensError, MethodError, MetricError, PromptFormatError, SpecError
from editlens.evaluate import evaluate
from editlens.evaluate.system import ModelSystem
from editlens.lm import ops
from editlens.lm.prompting import PROMPT_FORMATS, PromptFormat, chat_prefix, resolve_prompt_format
from editlens.testing import edit_cases
from tests.conftest import shipped_methods, trained_for

#: a ChatML-like template (the tiny models' tokenizers have none); its markers tokenize as plain characters
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
USER_TURN = "<|im_start|>user\n"
ASSISTANT_TURN = "<|im_end|>\n<|im_start|>assistant\n"
METRICS = ["t_acc", "c_acc", "kl", "ar_em"]


def chat_tiny():
    lm = editlens.load_model("tiny-llama")
    lm.tokenizer.chat_template = TEMPLATE
    return lm


@pytest.fixture()
def tiny_chat():
    return chat_tiny()


@pytest.fixture(scope="module")
def tiny_chat_mod():
    return chat_tiny()


# ============================================================================================ the enum
def test_allowed_values_and_resolution(tiny_chat, tiny_llama):
    assert PROMPT_FORMATS == ("raw", "chat", "auto")
    from editlens.runs import spec

    assert spec.PROMPT_FORMATS == PROMPT_FORMATS  # the spec's copy (kept import-light) is the same enum
    assert resolve_prompt_format("raw", tiny_chat.tokenizer) == "raw"
    assert resolve_prompt_format("chat", tiny_chat.tokenizer) == "chat"
    assert resolve_prompt_format("auto", tiny_chat.tokenizer) == "chat"   # has a template
    assert resolve_prompt_format("auto", tiny_llama.tokenizer) == "raw"   # has none
    assert ModelSystem(tiny_chat, prompt_format="auto").prompt_format == "chat"
    assert ModelSystem(tiny_llama, prompt_format="auto").prompt_format == "raw"
    # the chat prefix is the template's user turn with the instruction and the generation prompt
    fmt = PromptFormat.parse("chat", tiny_chat.tokenizer)
    assert fmt.apply("X is") == f"{USER_TURN}{fmt.instruction}{ASSISTANT_TURN}X is"
    assert chat_prefix(tiny_chat.tokenizer, "hello") == f"{USER_TURN}hello{ASSISTANT_TURN}"


@pytest.mark.parametrize("bad", ["weird", "Chat", "", None, 3, "auto "])
def test_unknown_value_is_a_prompt_format_error(tiny_chat, bad):
    with pytest.raises(PromptFormatError, match=r"'raw', 'chat', 'auto'") as ei:
        resolve_prompt_format(bad, tiny_chat.tokenizer)
    assert isinstance(ei.value, EditlensError)
    with pytest.raises(PromptFormatError, match="prompt_format"):
        ModelSystem(tiny_chat, prompt_format=bad)


def test_chat_without_template_names_the_fix(tiny_llama):
    with pytest.raises(PromptFormatError, match="chat template.*'raw' or 'auto'"):
        resolve_prompt_format("chat", tiny_llama.tokenizer)


def test_edit_and_evaluate_validate_before_any_work(tiny_chat, tiny_llama):
    cases = edit_cases(1)
    fp = tiny_chat.weights_fingerprint()
    for bad in ("weird", 1):
        with pytest.raises(PromptFormatError, match="prompt_format"):
            edit(tiny_chat, cases, "rome", prompt_format=bad)
        with pytest.raises(PromptFormatError, match="prompt_format"):
            edit_sequential(tiny_chat, cases, "rome", prompt_format=bad)
        with pytest.raises(PromptFormatError, match="prompt_format"):
            evaluate(ModelSystem(tiny_chat), cases, metrics=["t_acc"], prompt_format=bad, progress=False)
    with pytest.raises(PromptFormatError, match="chat template"):
        edit(tiny_llama, cases, "grace", prompt_format="chat")
    assert tiny_chat.weights_fingerprint() == fp and not tiny_chat.state


def test_auto_is_resolved_once_for_edit_and_evaluate(tiny_chat, tiny_llama):
    cases = edit_cases(1)
    e = edit(tiny_chat, cases, "ike", prompt_format="auto")
    try:
        assert e.system.prompt_format == "chat" and e.prompt_format == "chat"
        res = evaluate(e.system, cases, base=ModelSystem(tiny_chat, "auto"), metrics=["t_acc"], prompt_format="auto",
                       progress=False)
        assert res.meta["prompt_format"] == "chat"
    finally:
        e.undo()
    e = edit(tiny_llama, cases, "ike", prompt_format="auto")
    try:
        assert e.system.prompt_format == "raw"
    finally:
        e.undo()


# ============================================================================================ every method
@pytest.mark.parametrize("method", shipped_methods())
def test_every_method_edits_and_evaluates_in_chat(tiny_chat, method):
    cases = edit_cases(1)
    base = ModelSystem(tiny_chat, prompt_format="chat")
    before = {n: p.detach().clone() for n, p in tiny_chat.model.named_parameters()}
    # IKE's demonstrations in the chat turn do not fit the 256 positions of the character-level tiny model with k=4
    over = {"k": 1} if method == "ike" else {}
    e = edit(tiny_chat, cases, method, prompt_format="chat", **over, **trained_for(method, tiny_chat))
    try:
        assert e.system.prompt_format == "chat" and e.prompt_format == "chat"
        res = evaluate(e.system, cases, base=base, metrics=METRICS, prompt_format="chat", progress=False, cache=False)
        assert res.meta["prompt_format"] == "chat"
        df = res.to_pandas()
        got = {(k, m) for k, m in zip(df["probe_kind"], df["metric"])}
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            for m in METRICS:
                assert (kind, m) in got, (method, kind, m, sorted(got))
        assert set(df["case_id"]) == {c.case_id for c in cases}
        assert all(math.isfinite(v) for v in df["value"]), df
        # the system's model inputs are posed in the chat template (the query pre-filled as the reply)
        q = "Zed lives in the city of"
        assert all(x.startswith(USER_TURN) and x.endswith(ASSISTANT_TURN + q) for x in e.system._inputs([q])), \
            e.system._inputs([q])
    finally:
        e.undo()
    assert all(torch.equal(p, before[n]) for n, p in tiny_chat.model.named_parameters())


@pytest.mark.parametrize("method", ["rome", "grace", "ike", "scr"])
def test_sequential_edit_in_chat(tiny_chat, method):
    """Every step of a run is made in the run's format (wrappers keep one system for the whole run)."""
    cases = edit_cases(2)
    seen = []

    def cb(step, n, run):
        seen.append(run.system.prompt_format)
        evaluate(run.system, cases[:n], base=ModelSystem(tiny_chat, "chat"), metrics=["t_acc"], prompt_format="chat",
                 progress=False, cache=False)

    run = edit_sequential(tiny_chat, cases, method, prompt_format="chat", callback=cb,
                          **({"k": 1} if method == "ike" else {}))
    try:
        assert seen == ["chat"] * 2 and run.system.prompt_format == "chat" and run.prompt_format == "chat"
    finally:
        run.undo()


# ============================================================================================ the edit is built in the format
def test_grace_keys_are_taken_at_the_chat_prompt(tiny_chat):
    case = edit_cases(1)
    module = tiny_chat.arch.mlp_out_at(2)
    text = case[0].rewrite.text
    chat_in = PromptFormat.parse("chat", tiny_chat.tokenizer).apply(text)
    key_chat = ops.capture(tiny_chat, [chat_in], [module], [-1], kind="input")[module][0].float().cpu()
    key_raw = ops.capture(tiny_chat, [text], [module], [-1], kind="input")[module][0].float().cpu()
    assert not torch.allclose(key_chat, key_raw)
    for fmt, want in (("chat", key_chat), ("raw", key_raw)):
        e = edit(tiny_chat, case, "grace", prompt_format=fmt)
        try:
            assert torch.allclose(e.system.adaptor.keys[0], want), fmt
            # the edit prompt hits its entry when posed in the edit's format
            e.system.next_token_logprobs([text])
            assert int(e.system.adaptor.last_hits[0]) == 0
        finally:
            e.undo()


def test_wise_trains_on_chat_prompts(tiny_chat):
    cases = edit_cases(1)
    e = edit(tiny_chat, cases, "wise", prompt_format="chat", n_iter=1)
    try:
        mem = e.system.adaptor.memories[0]
        assert mem.prompts == [PromptFormat.parse("chat", tiny_chat.tokenizer).apply(cases[0].rewrite.text)]
        assert mem.contrasts and all(p.startswith(USER_TURN) for p in mem.contrasts + mem.calibration)
    finally:
        e.undo()


def test_ike_context_is_in_the_user_turn(tiny_chat):
    cases = edit_cases(3)
    e = edit(tiny_chat, cases, "ike", prompt_format="chat")
    try:
        q = cases[0].rewrite.text
        (x,) = e.system._inputs([q])
        user, reply = x[len(USER_TURN):].split(ASSISTANT_TURN)
        assert x.startswith(USER_TURN) and reply == q
        hp = e.system.hparams
        assert user.count(hp.fact_prefix) == hp.k + 1  # k demonstrations and the query's own fact
        assert user.rstrip().endswith(hp.chat_instruction)
        assert f"{hp.fact_prefix}{cases[0].rewrite.statement}" in user
    finally:
        e.undo()
    # raw: the IKE prompt as in the paper, the query last
    e = edit(tiny_chat, cases, "ike", prompt_format="raw")
    try:
        (x,) = e.system._inputs([q])
        assert x.startswith(e.system.hparams.fact_prefix) and x.endswith(e.system.hparams.prompt_prefix + q)
    finally:
        e.undo()


def test_scr_context_and_confirmation_in_chat(tiny_chat):
    cases = edit_cases(2)
    e = edit(tiny_chat, cases, "scr", prompt_format="chat", confirm=False, sim_threshold=-1.0, top_k=1)
    try:
        s = e.system
        q = cases[0].rewrite.text
        (x,) = s._inputs([q])
        assert x.startswith(USER_TURN + "Facts:\n- ") and x.endswith(ASSISTANT_TURN + q)
        assert s.context_format == "chat"
    finally:
        e.undo()
    # an explicit raw context in a chat-format system is refused (it would be silently overridden otherwise)
    with pytest.raises(EditlensError, match="context_format.*'raw'.*chat"):
        edit(tiny_chat, cases, "scr", prompt_format="chat", context_format="raw")


# ============================================================================================ mismatches
@pytest.mark.parametrize("method", ["grace", "ike", "scr"])
def test_wrapper_edit_evaluated_in_another_format_is_an_error(tiny_chat, method):
    cases = edit_cases(1)
    quick = {"n_iter": 1} if method == "grace" else {}
    for made, asked in (("raw", "chat"), ("chat", "raw")):
        e = edit(tiny_chat, cases, method, prompt_format=made, **quick)
        try:
            with pytest.raises(MetricError, match=rf"made in prompt format '{made}'.*prompt_format='{asked}'"):
                evaluate(e.system, cases, base=ModelSystem(tiny_chat), metrics=["t_acc"], prompt_format=asked,
                         progress=False)
        finally:
            e.undo()


def test_weight_edit_is_re_posed_exactly(tiny_chat):
    """A weight edit does not depend on the format its Edit.system was asked in: a raw edit evaluated in chat gives
    the rows of the same edit made with prompt_format='chat'."""
    cases = edit_cases(1)
    base = ModelSystem(tiny_chat)
    rows = {}
    for made in ("raw", "chat"):
        e = edit(tiny_chat, cases, "rome", prompt_format=made)
        try:
            res = evaluate(e.system, cases, base=base, metrics=METRICS, prompt_format="chat", progress=False,
                           cache=False)
            assert res.meta["prompt_format"] == "chat"
            rows[made] = res.to_pandas().sort_values(["case_id", "probe_kind", "metric"]).reset_index(drop=True)
        finally:
            e.undo()
    assert rows["raw"]["value"].tolist() == rows["chat"]["value"].tolist()


def test_a_method_that_ignores_the_format_is_refused(tiny_chat):
    from editlens.edit.base import Edit, Editor, register_method

    @register_method("_test_raw_only")
    class RawOnly(Editor):
        def apply(self, lm, cases, hparams, *, evk_align=None, progress=True, sequence=None):
            return Edit(ModelSystem(lm), self.name, cases, hparams, {}, lm=lm)

    with pytest.raises(MethodError, match="_test_raw_only.*'raw'.*prompt_format='chat'.*base_system"):
        edit(tiny_chat, edit_cases(1), "_test_raw_only", prompt_format="chat")
    assert edit(tiny_chat, edit_cases(1), "_test_raw_only").system.prompt_format == "raw"


# ============================================================================================ specs and runs
SPEC = """
    model = {{ name = "tiny-llama"{fmt} }}
    metrics = ["t_acc", "kl"]

    [[datasets]]
    path = "synthetic:2"

    [[methods]]
    name = "grace"
    hparams = {{ n_iter = 3 }}

    [regime]
    kind = "batch"
    sizes = [2]
"""


def test_spec_prompt_format_validated_and_default_raw(tmp_path):
    from editlens.runs.spec import load_spec

    p = tmp_path / "s.toml"
    p.write_text(textwrap.dedent(SPEC.format(fmt="")).lstrip())
    assert load_spec(p).model.prompt_format == "raw"
    p.write_text(textwrap.dedent(SPEC.format(fmt=', prompt_format = "Chat"')).lstrip())
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    msg = str(ei.value)
    assert f"{p}:1: model.prompt_format" in msg and "'raw'" in msg and "'chat'" in msg and "'auto'" in msg, msg


@pytest.mark.parametrize("fmt", ["chat", "auto"])
def test_run_edits_and_evaluates_in_the_spec_format(tmp_path, fmt):
    """A run of GRACE with prompt_format chat (or auto on a model with a template) edits and evaluates in chat."""
    from editlens.runs.runner import run_spec
    from editlens.runs.store import Store

    lm = chat_tiny()
    p = tmp_path / "s.toml"
    p.write_text(textwrap.dedent(SPEC.format(fmt=f', prompt_format = "{fmt}"')).lstrip())
    rid = run_spec(p, store=tmp_path / "r.sqlite", lm=lm, progress=False)
    with Store(tmp_path / "r.sqlite", readonly=True) as st:
        df = st.rows(rid)
    assert len(df) and set(df["metric"]) >= {"t_acc", "kl"}
    # the kl of an edit prompt is that of a GRACE hit (not zero): the edit was made and evaluated in one format
    kl = df[(df["metric"] == "kl") & (df["probe_kind"] == "rewrite")]["value"]
    assert len(kl) == 2 and (kl > 0).all(), df
