"""SCR on the tiny model: routing, exact pass-through, confirmation gate, persistence, registry, undo."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from editlens.data.schema import Rewrite, make_case
from editlens.edit import edit, edit_sequential, get_method
from editlens.edit.retrieval import EmbeddingIndex, HashingEncoder
from editlens.edit.scr import SCRHParams, SCRSystem
from editlens.errors import EditlensError, HParamsError
from editlens.evaluate.system import ModelSystem

FACTS = [("{} lives in the city of", "Alice Smith", "Paris", "Rome"),
         ("{} plays the", "Bob Jones", "violin", "piano"),
         ("{} works for", "Carol White", "Acme", "Globex")]


def _cases():
    return [make_case(str(i), Rewrite(p, s, n, t)) for i, (p, s, n, t) in enumerate(FACTS)]


def _system(lm, **over):
    hp = SCRHParams.for_model(lm).replace(**over)
    sys = SCRSystem(ModelSystem(lm), hp)
    sys.add_cases(_cases())
    return sys


def test_hashing_encoder_and_index_search():
    idx = EmbeddingIndex(HashingEncoder(256))
    idx.add(["Alice lives in Paris.", "Bob plays the violin."], ids=["a", "b"])
    scores, rows = idx.search(["Where does Alice live?", "violin player Bob"], k=2)
    assert rows[:, 0].tolist() == [0, 1]
    assert scores[0, 0] > scores[0, 1]
    assert np.allclose(np.linalg.norm(idx.embeddings, axis=1), 1.0, atol=1e-6)


def test_index_append_is_incremental_and_persists(tmp_path):
    enc = HashingEncoder(128)
    idx = EmbeddingIndex(enc)
    for i in range(40):  # capacity grows by doubling; each text encoded once
        idx.add([f"fact number {i} about thing{i}"], ids=[f"f{i}"])
    assert idx.n_encoded == 40 and len(idx) == 40
    idx.save(tmp_path / "mem")
    back = EmbeddingIndex.load(tmp_path / "mem", enc)
    assert back.texts == idx.texts and back.ids == idx.ids
    assert np.array_equal(back.embeddings, idx.embeddings)
    with pytest.raises(EditlensError, match="encoder"):
        EmbeddingIndex.load(tmp_path / "mem", HashingEncoder(64))
    with pytest.raises(EditlensError, match="not found"):
        EmbeddingIndex.load(tmp_path / "nothing", enc)


def test_unrelated_prompt_gets_exact_base_distribution(tiny_llama):
    sys = _system(tiny_llama, confirm_margin=-1e9)  # every filtered candidate confirmed
    base = ModelSystem(tiny_llama)
    prompts = ["The weather today is", "Alice Smith lives in the city of"]
    inputs = sys.contextualise(prompts)
    assert inputs[0] == prompts[0]  # nothing retrieved above the threshold: unchanged
    assert inputs[1].startswith("Fact: Alice Smith lives in the city of Paris.\n")
    assert inputs[1].endswith(prompts[1])
    a = sys.next_token_logprobs(prompts[:1])
    b = base.next_token_logprobs(prompts[:1])
    assert torch.equal(a, b)
    # teacher forcing of the target after the query sees the fact
    tf = sys.teacher_forced(prompts[1:], ["Paris"])[0]
    tf_base = base.teacher_forced([inputs[1]], ["Paris"])[0]
    assert torch.allclose(tf.logprobs, tf_base.logprobs, atol=1e-5)


def test_confirmation_gate_and_decision_log(tiny_llama):
    keep_all = _system(tiny_llama, confirm_margin=-1e9)
    keep_none = _system(tiny_llama, confirm_margin=1e9)
    q = ["Bob Jones plays the"]
    assert keep_all.select(q) != [()]
    assert keep_none.select(q) == [()]
    assert keep_none.contextualise(q) == q
    d = keep_none.decisions
    assert d and not any(x["confirmed"] for x in d)
    assert {"query", "fact", "similarity", "yes_logprob", "no_logprob", "confirmed"} <= set(d[0])
    # the decision is Yes-vs-No at the next token: recompute one by hand
    lp = ModelSystem(tiny_llama).next_token_logprobs([keep_none.confirm_prompt(q[0], d[0]["fact"])])[0]
    assert d[0]["yes_logprob"] == pytest.approx(float(torch.logsumexp(lp[keep_none._yes], 0)), abs=1e-4)
    # cached: a second call asks nothing new
    n = len(keep_none.decisions)
    keep_none.select(q)
    assert len(keep_none.decisions) == n


def test_confirm_disabled_and_calibrated(tiny_llama):
    sys = _system(tiny_llama, confirm=False)
    assert sys.select(["Carol White works for"])[0]
    assert sys.stats["confirmations"] == 0
    cal = _system(tiny_llama, confirm_calibrate=True, confirm_margin=-1e9)
    cal.select(["Carol White works for"])
    assert cal.stats["confirmations"] == len(cal.decisions) + 1  # one content-free reference per query


def test_registered_edit_undo_and_sequential(tiny_llama):
    assert get_method("scr").name == "scr"
    base = ModelSystem(tiny_llama)
    e = edit(tiny_llama, _cases(), "scr", confirm_margin=-1e9)
    assert isinstance(e.system, SCRSystem) and len(e.system.memory) == 3
    fp = e.system.fingerprint
    e.undo()
    assert len(e.system.memory) == 0 and e.system.fingerprint != fp
    p = ["Alice Smith lives in the city of"]
    assert torch.equal(e.system.next_token_logprobs(p), base.next_token_logprobs(p))
    run = edit_sequential(tiny_llama, _cases(), "scr", batch_size=1, confirm_margin=-1e9)
    assert len(run.system.memory) == 3 and run.system.memory.n_encoded == 3
    run.undo()
    assert len(run.system.memory) == 0


def test_memory_round_trip(tiny_llama, tmp_path):
    sys = _system(tiny_llama, confirm_margin=-1e9)
    sys.save_memory(tmp_path / "scr")
    back = SCRSystem.from_memory(ModelSystem(tiny_llama), tmp_path / "scr", sys.hparams)
    assert back.facts == sys.facts and back.fingerprint == sys.fingerprint
    q = ["Bob Jones plays the"]
    assert back.contextualise(q) == sys.contextualise(q)


def test_bad_hparams(tiny_llama):
    with pytest.raises(HParamsError, match="top_k"):
        SCRHParams().replace(top_k=0)
    with pytest.raises(HParamsError, match="confirm_template"):
        SCRHParams().replace(confirm_template="no placeholders")
    with pytest.raises(HParamsError, match="chat template"):
        SCRSystem(ModelSystem(tiny_llama), SCRHParams(retriever="hashing", context_format="chat"))
