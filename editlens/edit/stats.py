"""Second-moment statistics ``C = E[k kᵀ]`` of the keys of MLP output projections, cached on disk.

ROME (Meng et al., 2022, eq. 2) and MEMIT (Meng et al., 2023, eq. 14) regularise an edit with the uncentred
covariance of the keys ``k`` — the inputs of the MLP output projection ``arch.mlp_out_at(layer)`` — over a text
corpus: ``C = E[k kᵀ]`` (MEMIT's ``K₀K₀ᵀ`` up to the sample count; its λ is ``mom2_update_weight``). AlphaEdit
projects updates on the null space of the same matrix; EMMET uses it as its preservation metric.

:func:`second_moment` computes ``C`` for several layers in **one forward pass per batch** (the inputs of every
requested module are recorded with :func:`editlens.lm.hooks.record_io`), ignores padding (attention mask),
accumulates ``Σ k kᵀ`` in float64 on the model's device (keys are never kept beyond one batch) and caches each
layer's mean under ``<cache>/stats/`` keyed by (``lm.fingerprint``, layer, corpus hash, sample count,
document length, model dtype). The cache directory is ``cache_dir`` if given, else ``$EDITLENS_STATS_DIR``,
else ``editlens.lm.cache_dir()/"stats"``.

Corpus: a list of strings, a ``.txt`` file (one document per blank-line-separated paragraph), a ``.jsonl`` file
(one object with a ``"text"`` field per line) or, by default (``None``), text sampled from the model itself:
``n_samples`` documents of ``max_length`` tokens sampled at temperature 1 (top-k 50) after short seed prompts,
seeded, deterministic on CPU (cached beside the statistics). The papers use Wikipedia (MEMIT: 100,000 samples);
model-sampled text keeps editlens offline and is a documented deviation — pass a corpus file to follow them.

Default size (issue 19): ``DEFAULT_N_SAMPLES × DEFAULT_MAX_LENGTH`` = 128 × 128 tokens, half the previous 256 × 128
(``PREVIOUS_*``, still reachable: ``stats_n_samples=256``). Where the time goes (SmolLM2-135M, CPU, process CPU
time on one thread): sampling ≈ 9–15 ms per generated token (``model.generate`` with its KV cache, batches of up
to ``SAMPLING_BATCH`` documents; larger batches are cheaper per token), accumulation ≈ 4 ms per token — sampling
is about 70% of the cost. With two threads on a busy machine the sampling steps (small matrices, many kernel
launches) spend most of their time waiting on each other: 2,048 tokens cost 228 s of CPU time, 15 times the
one-thread cost — how the old default could take over 35 minutes (issue 19). How C converges (``scripts/stats_convergence.py``,
``results/stats_convergence/``): the error of the estimate falls like ``tokens^-0.5`` (≈ √(d/tokens), d the key
width) and is still about 23% at the old default's 32,768 tokens, so no practical token count is *converged*;
halving the tokens raises it by √2 (to 32%), and ROME's update with the new default differs from the old
default's by 35% on average (cosine ≥ 0.94), less than two disjoint corpora of the new size differ from each
other (61%) — the old default was no reference either. For edits that must follow the papers closely, pass a large
corpus (``stats_corpus``) or more samples.

``||Δk||`` diagnostic: with ``C`` in hand, the expected squared change of the output on a preserved key is
``E||ΔW k||² = tr(ΔW C ΔWᵀ)``; :func:`dk_norm` returns its square root (the RMS of ``||ΔW k_j||`` over the
corpus keys), the quantity MEMIT's λ-term penalises (``λ Σ_j ||ΔW k_j||²``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from editlens.errors import DataFormatError, EditlensError
from editlens.lm import ops
from editlens.lm.hooks import record_io

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    from editlens.lm.load import LM

#: seed prompts of the model-sampled default corpus
CORPUS_SEEDS = ("The", "In", "A", "It", "This", "He", "She", "We", "There", "When", "According to", "On",
                "After", "His", "Her", "One of the")
#: the default sampled corpus: 128 documents x 128 tokens (16,384 tokens; half the previous default, see the
#: module docstring and results/stats_convergence/)
DEFAULT_N_SAMPLES = 128
DEFAULT_MAX_LENGTH = 128
#: editlens's defaults before issue 19 (``stats_n_samples=256, stats_max_length=128``: 32,768 tokens), still
#: reachable through the hyperparameters; ``benchmarks/bench_stats.py`` times them against the default
PREVIOUS_N_SAMPLES = 256
PREVIOUS_MAX_LENGTH = 128
#: documents generated together by one ``model.generate`` call of the sampled corpus
SAMPLING_BATCH = 128
STATS_VERSION = 1


class StatsError(EditlensError):
    """Statistics could not be computed (bad corpus, layer, ...)."""


def stats_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where statistics are cached: ``cache_dir``, ``$EDITLENS_STATS_DIR`` or ``editlens.lm.cache_dir()/"stats"``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("EDITLENS_STATS_DIR")
    if env:
        return Path(env).expanduser()
    from editlens.lm.load import cache_dir as _cd

    return _cd() / "stats"


# --------------------------------------------------------------------------------------------- corpus
def read_corpus(path: str | os.PathLike) -> list[str]:
    """Documents of a ``.txt`` (blank-line-separated paragraphs) or ``.jsonl`` (``"text"`` field) file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataFormatError("corpus file not found", path=p)
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"not UTF-8 text: {e}", path=p) from None
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines()):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"invalid JSON: {e.msg}", path=p, record=i) from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataFormatError("expected an object with a string field", path=p, record=i, field="text")
            if obj["text"].strip():
                docs.append(obj["text"])
    else:
        docs = [" ".join(par.split()) for par in raw.replace("\r\n", "\n").split("\n\n") if par.strip()]
    if not docs:
        raise DataFormatError("corpus holds no document", path=p)
    return docs


def sampled_corpus(lm: "LM", n_samples: int, max_length: int, *, seed: int = 0, cache: Path | None = None,
                   progress: bool = False, batch_size: int = SAMPLING_BATCH) -> list[str]:
    """``n_samples`` texts of ``max_length`` tokens sampled from the model (seeded), cached as JSONL in ``cache``.

    Documents are generated ``batch_size`` at a time with ``model.generate`` (which keeps a KV cache: each new
    token costs one single-position forward step), exactly as :func:`editlens.edit.locate.sample_texts` samples
    them (same seeds, same calls: a corpus cached before this function reported progress is still valid); the
    progress bar counts generated tokens, so that even a single batch shows its progress.
    """
    key = hashlib.sha256(f"sampled|{lm.fingerprint}|{n_samples}|{max_length}|{seed}|v1".encode()).hexdigest()[:16]
    path = cache / f"corpus-{key}.jsonl" if cache is not None else None
    if path is not None and path.is_file():
        try:
            docs = [json.loads(l)["text"] for l in path.read_text().splitlines() if l.strip()]
            if len(docs) == n_samples:
                return docs
        except (json.JSONDecodeError, KeyError):
            pass
    seeds = [CORPUS_SEEDS[i % len(CORPUS_SEEDS)] for i in range(n_samples)]
    docs: list[str] = []
    bs = int(batch_size)
    # editlens.progress: a tqdm bar on a terminal, plain periodic lines in logs, nothing with --quiet
    from editlens.progress import bar as _bar

    bar = _bar(total=n_samples * max_length, desc="sampling statistics corpus", unit="tok", disable=not progress)
    try:
        for start in range(0, n_samples, bs):
            docs += _sample_batch(lm, seeds[start:start + bs], max_length, seed + start, bar)
    finally:
        bar.close()
    if path is not None:
        _atomic_write_text(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


class _StepCounter:
    """A logits processor that changes nothing and advances a progress bar by the batch size at every generation
    step (``model.generate`` calls it once per new token)."""

    def __init__(self, bar, rows: int):
        self.bar, self.rows = bar, rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.bar.update(self.rows)
        return scores


@torch.no_grad()
def _sample_batch(lm: "LM", seeds: Sequence[str], max_length: int, seed: int, bar) -> list[str]:
    """One batch of :func:`sampled_corpus`: the calls of :func:`editlens.edit.locate.sample_texts` (temperature 1,
    top-k 50, ``max_length`` new tokens, forked RNG seeded with ``seed``), plus the progress counter."""
    from transformers import LogitsProcessorList

    devices = [lm.device] if lm.device.type == "cuda" else []
    ids = [ops.encode(lm.tokenizer, s) for s in seeds]
    batch = ops.pad_left(ids, ops._pad_id(lm), lm.device)
    batch.pop("position_ids")
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        gen = lm.model.generate(**batch, max_new_tokens=max_length, min_new_tokens=max_length,
                                pad_token_id=ops._pad_id(lm), eos_token_id=lm.tokenizer.eos_token_id, num_beams=1,
                                do_sample=True, temperature=1.0, top_p=None, top_k=50,
                                logits_processor=LogitsProcessorList([_StepCounter(bar, len(seeds))]))
    new = gen[:, batch["input_ids"].shape[1]:].cpu()
    return [s + lm.tokenizer.decode(new[r].tolist(), skip_special_tokens=True) for r, s in enumerate(seeds)]


def corpus_hash(docs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=str(path.parent))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- statistics
def _docs_and_key(lm: "LM", corpus, n_samples: int, max_length: int, cache: Path, seed: int,
                  progress: bool) -> tuple[list[str], str]:
    if corpus is None:
        docs = sampled_corpus(lm, n_samples, max_length, seed=seed, cache=cache, progress=progress)
        return docs, f"sampled{seed}"
    if isinstance(corpus, (str, os.PathLike)):
        docs = read_corpus(corpus)
    else:
        docs = [str(d) for d in corpus]
        if not docs:
            raise StatsError("empty corpus")
    docs = docs[:n_samples]
    return docs, corpus_hash(docs)


def _cache_path(cache: Path, lm: "LM", layer: int, ckey: str, n: int, max_length: int) -> Path:
    dt = str(lm.dtype).replace("torch.", "")
    return cache / f"mom2-{lm.fingerprint}-L{layer}-{ckey}-n{n}-t{max_length}-{dt}-v{STATS_VERSION}.pt"


def _accumulate(lm: "LM", docs: Sequence[str], layer_groups: Iterable[Sequence[int]], max_length: int,
                max_tokens: int | None, batch_tokens: int, progress: bool) -> tuple[dict[int, torch.Tensor], int]:
    """Sum of k kᵀ (float64, device) per layer, recording each group of layers in one forward pass per batch."""
    tok = lm.tokenizer
    ids = [ops.encode(tok, d)[:max_length] for d in docs]
    ids = [s for s in ids if len(s) > 0]
    if max_tokens is not None:
        kept, total = [], 0
        for s in ids:
            if total >= max_tokens:
                break
            s = s[: max(1, max_tokens - total)]
            kept.append(s)
            total += len(s)
        ids = kept
    groups = ops.plan_batches([len(s) for s in ids], batch_tokens)
    sums: dict[int, torch.Tensor] = {}
    count = 0
    layer_groups = [list(g) for g in layer_groups]
    bar = None
    if progress:
        from editlens.progress import bar as _bar

        bar = _bar(total=len(groups) * len(layer_groups), desc="second moments", unit="batch")
    for layers in layer_groups:
        modules = {lm.arch.mlp_out_at(l): l for l in layers}
        count = 0
        for g in groups:
            batch = ops.pad_left([ids[i] for i in g], ops._pad_id(lm), lm.device)
            mask = batch["attention_mask"].bool()
            with torch.no_grad(), record_io(lm.model, list(modules), kind="input") as rec:
                lm.model(**batch, logits_to_keep=1, use_cache=False)
                for name, l in modules.items():
                    k = rec.pop(name)
                    k = k[mask.to(k.device)]  # [tokens, d_in], padding removed; on the layer's own device
                    # per-batch product: float64 on accelerators; float32 on CPU (float64 matmul is ~3x slower
                    # there), the running sum is always float64
                    k = k.double() if k.device.type != "cpu" else k.float()
                    s = (k.T @ k).double()
                    if l in sums:
                        sums[l] += s
                    else:
                        sums[l] = s
                    del k, s
            count += int(mask.sum())
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return sums, count


def second_moment(lm: "LM", layers: Sequence[int], corpus: "str | os.PathLike | Sequence[str] | None" = None,
                  n_samples: int = DEFAULT_N_SAMPLES, max_length: int = DEFAULT_MAX_LENGTH,
                  max_tokens: int | None = None, cache_dir: str | os.PathLike | None = None, progress: bool = True,
                  *, one_pass: bool = True, seed: int = 0, batch_tokens: int = 2048, use_cache: bool = True,
                  out_dtype: torch.dtype = torch.float32, info: dict | None = None) -> dict[int, torch.Tensor]:
    """``C_l = E[k kᵀ]`` of the inputs of ``arch.mlp_out_at(l)`` for each requested layer (see module doc).

    Args:
        layers: layer indices.
        corpus: ``None`` (text sampled from the model), a ``.txt``/``.jsonl`` path, or a list of documents.
        n_samples: number of documents (the first ``n_samples`` of a file / sampled documents).
        max_length: tokens kept per document (and length of sampled documents).
        max_tokens: optional total token budget over all documents.
        cache_dir: statistics cache (default ``$EDITLENS_STATS_DIR`` or ``editlens.lm.cache_dir()/"stats"``).
        progress: progress of both phases (sampling the corpus, in generated tokens; accumulation, in batches)
            through :mod:`editlens.progress` — a tqdm bar on a terminal, a plain line every 30 s in logs, nothing
            in mode ``off`` — and a line saying what is computed before it starts. Whatever ``progress`` is, a
            computation (not a cache hit) is logged at INFO level on the ``editlens.edit.stats`` logger when it
            starts and when it ends, with its figures.
        one_pass: record all missing layers in one forward pass per batch (``False``: one pass per layer, for
            benchmarking).
        seed: seed of the sampled corpus.
        use_cache: read/write the disk cache.
        out_dtype: dtype of the returned matrices (accumulation is always float64).
        info: a dict filled with what was done: ``computed`` / ``cached`` (layers), ``documents``, ``tokens``
            (counted in the accumulation; 0 when every layer came from the cache), ``sampling_s`` (wall time
            spent sampling the corpus; 0 when it came from the cache or a file), ``accumulation_s``, ``total_s``.

    Returns:
        ``{layer: C [d_in, d_in]}`` on CPU.

    Thread safety: holds the model's lock (:attr:`editlens.lm.LM.lock`) for the whole computation, like an edit.

    Raises:
        StatsError: a layer outside the model or an empty corpus; DataFormatError: an unreadable corpus file.
    """
    from editlens.edit.base import _model_lock

    layers = sorted({int(l) for l in layers})
    for l in layers:
        if not 0 <= l < lm.n_layers:
            raise StatsError(f"layer {l} is outside the model ({lm.n_layers} layers, 0..{lm.n_layers - 1})")
    if n_samples < 1 or max_length < 1:
        raise StatsError(f"n_samples and max_length must be >= 1 (got {n_samples}, {max_length})")
    # The model's lock is held throughout (re-entrant: an edit that asks for statistics already holds it), so
    # another thread cannot edit or undo between reading the weights' fingerprint (the cache key) and the last
    # forward pass: the statistics stored under a fingerprint are those of the weights it names.
    with _model_lock(lm):
        return _second_moment(lm, layers, corpus, n_samples, max_length, max_tokens, cache_dir, progress,
                              one_pass, seed, batch_tokens, use_cache, out_dtype, info)


def _second_moment(lm: "LM", layers: list[int], corpus, n_samples: int, max_length: int, max_tokens: int | None,
                   cache_dir, progress: bool, one_pass: bool, seed: int, batch_tokens: int, use_cache: bool,
                   out_dtype: torch.dtype, info: dict | None) -> dict[int, torch.Tensor]:
    """:func:`second_moment` after its checks, with the model's lock held."""
    cache = stats_dir(cache_dir)
    docs: list[str] | None = None
    if corpus is None:  # the key of the sampled corpus is known without sampling it
        ckey = f"sampled{seed}"
    else:
        docs, ckey = _docs_and_key(lm, corpus, n_samples, max_length, None, seed, progress)
    if max_tokens is not None:
        ckey = f"{ckey}-m{int(max_tokens)}"
    out: dict[int, torch.Tensor] = {}
    missing = []
    for l in layers:
        path = _cache_path(cache, lm, l, ckey, n_samples, max_length)
        if use_cache and path.is_file():
            mom2 = _read_cached(path, lm, l)
            if mom2 is not None:
                out[l] = mom2.to(out_dtype)
                continue
        missing.append(l)
    t_start = time.perf_counter()
    sampling_s = accumulation_s = 0.0
    count = 0
    if missing:
        what = (f"{n_samples} documents x {max_length} tokens sampled from the model" if corpus is None
                else f"{len(docs or [])} documents of {corpus if isinstance(corpus, (str, os.PathLike)) else 'a list'}"
                     f" (at most {max_length} tokens each)")
        where = str(cache) if use_cache else "not cached"
        log.info("second-moment statistics of %s, layers %s: computing over %s (%s)", lm.name, missing, what, where)
        if progress:
            from editlens.progress import echo

            echo(f"editlens: second-moment statistics of layers {', '.join(map(str, missing))} over {what} "
                 f"(first use; cached in {where})" if use_cache else
                 f"editlens: second-moment statistics of layers {', '.join(map(str, missing))} over {what}")
        if docs is None:
            t0 = time.perf_counter()
            docs, _ = _docs_and_key(lm, None, n_samples, max_length, cache if use_cache else None, seed, progress)
            sampling_s = time.perf_counter() - t0
        groups = [missing] if one_pass else [[l] for l in missing]
        t0 = time.perf_counter()
        sums, count = _accumulate(lm, docs, groups, max_length, max_tokens, batch_tokens, progress)
        accumulation_s = time.perf_counter() - t0
        if count == 0:
            raise StatsError("the corpus produced no tokens")
        log.info("second-moment statistics of %s, layers %s: %d tokens of %d documents in %.1f s (sampling %.1f s, "
                 "accumulation %.1f s)", lm.name, missing, count, len(docs), time.perf_counter() - t_start,
                 sampling_s, accumulation_s)
        for l in missing:
            mom2 = (sums[l] / count).cpu()
            if use_cache:
                path = _cache_path(cache, lm, l, ckey, n_samples, max_length)
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix="tmp-", suffix=".pt", dir=str(path.parent))
                os.close(fd)
                torch.save({"mom2": mom2, "count": count, "layer": l, "model": lm.name,
                            "fingerprint": lm.fingerprint}, tmp)
                os.replace(tmp, path)
            out[l] = mom2.to(out_dtype)
    if info is not None:
        info.update(computed=list(missing), cached=[l for l in layers if l not in missing],
                    documents=len(docs) if (missing and docs is not None) else 0, tokens=count,
                    sampling_s=sampling_s, accumulation_s=accumulation_s, total_s=time.perf_counter() - t_start)
    return {l: out[l] for l in layers}


def _read_cached(path: Path, lm: "LM", layer: int) -> torch.Tensor | None:
    """The cached ``C`` of ``layer`` in ``path``, or None (with a warning naming the file) when it is damaged.

    The file is read with ``weights_only=True`` (no object of the file is constructed beyond tensors and plain
    containers, nothing is imported or called) and its content is checked before use: a dict whose ``mom2`` is a
    finite, square floating-point matrix of the layer's key width and whose ``layer`` is this layer. Anything
    else (an unreadable file, a pickle naming code, a wrong shape, NaN/inf) is recomputed and the entry replaced.
    """
    import warnings

    from editlens.lm.arch import in_out_features

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable entry is recomputed
        why = f"unreadable ({type(e).__name__})"
    else:
        d_in = in_out_features(lm.module(lm.arch.mlp_out_at(layer)))[0]
        mom2 = obj.get("mom2") if isinstance(obj, dict) else None
        if not isinstance(mom2, torch.Tensor) or not mom2.is_floating_point():
            why = "no floating-point 'mom2' matrix"
        elif tuple(mom2.shape) != (d_in, d_in):
            why = f"'mom2' has shape {tuple(mom2.shape)}, expected {(d_in, d_in)}"
        elif obj.get("layer") != layer:
            why = f"it is for layer {obj.get('layer')!r}, not {layer}"
        elif not bool(torch.isfinite(mom2).all()):
            why = "'mom2' holds NaN or inf"
        else:
            return mom2
    warnings.warn(f"statistics cache file {path} is damaged ({why}); recomputing it", stacklevel=3)
    return None


def dk_norm(delta: torch.Tensor, C: torch.Tensor) -> float:
    """``sqrt(tr(ΔW C ΔWᵀ))`` = RMS over the corpus keys of ``||ΔW k||`` (``delta`` is ``[out, in]``)."""
    d = delta.double()
    c = C.to(device=d.device, dtype=torch.float64)
    val = ((d @ c) * d).sum()
    return float(val.clamp(min=0).sqrt())
