"""Hand-computed checks of the pure metric functions in editlens.evaluate.functional."""
from __future__ import annotations

import math

import pytest
import torch

from editlens.errors import EditlensError
from editlens.evaluate import functional as F
from editlens.lm.ops import TeacherForced


def lp(*probs: float) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def tf(target, argmax, probs) -> TeacherForced:
    return TeacherForced(torch.tensor(target), torch.tensor(probs, dtype=torch.float32).log(), torch.tensor(argmax))


def test_kl_known_distributions():
    # KL([.5,.5] || [.25,.75]) = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3)
    assert float(F.kl_divergence(lp(0.5, 0.5), lp(0.25, 0.75))) == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)
    # asymmetric
    assert float(F.kl_divergence(lp(0.25, 0.75), lp(0.5, 0.5))) == pytest.approx(
        0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-12)


def test_kl_zero_mass_terms_and_batch():
    p = torch.tensor([[0.0, 1.0], [0.5, 0.5]]).log()
    q = torch.tensor([[0.5, 0.5], [0.5, 0.5]]).log()
    out = F.kl_divergence(p, q)
    assert out.shape == (2,)
    assert float(out[0]) == pytest.approx(math.log(2), abs=1e-7)  # 0·log 0 counts as 0
    assert float(out[1]) == 0.0
    assert float(F.kl_divergence(q[0], p[0])) == math.inf


def test_kl_shape_mismatch_is_an_error():
    with pytest.raises(EditlensError, match="shape"):
        F.kl_divergence(lp(0.5, 0.5), lp(0.2, 0.3, 0.5))


def test_topk_overlap_three_of_five():
    a = torch.tensor([9.0, 8, 7, 6, 5, 0, 0, 0, 0, 0])  # top5 = {0,1,2,3,4}
    b = torch.tensor([9.0, 8, 7, 0, 0, 0, 0, 6, 5, 0])  # top5 = {0,1,2,7,8}
    assert float(F.topk_overlap(a, b, 5)) == pytest.approx(3 / 5)
    assert float(F.topk_overlap(a, b, 3)) == 1.0
    assert float(F.topk_overlap(a, a, 5)) == 1.0
    with pytest.raises(EditlensError):
        F.topk_overlap(a, b, 11)


def test_js_symmetric_and_bounded():
    g = torch.Generator().manual_seed(0)
    x = torch.log_softmax(torch.randn(20, 50, generator=g), -1)
    y = torch.log_softmax(3 * torch.randn(20, 50, generator=g), -1)
    j1, j2 = F.js_divergence(x, y), F.js_divergence(y, x)
    assert torch.equal(j1, j2)
    assert bool((j1 >= 0).all()) and bool((j1 <= math.log(2)).all())
    # disjoint supports reach ln 2 (up to eps)
    d = float(F.js_divergence(torch.tensor([1.0, 0.0]).log(), torch.tensor([0.0, 1.0]).log()))
    assert d == pytest.approx(math.log(2), abs=1e-8) and d <= math.log(2) + 1e-12
    assert float(F.js_divergence(x[0], x[0])) == 0.0


def test_js_known_value():
    p, q = lp(0.5, 0.5), lp(1.0, 1e-300)
    # m = [.75, .25]: JS = .5[.5 ln(.5/.75) + .5 ln(.5/.25)] + .5[1 ln(1/.75)]
    expected = 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2)) + 0.5 * math.log(1 / 0.75)
    assert float(F.js_divergence(p, q)) == pytest.approx(expected, abs=1e-9)


def test_nkl_code_is_reverse_kl_over_vocab():
    p, q = lp(0.5, 0.3, 0.2), lp(0.2, 0.2, 0.6)
    assert float(F.nkl_code(p, q)) == pytest.approx(float(F.kl_divergence(q, p)) / 3, abs=1e-12)


def test_token_accuracy_and_contrastive_hand_made():
    t = tf([3, 4], [3, 5], [0.5, 0.5])
    assert F.token_accuracy(t) == 0.5
    foil = tf([7], [7], [0.25])
    acc, mag = F.contrastive(t, foil)
    assert acc == 1.0 and mag == pytest.approx(0.25, abs=1e-7)
    assert F.sequence_prob(t) == pytest.approx(0.5, abs=1e-7)


def test_contrastive_is_length_normalised():
    # total P(target) = .4 * .4 = .16 < .3 = P(foil), but per-token geometric mean .4 > .3 -> C-acc = 1
    target, foil = tf([1, 2], [0, 0], [0.4, 0.4]), tf([3], [0], [0.3])
    acc, mag = F.contrastive(target, foil)
    assert acc == 1.0 and mag == pytest.approx(0.1, abs=1e-6)
    acc2, mag2 = F.contrastive(foil, target)
    assert acc2 == 0.0 and mag2 == pytest.approx(-0.1, abs=1e-6)


def test_string_match_raw_and_normalised():
    assert F.string_match(" Paris, France", ["Paris"])
    assert not F.string_match("Parisian food", ["Paris"])
    assert not F.string_match("paris", ["Paris"])
    assert F.string_match("paris", ["Paris"], normalize=True)
    assert F.string_match("The Beatles were", ["Beatles"], normalize=True)
    assert not F.string_match("The Beatles were", ["Beatles"])
    assert F.string_match("I think Tokyo", ["Kyoto", "I think"])  # aliases
    assert F.normalize_answer("  The U.S.A.!  ") == "u s"


def test_fluency_entropy_tiny_token_list():
    # tokens a b a b: bigrams (a,b)x2,(b,a)x1 -> H2 = H(2/3,1/3); trigrams (a,b,a),(b,a,b) -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert F.ngram_entropy(["a", "b", "a", "b"], 2) == pytest.approx(h2)
    assert F.ngram_entropy(["a", "b", "a", "b"], 3) == pytest.approx(1.0)
    assert F.text_fluency("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert F.fluency(["a b a b", "x"]) == pytest.approx((2 / 3 * h2 + 4 / 3) / 4)  # "x" has no n-grams: 0
    assert F.word_tokenize("Hi, it's me.") == ["Hi", ",", "it's", "me", "."]


def test_tfidf_cosine_two_tiny_docs():
    # idf(apple) = ln(3/3)+1 = 1; idf(banana) = idf(cherry) = ln(3/2)+1
    w = math.log(1.5) + 1
    expected = 1 / (1 + w * w)
    assert F.tfidf_cosine("apple banana", "apple cherry") == pytest.approx(expected)
    assert F.tfidf_cosine("apple banana", "Banana APPLE") == pytest.approx(1.0)
    model = F.TfIdf(["apple banana", "apple cherry"])
    assert model.cosine("durian", "apple") == 0.0  # unknown terms are ignored
