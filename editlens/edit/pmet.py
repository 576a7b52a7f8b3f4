"""PMET: Precise Model Editing in a Transformer (Li et al., AAAI 2024, arXiv 2308.08742).

PMET observes that the hidden state of a transformer layer is the sum of the residual input, the multi-head
self-attention (MHSA) output and the FFN output, and that MEMIT's target — the whole residual stream after the
last edited layer — therefore also contains the attention's contribution, which the FFN weights should not be
made to absorb. PMET instead optimises the *transformer-component (TC) hidden states* of both MHSA and FFN at
the last critical layer ``L`` **simultaneously**, then updates only the FFN weights, with the FFN part:

1. **Values** (:func:`editlens.edit.locate.optimise_values` at :func:`pmet_places`): two vectors ``δ_attn``, ``δ_mlp`` per request are added to the
   outputs of the attention output projection (``arch.attn_out_at(L)``) and of the MLP output projection
   (``arch.mlp_out_at(L)``) at the last subject token and optimised jointly with Adam to minimise

       mean_j −log P(target | x_j + prompt; δ) / |target|  +  kl_factor · KL(essence)
       + weight_decay · (‖δ_mlp‖²/‖m₀‖² + ‖δ_attn‖²/‖a₀‖²)  (+ extra_loss, e.g. EVK-Align)

   with each ``δ`` clamped to ``clamp_norm_factor`` times the norm of its original output (``m₀``, ``a₀``).
   The FFN target is ``m* = m₀ + δ_mlp``; the attention part is discarded (the MHSA weights are not edited).
2. **Update** (:func:`pmet_layer_update`), for each critical layer ``l`` in order (``i = 0..|R|−1``): keys
   ``K_l`` (inputs of the FFN output projection at the last subject token, averaged over the context prefixes),
   residual ``R = m* − m_L(current weights)`` measured at the FFN output of the last layer ``L`` after the
   updates of the earlier layers are in place, and

       ΔW_l = (R / √(|R| − i)) K_lᵀ (K_l K_lᵀ + λ C_l)⁻¹        (written [out, in]; C_l = E[k kᵀ], λ = mom2_update_weight)

   i.e. MEMIT's closed form with the FFN part of the residual spread over the remaining layers by the square
   root of their number (PMET's spreading; MEMIT divides by the number itself).

Machinery shared with ROME/MEMIT (:mod:`editlens.edit.locate`, :mod:`editlens.edit.stats`): context prefixes,
keys, statistics, the essence-KL prompt and the value optimisation itself (with two places instead of one, so
it is memoised and drops early-stopped requests from later passes like ROME's and MEMIT's). Deviations
(documented): the weight decay is the authors' ``‖δ‖/‖v₀‖²`` by default, as in
:func:`editlens.edit.locate.optimise_values` (``v_decay="squared"``: ``‖δ‖²/‖v₀‖²``); the essence KL reads the
distribution after ``"{subject}"`` (equal by causality to the authors' read at the subject of ``"{} is a"``);
PMET's dynamic lowering of the NLL weight once the target is the argmax is not reproduced (per-request early
stopping below ``early_stop_loss`` is used instead, as in the MEMIT implementation here).

Per-architecture defaults: GPT-J 3–8 (clamp 0.75, lr 0.2, 30 steps, KL 1), LLaMA-family 4–8 (clamp 1.0, lr 0.5,
20 steps), GPT-2 family MEMIT's 13–17, λ = 15000 (the authors' settings); SmolLM2-135M 3–7; tiny models 1–2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch

from editlens.edit import locate
from editlens.edit.base import Edit, Editor, SequenceState, evk_settings, register_method
from editlens.edit.hparams import TINY, LocateHParams, no_duplicate_layers
from editlens.edit.base import POSITIVE
from editlens.edit.stats import dk_norm
from editlens.errors import HParamsError, MethodError

if TYPE_CHECKING:  # pragma: no cover
    from editlens.lm.load import LM


# ------------------------------------------------------------------------------------------------ pure parts
def pmet_layer_update(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, n_remaining: int) -> torch.Tensor:
    """PMET's closed form for one layer, in float64.

    Args:
        K: ``[n, d_in]`` keys of the edited facts at this layer.
        R: ``[n, d_out]`` FFN residuals ``m* − m_L`` at the last critical layer.
        C: ``[d_in, d_in]`` preserved-key term, already multiplied by λ (``λ E[k kᵀ]``).
        n_remaining: number of critical layers from this one to the last (``|R| − i``); the residual is
            divided by its square root.

    Returns:
        ``ΔW [d_out, d_in]`` solving ``ΔW (Kᵀ K + C) = (R/√n_remaining)ᵀ K`` (``K`` here has one key per row).
    """
    if n_remaining < 1:
        raise MethodError(f"PMET: n_remaining must be >= 1, got {n_remaining}")
    K64 = K.double()
    R64 = R.double().to(K64.device) / math.sqrt(n_remaining)
    A = K64.T @ K64 + C.to(device=K64.device, dtype=torch.float64)
    rhs = R64.T @ K64  # [d_out, d_in]
    # ΔW A = rhs  <=>  A ΔWᵀ = rhsᵀ (A symmetric)
    return torch.linalg.solve(A, rhs.T).T


# ------------------------------------------------------------------------------------------------ values
def pmet_places(lm: "LM", layer: int) -> list[locate.Place]:
    """PMET's places at the last critical layer ``layer``: the FFN output (first, so that
    :attr:`~editlens.edit.locate.ValueResult.target` is ``m* = m₀ + δ_mlp``) and the MHSA output, optimised jointly
    by :func:`editlens.edit.locate.optimise_values`."""
    return [locate.Place.mlp(lm, layer), locate.Place.attention(lm, layer)]


# ------------------------------------------------------------------------------------------------ method
@dataclass
class PMETHParams(LocateHParams):
    """PMET hyperparameters (shared ones: :class:`~editlens.edit.hparams.LocateHParams`).

    Attributes:
        layers: the critical layers (FFN output projections edited); values are optimised at the last one.
            ``"trace"``: chosen as MEMIT's (:func:`editlens.localize.trace_layers`; docs/localize.md).
        mom2_update_weight: λ multiplying ``C = E[k kᵀ]``.
    """

    layers: list[int] | str = field(default_factory=lambda: [4, 5, 6, 7, 8])
    mom2_update_weight: float = 1.5e4
    clamp_norm_factor: float = 1.0
    RANGES: ClassVar[Mapping[str, Any]] = {"mom2_update_weight": POSITIVE}

    ARCH_DEFAULTS: ClassVar[Mapping[str, Any]] = {
        "tiny": dict(layers=[1, 2], clamp_norm_factor=4.0, **TINY),
        "smollm2-135m": dict(layers=[3, 4, 5, 6, 7], clamp_norm_factor=1.0),
        "gpt2-xl": dict(layers=[13, 14, 15, 16, 17], clamp_norm_factor=0.75, mom2_update_weight=2e4),
        "gpt2": dict(layers=[3, 4, 5, 6, 7], clamp_norm_factor=0.75),
        "gpt-j": dict(layers=[3, 4, 5, 6, 7, 8], clamp_norm_factor=0.75, v_lr=0.2, v_num_grad_steps=30,
                      kl_factor=1.0),
        "gptj": dict(layers=[3, 4, 5, 6, 7, 8], clamp_norm_factor=0.75, v_lr=0.2, v_num_grad_steps=30,
                     kl_factor=1.0),
        "llama": dict(layers=[4, 5, 6, 7, 8], clamp_norm_factor=1.0),
    }

    def validate(self) -> None:
        super().validate()
        if not self.layers:
            raise HParamsError(f"hyperparameter 'layers' of method {self.method!r} must name at least one layer")
        no_duplicate_layers(self.method, self.layers)
        if self.mom2_update_weight <= 0:
            raise HParamsError(f"hyperparameter 'mom2_update_weight' of method {self.method!r} must be > 0")


@register_method("pmet")
class PMET(Editor):
    """PMET: joint MHSA+FFN value optimisation, FFN-only MEMIT-style update."""

    hparams_class = PMETHParams
    supports_evk_align = True  # passed to the joint value optimisation (extra_loss)

    def apply(self, lm: "LM", cases, hparams: PMETHParams, *, evk_align: Any = None, progress: bool = True,
              sequence: SequenceState | None = None) -> Edit:
        hp = hparams
        st = locate.setup_edit(lm, cases, hp, hp.layers, self.name, sequence, progress)
        layers, requests, cov, prefixes = st.layers, st.requests, st.cov, st.prefixes
        L = layers[-1]
        vals = locate.optimise_values(lm, requests, pmet_places(lm, L), st.values, extra_loss=evk_align,
                                      progress=progress)
        target = vals.target  # m* = m₀ + δ_mlp (the first place); the MHSA part is discarded
        mlp_L = lm.arch.mlp_out_at(L)
        snap = self.snapshot_for(sequence)
        deltas: dict[str, torch.Tensor] = {}
        diag: dict[str, Any] = {**vals.losses, **st.diagnostics}
        diag["pmet/delta_attn_norm"] = float(vals.deltas[1].norm(dim=-1).mean())
        diag["pmet/delta_mlp_norm"] = float(vals.deltas[0].norm(dim=-1).mean())
        try:
            for i, layer in enumerate(layers):
                K = locate.compute_keys(lm, layer, requests, prefixes, batch_tokens=hp.batch_tokens)
                cur = locate.capture_at_subject(lm, requests, mlp_L, kind="output")
                R = target - cur
                delta = pmet_layer_update(K, R, hp.mom2_update_weight * cov[layer], len(layers) - i)
                name = lm.arch.mlp_out_at(layer)
                self.add_now(lm, snap, name, delta)
                deltas[name] = delta
                diag[f"delta_norm/{layer}"] = locate.fro(delta)
                diag[f"dk_norm/{layer}"] = dk_norm(delta, cov[layer])
                diag[f"resid_norm/{layer}"] = float(R.norm(dim=-1).mean())
            after = locate.capture_at_subject(lm, requests, mlp_L, kind="output")
            diag["pmet/resid_after"] = float((target - after).norm(dim=-1).mean())
        except BaseException:
            if sequence is None:
                snap.restore()
            raise
        diag["layers"] = list(layers)
        diag["evk_align"] = evk_settings(evk_align)
        return self.weight_edit(lm, cases, hp, deltas, diag, sequence, snapshot=snap, applied=True)
