"""Audit any edited model against its base: checkpoints, pair checks, weight differences, drift, full tables.

editlens can judge edits made elsewhere (other toolkits, fine-tuning scripts): everything here takes two loaded
models (:class:`~editlens.lm.LM`) or two names/paths, never an :class:`~editlens.edit.Edit`.

* :func:`save_checkpoint` (from :mod:`editlens.lm.checkpoint`, re-exported) writes a (possibly edited) model as a
  standard Hugging Face checkpoint directory (``model.safetensors`` or shards, ``config.json``,
  ``generation_config.json``, tokenizer files) plus ``editlens.json`` (what editlens knows about it: base model,
  base fingerprint, applied edits, method, hyperparameters, case ids). :meth:`editlens.edit.Edit.save_pretrained`
  calls it for weight edits. The files are read back tensor by tensor and compared bit for bit before the
  directory is put in place.
* :func:`load_pair` loads a base and an edited model and checks them with :func:`check_pair`: tokenizers that
  differ are refused (:class:`TokenizerMismatchError` naming the difference: vocabulary size, first differing
  token id and strings, special tokens, how a sample text is tokenised), different architectures are warned
  about (:class:`ArchitectureMismatchWarning`).
* :func:`evaluate_pair` evaluates the edited model against the base with any metrics (GT-free ones compare the
  base model's answers with the edited model's) through the ordinary evaluator.
* :func:`weight_diff` lists which parameter tensors changed and by how much, streaming one tensor at a time.
* :func:`drift` is the ground-truth-free drift audit on prompts no edit should touch.
* :func:`audit` puts them together into an :class:`AuditReport` (Markdown / JSON); ``editlens audit`` is its
  command line.

Numerical rank of ΔW (stated tolerance)
---------------------------------------
``ΔW = W_edited − W_base`` is formed in float64 (exact for float32/bfloat16/float16 inputs) and its singular
values σ₁ ≥ σ₂ ≥ ... are computed with ``torch.linalg.svdvals``. Its numerical rank is ``#{σᵢ > tol}`` with

    tol = max(σ₁ · max(m, n) · ε₆₄,  u · ‖W_edited‖_F),   u = ε(dtype) / 2 (unit roundoff of the stored dtype).

The first term is the usual LAPACK/NumPy tolerance of the float64 SVD. The second is the rounding floor of the
storage: an edit ``W + Δ`` stored in ``dtype`` is ``W_edited = fl(W + Δ)`` with ``|E_ij| ≤ u·|W_edited,ij|``
per element, so the observed ``ΔW = Δ + E`` has ``‖E‖₂ ≤ ‖E‖_F ≤ u·‖W_edited‖_F`` and, by Weyl's inequality,
every singular value beyond the rank of Δ is at most that. The reported rank therefore never counts rounding
noise (it is a lower bound of rank Δ, equal to it when Δ's singular values exceed twice the tolerance).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch

from editlens.errors import EditlensError, ModelLoadError
from editlens.lm.checkpoint import METADATA_FILE, _plain, check_save_target, read_metadata, save_checkpoint

__all__ = ["ArchitectureMismatchWarning", "AuditReport", "TensorDiff", "TokenizerMismatchError", "audit",
           "check_pair", "check_save_target", "compare_architectures", "compare_tokenizers", "drift",
           "evaluate_pair", "factual_qa_prompts", "load_pair", "neutral_prompts", "rank_tolerance",
           "read_metadata", "save_checkpoint", "tensor_diff", "unit_roundoff", "weight_diff"]

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from editlens.data.schema import EditCase
    from editlens.evaluate.core import Results
    from editlens.system import ModelSystem
    from editlens.lm.load import LM

#: the sample text whose tokenisation :func:`compare_tokenizers` compares
TOKENIZER_SAMPLE = ("The Eiffel Tower is located in Paris, France. In 1889, 42 engineers asked: \"Why?\"\n"
                    "  def f(x): return x**2  # naïve café, São Paulo, Zürich, 東京, emoji 🙂")
#: config fields compared by :func:`compare_architectures`
_ARCH_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_theta",
                "tie_word_embeddings", "n_layer", "n_embd", "n_head", "n_positions", "rotary_dim")
#: prompt sets of the drift audit (shipped)
NEUTRAL_PROMPTS = "neutral_prompts.jsonl"


class TokenizerMismatchError(ModelLoadError):
    """The base and the edited model do not share a tokenizer (their distributions cannot be compared)."""


class ArchitectureMismatchWarning(UserWarning):
    """The base and the edited model have different architectures (class, layers, widths)."""


# ============================================================================================== pair checks
def _show(tok: Any) -> str:
    return repr(tok)


def compare_tokenizers(a: Any, b: Any, *, chat: bool = False, names: tuple[str, str] = ("base", "edited")
                       ) -> list[str]:
    """Differences between two tokenizers, each a sentence naming it (empty list: interchangeable).

    Compared: the vocabulary size (``len``), the id → token map (the first differing id and both tokens), the
    special tokens (bos/eos/unk/pad/... and the additional ones), the ids a sample text (:data:`TOKENIZER_SAMPLE`,
    first differing position) is encoded to, and with ``chat`` the chat templates.
    """
    na, nb = names
    out: list[str] = []
    la, lb = len(a), len(b)
    if la != lb:
        out.append(f"vocabulary size: {na} has {la} tokens, {nb} has {lb}")
    va = {i: t for t, i in a.get_vocab().items()}
    vb = {i: t for t, i in b.get_vocab().items()}
    for i in sorted(set(va) | set(vb)):
        ta, tb = va.get(i), vb.get(i)
        if ta != tb:
            out.append(f"token id {i}: {na} has {_show(ta) if ta is not None else 'no token'}, "
                       f"{nb} has {_show(tb) if tb is not None else 'no token'}")
            break
    sa = {k: str(v) for k, v in (getattr(a, "special_tokens_map", {}) or {}).items()}
    sb = {k: str(v) for k, v in (getattr(b, "special_tokens_map", {}) or {}).items()}
    for key in sorted(set(sa) | set(sb)):
        if sa.get(key) != sb.get(key):
            out.append(f"special token {key}: {na} has {sa.get(key, 'none')}, {nb} has {sb.get(key, 'none')}")
    ea = a(TOKENIZER_SAMPLE, add_special_tokens=True)["input_ids"]
    eb = b(TOKENIZER_SAMPLE, add_special_tokens=True)["input_ids"]
    if ea != eb:
        pos = next((k for k, (x, y) in enumerate(zip(ea, eb)) if x != y), min(len(ea), len(eb)))
        xa = ea[pos] if pos < len(ea) else None
        xb = eb[pos] if pos < len(eb) else None
        out.append(f"tokenisation of the sample text {TOKENIZER_SAMPLE[:30]!r}...: first difference at position "
                   f"{pos}: {na} id {xa} ({_show(va.get(xa)) if xa is not None else 'end'}), {nb} id {xb} "
                   f"({_show(vb.get(xb)) if xb is not None else 'end'}) ({len(ea)} vs {len(eb)} tokens)")
    if chat and getattr(a, "chat_template", None) != getattr(b, "chat_template", None):
        out.append("chat template: the two tokenizers carry different chat templates (prompt format 'chat')")
    return out


def compare_architectures(base: "LM", edited: "LM") -> list[str]:
    """Differences between the two models' architectures: model class, structural config fields
    (:data:`_ARCH_FIELDS`), and parameter names/shapes (empty list: the same architecture)."""
    out: list[str] = []
    ca, cb = type(base.model).__name__, type(edited.model).__name__
    if ca != cb:
        out.append(f"model class: base is {ca}, edited is {cb}")
    fa, fb = base.model.config.to_dict(), edited.model.config.to_dict()
    for key in _ARCH_FIELDS:
        if fa.get(key) != fb.get(key):
            out.append(f"config {key}: base {fa.get(key)!r}, edited {fb.get(key)!r}")
    sa = {n: tuple(p.shape) for n, p in base.model.named_parameters()}
    sb = {n: tuple(p.shape) for n, p in edited.model.named_parameters()}
    only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
    if only_a:
        out.append(f"{len(only_a)} parameter(s) only in base (e.g. {only_a[0]})")
    if only_b:
        out.append(f"{len(only_b)} parameter(s) only in edited (e.g. {only_b[0]})")
    shape = [n for n in sorted(set(sa) & set(sb)) if sa[n] != sb[n]]
    if shape:
        out.append(f"{len(shape)} parameter(s) with different shapes (e.g. {shape[0]}: {sa[shape[0]]} vs "
                   f"{sb[shape[0]]})")
    return out


def check_pair(base: "LM", edited: "LM", *, prompt_format: str = "raw") -> list[str]:
    """Check that ``edited`` can be evaluated against ``base``.

    Raises :class:`TokenizerMismatchError` (naming every difference found, see :func:`compare_tokenizers`) when
    the tokenizers differ or the output vocabularies (embedding rows) have different sizes; warns with
    :class:`ArchitectureMismatchWarning` when the architectures differ and returns those differences."""
    from editlens.lm.prompting import resolve_prompt_format

    chat = resolve_prompt_format(prompt_format, base.tokenizer) == "chat"  # 'auto' as everywhere: chat iff a template
    diffs = compare_tokenizers(base.tokenizer, edited.tokenizer, chat=chat)
    if base.vocab_size != edited.vocab_size:
        diffs.append(f"embedding rows (output vocabulary): base {base.vocab_size}, edited {edited.vocab_size}")
    if diffs:
        raise TokenizerMismatchError(
            f"cannot compare {edited.name} with {base.name}: their tokenizers differ, so their next-token "
            f"distributions and teacher-forced scores are not over the same tokens. " + "; ".join(diffs))
    arch = compare_architectures(base, edited)
    if arch:
        warnings.warn(f"{edited.name} and {base.name} have different architectures: " + "; ".join(arch)
                      + ". The evaluation compares their outputs; the weight report covers the shared tensors only",
                      ArchitectureMismatchWarning, stacklevel=2)
    return arch


def load_pair(base: str | os.PathLike, edited: str | os.PathLike, *, device: str | None = None,
              dtype: str | None = None, prompt_format: str = "raw", trust_remote_code: bool = False
              ) -> tuple["LM", "LM"]:
    """Load a base and an edited model (any name :func:`editlens.load_model` takes: a built-in name, a ``.gguf``
    file, a checkpoint directory, a hub id) and check the pair (:func:`check_pair`)."""
    from editlens.lm.load import load_model

    base_lm = load_model(base, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    edited_lm = load_model(edited, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    check_pair(base_lm, edited_lm, prompt_format=prompt_format)
    return base_lm, edited_lm


def evaluate_pair(base: "LM", edited: "LM", cases: Sequence["EditCase"], metrics: Any = ("gt", "gtfree"), *,
                  prompt_format: str = "raw", batch_tokens: int = 4096, cache: Any = True,
                  progress: bool = False) -> "Results":
    """Evaluate ``edited`` against ``base`` on ``cases`` with ``metrics`` (:func:`editlens.evaluate` with the two
    models as the evaluated and the base system; GT-free metrics compare the base model's answers with the
    edited model's). The pair is checked first (:func:`check_pair`)."""
    from editlens.evaluate import evaluate
    from editlens.system import ModelSystem

    check_pair(base, edited, prompt_format=prompt_format)
    b = ModelSystem(base, prompt_format=prompt_format, batch_tokens=batch_tokens)
    e = ModelSystem(edited, prompt_format=prompt_format, batch_tokens=batch_tokens)
    return evaluate(e, cases, base=b, metrics=metrics, batch_tokens=batch_tokens, cache=cache, progress=progress)


# ============================================================================================== weights
@dataclass
class TensorDiff:
    """How one parameter tensor differs between base and edited.

    ``status``: ``changed``, ``unchanged`` (bit for bit), ``shape`` (shapes differ), ``only_base`` /
    ``only_edited``. ``fro`` = ‖ΔW‖_F, ``rel`` = ‖ΔW‖_F / ‖W_base‖_F, ``rank`` the numerical rank of ΔW with
    tolerance ``tol`` (module docstring; ``None`` for 1-D tensors or when not computed), ``singular_values``
    the largest few σᵢ of ΔW."""

    name: str
    status: str
    shape: tuple[int, ...] = ()
    dtype: str = ""
    n_changed: int = 0
    numel: int = 0
    fro: float = 0.0
    rel: float = 0.0
    max_abs: float = 0.0
    rank: int | None = None
    tol: float | None = None
    singular_values: list[float] = field(default_factory=list)


class _Source:
    """Named tensors of a model, one at a time: an :class:`LM`/``nn.Module`` (its parameters, tied ones once), a
    mapping, or a directory of ``.safetensors`` files (read lazily with ``safe_open``)."""

    def __init__(self, obj: Any):
        self._files: dict[str, Path] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        model = getattr(obj, "model", obj)
        if isinstance(obj, (str, os.PathLike)):
            d = Path(obj).expanduser()
            files = sorted(d.glob("*.safetensors")) if d.is_dir() else []
            if not files:
                raise ModelLoadError(f"{d} is not a directory of .safetensors files; load the model and pass the "
                                     f"LM instead")
            from safetensors import safe_open

            for f in files:
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    for k in st.keys():
                        self._files[k] = f
        elif isinstance(model, torch.nn.Module):
            self._tensors = dict(model.named_parameters())  # shared (tied) parameters appear once
        elif isinstance(obj, Mapping):
            self._tensors = dict(obj)
        else:
            raise EditlensError(f"cannot read weights from a {type(obj).__name__}: pass an LM, a torch module, a "
                                f"mapping of tensors or a directory of .safetensors files")

    def names(self) -> list[str]:
        return sorted(self._files) if self._files else sorted(self._tensors)

    @contextlib.contextmanager
    def get(self, name: str) -> Iterator[torch.Tensor]:
        if self._files:
            from safetensors import safe_open

            with safe_open(str(self._files[name]), framework="pt", device="cpu") as st:
                yield st.get_tensor(name)
        else:
            yield self._tensors[name].detach()


def unit_roundoff(dtype: torch.dtype) -> float:
    """``ε(dtype) / 2`` (float32: 5.96e-8, bfloat16: 3.9e-3, float16: 4.9e-4, float64: 1.1e-16)."""
    return float(torch.finfo(dtype).eps) / 2.0


def rank_tolerance(sigma_max: float, shape: tuple[int, int], dtype: torch.dtype, edited_fro: float) -> float:
    """``max(σ₁ · max(m, n) · ε₆₄, u(dtype) · ‖W_edited‖_F)`` (see the module docstring)."""
    return max(sigma_max * max(shape) * float(torch.finfo(torch.float64).eps), unit_roundoff(dtype) * edited_fro)


def tensor_diff(name: str, w_base: torch.Tensor, w_edited: torch.Tensor, *, rank: bool = True,
                n_singular: int = 5) -> TensorDiff:
    """:class:`TensorDiff` of one tensor (ΔW in float64; SVD of ΔW reshaped to 2-D when ``rank``)."""
    shape, dtype = tuple(w_edited.shape), str(w_edited.dtype).replace("torch.", "")
    if tuple(w_base.shape) != shape:
        return TensorDiff(name, "shape", shape, dtype, numel=w_edited.numel())
    if w_base.device != w_edited.device:
        w_base = w_base.to(w_edited.device)
    if torch.equal(w_base, w_edited):
        return TensorDiff(name, "unchanged", shape, dtype, numel=w_edited.numel())
    with torch.no_grad():
        d = w_edited.to(torch.float64) - w_base.to(torch.float64)
        n_changed = int(torch.count_nonzero(w_edited != w_base))
        fro = float(torch.linalg.vector_norm(d))
        base_fro = float(torch.linalg.vector_norm(w_base.to(torch.float64)))
        out = TensorDiff(name, "changed", shape, dtype, n_changed=n_changed, numel=d.numel(), fro=fro,
                         rel=fro / base_fro if base_fro > 0 else math.inf, max_abs=float(d.abs().max()))
        if rank and d.dim() >= 2:
            m = d.reshape(d.shape[0], -1)
            sv = torch.linalg.svdvals(m)
            edited_fro = float(torch.linalg.vector_norm(w_edited.to(torch.float64)))
            tol = rank_tolerance(float(sv[0]), tuple(m.shape), w_edited.dtype, edited_fro)
            out.rank = int((sv > tol).sum())
            out.tol = tol
            out.singular_values = [float(s) for s in sv[:n_singular]]
        del d
    return out


def weight_diff(base: Any, edited: Any, *, rank: bool = True, include_unchanged: bool = False) -> list[TensorDiff]:
    """Which parameter tensors differ between ``base`` and ``edited``, and how (one :class:`TensorDiff` each).

    ``base`` / ``edited``: an :class:`~editlens.lm.LM`, a torch module, a mapping ``name -> tensor`` or a
    directory of ``.safetensors`` files (read lazily). Tensors are compared one at a time: beyond the models
    themselves, memory holds one ΔW in float64 and its SVD (none for a directory, whose tensors are read one by
    one). Tied parameters are compared once. Unchanged tensors are left out unless ``include_unchanged``; tensors
    present on one side only, or with different shapes, are listed with that status.
    """
    a, b = _Source(base), _Source(edited)
    na, nb = set(a.names()), set(b.names())
    out: list[TensorDiff] = []
    for name in sorted(na | nb):
        if name not in nb:
            out.append(TensorDiff(name, "only_base"))
            continue
        if name not in na:
            out.append(TensorDiff(name, "only_edited"))
            continue
        with a.get(name) as wa, b.get(name) as wb:
            td = tensor_diff(name, wa, wb, rank=rank)
        if td.status != "unchanged" or include_unchanged:
            out.append(td)
    return out


# ============================================================================================== drift
def neutral_prompts() -> list[str]:
    """The shipped neutral prompts (``editlens/resources/probes/neutral_prompts.jsonl``): everyday prose, how-to,
    arithmetic, code and definitions that name no particular entity a factual edit would touch."""
    from editlens.evaluate.general import load_prompts, resource_path

    return [p for _, p in load_prompts(resource_path("probes", NEUTRAL_PROMPTS))]


def factual_qa_prompts() -> list[str]:
    """The prompts of the shipped ``factual_qa`` multiple-choice suite (20 questions)."""
    from editlens.evaluate.general import load_suite

    return [it.prompt for it in load_suite("factual_qa")]


def _summ(scores: Mapping[str, torch.Tensor]) -> dict[str, float]:
    kl = scores["kl"].double()
    out = {"n": int(kl.numel()), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
           "js_mean": float(scores["js"].double().mean())}
    for k, v in scores.items():
        if k.startswith("topk@"):
            out[f"{k}_mean"] = float(v.double().mean())
    if "topk@1" in scores:
        out["argmax_changed"] = int((scores["topk@1"] < 1).sum())
    return out


def drift(base: "ModelSystem", edited: "ModelSystem", prompt_sets: Mapping[str, Sequence[str]] | None = None, *,
          suites: Sequence[str] = ("factual_qa", "sentiment", "reasoning"), general: bool = True) -> dict[str, Any]:
    """Ground-truth-free drift of ``edited`` from ``base`` where no edit should reach.

    * ``prompt_sets`` (default: ``neutral`` = :func:`neutral_prompts`, ``factual_qa`` = :func:`factual_qa_prompts`):
      per set, KL(base ‖ edited), JS and top-k overlaps (k = 1, 5, 10) of the next-token distributions
      (:func:`editlens.evaluate.gtfree.gtfree_scores`), as mean / max, with the number of prompts whose greedy
      next token changed; ``per_prompt`` holds every prompt's KL.
    * ``general``: perplexity on the shipped held-out text and multiple-choice accuracy on ``suites``, for
      both systems (``ppl``, ``downstream_acc@<suite>``).

    Returns ``{"prompts": {set: {...}}, "per_prompt": {set: [(prompt, kl)]}, "general": {metric: {"base",
    "edited"}}}``.
    """
    from editlens.evaluate import evaluate
    from editlens.evaluate.general import DownstreamAccuracy, Perplexity
    from editlens.evaluate.gtfree import gtfree_scores

    sets = dict(prompt_sets) if prompt_sets is not None else {"neutral": neutral_prompts(),
                                                              "factual_qa": factual_qa_prompts()}
    out: dict[str, Any] = {"prompts": {}, "per_prompt": {}, "general": {}}
    for label, prompts in sets.items():
        prompts = list(dict.fromkeys(prompts))
        if not prompts:
            raise EditlensError(f"drift audit: the prompt set {label!r} is empty")
        scores = gtfree_scores(base, edited, prompts)
        out["prompts"][label] = _summ(scores)
        out["per_prompt"][label] = [(p, float(v)) for p, v in zip(prompts, scores["kl"].tolist())]
    if general:
        metrics = [Perplexity(), *[DownstreamAccuracy(s) for s in suites]]
        rb = evaluate(base, [], metrics=metrics, progress=False)
        re_ = evaluate(edited, [], metrics=metrics, progress=False)
        for m in metrics:
            out["general"][m.name] = {"base": rb.value(m.name), "edited": re_.value(m.name)}
    return out


# ============================================================================================== audit
@dataclass
class AuditReport:
    """What :func:`audit` found; :meth:`to_markdown` / :meth:`to_dict` render it."""

    base: str
    edited: str
    tokenizer: str
    architecture: list[str]
    weights: list[TensorDiff] | None
    n_tensors: int
    n_values: int
    drift: dict[str, Any] | None
    table: "pd.DataFrame | None" = None
    data: str | None = None
    n_cases: int = 0
    metadata: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ rendering
    def changed(self) -> list[TensorDiff]:
        return [t for t in (self.weights or []) if t.status == "changed"]

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "table"}
        d["table"] = None if self.table is None else self.table.to_dict(orient="records")
        return _plain(d)

    def to_markdown(self, max_tensors: int = 40) -> str:
        L: list[str] = [f"# editlens audit: `{self.edited}` against `{self.base}`", ""]
        L.append(f"- tokenizers: {self.tokenizer}")
        L.append("- architecture: " + ("same" if not self.architecture else "DIFFERENT: " + "; ".join(self.architecture)))
        if self.metadata:
            md = self.metadata
            what = ", ".join(f"{k}={md[k]}" for k in ("method", "n_cases", "base_model") if k in md)
            L.append(f"- checkpoint metadata ({METADATA_FILE}): {what or 'present'}")
        L.append("")
        if self.weights is not None:
            ch = self.changed()
            n_vals = sum(t.n_changed for t in ch)
            L += ["## Weights", "",
                  f"{len(ch)} of {self.n_tensors} parameter tensors changed ({n_vals} of {self.n_values} values). "
                  "Rank: singular values of ΔW above tol = max(σ₁·max(m,n)·ε₆₄, u·‖W_edited‖_F), u = unit "
                  "roundoff of the stored dtype (the rounding floor of storing W + Δ).", ""]
            other = [t for t in self.weights if t.status not in ("changed", "unchanged")]
            if ch:
                L += ["| tensor | shape | changed values | ‖ΔW‖_F | ‖ΔW‖_F/‖W‖_F | max abs | rank(ΔW) | tol |",
                      "|---|---|---|---|---|---|---|---|"]
                for t in sorted(ch, key=lambda t: -t.fro)[:max_tensors]:
                    L.append(f"| `{t.name}` | {'×'.join(map(str, t.shape))} | {t.n_changed} | {t.fro:.4g} | "
                             f"{t.rel:.3g} | {t.max_abs:.3g} | {'—' if t.rank is None else t.rank} | "
                             f"{'—' if t.tol is None else f'{t.tol:.2g}'} |")
                if len(ch) > max_tensors:
                    L.append(f"| ... {len(ch) - max_tensors} more (see --json) | | | | | | | |")
            for t in other:
                L.append(f"- `{t.name}`: {t.status.replace('_', ' ')}")
            L.append("")
        if self.drift is not None:
            L += ["## Drift where no edit should reach", "",
                  "KL(base ‖ edited), JS and top-k overlap of next-token distributions (ground-truth-free).", "",
                  "| prompts | n | KL mean | KL max | JS mean | top-1 | top-5 | top-10 | greedy token changed |",
                  "|---|---|---|---|---|---|---|---|---|"]
            for label, s in self.drift["prompts"].items():
                L.append(f"| {label} | {s['n']} | {s['kl_mean']:.3g} | {s['kl_max']:.3g} | {s['js_mean']:.3g} | "
                         f"{s.get('topk@1_mean', math.nan):.3g} | {s.get('topk@5_mean', math.nan):.3g} | "
                         f"{s.get('topk@10_mean', math.nan):.3g} | {s.get('argmax_changed', 0)} of {s['n']} |")
            for label, pp in self.drift.get("per_prompt", {}).items():
                if pp:
                    prompt, kl = max(pp, key=lambda t: t[1])
                    L.append(f"- most moved {label} prompt: {json.dumps(prompt, ensure_ascii=False)} (KL {kl:.3g})")
            if self.drift.get("general"):
                L += ["", "| general ability | base | edited | edited − base |", "|---|---|---|---|"]
                for name, v in self.drift["general"].items():
                    L.append(f"| {name} | {v['base']:.4g} | {v['edited']:.4g} | {v['edited'] - v['base']:+.3g} |")
            L.append("")
        if self.table is not None:
            L += [f"## Probe kinds × metrics ({self.data}, {self.n_cases} cases)", "",
                  "Mean over cases; `base` is the base model evaluated against itself.", "",
                  "| probe kind | metric | base | edited | sem | n |", "|---|---|---|---|---|---|"]
            for r in self.table.itertuples(index=False):
                L.append(f"| {r.probe_kind} | {r.metric} | {r.base:.4g} | {r.edited:.4g} | {r.sem:.2g} | {r.n} |")
            L.append("")
        return "\n".join(L)

    def save_json(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        return p


def audit(base: "LM | str", edited: "LM | str", cases: Sequence["EditCase"] | None = None, *,
          metrics: Any = ("gt", "gtfree"), data_label: str | None = None, prompt_format: str = "raw",
          weights: bool = True, rank: bool = True, drift_audit: bool = True, general: bool = True,
          prompt_sets: Mapping[str, Sequence[str]] | None = None, batch_tokens: int = 4096,
          device: str | None = None, dtype: str | None = "float32") -> AuditReport:
    """Audit ``edited`` against ``base`` (two :class:`~editlens.lm.LM` or two names/paths loaded with
    :func:`load_pair`, float32 by default so that the weight report sees the stored values).

    * pair check (:func:`check_pair`): tokenizers must match, architecture differences are reported;
    * ``weights``: :func:`weight_diff` (changed tensors, ‖ΔW‖_F, relative, rank with its tolerance);
    * ``drift_audit``: :func:`drift` on the shipped neutral prompts and factual-QA probes plus (``general``)
      perplexity and downstream accuracy of both models;
    * ``cases``: the probe-kind × metric table of ``metrics`` for the edited model against the base
      (:func:`evaluate_pair`) beside the base model evaluated against itself.
    """
    from editlens.evaluate import evaluate
    from editlens.system import ModelSystem

    t0 = time.perf_counter()
    if isinstance(base, (str, os.PathLike)) or isinstance(edited, (str, os.PathLike)):
        from editlens.lm.load import load_model

        if isinstance(base, (str, os.PathLike)):
            base = load_model(base, device=device, dtype=dtype)
        if isinstance(edited, (str, os.PathLike)):
            edited = load_model(edited, device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ArchitectureMismatchWarning)
        arch = check_pair(base, edited, prompt_format=prompt_format)
    if arch:
        warnings.warn(f"{edited.name} and {base.name} have different architectures: " + "; ".join(arch),
                      ArchitectureMismatchWarning, stacklevel=2)
    timings: dict[str, float] = {"load_s": time.perf_counter() - t0}
    params = dict(base.model.named_parameters())
    report = AuditReport(base=base.name, edited=edited.name,
                         tokenizer=f"identical ({len(base.tokenizer)} tokens, same special tokens and tokenisation)",
                         architecture=arch, weights=None, n_tensors=len(params),
                         n_values=sum(p.numel() for p in params.values()), drift=None,
                         metadata=read_metadata(edited.name))
    if weights:
        t = time.perf_counter()
        report.weights = weight_diff(base, edited, rank=rank)
        timings["weights_s"] = time.perf_counter() - t
    b = ModelSystem(base, prompt_format=prompt_format, batch_tokens=batch_tokens)
    e = ModelSystem(edited, prompt_format=prompt_format, batch_tokens=batch_tokens)
    if drift_audit:
        t = time.perf_counter()
        report.drift = drift(b.with_format("raw"), e.with_format("raw"), prompt_sets, general=general)
        timings["drift_s"] = time.perf_counter() - t
    if cases is not None:
        import pandas as pd

        t = time.perf_counter()
        res_e = evaluate(e, cases, base=b, metrics=metrics, batch_tokens=batch_tokens, progress=False)
        res_b = evaluate(b, cases, base=b, metrics=metrics, batch_tokens=batch_tokens, progress=False)
        se, sb = res_e.summary(), res_b.summary()
        table = se.rename(columns={"mean": "edited"}).merge(
            sb[["probe_kind", "metric", "mean"]].rename(columns={"mean": "base"}), on=["probe_kind", "metric"],
            how="left")
        report.table = pd.DataFrame(table[["probe_kind", "metric", "base", "edited", "sem", "n"]])
        report.data = data_label or "cases"
        report.n_cases = len(list(cases))
        timings["table_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    report.timings = timings
    return report
