"""Causal tracing (editlens.localize) on the tiny random models: identities, bit-identity with an independent
one-restoration-per-forward loop, determinism, input errors before any forward pass, hook hygiene, aggregation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import editlens
from editlens.data.schema import Rewrite, make_case
from editlens.errors import EditlensError
from editlens.localize import (CATEGORIES, TraceError, average_trace, causal_trace, causal_trace_reference,
                               embedding_std, token_categories)
from editlens.localize.average import aggregate

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one op per parallel region; one thread avoids barrier stalls on a shared, oversubscribed CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PROMPT = "The capital city of France is the town of"
SUBJECT = "France"


def _hook_counts(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def _naive_trace(lm, prompt, subject, kind, samples, window, seed, noise):
    """Independent reference: plain torch hooks, one forward pass of ``samples`` rows per restored state (only the
    last position's logits, like editlens: the head's matrix product then has the same shape and rounding)."""
    enc = lm.tokenizer(prompt, return_offsets_mapping=True)
    ids = list(enc.input_ids)
    s0 = prompt.index(subject)
    subj = [i for i, (a, b) in enumerate(enc.offset_mapping) if b > a and a < s0 + len(subject) and b > s0]
    a, b = subj[0], subj[-1] + 1
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn((samples, b - a, lm.d_model), generator=g) * noise
    model = lm.model
    L = lm.n_layers
    names = {"hidden": lm.arch.block, "mlp": lm.arch.mlp_at, "attn": lm.arch.attn_at}[kind]

    def first(o):
        return o[0] if isinstance(o, tuple) else o

    clean = {}
    hs = [model.get_submodule(names(l)).register_forward_hook(
        lambda m, i, o, l=l: clean.__setitem__(l, first(o)[0].detach().clone())) for l in range(L)]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1).logits[0, -1]
    for h in hs:
        h.remove()
    answer = int(logits.argmax())
    p_clean = float(torch.softmax(logits.float(), -1)[answer])

    def run(restore):  # restore: list of (layer, token)
        def emb_hook(m, i, o):
            o = o.clone()
            o[:, a:b] = o[:, a:b] + eps.to(o.dtype)
            return o

        def patch(l, t):
            def hook(m, i, o):
                h = first(o).clone()
                h[:, t] = clean[l][t]
                return (h, *o[1:]) if isinstance(o, tuple) else h
            return hook

        handles = [model.get_submodule(lm.arch.embed).register_forward_hook(emb_hook)]
        handles += [model.get_submodule(names(l)).register_forward_hook(patch(l, t)) for l, t in restore]
        try:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids] * samples), use_cache=False, logits_to_keep=1).logits[:, -1]
        finally:
            for h in handles:
                h.remove()
        return float(torch.softmax(out.float(), -1)[:, answer].double().mean())

    p_corrupt = run([])
    scores = np.zeros((len(ids), L))
    for t in range(len(ids)):
        for l in range(L):
            if kind == "hidden":
                win = [l]
            else:
                win = range(max(0, l - window // 2), min(L, l - (-window // 2)))
            scores[t, l] = run([(j, t) for j in win])
    return scores, p_clean, p_corrupt, (a, b), answer


@pytest.mark.parametrize("name,kind", [("tiny-llama", "hidden"), ("tiny-gpt2", "mlp"), ("tiny-neox", "attn")])
def test_scores_bit_identical_to_naive_loop(name, kind):
    lm = editlens.load_model(name)
    noise = 3 * embedding_std(lm)
    ref, p_clean, p_corrupt, span, answer = _naive_trace(lm, PROMPT, SUBJECT, kind, 3, 3, 7, noise)
    tr = causal_trace(lm, PROMPT, subject=SUBJECT, kind=kind, samples=3, window=3, seed=7, batch_tokens=200)
    assert tr.subject_range == span and tr.answer_id == answer
    assert tr.scores.shape == (len(tr.tokens), lm.n_layers)
    # not a vacuous comparison: the restorations do change the answer's probability
    assert np.ptp(ref) > 1e-5
    assert np.array_equal(tr.scores, ref)
    assert tr.p_corrupt == p_corrupt and tr.p_clean == p_clean
    # the library's own loop, without reuse, and a single big batch all agree bit for bit
    loop = causal_trace_reference(lm, PROMPT, subject=SUBJECT, kind=kind, samples=3, window=3, seed=7)
    flat = causal_trace(lm, PROMPT, subject=SUBJECT, kind=kind, samples=3, window=3, seed=7, reuse=False)
    big = causal_trace(lm, PROMPT, subject=SUBJECT, kind=kind, samples=3, window=3, seed=7, batch_tokens=10**6)
    for other in (loop, flat, big):
        assert np.array_equal(other.scores, ref) and other.p_corrupt == p_corrupt


def test_hidden_identities(tiny_llama):
    lm = tiny_llama
    tr = causal_trace(lm, PROMPT, subject=SUBJECT, samples=4, seed=1, noise=1.0)  # random model: large noise
    T, L = tr.scores.shape
    # restoring the last token's last hidden state gives back the clean run
    assert tr.scores[-1, -1] == pytest.approx(tr.p_clean, rel=1e-5, abs=1e-7)
    assert abs(tr.p_clean - tr.p_corrupt) > 1e-6  # the corruption does something (random model: ~0.4%)
    # the last layer's state of any other token cannot reach the last position: no effect
    np.testing.assert_allclose(tr.scores[:-1, -1], tr.p_corrupt, rtol=1e-5, atol=1e-8)
    # tokens before the subject are the same in the clean and corrupted runs: restoring them changes nothing
    a, b = tr.subject_range
    assert a > 0
    np.testing.assert_allclose(tr.scores[:a], tr.p_corrupt, rtol=1e-5, atol=1e-8)
    # no noise: every run is the clean run
    z = causal_trace(lm, PROMPT, subject=SUBJECT, samples=2, noise=0.0)
    np.testing.assert_allclose(z.scores, z.p_clean, rtol=1e-5)
    assert z.p_corrupt == pytest.approx(z.p_clean, rel=1e-5)


def test_p_corrupt_is_the_unrestored_run(tiny_gpt2):
    lm = tiny_gpt2
    noise = 0.5
    tr = causal_trace(lm, PROMPT, subject=SUBJECT, kind="mlp", samples=5, window=2, seed=3, noise=noise)
    # the unrestored corrupted run computed here from the documented noise recipe
    enc = lm.tokenizer(PROMPT)
    ids = torch.tensor([enc.input_ids] * 5)
    a, b = tr.subject_range
    eps = torch.randn((5, b - a, lm.d_model), generator=torch.Generator().manual_seed(3)) * noise
    h = lm.model.get_submodule(lm.arch.embed).register_forward_hook(
        lambda m, i, o: torch.cat([o[:, :a], o[:, a:b] + eps, o[:, b:]], dim=1))
    try:
        with torch.no_grad():
            out = lm.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    finally:
        h.remove()
    p = torch.softmax(out.float(), -1)[:, tr.answer_id].double().mean()
    assert tr.p_corrupt == pytest.approx(float(p), rel=1e-6)
    assert tr.noise == noise


def test_seed_determinism(tiny_llama):
    a = causal_trace(tiny_llama, PROMPT, subject=SUBJECT, samples=3, seed=5)
    b = causal_trace(tiny_llama, PROMPT, subject=SUBJECT, samples=3, seed=5)
    c = causal_trace(tiny_llama, PROMPT, subject=SUBJECT, samples=3, seed=6)
    assert np.array_equal(a.scores, b.scores) and a.p_corrupt == b.p_corrupt
    assert a.p_corrupt != c.p_corrupt and not np.array_equal(a.scores, c.scores)
    assert a.noise == pytest.approx(3 * float(tiny_llama.module(tiny_llama.arch.embed).weight.double().std(
        unbiased=False)))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(subject="Germany"), "does not occur in the prompt"),
    (dict(subject=SUBJECT, kind="resid"), "unknown kind 'resid'"),
    (dict(subject=SUBJECT, kind="mlp", window=0), "window must be an integer >= 1"),
    (dict(subject=SUBJECT, samples=0), "samples must be an integer >= 1"),
    (dict(subject=SUBJECT, noise=-1.0), "noise must be a finite number >= 0"),
    (dict(subject=SUBJECT, noise=float("nan")), "noise must be a finite number >= 0"),
    (dict(subject=SUBJECT, target="  "), "target must be a non-empty string"),
    (dict(), "give subject="),
])
def test_bad_input_fails_before_any_forward(tiny_llama, kwargs, needle):
    calls = []
    h = tiny_llama.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(TraceError, match=needle) as ei:
            causal_trace(tiny_llama, PROMPT, **kwargs)
    finally:
        h.remove()
    assert isinstance(ei.value, EditlensError)
    assert calls == []


def test_bad_case_in_a_dataset_fails_before_any_trace(tiny_llama):
    good = make_case("a", Rewrite("The capital city of {} is the town of", "France", "Rome", "Paris"))
    bad = make_case("b", Rewrite("{} speaks", "Anna", "French", "German"))
    calls = []
    h = tiny_llama.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(TraceError, match="window"):
            average_trace(tiny_llama, [good, bad], kind="mlp", window=0)
        # a case whose subject is not in its prompt (the subject argument overrides nothing here)
        odd = bad.__class__(case_id="odd", rewrite=Rewrite("{} speaks", "Anna", "French", "German").__class__(
            prompt="Bob speaks", subject="Anna", target_new="French", target_true="German"), probes=bad.probes)
        with pytest.raises(TraceError, match="case 'odd': subject 'Anna' does not occur"):
            average_trace(tiny_llama, [good, odd])
        with pytest.raises(TraceError, match="no cases"):
            average_trace(tiny_llama, [])
    finally:
        h.remove()
    assert calls == []


def test_no_leftover_hooks_even_on_exceptions(tiny_llama):
    lm = tiny_llama
    before = _hook_counts(lm.model)
    causal_trace(lm, PROMPT, subject=SUBJECT, kind="mlp", samples=2, window=2)
    assert _hook_counts(lm.model) == before

    state = {"n": 0}

    def boom(m, i, o):
        state["n"] += 1
        if state["n"] == 3:  # fail inside the batched forward passes, after the clean run
            raise RuntimeError("boom")

    h = lm.model.get_submodule(lm.arch.block(1)).register_forward_hook(boom)
    with_boom = _hook_counts(lm.model)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            causal_trace(lm, PROMPT, subject=SUBJECT, kind="hidden", samples=2, batch_tokens=50)
        assert _hook_counts(lm.model) == with_boom
    finally:
        h.remove()
    assert _hook_counts(lm.model) == before
    # the model is untouched: a plain forward gives what it gave before
    with torch.no_grad():
        x = torch.tensor([lm.tokenizer(PROMPT).input_ids])
        y1 = lm.model(input_ids=x).logits
    causal_trace(lm, PROMPT, subject=SUBJECT, samples=2)
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=x).logits, y1)


def test_case_input_target_and_tables(tiny_llama, tmp_path):
    case = make_case("c1", Rewrite("The capital city of {} is the town of", "France", "Rome", "Paris"))
    tr = causal_trace(tiny_llama, case, samples=2)
    assert tr.case_id == "c1" and tr.answer == "Paris" and tr.subject == "France"
    _, t_ids = editlens.lm.ops.target_token_ids(tiny_llama.tokenizer, case.rewrite.text, "Paris")
    assert tr.answer_id == t_ids[0]
    df = tr.to_pandas()
    assert len(df) == tr.scores.size
    row = df[(df.token_index == 2) & (df.layer == 1)].iloc[0]
    assert row.score == tr.scores[2, 1] and row.indirect_effect == pytest.approx(tr.scores[2, 1] - tr.p_corrupt)
    assert df.is_subject.sum() == (tr.subject_range[1] - tr.subject_range[0]) * tr.n_layers
    out = tmp_path / "h.png"
    tr.plot(out)
    assert out.stat().st_size > 2000 and out.read_bytes()[:4] == b"\x89PNG"


def test_token_categories():
    # prompt of 8 tokens, subject tokens 1..3
    cats = [token_categories(i, (1, 4), 8) for i in range(8)]
    assert cats == [[], ["first subject token"], ["middle subject tokens"], ["last subject token"],
                    ["first subsequent token"], ["further tokens"], ["further tokens"], ["last token"]]
    assert token_categories(0, (0, 1), 3) == ["first subject token", "last subject token"]
    assert token_categories(2, (0, 1), 3) == ["last token"]


def test_average_trace_matches_hand_aggregation(tiny_llama, tmp_path):
    cases = [make_case("a", Rewrite("The capital city of {} is the town of", "France", "Rome", "Paris")),
             make_case("b", Rewrite("{} was born in the city of", "Marie Curie of Warsaw", "Oslo", "Warsaw")),
             make_case("c", Rewrite("In {}, people speak", "Brazil", "French", "Portuguese"))]
    avg = average_trace(tiny_llama, cases, samples=2)
    assert avg.n_cases == 3 and avg.categories == CATEGORIES
    L = tiny_llama.n_layers
    assert avg.effects.shape == (len(CATEGORIES), L)
    # hand aggregation of "last subject token" and "further tokens"
    for cat in ("last subject token", "further tokens", "middle subject tokens"):
        per = []
        for t in avg.traces:
            idx = [i for i in range(len(t.tokens)) if cat in token_categories(i, t.subject_range, len(t.tokens))]
            if idx:
                per.append(np.mean([t.scores[i] - t.p_corrupt for i in idx], axis=0))
        k = CATEGORIES.index(cat)
        assert avg.counts[k] == len(per)
        if per:
            np.testing.assert_allclose(avg.effects[k], np.mean(per, axis=0), rtol=1e-12)
        if len(per) > 1:
            np.testing.assert_allclose(avg.sem[k], np.std(per, axis=0, ddof=1) / math.sqrt(len(per)), rtol=1e-12)
    # each trace equals a trace made alone with the same noise scale and seed
    alone = causal_trace(tiny_llama, cases[1], samples=2, noise=avg.traces[1].noise)
    assert np.array_equal(alone.scores, avg.traces[1].scores)
    assert avg.total_effect == pytest.approx(np.mean([t.p_clean - t.p_corrupt for t in avg.traces]))
    df = avg.to_pandas()
    assert len(df) == len(CATEGORIES) * L
    avg.plot(tmp_path / "avg.png")
    assert (tmp_path / "avg.png").stat().st_size > 2000
    with pytest.raises(TraceError, match="different kinds"):
        aggregate([avg.traces[0], causal_trace(tiny_llama, cases[0], kind="mlp", samples=1)])
