"""Pure metric functions on tensors and strings (no models). Every metric module builds on these.

Distributions are passed as **log-probabilities** over the last axis (``[..., vocab]``), as
:meth:`System.next_token_logprobs` returns them; results keep the leading axes. Divergences are in nats.

* :func:`kl_divergence` — ``KL(p‖q) = Σ_w p(w) (log p(w) − log q(w))`` (terms with ``p(w) = 0`` are 0).
  Edit-locality paper §3.5 Eq. 10 uses ``KL(f_θ(q) ‖ f_θ*(q))``: p = base (pre-edit), q = edited.
* :func:`js_divergence` — ``½ Σ p (log(p+ε) − log(m+ε)) + ½ Σ q (log(q+ε) − log(m+ε))``, ``m = (p+q)/2``,
  ``ε = 1e-10`` added inside the logs as in the edit-locality authors' experiment code
  (``experiments/locality_exp_kl.py`` of jugechengzi/FE). Symmetric; bounded by ``ln 2``.
* :func:`topk_overlap` — ``|TopK(p) ∩ TopK(q)| / k`` (edit-locality paper Eq. 11).
* :func:`nkl_code` — the released CounterFact+ code's ``kl_div(logP_unedited, logP_edited, log_target=True,
  reduction="batchmean")`` on a 1-D vocabulary vector = ``KL(edited‖unedited) / |V|``.
* :func:`sequence_prob` — ``exp(mean token log-prob)``, CounterFact's length-normalised probability.
* :func:`contrastive` — C-acc indicator ``P(target) > P(foil)`` and C-mag ``P(target) − P(foil)``.
* :func:`scores_ok`, :func:`distribution_ok` — whether scores came from finite logits. Argmax- and ranking-based
  results (T-acc, C-acc/C-mag, top-k overlap) are NaN, never 0, on scores of non-finite logits.
* :func:`normalize_answer`, :func:`string_match` — S-acc string matching.
* :func:`word_tokenize`, :func:`ngram_entropy`, :func:`fluency` — ROME's generation entropy.
* :class:`TfIdf`, :func:`tfidf_cosine` — ROME's consistency (reference score), numpy only.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Iterable, Sequence

import numpy as np
import torch

from editlens.errors import EditlensError
from editlens.lm.ops import TeacherForced

JS_EPS = 1e-10


# ================================================================================================ divergences
def _check_pair(logp: torch.Tensor, logq: torch.Tensor) -> None:
    if logp.shape != logq.shape:
        raise EditlensError(f"distributions differ in shape: {tuple(logp.shape)} vs {tuple(logq.shape)}")


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p‖q)`` in nats over the last axis, from log-probabilities (computed in float64).

    Terms where ``p(w) = 0`` contribute 0; a ``q(w) = 0`` where ``p(w) > 0`` gives ``inf``.
    """
    _check_pair(logp, logq)
    lp, lq = logp.double(), logq.double()
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
    return terms.sum(-1)


def js_divergence(logp: torch.Tensor, logq: torch.Tensor, eps: float = JS_EPS) -> torch.Tensor:
    """Jensen–Shannon divergence in nats over the last axis (``eps`` inside the logs; see module docstring)."""
    _check_pair(logp, logq)
    p, q = logp.double().exp(), logq.double().exp()
    m = 0.5 * (p + q)
    log_m = torch.log(m + eps)
    a = (p * (torch.log(p + eps) - log_m)).sum(-1)
    b = (q * (torch.log(q + eps) - log_m)).sum(-1)
    return 0.5 * (a + b)


def topk_overlap(logp: torch.Tensor, logq: torch.Tensor, k: int) -> torch.Tensor:
    """``|TopK(p) ∩ TopK(q)| / k`` over the last axis (ties broken by :func:`torch.topk`).

    NaN where either distribution holds a NaN (non-finite logits: its ranking means nothing)."""
    _check_pair(logp, logq)
    if not 1 <= k <= logp.shape[-1]:
        raise EditlensError(f"k={k} must be between 1 and the vocabulary size {logp.shape[-1]}")
    a = torch.topk(logp, k, dim=-1).indices
    b = torch.topk(logq, k, dim=-1).indices
    hits = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1)
    out = hits.double() / k
    broken = torch.isnan(logp).any(-1) | torch.isnan(logq).any(-1)
    return torch.where(broken, torch.full_like(out, math.nan), out)


def distribution_ok(logp: torch.Tensor) -> bool:
    """Whether a next-token log-distribution came from finite logits (no NaN: a NaN or ``+inf`` logit makes the
    log-softmax NaN; ``-inf`` entries, i.e. masked tokens, are fine)."""
    return not bool(torch.isnan(logp).any())


def scores_ok(*tfs: TeacherForced) -> bool:
    """Whether teacher-forced scores came from finite logits: every target log-prob is finite.

    A NaN or ``+inf`` logit anywhere in a row makes that row's log-softmax NaN or ``-inf``, so argmax-based
    metrics (T-acc, C-acc, argmax agreement) on such scores are undefined: they return NaN, never 0."""
    return all(bool(torch.isfinite(tf.logprobs).all()) for tf in tfs)


def nkl_code(log_unedited: torch.Tensor, log_edited: torch.Tensor) -> torch.Tensor:
    """The CounterFact+ code's NKL: ``KL(edited‖unedited) / |V|`` (see module docstring)."""
    return kl_divergence(log_edited, log_unedited) / log_edited.shape[-1]


# ================================================================================================ teacher forcing
def sequence_prob(tf: TeacherForced) -> float:
    """``exp(mean token log-prob)`` of a teacher-forced target (CounterFact's length-normalised probability)."""
    if tf.logprobs.numel() == 0:
        raise EditlensError("empty target: no token to score")
    return math.exp(float(tf.logprobs.double().mean()))


def token_accuracy(tf: TeacherForced) -> float:
    """T-acc of one target: mean over its tokens of ``argmax == target token``."""
    if tf.target_ids.numel() == 0:
        raise EditlensError("empty target: no token to score")
    if not scores_ok(tf):
        return math.nan  # non-finite logits: the argmax is meaningless (see scores_ok)
    return float((tf.argmax_ids == tf.target_ids).double().mean())


def contrastive(target: TeacherForced, foil: TeacherForced) -> tuple[float, float]:
    """``(C-acc, C-mag)`` = ``(1[P(target) > P(foil)], P(target) − P(foil))`` with P = :func:`sequence_prob`.

    ``P(target) > P(foil)`` is evaluated as ``mean log P(target) > mean log P(foil)`` (the same order, without
    the rounding of ``exp``), i.e. a lower mean token NLL of the target, as in CounterFact. Both are NaN when either
    score came from non-finite logits (:func:`scores_ok`).
    """
    if not scores_ok(target, foil):
        return math.nan, math.nan
    mt = float(target.logprobs.double().mean())
    mf = float(foil.logprobs.double().mean())
    return float(mt > mf), math.exp(mt) - math.exp(mf)


# ================================================================================================ strings
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lowercase, replace punctuation by spaces, drop the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCT_TABLE)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _prefix_at_boundary(text: str, prefix: str) -> bool:
    if not prefix or not text.startswith(prefix):
        return False
    return len(text) == len(prefix) or not (text[len(prefix)].isalnum() and prefix[-1].isalnum())


def string_match(generation: str, answers: Iterable[str], normalize: bool = False) -> bool:
    """S-acc of one generation: does it *start with* one of the answers, at a word boundary?

    Raw (``normalize=False``): leading whitespace of the generation is removed, then the first
    ``len(answer)`` characters must equal the answer exactly (case-sensitive) and the next character, if
    any, must not continue a word (``"Paris"`` matches ``"Paris, France"`` but not ``"Parisian"``).
    Normalised: the same test after :func:`normalize_answer` on both sides.
    """
    gen = normalize_answer(generation) if normalize else generation.lstrip()
    for ans in answers:
        a = normalize_answer(ans) if normalize else ans.strip()
        if a and _prefix_at_boundary(gen, a):
            return True
    return False


# ================================================================================================ fluency
_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    """Words (with inner apostrophes) and single punctuation marks — a dependency-free stand-in for
    ``nltk.word_tokenize`` used by ROME (differences: contractions stay one token)."""
    return _WORD.findall(text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the frequency distribution of the ``n``-grams of ``tokens`` (0 when there are none)."""
    grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    if total == 0:
        return 0.0
    f = np.array(list(grams.values()), dtype=np.float64) / total
    return float(-(f * np.log2(f)).sum())


def text_fluency(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's weighted n-gram entropy of one text: ``mean_n(w_n · H_n)`` = ``(⅔H₂ + ⁴⁄₃H₃) / 2`` by default.

    ``H_n`` is :func:`ngram_entropy` (bits) over :func:`word_tokenize` tokens.
    """
    toks = word_tokenize(text)
    vals = [w * ngram_entropy(toks, n) for n, w in zip(ns, weights)]
    return float(np.mean(vals))


def fluency(texts: Sequence[str]) -> float:
    """Mean :func:`text_fluency` over texts (ROME's ``n_gram_entropy`` with arithmetic mean)."""
    if not texts:
        raise EditlensError("fluency needs at least one text")
    return float(np.mean([text_fluency(t) for t in texts]))


# ================================================================================================ TF-IDF
_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def tfidf_tokenize(text: str) -> list[str]:
    """Lowercased tokens of two or more word characters (the usual TF-IDF token pattern)."""
    return _TFIDF_TOKEN.findall(text.lower())


class TfIdf:
    """A minimal TF-IDF model (numpy): raw term counts × smoothed IDF, L2-normalised rows.

    ``idf(t) = ln((1 + N) / (1 + df(t))) + 1`` over the ``N`` fitted documents; terms never seen in fitting
    are ignored when transforming.
    """

    def __init__(self, documents: Sequence[str]):
        docs = [set(tfidf_tokenize(d)) for d in documents]
        if not docs:
            raise EditlensError("TF-IDF needs at least one document to fit")
        vocab = sorted(set().union(*docs))
        self.vocab = {t: i for i, t in enumerate(vocab)}
        df = np.zeros(len(vocab))
        for d in docs:
            for t in d:
                df[self.vocab[t]] += 1
        self.idf = np.log((1 + len(docs)) / (1 + df)) + 1.0

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(self.vocab)))
        for r, text in enumerate(texts):
            for t, c in Counter(tfidf_tokenize(text)).items():
                j = self.vocab.get(t)
                if j is not None:
                    out[r, j] = c
        out *= self.idf
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)

    def cosine(self, a: str, b: str) -> float:
        """Cosine similarity of the TF-IDF vectors of two texts (0 when either has no known term)."""
        va, vb = self.transform([a, b])
        return float(va @ vb)


def tfidf_cosine(a: str, b: str, corpus: Sequence[str] | None = None) -> float:
    """Cosine similarity of ``a`` and ``b`` under a TF-IDF fitted on ``corpus`` (default ``[a, b]``)."""
    return TfIdf(list(corpus) if corpus is not None else [a, b]).cosine(a, b)
