"""ROME: Rank-One Model Editing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT").

One fact at a time is written into the MLP output projection ``W`` of one layer (``arch.mlp_out_at(layer)``):

1. key ``k*`` — the projection's input at the last subject token, averaged over context-prefixed prompts (eq. 3);
2. value ``v*`` — ``W k* + δ`` where ``δ`` is the change of the MLP output at the last subject token optimised for
   the target (NLL over prefixed prompts + essence KL + decay, clamped; :func:`editlens.edit.locate.optimise_values`
   at :meth:`~editlens.edit.locate.Place.mlp`);
3. the rank-one closed form (eq. 2) ``ΔW = (v* − W k*) (C⁻¹ k*)ᵀ / ((C⁻¹ k*)ᵀ k*)`` with ``C = E[k kᵀ]`` from
   :mod:`editlens.edit.stats` (:func:`rome_update`), which makes ``(W + ΔW) k* = v*`` exactly while changing
   ``W`` least in the metric of ``C``.

Several cases are applied one after the other (each sees the previous updates), as ROME is a single-fact
method. ``mom2_update_weight`` (λ) multiplies ``C``; the rank-one formula is invariant to it, so it only matters
together with ``mom2_ridge`` (a ridge ``ε·tr(C)/d·I`` added before solving, 0 by default).

Deviation (documented): ROME's reference code sets ``v* = v₀ + δ`` at the unprefixed prompt; here
``v* = W k* + δ`` so that every context's output moves by exactly the optimised ``δ`` at ``k*``.

Default layers: GPT-2-XL 17, GPT-J 5, LLaMA-family 5 (the papers' causal-tracing choices); SmolLM2-135M 4 (early
middle layers 3–8 all succeed on its known facts; 4 had the best edit/locality balance in our trials); tiny
random models 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch

from editlens.edit import locate
from editlens.edit.base import Edit, Editor, register_method, NON_NEGATIVE, POSITIVE
from editlens.edit.hparams import TINY, LocateHParams
from editlens.edit.stats import dk_norm
from editlens.errors import HParamsError
from editlens.lm.arch import weight_view


def rome_update(W: torch.Tensor, C: torch.Tensor, k_star: torch.Tensor, v_star: torch.Tensor, *,
                c_is_inverse: bool = False) -> torch.Tensor:
    """Rank-one update ``ΔW = (v* − W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*)`` (ROME eq. 2), in float64.

    Args:
        W: ``[out, in]`` weight. C: ``[in, in]`` second moment (or its inverse with ``c_is_inverse``).
        k_star: ``[in]``. v_star: ``[out]``.

    Returns:
        ``ΔW [out, in]`` (float64) with ``(W + ΔW) k* = v*``.
    """
    W64, k, v = W.double(), k_star.double().reshape(-1), v_star.double().reshape(-1)
    C64 = C.to(device=W64.device, dtype=torch.float64)
    u = C64 @ k if c_is_inverse else torch.linalg.solve(C64, k)
    return torch.outer(v - W64 @ k, u) / (u @ k)


@dataclass
class ROMEHParams(LocateHParams):
    """ROME hyperparameters (see :class:`~editlens.edit.hparams.LocateHParams` for the shared ones).

    Attributes:
        layer: the edited layer.
        mom2_update_weight: λ multiplying ``C`` (no effect on the rank-one update unless ``mom2_ridge > 0``).
        mom2_ridge: relative ridge ``ε`` added as ``ε·tr(C)/d·I`` before solving (0: none).
    """

    layer: int = 5
    mom2_update_weight: float = 1.5e4
    mom2_ridge: float = 0.0
    RANGES: ClassVar[Mapping[str, Any]] = {"mom2_update_weight": POSITIVE, "mom2_ridge": NON_NEGATIVE}

    ARCH_DEFAULTS: ClassVar[Mapping[str, Any]] = {
        "tiny": dict(layer=1, **TINY),
        "smollm2-135m": dict(layer=4, clamp_norm_factor=4.0),
        "gpt2-xl": dict(layer=17, clamp_norm_factor=4.0),
        "gpt2": dict(layer=5),
        "gpt-j": dict(layer=5), "gptj": dict(layer=5),
        "llama": dict(layer=5),
    }

    def validate(self) -> None:
        super().validate()
        if self.layer < 0:
            raise HParamsError(f"hyperparameter 'layer' of method {self.method!r} must be >= 0")
        if self.mom2_update_weight <= 0 or self.mom2_ridge < 0:
            raise HParamsError(f"method {self.method!r}: mom2_update_weight must be > 0 and mom2_ridge >= 0")


@register_method("rome")
class ROME(Editor):
    """ROME (rank-one, one fact at a time)."""

    hparams_class = ROMEHParams
    supports_evk_align = True  # passed to the value optimisation (optimise_values' extra_loss)

    def apply(self, lm, cases, hparams: ROMEHParams, *, evk_align=None, progress=True, sequence=None) -> Edit:
        hp = hparams
        st = locate.setup_edit(lm, cases, hp, [hp.layer], self.name, sequence, progress)
        requests, cov, prefixes = st.requests, st.cov, st.prefixes
        C = hp.mom2_update_weight * cov[hp.layer]
        if hp.mom2_ridge > 0:
            C = C + hp.mom2_ridge * torch.trace(C) / C.shape[0] * torch.eye(C.shape[0], device=C.device,
                                                                          dtype=C.dtype)
        name = lm.arch.mlp_out_at(hp.layer)
        places = [locate.Place.mlp(lm, hp.layer)]
        snap = self.snapshot_for(sequence)
        total = None
        diag: dict[str, Any] = {}
        losses: dict[str, list[float]] = {}
        try:
            for req in requests:
                k = locate.compute_keys(lm, hp.layer, [req], prefixes, batch_tokens=hp.batch_tokens)[0]
                vals = locate.optimise_values(lm, [req], places, st.values, extra_loss=evk_align, progress=progress)
                W = weight_view(lm.module(name)).detach()
                v_star = W.double() @ k.double() + vals.delta[0].double()
                delta = rome_update(W, C, k, v_star)
                self.add_now(lm, snap, name, delta)
                total = delta if total is None else total + delta
                for key, val in vals.losses.items():
                    losses.setdefault(key, []).append(val)
        except BaseException:
            if sequence is None:
                snap.restore()
            raise
        assert total is not None
        diag[f"delta_norm/{hp.layer}"] = locate.fro(total)
        diag[f"dk_norm/{hp.layer}"] = dk_norm(total, cov[hp.layer])
        for key, vs in losses.items():
            diag[key] = sum(vs) / len(vs)
        diag["layers"] = [hp.layer]
        return self.weight_edit(lm, cases, hp, {name: total}, diag, sequence, snapshot=snap, applied=True)
