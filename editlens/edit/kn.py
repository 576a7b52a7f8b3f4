"""KN — Knowledge Neurons (Dai et al., ACL 2022, "Knowledge Neurons in Pretrained Transformers").

What is computed, per case
--------------------------
1. **Knowledge attribution by integrated gradients** (paper §3.1). For a prompt ``x`` and the fact's answer
   ``y*`` (the case's ``target_true``; the model's own greedy next token when the case has none), let ``w̄ ∈ R^{d_ff}``
   be the FFN intermediate activations of layer ``l`` at the last prompt token (the input of the MLP output
   projection: GELU(...) for GPT-2, ``SiLU(gate) ⊙ up`` for LLaMA-style MLPs) and ``P(α) = p(y*₁ | x)`` with that
   vector replaced by ``α w̄`` (``y*₁``: the answer's first token). The attribution of neuron ``i`` is the Riemann
   approximation of ``w̄_i ∫₀¹ ∂P(α w̄)/∂w_i dα`` with ``m = steps`` points (paper eq. 3)::

       Attr_i = w̄_i / m · Σ_{k=1..m} ∂P(k/m · w̄)/∂w_i

   All ``m`` interpolation points of all prompts of a case are one batched forward/backward per layer
   (:func:`integrated_gradients`). As in the authors' released code the path scales the whole layer vector at once
   (baseline: the zero vector), so the attributions of a layer sum to ``P(w̄) − P(0)`` up to the discretisation
   error (completeness; checked in the tests).
2. **Refining across prompts** (§3.2). The prompts are the rewrite prompt and ``n_prompts`` context-prefixed
   variants of it (``prompts="prefixes"``: text sampled from the model and prepended, ROME/MEMIT's context
   templates, :func:`editlens.edit.locate.context_prefixes`) or the case's paraphrase probes
   (``prompts="paraphrases"``; these are usually the generalisation probes of the evaluation, so they are then no
   longer held out). For each prompt the neurons with ``Attr > t · max Attr`` (``t = threshold``, the maximum over
   every attributed layer) are kept; a neuron is a knowledge neuron when it is kept for at least a fraction ``p``
   of the prompts (``p = share``). As in the paper, ``p`` is then moved by 0.05 steps (down when fewer than
   ``min_neurons``, up when more than ``max_neurons`` are found) until the count lies in
   ``[min_neurons, max_neurons]``; if no ``p`` in [0.05, 1] gets there, the ``max_neurons`` neurons shared by most
   prompts (ties: larger mean attribution) are taken.
3. **Updating the fact** (§5, "updating facts"): the value slot of each knowledge neuron — column ``i`` of the
   MLP output projection ``W_out [d_model, d_ff]``, i.e. row ``i`` of the down-projection in ``[d_ff, d_model]``
   layout — becomes ``v_i − λ₁ e(y_old) + λ₂ e(y_new)`` with ``λ₁ = erase_scale`` (1 in the paper) and
   ``λ₂ = update_scale`` (8 in the paper); ``e(y)`` is the output embedding (``lm_head`` row) of the object's
   first token.

Batch edits attribute every case on the unedited weights and add the updates together (a neuron chosen by two
cases gets both updates); a sequential run attributes each batch on the weights edited so far. The update goes
through :meth:`~editlens.edit.base.Editor.weight_edit`, so undo is bit for bit.

Deviations, and why: the answer is read at its first token (the paper's answers are single [MASK] tokens); the
embedding is the *output* embedding (the paper's BERT ties input and output embeddings, and so does SmolLM2; for an
untied model the output embedding is the direction a value vector must write for the logit to move); the prompts
are generated context variants of the rewrite prompt instead of the paper's ParaRel templates (which editlens's
datasets do not carry); the paper's further filter of neurons shared by many facts of one relation (used for its
erasing experiment) is not applied. The method is known to be weak at changing facts in autoregressive models
(docs/methods-lora-kn.md gives the measured figure on SmolLM2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from editlens.edit.base import Edit, Editor, HParams, SequenceState, register_method
from editlens.edit.base import FINITE, FRACTION, NON_NEGATIVE, Range
from editlens.errors import HParamsError, MethodError
from editlens.lm import ops

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM

PROMPT_SOURCES = ("prefixes", "paraphrases")


@dataclass
class KNHParams(HParams):
    """Hyperparameters of KN.

    Attributes:
        layers: layers whose FFN neurons are attributed (empty = every layer, as in the paper).
        steps: ``m``, interpolation points of the integrated gradients (paper: 20).
        threshold: ``t``, fraction of the maximum attribution a neuron must exceed on a prompt (paper: 0.2).
        share: ``p``, initial fraction of prompts that must share a neuron (paper: 0.7; adjusted, see the module).
        min_neurons, max_neurons: the target number of knowledge neurons per fact (paper: 2..5).
        prompts: ``"prefixes"`` (rewrite prompt + sampled context prefixes) or ``"paraphrases"``.
        n_prompts: number of prefixed variants (``prompts="prefixes"``) or paraphrases used at most.
        prefix_length: tokens per sampled prefix.
        erase_scale: ``λ₁``, multiple of the old object's embedding subtracted (paper: 1).
        update_scale: ``λ₂``, multiple of the new object's embedding added (paper: 8).
        batch_rows: rows per forward/backward chunk of the attribution (all steps of one prompt stay together).
        seed: seed of the sampled prefixes.
    """

    method: ClassVar[str] = "kn"
    layers: list[int] = field(default_factory=list)
    steps: int = 20
    threshold: float = 0.2
    share: float = 0.7
    min_neurons: int = 2
    max_neurons: int = 5
    prompts: str = "prefixes"
    n_prompts: int = 3
    prefix_length: int = 8
    erase_scale: float = 1.0
    update_scale: float = 8.0
    batch_rows: int = 200
    seed: int = 0
    RANGES: ClassVar[dict[str, Range]] = {"threshold": Range(0.0, 1.0, lo_open=True, hi_open=True), "share": FRACTION,
                                         "erase_scale": FINITE, "update_scale": FINITE}
    ARCH_DEFAULTS: ClassVar[dict[str, Any]] = {"tiny": {"n_prompts": 2, "prefix_length": 4, "steps": 10}}

    def validate(self) -> None:
        m = self.method
        for key in ("steps", "min_neurons", "max_neurons", "prefix_length", "batch_rows"):
            if int(getattr(self, key)) < 1:
                raise HParamsError(f"hyperparameter {key!r} of method {m!r} must be >= 1, got {getattr(self, key)}")
        if int(self.n_prompts) < 0:
            raise HParamsError(f"hyperparameter 'n_prompts' of method {m!r} must be >= 0, got {self.n_prompts}")
        if self.min_neurons > self.max_neurons:
            raise HParamsError(f"hyperparameters 'min_neurons' ({self.min_neurons}) and 'max_neurons' "
                               f"({self.max_neurons}) of method {m!r}: min_neurons must be <= max_neurons")
        if self.prompts not in PROMPT_SOURCES:
            raise HParamsError(f"hyperparameter 'prompts' of method {m!r} must be one of {PROMPT_SOURCES}, got "
                               f"{self.prompts!r}")
        if any(int(l) < 0 for l in self.layers) or len(set(self.layers)) != len(self.layers):
            raise HParamsError(f"hyperparameter 'layers' of method {m!r} must hold distinct layer indices >= 0, got "
                               f"{list(self.layers)}")
        if self.steps and int(self.steps) > int(self.batch_rows):
            raise HParamsError(f"hyperparameter 'batch_rows' of method {m!r} ({self.batch_rows}) must be >= 'steps' "
                               f"({self.steps}): all interpolation steps of a prompt run in one batch")

    def layer_list(self, lm: "LM") -> list[int]:
        if not self.layers:
            return list(range(lm.n_layers))
        for l in self.layers:
            if not 0 <= int(l) < lm.n_layers:
                raise HParamsError(f"hyperparameter 'layers' of method {self.method!r}: layer {l} is outside the "
                                   f"model's 0..{lm.n_layers - 1}")
        return [int(l) for l in self.layers]


# ------------------------------------------------------------------------------------------------ attribution
class _ScaleHook:
    """Forward pre-hook on the MLP output projection: replaces its input at the last position by ``scaled``."""

    def __init__(self) -> None:
        self.scaled: torch.Tensor | None = None
        self.captured: torch.Tensor | None = None

    def __call__(self, module: Any, args: tuple) -> Any:
        x = args[0]
        if self.scaled is None:
            self.captured = x[:, -1, :].detach().float().clone()
            return None
        x = x.clone()
        x[:, -1, :] = self.scaled.to(x.dtype)
        return (x, *args[1:])


def _encode(lm: "LM", prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    return ops.pad_left([ops.encode(lm.tokenizer, p) for p in prompts], ops._pad_id(lm), lm.device)


def _run(lm: "LM", enc: dict[str, torch.Tensor]) -> torch.Tensor:
    return lm.model(**enc, logits_to_keep=1, use_cache=False).logits[:, -1, :].float()


def layer_activations(lm: "LM", prompts: Sequence[str], layer: int) -> torch.Tensor:
    """``w̄ [n_prompts, d_ff]``: the FFN intermediate activations of ``layer`` at each prompt's last token."""
    hook = _ScaleHook()
    h = lm.module(lm.arch.mlp_out_at(layer)).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            _run(lm, _encode(lm, prompts))
    finally:
        h.remove()
    assert hook.captured is not None
    return hook.captured


def scaled_probability(lm: "LM", prompts: Sequence[str], layer: int, vectors: torch.Tensor,
                       targets: Sequence[int], *, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``P`` of ``targets[r]`` after ``prompts[r]`` with the FFN activations of ``layer`` at the last token replaced
    by ``vectors[r]``; with ``grad`` also ``∂P_r/∂vectors[r]``. One batched forward (and backward)."""
    hook = _ScaleHook()
    x = vectors.detach().float().clone().requires_grad_(grad)
    hook.scaled = x
    h = lm.module(lm.arch.mlp_out_at(layer)).register_forward_pre_hook(hook)
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            probs = torch.softmax(_run(lm, _encode(lm, prompts)), -1)
            p = probs[torch.arange(len(prompts)), torch.as_tensor(list(targets))]
            g = torch.autograd.grad(p.sum(), x)[0] if grad else None
    finally:
        h.remove()
    return p.detach(), (g.detach() if g is not None else None)


def _cache_kw(lm: "LM") -> str:
    """The forward keyword of the KV cache: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"


def _prefix_cache(lm: "LM", ids: list[int]) -> Any:
    """The KV cache of ``ids[:-1]`` (one row, no gradient)."""
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids[:-1]], device=lm.device), use_cache=True)
    cache = out.get("cache", None)
    return cache if cache is not None else out.get("past_key_values")


def _last_token_grads(lm: "LM", ids: list[int], cache: Any, layer: int, vectors: torch.Tensor, target: int
                      ) -> torch.Tensor:
    """``∂P(target)/∂vectors[r]`` for every row ``r``: one batch of ``len(vectors)`` rows that share the prompt's
    cached prefix and differ only in the FFN activations of ``layer`` at the last token. Earlier positions never
    attend to the last one, so reusing their cache is exact."""
    import copy

    m = vectors.shape[0]
    c = copy.deepcopy(cache)
    c.batch_repeat_interleave(m)
    hook = _ScaleHook()
    x = vectors.detach().float().clone().requires_grad_(True)
    hook.scaled = x
    h = lm.module(lm.arch.mlp_out_at(layer)).register_forward_pre_hook(hook)
    try:
        with torch.enable_grad():
            last = torch.full((m, 1), int(ids[-1]), dtype=torch.long, device=lm.device)
            logits = lm.model(input_ids=last, use_cache=True, logits_to_keep=1, **{_cache_kw(lm): c}).logits
            p = torch.softmax(logits[:, -1, :].float(), -1)[:, int(target)]
            (g,) = torch.autograd.grad(p.sum(), x)
    finally:
        h.remove()
    return g.detach()


def integrated_gradients(lm: "LM", prompts: Sequence[str], targets: Sequence[int], layer: int, steps: int, *,
                         batch_rows: int = 200, caches: Sequence[Any] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """KN attribution of every FFN neuron of ``layer`` for each prompt (paper eq. 3, right Riemann sum).

    Returns ``(attr [n_prompts, d_ff], w̄ [n_prompts, d_ff])``. The ``steps`` interpolation points ``α = k/m`` of a
    prompt are rows of one batched forward/backward (in chunks of ``batch_rows`` rows when ``steps`` is larger).
    Each prompt's prefix (all tokens but the last) is run once and its KV cache shared by the rows (``caches``:
    the caches of the prompts, reused across layers), so a row costs one token's forward/backward."""
    wbar = layer_activations(lm, prompts, layer)
    m = int(steps)
    alphas = torch.arange(1, m + 1, dtype=torch.float32, device=wbar.device) / m
    attrs = []
    for i, prompt in enumerate(prompts):
        ids = ops.encode(lm.tokenizer, prompt)
        vec = alphas[:, None] * wbar[i][None, :]
        total = torch.zeros_like(wbar[i])
        if len(ids) < 2:  # nothing to cache: the full prompt per row
            for s in range(0, m, int(batch_rows)):
                _, g = scaled_probability(lm, [prompt] * len(vec[s:s + batch_rows]), layer, vec[s:s + batch_rows],
                                          [targets[i]] * len(vec[s:s + batch_rows]), grad=True)
                assert g is not None
                total += g.sum(0)
        else:
            cache = caches[i] if caches is not None else _prefix_cache(lm, ids)
            for s in range(0, m, int(batch_rows)):
                total += _last_token_grads(lm, ids, cache, layer, vec[s:s + int(batch_rows)], targets[i]).sum(0)
        attrs.append(wbar[i] * total / m)
    return torch.stack(attrs), wbar


# ------------------------------------------------------------------------------------------------ refining
def refine(attrs: torch.Tensor, threshold: float, share: float, min_neurons: int, max_neurons: int
           ) -> tuple[list[int], float]:
    """Knowledge neurons from per-prompt attributions ``attrs [n_prompts, n_neurons]`` (flattened over layers).

    Per prompt, keep neurons with ``attr > threshold · max``; keep those kept by at least ``p`` of the prompts,
    moving ``p`` by 0.05 from ``share`` until the count is within ``[min_neurons, max_neurons]`` (see the module
    docstring). Returns ``(sorted neuron indices, p used)``; ``p = -1`` when the fallback (top ``max_neurons`` by
    count, then mean attribution) was taken."""
    mx = attrs.max(dim=1, keepdim=True).values
    kept = (attrs > threshold * mx) & (mx > 0)
    frac = kept.float().mean(0)
    eps = 1e-9

    def at(p: float) -> list[int]:
        return torch.nonzero(frac >= p - eps).flatten().tolist()

    p = float(share)
    sel = at(p)
    while len(sel) < min_neurons and p - 0.05 >= 0.05 - eps:
        p = round(p - 0.05, 10)
        sel = at(p)
    while len(sel) > max_neurons and p + 0.05 <= 1.0 + eps:
        p = round(p + 0.05, 10)
        sel = at(p)
    if min_neurons <= len(sel) <= max_neurons:
        return sorted(sel), p
    # the window was jumped across or p ran out of range: the max_neurons neurons shared by most prompts
    candidates = torch.nonzero(frac > 0).flatten()
    if len(candidates) == 0:
        return [], -1.0
    mean = attrs.mean(0)
    order = sorted(candidates.tolist(), key=lambda j: (-float(frac[j]), -float(mean[j]), j))
    return sorted(order[:max_neurons]), -1.0


# ------------------------------------------------------------------------------------------------ the method
def _prompts_for(lm: "LM", case: "EditCase", hp: KNHParams, prefixes: list[str]) -> list[str]:
    base = case.rewrite.text
    if hp.prompts == "paraphrases":
        para = [p.prompt for p in case.probes.get("paraphrase", [])][: int(hp.n_prompts)]
        return [base, *para]
    return [base] + [p + base for p in prefixes[1:]]


def _first_token(lm: "LM", prompt: str, target: str) -> int:
    return int(ops.target_token_ids(lm.tokenizer, prompt, target)[1][0])


def locate_neurons(lm: "LM", case: "EditCase", hp: KNHParams, prefixes: list[str]) -> dict[str, Any]:
    """Attribute and refine for one case: ``{"neurons": [(layer, index)], "answer_token", "p", "prompts"}``."""
    prompts = _prompts_for(lm, case, hp, prefixes)
    rw = case.rewrite
    if rw.target_true:
        answers = [_first_token(lm, p, rw.target_true) for p in prompts]
    else:  # the model's own answer to the rewrite prompt
        with torch.no_grad():
            top = int(_run(lm, _encode(lm, [rw.text])).argmax(-1)[0])
        answers = [top] * len(prompts)
    layers = hp.layer_list(lm)
    caches = [_prefix_cache(lm, ops.encode(lm.tokenizer, p)) if len(ops.encode(lm.tokenizer, p)) > 1 else None
              for p in prompts]
    per_layer = [integrated_gradients(lm, prompts, answers, l, hp.steps, batch_rows=hp.batch_rows,
                                      caches=caches)[0] for l in layers]
    d_ff = per_layer[0].shape[1]
    attrs = torch.cat(per_layer, dim=1)  # [n_prompts, n_layers * d_ff]
    flat, p = refine(attrs, hp.threshold, hp.share, hp.min_neurons, hp.max_neurons)
    neurons = [(layers[j // d_ff], j % d_ff) for j in flat]
    return {"neurons": neurons, "answer_token": answers[0], "p": p, "n_prompts": len(prompts),
            "max_attr": float(attrs.max())}


def kn_deltas(lm: "LM", cases: Sequence["EditCase"], hp: KNHParams) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``({MLP output projection path: ΔW [out, in]}, diagnostics)`` of KN's update for ``cases`` (model unchanged)."""
    from editlens.edit.locate import context_prefixes
    from editlens.lm.arch import weight_view

    prefixes = context_prefixes(lm, int(hp.n_prompts), int(hp.prefix_length), seed=int(hp.seed)) \
        if hp.prompts == "prefixes" else [""]
    emb = lm.model.get_output_embeddings().weight.detach()
    deltas: dict[str, torch.Tensor] = {}
    per_case, ps, layers_hit = [], [], set()
    for case in cases:
        rw = case.rewrite
        found = locate_neurons(lm, case, hp, prefixes)
        new_tok = _first_token(lm, rw.text, rw.target_new)
        direction = hp.update_scale * emb[new_tok].float()
        if rw.target_true:
            direction = direction - hp.erase_scale * emb[_first_token(lm, rw.text, rw.target_true)].float()
        else:
            direction = direction - hp.erase_scale * emb[found["answer_token"]].float()
        for layer, i in found["neurons"]:
            layers_hit.add(int(layer))
            path = lm.arch.mlp_out_at(layer)
            if path not in deltas:
                W = weight_view(lm.module(path))
                deltas[path] = torch.zeros(W.shape, dtype=torch.float32, device=W.device)
            deltas[path][:, i] += direction.to(deltas[path].device)
        per_case.append(len(found["neurons"]))
        ps.append(found["p"])
    for path in list(deltas):
        W = weight_view(lm.module(path))
        deltas[path] = deltas[path].to(W.dtype)
    diag: dict[str, Any] = {"kn/n_neurons": int(sum(per_case)), "kn/neurons_per_case": per_case,
                            "kn/share_used": [float(p) for p in ps],
                            "kn/layers_edited": sorted(layers_hit)}
    for path, d in deltas.items():
        diag[f"delta_norm/{path}"] = float(d.double().norm())
    return deltas, diag


@register_method("kn")
class KNEditor(Editor):
    """Knowledge neurons: integrated-gradients attribution, refined across prompts; value slots updated."""

    hparams_class = KNHParams
    edits_weights = True

    def apply(self, lm: "LM", cases: Sequence["EditCase"], hparams: HParams, *, evk_align: Any = None,
              progress: bool = True, sequence: SequenceState | None = None) -> Edit:
        if not isinstance(hparams, KNHParams):
            raise HParamsError(f"method 'kn' expects KNHParams, got {type(hparams).__name__}")
        hparams.layer_list(lm)  # a layer outside the model: HParamsError before any work
        if lm.model.get_output_embeddings() is None:
            raise MethodError(f"kn: model {lm.name!r} has no output embedding to read the objects' embeddings from")
        deltas, diag = kn_deltas(lm, cases, hparams)
        return self.weight_edit(lm, cases, hparams, deltas, diag, sequence)
