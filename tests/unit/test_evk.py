"""EVK-Bench (editlens.evaluate.evk) on tiny random models: samples, spans, noise statistics, metrics."""
from __future__ import annotations

import math

import pytest
import torch

import editlens
from editlens.data.schema import Probe, Rewrite, make_case
from editlens.errors import MetricError
from editlens.evaluate import evk
from editlens.evaluate.core import BASE, EDITED, BaseCache, evaluate, resolve_metrics
from editlens.evaluate.system import ModelSystem, WrappedSystem
from editlens.lm import ops


def _cases(n: int = 2):
    out = []
    for i in range(n):
        rw = Rewrite("The capital of {} is", f"Country{i}", "Seoul", "Tokyo")
        out.append(make_case(f"c{i}", rw, {
            "neighborhood": [Probe("The capital of China is", "Beijing"), Probe(f"The capital of Land{i} is", "X"),
                             Probe("Water boils at", None)],
        }))
    return out


def _noisy_copy(scale: float = 0.05) -> ModelSystem:
    lm = editlens.load_model("tiny-llama")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if name.endswith("layers.1.mlp.down_proj.weight"):
                p.add_(scale * torch.randn(p.shape, generator=g))
    lm.push_state("test-noise")
    return ModelSystem(lm)


# ----------------------------------------------------------------------------------------------- spans
def test_subject_range_variants():
    assert evk.subject_range("The capital of Japan is", "The capital of {} is", "Japan") == (15, 20)
    # a neighbour with another subject matches the template
    assert evk.subject_range("The capital of South Korea is", "The capital of {} is", None) == (15, 26)
    # a paraphrase containing the subject
    assert evk.subject_range("Japan's seat of government is", "The capital of {} is", "Japan") == (0, 5)
    assert evk.subject_range("Water boils at", "The capital of {} is", "Japan") is None


def test_span_tokens_partition_the_query(tiny_llama):
    tok = tiny_llama.tokenizer
    prefix = "Some context. "
    prompt = "The capital of Japan is"
    text = prefix + prompt
    spans = evk.span_tokens(tok, text, len(prefix), len(prompt), (15, 20))
    enc = tok(text, return_offsets_mapping=True)
    full_text = "".join(text[a:b] for a, b in (enc.offset_mapping[i] for i in spans["full"]))
    assert full_text.strip() == prompt.strip() or prompt in full_text
    assert set(spans["subject"]) | set(spans["relation"]) == set(spans["full"])
    assert not set(spans["subject"]) & set(spans["relation"])
    subj_text = "".join(text[a:b] for a, b in (enc.offset_mapping[i] for i in spans["subject"]))
    assert "Japan" in subj_text
    # no prefix token is part of the query
    assert min(spans["full"]) >= len(ops.encode(tok, prefix.rstrip())) - 1


# ----------------------------------------------------------------------------------------------- noise
def test_noise_reproducible_and_seed_dependent():
    a = evk.sample_noise(3, "p", 0, 5, 16)
    b = evk.sample_noise(3, "p", 0, 5, 16)
    assert torch.equal(a, b)
    assert not torch.equal(a, evk.sample_noise(4, "p", 0, 5, 16))
    assert not torch.equal(a, evk.sample_noise(3, "p", 1, 5, 16))
    assert not torch.equal(a, evk.sample_noise(3, "q", 0, 5, 16))


def test_noise_norm_statistics():
    d = 512
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(4000, d, generator=g) * torch.rand(4000, 1, generator=g).add(0.5) * 3
    eps = torch.randn(4000, d, generator=g)
    for sigma in (0.05, 0.1, 0.4, 1.0):
        out = evk.perturb(emb, eps, sigma)
        ratio = (out - emb).norm(dim=-1) / emb.norm(dim=-1)
        # E||Δ||² = σ²||e||²  and  ||Δ||/||e|| concentrates at σ (chi distribution with d degrees of freedom)
        assert float((ratio ** 2).mean()) == pytest.approx(sigma ** 2, rel=0.01)
        assert float(ratio.mean()) == pytest.approx(sigma, rel=0.01)
        assert float(ratio.std()) < 0.05 * sigma
        # the noise direction is isotropic: mean cosine with the embedding near 0
        cos = torch.nn.functional.cosine_similarity(out - emb, emb, dim=-1)
        assert abs(float(cos.mean())) < 0.01
    assert torch.equal(evk.perturb(emb, eps, 0.0), emb)


def test_perturb_hand_computed():
    emb = torch.tensor([[3.0, 4.0, 0.0, 0.0]])          # ||e|| = 5, d = 4, sqrt(d) = 2
    eps = torch.tensor([[1.0, -1.0, 2.0, 0.0]])
    out = evk.perturb(emb, eps, 0.2)                    # e + 0.2 * 5 * eps / 2 = e + 0.5 eps
    assert torch.allclose(out, torch.tensor([[3.5, 3.5, 1.0, 0.0]]))


# ----------------------------------------------------------------------------------------------- samples on models
def test_sigma_zero_is_the_unperturbed_output(tiny_llama):
    sys_ = ModelSystem(tiny_llama)
    prompts = ["The capital of Japan is", "Water boils at", "The capital of China is"]
    lp0 = evk.perturbed_next_token_logprobs(sys_, prompts, "full", 0.0, n_samples=2)
    ref = sys_.next_token_logprobs(prompts)
    assert torch.allclose(lp0[:, 0], ref, atol=1e-5)
    assert torch.equal(lp0[:, 0], lp0[:, 1])
    # hidden states: bit-identical to a plain forward of the same batch
    reqs = [evk.EvkNext(p, "full", 0.0, 0, 0) for p in prompts]
    h = evk.virtual_hidden(sys_, reqs)
    items = [evk.VirtualItem(ops.encode(tiny_llama.tokenizer, p), [], torch.zeros(0, tiny_llama.d_model), 0.0)
             for p in prompts]
    plain = []
    for it in items:
        batch = ops.pad_left([it.ids], ops._pad_id(tiny_llama), tiny_llama.device)
        with torch.no_grad(), editlens.lm.hooks.record_io(tiny_llama.model, [tiny_llama.arch.lm_head]) as rec:
            tiny_llama.model(**batch, logits_to_keep=1, use_cache=False)
        plain.append(rec[tiny_llama.arch.lm_head][0, -1])
    assert torch.allclose(h, torch.stack(plain), atol=1e-6)


def test_samples_identical_for_base_and_edited_and_reproducible(tiny_llama):
    base = ModelSystem(tiny_llama)
    edited = _noisy_copy()
    captured: dict[str, list[torch.Tensor]] = {"b": [], "e": []}

    def grab(system, key):
        lm = system.lm
        with editlens.lm.hooks.record_io(lm.model, [lm.arch.layers + ".0"], kind="input") as rec:
            orig = evk.forward_hidden

            def spy(s, items):
                out = orig(s, items)
                captured[key].append(rec[lm.arch.layers + ".0"].clone())
                return out
            evk_forward = spy
            out = evk_forward(system, [evk.VirtualItem(ops.encode(lm.tokenizer, "The capital of Japan is"),
                                                       [1, 2], evk.sample_noise(0, "x", 0, 2, lm.d_model), 0.3)])
        return out

    grab(base, "b")
    grab(edited, "e")
    # the perturbed embeddings entering the first block are identical (same embedding weights, same noise)
    assert torch.equal(captured["b"][0], captured["e"][0])
    a = evk.perturbed_next_token_logprobs(base, ["The capital of Japan is"], "full", 0.2, n_samples=3, seed=5)
    b = evk.perturbed_next_token_logprobs(base, ["The capital of Japan is"], "full", 0.2, n_samples=3, seed=5)
    c = evk.perturbed_next_token_logprobs(base, ["The capital of Japan is"], "full", 0.2, n_samples=3, seed=6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # samples differ from each other and from the clean prompt
    assert not torch.allclose(a[0, 0], a[0, 1])


def test_only_the_span_is_perturbed(tiny_llama):
    sys_ = ModelSystem(tiny_llama)
    prompt = "The capital of Japan is"
    subj = evk.subject_range(prompt, "The capital of {} is", "Japan")
    seen = {}
    lm = tiny_llama
    for span in evk.SPANS:
        with editlens.lm.hooks.record_io(lm.model, [lm.arch.layers + ".0"], kind="input") as rec:
            evk.virtual_hidden(sys_, [evk.EvkNext(prompt, span, 0.3, 0, 0, *subj)])
            seen[span] = rec[lm.arch.layers + ".0"][0].clone()
    with editlens.lm.hooks.record_io(lm.model, [lm.arch.layers + ".0"], kind="input") as rec:
        evk.virtual_hidden(sys_, [evk.EvkNext(prompt, "full", 0.0, 0, 0)])
        clean = rec[lm.arch.layers + ".0"][0].clone()
    text = prompt
    spans = evk.span_tokens(lm.tokenizer, text, 0, len(prompt), subj)
    for span in evk.SPANS:
        changed = {i for i in range(clean.shape[0]) if not torch.equal(seen[span][i], clean[i])}
        assert changed == set(spans[span]), span
    # full noise = subject noise + relation noise (same ε per token)
    for i in spans["subject"]:
        assert torch.equal(seen["full"][i], seen["subject"][i])
    for i in spans["relation"]:
        assert torch.equal(seen["full"][i], seen["relation"][i])


def test_in_context_systems_perturb_the_query_only(tiny_llama):
    class Prefixed(WrappedSystem):
        def transform_prompts(self, prompts):
            return [f"New fact: the capital of Japan is Seoul. {p}" for p in prompts]

    sys_ = Prefixed(ModelSystem(tiny_llama), "prefix")
    lm = tiny_llama
    prompt = "The capital of China is"
    with editlens.lm.hooks.record_io(lm.model, [lm.arch.layers + ".0"], kind="input") as rec:
        evk.virtual_hidden(sys_, [evk.EvkNext(prompt, "full", 0.5, 0, 0)])
        noisy = rec[lm.arch.layers + ".0"][0].clone()
    with editlens.lm.hooks.record_io(lm.model, [lm.arch.layers + ".0"], kind="input") as rec:
        evk.virtual_hidden(sys_, [evk.EvkNext(prompt, "full", 0.0, 0, 0)])
        clean = rec[lm.arch.layers + ".0"][0].clone()
    n_q = len(evk.span_tokens(lm.tokenizer, sys_._inputs([prompt])[0],
                              sys_._inputs([prompt])[0].rfind(prompt), len(prompt), None)["full"])
    changed = [i for i in range(clean.shape[0]) if not torch.equal(noisy[i], clean[i])]
    assert changed == list(range(clean.shape[0] - n_q, clean.shape[0]))


def test_relation_span_needs_a_subject(tiny_llama):
    sys_ = ModelSystem(tiny_llama)
    with pytest.raises(MetricError, match="subject"):
        evk.virtual_hidden(sys_, [evk.EvkNext("Water boils at", "relation", 0.1, 0, 0)])
    with pytest.raises(MetricError, match="span"):
        evk.virtual_hidden(sys_, [evk.EvkNext("Water boils at", "object", 0.1, 0, 0)])


def test_head_logprobs_match_the_model(tiny_gpt2):
    sys_ = ModelSystem(tiny_gpt2)
    prompts = ["The capital of Japan is", "Water"]
    h = evk.virtual_hidden(sys_, [evk.EvkNext(p, "full", 0.0, 0, 0) for p in prompts])
    lp = evk.head_logprobs(evk.lm_head_tensor(tiny_gpt2), h)
    assert torch.allclose(lp, sys_.next_token_logprobs(prompts), atol=1e-5)


# ----------------------------------------------------------------------------------------------- metrics
def test_stability_against_itself_is_perfect(tiny_llama):
    sys_ = ModelSystem(tiny_llama)
    res = evaluate(sys_, _cases(), base=sys_, metrics=["evk"], progress=False, cache=False)
    df = res.to_pandas()
    kl = df[df.metric.str.contains("kl")]
    top = df[df.metric.str.contains("topk")]
    assert len(kl) and len(top)
    assert (kl.value == 0.0).all()
    assert (top.value == 1.0).all()
    names = set(df.metric)
    for span in evk.SPANS:
        assert f"evk_kl@{span}" in names and f"evk_topk@{span}" in names
        assert f"evk_kl@{span}:0.1" in names and f"evk_kl@{span}:0" in names
    assert {"evk_text_kl", "evk_text_topk"} <= names
    # "Water boils at" matches no template: only the full span sees it; subject/relation still have rows
    assert set(df.probe_kind) == {"rewrite", "neighborhood"}


def test_edited_system_drifts_and_matches_a_direct_computation(tiny_llama):
    base = ModelSystem(tiny_llama)
    edited = _noisy_copy(0.2)
    cases = _cases(1)
    m = evk.EvkKL("relation", sigmas=(0.1, 0.4), n_samples=3, seed=7)
    t = evk.EvkTopK("relation", sigmas=(0.1, 0.4), n_samples=3, seed=7, k=5)
    res = evaluate(edited, cases, base=base, metrics=[m, t], progress=False, cache=False)
    # direct: log-probs on the same virtual samples
    prompt = cases[0].rewrite.text
    subj = evk.subject_range(prompt, cases[0].rewrite.prompt, cases[0].rewrite.subject)
    vals = []
    for sigma in (0.1, 0.4):
        b = evk.perturbed_next_token_logprobs(base, [prompt], "relation", sigma, 3, 7, [subj])
        e = evk.perturbed_next_token_logprobs(edited, [prompt], "relation", sigma, 3, 7, [subj])
        vals.append(float(editlens.evaluate.functional.kl_divergence(b, e).mean()))
        got = res.value(f"evk_kl@relation:{sigma:g}", "rewrite")
        assert got == pytest.approx(vals[-1], rel=1e-4, abs=1e-7)
    assert res.value("evk_kl@relation", "rewrite") == pytest.approx(sum(vals) / 2, rel=1e-4)
    assert res.value("evk_kl@relation", "rewrite") > 0
    assert 0 <= res.value("evk_topk@relation", "rewrite") <= 1


def test_base_answers_are_cached(tiny_llama):
    base = ModelSystem(tiny_llama)
    edited = _noisy_copy()
    cache = BaseCache()
    m = [evk.EvkKL("full", sigmas=(0.2,), n_samples=2)]
    r1 = evaluate(edited, _cases(1), base=base, metrics=m, progress=False, cache=cache)
    r2 = evaluate(edited, _cases(1), base=base, metrics=m, progress=False, cache=cache)
    assert r1.meta["base_cache_hit"] is False and r2.meta["base_cache_hit"] is True
    assert [tuple(r) for r in r1.rows] == [tuple(r) for r in r2.rows]


def test_disk_cache_round_trip(tiny_llama, tmp_path):
    base = ModelSystem(tiny_llama)
    m = [evk.EvkKL("subject", sigmas=(0.2,), n_samples=1)]
    r1 = evaluate(base, _cases(1), base=base, metrics=m, progress=False, cache=str(tmp_path))
    r2 = evaluate(_noisy_copy(), _cases(1), base=base, metrics=m, progress=False, cache=BaseCache(tmp_path))
    assert r2.meta["base_cache_hit"] is True
    assert r1.value("evk_kl@subject") == 0.0


def test_metric_names_and_errors():
    names = [m.name for m in resolve_metrics(["evk"])]
    assert "evk_kl@relation" in names and "evk_topk@subject" in names and "evk_text_kl" in names
    assert [m.name for m in resolve_metrics(["evk_kl@full"])] == ["evk_kl@full"]
    with pytest.raises(MetricError, match="span"):
        resolve_metrics(["evk_kl@object"])
    with pytest.raises(MetricError, match="sigmas"):
        evk.EvkKL("full", sigmas=(-1.0,))
    assert all(("kl" in n) or ("topk" in n) for n in names)


def test_not_model_backed_system_is_a_clear_error():
    class Fake:
        fingerprint = "x"
        prompt_format = "raw"
    with pytest.raises(MetricError, match="model"):
        evk.virtual_hidden(Fake(), [evk.EvkNext("a", "full", 0.1, 0, 0)])
