"""FT-L and FT-M: constrained fine-tuning of chosen MLP weights.

Papers and variants:

* **FT-L** — Zhu et al., "Modifying Memories in Transformer Models" (arXiv 2012.00363, 2020): fine-tune the
  chosen weights on the new facts under an L∞ norm constraint ``||θ − θ₀||_∞ ≤ ε``, enforced by projecting
  (clamping every weight into ``[θ₀ − ε, θ₀ + ε]``) after each optimiser step. As in ROME's FT-L baseline (Meng
  et al. 2022) and EasyEdit's "prompt_last" objective, the loss is read at the *last prompt token*: the mean
  over the target's tokens of ``−log p(target token | prompt)`` under the next-token distribution after the
  prompt (exactly the usual NLL for one-token targets).
* **FT-M** — EasyEdit's variant (Zhang et al., "A Comprehensive Study of Knowledge Editing for LLMs", 2024,
  arXiv 2401.01286): teacher-forced cross-entropy on ``prompt + target`` with the loss *masked to the target
  tokens* (the prompt tokens carry no loss), no norm constraint by default.

Both optimise only the chosen MLP projections (default: the MLP output projection of one layer, as in
ROME/EasyEdit) with Adam for ``steps`` epochs over the rewrites in batches of ``batch_size``; an epoch whose
mean loss is below ``stop_loss`` ends the optimisation, and a batch whose loss is already below it takes no
optimiser step (EasyEdit's rule). The final ``ΔW = W_trained − W₀`` (clamped to ``[−ε, ε]`` under FT-L, so the
bound holds for the weights written back) is applied through :meth:`Editor.weight_edit`, hence undo is bit
for bit and the fingerprint follows the weights.

Registered names: ``"ft"`` (``variant`` hyperparameter, default ``"ft-l"``), ``"ft-l"`` and ``"ft-m"`` (the same
method with that variant as default).

EVK-Align: ``evk_align`` is the same ``extra_loss`` hook the value optimisation of ROME/MEMIT/AlphaEdit/EMMET
calls (:func:`editlens.edit.locate.compute_values`): a callable taking a
:class:`~editlens.edit.locate.ValueLossContext` and returning a differentiable scalar. FT passes an adapter
context (:class:`FTLossContext`) whose ``delta`` is a zero vector (FT has no residual delta: the trained
weights are the edit) and whose ``run(..., use_delta=True)`` forwards the model with the weights being trained
(gradients flow into them), while ``run(..., use_delta=False)`` forwards the *original* weights (without
gradient) for reference outputs. The hook's value is added to every batch loss;
``diagnostics["evk_align"]`` records its settings.

Deviations: none in the objectives; ``norm_constraint = -1`` (the default) means "the variant's default"
(FT-L: the per-architecture ε below, FT-M: no constraint); 0 switches the constraint off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from editlens.edit import locate
from editlens.edit.base import Edit, Editor, HParams, SequenceState, evk_settings, model_keys, register_method
from editlens.edit.base import NON_NEGATIVE, POSITIVE, Range
from editlens.errors import HParamsError, MethodError
from editlens.lm import ops
from editlens.lm.arch import is_conv1d, weight_param

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM

VARIANTS = ("ft-l", "ft-m")
OBJECTIVES = ("auto", "prompt_last", "target_new")
MODULES = ("mlp_out", "mlp_in", "mlp_gate")

#: FT-L's default L∞ radius per model key (ROME / EasyEdit "constr" settings: GPT-2 5e-4, GPT-J 5e-5)
FT_L_EPS: dict[str, float] = {"tiny": 5e-3, "smollm2-135m": 5e-3, "gpt2": 5e-4, "gptj": 5e-5, "llama": 5e-5,
                              "qwen2": 5e-5, "default": 5e-5}


def _rel_layer(frac: float):
    def f(lm: "LM") -> dict[str, Any]:
        return {"layers": [min(lm.n_layers - 1, max(0, int(round(frac * lm.n_layers))))]}
    return f


@dataclass
class FTHParams(HParams):
    """Hyperparameters of FT-L / FT-M.

    Attributes:
        variant: ``"ft-l"`` (L∞-constrained, last-prompt-token loss) or ``"ft-m"`` (target-token masked loss).
        layers: layers whose MLP projection is fine-tuned.
        module: which projection: ``"mlp_out"`` (down_proj / c_proj / fc_out, default), ``"mlp_in"`` or
            ``"mlp_gate"`` (gated MLPs only).
        lr: Adam learning rate.
        steps: epochs over the rewrites.
        norm_constraint: FT-L's L∞ radius ε; ``-1`` = the variant's default (FT-L: per architecture, FT-M:
            none), ``0`` = no constraint.
        objective: ``"auto"`` (by variant), ``"prompt_last"`` or ``"target_new"``.
        batch_size: rewrites per optimiser step.
        weight_decay: Adam weight decay.
        stop_loss: early-stopping threshold on the epoch's mean loss (and per batch: no step below it).
    """

    method: ClassVar[str] = "ft"
    variant: str = "ft-l"
    layers: list[int] = field(default_factory=lambda: [0])
    module: str = "mlp_out"
    lr: float = 5e-4
    steps: int = 25
    norm_constraint: float = -1.0
    objective: str = "auto"
    batch_size: int = 1
    weight_decay: float = 0.0
    stop_loss: float = 1e-2
    RANGES: ClassVar[dict[str, Any]] = {"lr": POSITIVE, "norm_constraint": Range(0.0, also=(-1.0,)),
                                        "weight_decay": NON_NEGATIVE, "stop_loss": NON_NEGATIVE}

    ARCH_DEFAULTS: ClassVar[dict[str, Any]] = {
        "tiny": {"layers": [2], "lr": 5e-3, "steps": 25},
        # 30 layers, d=576: a late-middle layer as EasyEdit uses for LLaMA (21 of 32); lr/steps/ε from trials
        "smollm2-135m": {"layers": [20], "lr": 2e-3, "steps": 15},
        "gpt2": {"layers": [0], "batch_size": 3},  # ROME / EasyEdit gpt2-xl (constr)
        "gptj": {"layers": [21]},  # EasyEdit gpt-j-6B
        "qwen2": _rel_layer(27 / 28),  # EasyEdit qwen2-7b: layer 27 of 28
        "llama": _rel_layer(21 / 32),  # EasyEdit llama-7b / llama3: layer 21 of 32
    }

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise HParamsError(f"hyperparameter 'variant' of method 'ft' must be one of {VARIANTS}, got "
                               f"{self.variant!r}")
        if self.objective not in OBJECTIVES:
            raise HParamsError(f"hyperparameter 'objective' of method 'ft' must be one of {OBJECTIVES}, got "
                               f"{self.objective!r}")
        if self.module not in MODULES:
            raise HParamsError(f"hyperparameter 'module' of method 'ft' must be one of {MODULES}, got {self.module!r}")
        if not self.layers:
            raise HParamsError("hyperparameter 'layers' of method 'ft' must name at least one layer")
        if len(set(self.layers)) != len(self.layers):
            raise HParamsError(f"hyperparameter 'layers' of method 'ft' names a layer twice: {list(self.layers)}")
        for key in ("steps", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise HParamsError(f"hyperparameter {key!r} of method 'ft' must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise HParamsError(f"hyperparameter 'lr' of method 'ft' must be > 0, got {self.lr}")
        if self.norm_constraint < 0 and self.norm_constraint != -1:
            raise HParamsError(f"hyperparameter 'norm_constraint' of method 'ft' must be >= 0 (or -1 = variant "
                               f"default), got {self.norm_constraint}")

    def effective_objective(self) -> str:
        if self.objective != "auto":
            return self.objective
        return "prompt_last" if self.variant == "ft-l" else "target_new"

    def effective_eps(self, lm: "LM") -> float:
        """The L∞ radius actually used (0 = unconstrained)."""
        if self.norm_constraint >= 0:
            return float(self.norm_constraint)
        if self.variant == "ft-m":
            return 0.0
        for key in model_keys(lm):
            if key in FT_L_EPS:
                return FT_L_EPS[key]
        return FT_L_EPS["default"]


@dataclass
class FTLHParams(FTHParams):
    """FT-L defaults (``variant="ft-l"``)."""

    method: ClassVar[str] = "ft-l"
    variant: str = "ft-l"


@dataclass
class FTMHParams(FTHParams):
    """FT-M defaults (``variant="ft-m"``)."""

    method: ClassVar[str] = "ft-m"
    variant: str = "ft-m"


# ------------------------------------------------------------------------------------------------ pure parts
def linf_project_(W: torch.Tensor, W0: torch.Tensor, eps: float) -> torch.Tensor:
    """Clamp ``W`` in place into the L∞ ball of radius ``eps`` around ``W0`` (Zhu et al.'s projection)."""
    with torch.no_grad():
        torch.maximum(W, W0 - eps, out=W)
        torch.minimum(W, W0 + eps, out=W)
    return W


def masked_target_nll(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FT-M's loss: per row, mean NLL of ``labels`` over the positions where ``mask`` is true; then the batch mean.

    ``logits[b, i]`` predicts ``labels[b, i]`` (already shifted). Rows without a masked position are an error.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    nll = -lp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    m = mask.to(nll.dtype)
    counts = m.sum(-1)
    if bool((counts == 0).any()):
        raise MethodError("FT-M: a row has no target token to train on")
    return ((nll * m).sum(-1) / counts).mean()


def prompt_last_nll(last_logits: torch.Tensor, target_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """FT-L's loss (ROME's FT baseline): per row, mean over the target tokens of ``−log p(token)`` under the
    next-token distribution after the prompt (``last_logits [b, vocab]``); then the batch mean."""
    lp = torch.log_softmax(last_logits.float(), dim=-1)
    rows = [-lp[b, torch.as_tensor(list(t), device=lp.device)].mean() for b, t in enumerate(target_ids)]
    return torch.stack(rows).mean()


# ------------------------------------------------------------------------------------------------ plumbing
def _module_paths(lm: "LM", hp: FTHParams) -> list[str]:
    paths = []
    for layer in hp.layers:
        if not 0 <= int(layer) < lm.n_layers:
            raise HParamsError(f"hyperparameter 'layers' of method {hp.method!r}: layer {layer} is outside the "
                               f"model's 0..{lm.n_layers - 1}")
        if hp.module == "mlp_out":
            paths.append(lm.arch.mlp_out_at(int(layer)))
        elif hp.module == "mlp_in":
            paths.append(lm.arch.mlp_in_at(int(layer)))
        else:
            if lm.arch.mlp_gate is None:
                raise HParamsError(f"hyperparameter 'module' of method {hp.method!r}: the {lm.arch.family} "
                                   "architecture has no gated MLP (use 'mlp_out' or 'mlp_in')")
            paths.append(lm.arch.mlp_gate.format(int(layer)))
    return paths


def _examples(lm: "LM", cases: Sequence["EditCase"]) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, target_ids)`` for every rewrite of every case."""
    out = []
    for c in cases:
        for r in c.rewrites:
            out.append(ops.target_token_ids(lm.tokenizer, r.text, r.target_new))
    return out


def _batch_loss(lm: "LM", batch: list[tuple[list[int], list[int]]], objective: str) -> torch.Tensor:
    pad = ops._pad_id(lm)
    if objective == "prompt_last":
        enc = ops.pad_left([p for p, _ in batch], pad, lm.device)
        out = lm.model(**enc, logits_to_keep=1, use_cache=False)
        return prompt_last_nll(out.logits[:, -1, :], [t for _, t in batch])
    # target_new: teacher forcing on prompt + target[:-1]; with left padding every row's targets sit at the end
    seqs = [p + t[:-1] for p, t in batch]
    enc = ops.pad_left(seqs, pad, lm.device)
    keep = max(len(t) for _, t in batch)
    keep = min(keep, enc["input_ids"].shape[1])
    out = lm.model(**enc, logits_to_keep=keep, use_cache=False)
    logits = out.logits[:, -keep:, :]
    labels = torch.full((len(batch), keep), -1, dtype=torch.long, device=logits.device)
    for b, (_, t) in enumerate(batch):
        labels[b, keep - len(t):] = torch.as_tensor(t, dtype=torch.long)
    return masked_target_nll(logits, labels, labels >= 0)


@dataclass
class FTLossContext(locate.ValueLossContext):
    """EVK-Align adapter for fine-tuning (see the module docstring): ``delta`` is a zero vector, the edit lives in
    the trained weights; ``run(use_delta=False)`` swaps the original weights in (no gradient)."""

    params: list[torch.Tensor] = field(default_factory=list)
    originals: list[torch.Tensor] = field(default_factory=list)

    def run(self, request_index: torch.Tensor, positions: torch.Tensor, *, use_delta: bool = True,
            **kw: Any) -> torch.Tensor:
        if use_delta:
            return super().run(request_index, positions, use_delta=True, **kw)
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            try:
                for p, p0 in zip(self.params, self.originals):
                    p.data.copy_(p0)
                return super().run(request_index, positions, use_delta=False, **kw)
            finally:
                for p, t in zip(self.params, trained):
                    p.data.copy_(t)


def finetune_deltas(lm: "LM", cases: Sequence["EditCase"], hp: FTHParams, *, evk_align: Any = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run FT-L/FT-M and return ``({module path: ΔW [out, in]}, diagnostics)``; the model is left unchanged."""
    objective = hp.effective_objective()
    eps = hp.effective_eps(lm)
    paths = _module_paths(lm, hp)
    from editlens.lm.placement import is_offloaded

    offloaded = [p for p in paths if is_offloaded(lm.module(p))]
    if offloaded:  # gradients reach the copy accelerate places for each forward, never the offloaded weight
        raise MethodError(f"method {hp.method!r} cannot fine-tune offloaded weights ({', '.join(offloaded)} are kept "
                          f"in accelerate's weights map): load the model with a device_map that keeps layers "
                          f"{list(hp.layers)} on a device (rome and memit can edit offloaded layers)")
    params = [weight_param(lm.module(p)) for p in paths]
    originals = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    examples = _examples(lm, cases)
    ctx: FTLossContext | None = None
    if evk_align is not None:
        requests = locate.requests_from_cases(cases)
        layer0 = int(hp.layers[0])
        mod = lm.arch.mlp_out_at(layer0)
        init = locate.capture_at_subject(lm, requests, mod, kind="output")
        ctx = FTLossContext(lm=lm, layer=layer0, module=mod, requests=requests,
                            delta=torch.zeros_like(init, requires_grad=True), init=init, prefixes=[""],
                            params=params, originals=originals)
    diag: dict[str, Any] = {"ft/objective": objective, "ft/norm_constraint": eps, "ft/variant": hp.variant}
    losses: list[float] = []
    try:
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        epochs = 0
        extra_last: float | None = None
        for _ in range(int(hp.steps)):
            epochs += 1
            total, n = 0.0, 0
            for start in range(0, len(examples), int(hp.batch_size)):
                batch = examples[start:start + int(hp.batch_size)]
                opt.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    loss = _batch_loss(lm, batch, objective)
                    if ctx is not None:
                        ctx.step = epochs - 1
                        extra_val = evk_align(ctx)
                        if not (torch.is_tensor(extra_val) and extra_val.dim() == 0):
                            raise MethodError("evk_align (extra_loss) must return a scalar tensor")
                        extra_last = float(extra_val.detach())
                        loss = loss + extra_val
                total += float(loss.detach()) * len(batch)
                n += len(batch)
                if float(loss.detach()) >= hp.stop_loss:
                    loss.backward()
                    opt.step()
                if eps > 0:
                    for p, p0 in zip(params, originals):
                        linf_project_(p.data, p0, eps)
            epoch_loss = total / max(1, n)
            losses.append(epoch_loss)
            if not math.isfinite(epoch_loss):
                raise MethodError(f"{hp.method}: the fine-tuning loss became {epoch_loss} (lower 'lr')")
            if epoch_loss < hp.stop_loss:
                break
        deltas: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for path, p, p0 in zip(paths, params, originals):
                d = p.detach() - p0
                if eps > 0:
                    d = d.clamp(-eps, eps)
                deltas[path] = (d.t() if is_conv1d(lm.module(path)) else d).clone()
    finally:
        with torch.no_grad():
            for p, p0, f in zip(params, originals, flags):
                p.copy_(p0)
                p.requires_grad_(f)
                p.grad = None
    diag["loss/first"] = float(losses[0]) if losses else float("nan")
    diag["loss/final"] = float(losses[-1]) if losses else float("nan")
    diag["ft/epochs"] = len(losses)
    if extra_last is not None:
        diag["loss/extra"] = extra_last
    for layer, path in zip(hp.layers, paths):
        d = deltas[path]
        diag[f"delta_norm/{int(layer)}"] = float(d.double().norm())
        diag[f"delta_linf/{int(layer)}"] = float(d.abs().max()) if d.numel() else 0.0
    return deltas, diag


class _FTBase(Editor):
    supports_offloaded_weights = True  # refuses only when a fine-tuned layer itself is offloaded
    supports_evk_align = True  # added to the fine-tuning loss

    def apply(self, lm: "LM", cases: Sequence["EditCase"], hparams: HParams, *, evk_align: Any = None,
              progress: bool = True, sequence: SequenceState | None = None) -> Edit:
        if not isinstance(hparams, FTHParams):
            raise HParamsError(f"method {self.name!r} expects FTHParams, got {type(hparams).__name__}")
        deltas, diag = finetune_deltas(lm, cases, hparams, evk_align=evk_align)
        diag["evk_align"] = evk_settings(evk_align)
        return self.weight_edit(lm, cases, hparams, deltas, diag, sequence=sequence)


@register_method("ft")
class FTEditor(_FTBase):
    """Constrained fine-tuning (``variant`` ``"ft-l"`` or ``"ft-m"``)."""

    hparams_class = FTHParams


@register_method("ft-l")
class FTLEditor(_FTBase):
    """FT-L: L∞-constrained fine-tuning with the last-prompt-token loss (Zhu et al. 2020; ROME's baseline)."""

    hparams_class = FTLHParams


@register_method("ft-m")
class FTMEditor(_FTBase):
    """FT-M: fine-tuning with the loss masked to the target tokens (EasyEdit)."""

    hparams_class = FTMHParams
