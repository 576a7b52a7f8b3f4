"""EMMET: Equality-constrained Mass Model Editing in a Transformer (Gupta, Sajnani & Anumanchipalli, 2024).

EMMET solves the preservation-memorisation objective with *equality* constraints on the edited keys::

    min_ΔW  ‖ΔW K₀‖²   s.t.   (W + ΔW) K_E = V_E

whose closed form is (Lagrange multipliers) ``ΔW = R (K_Eᵀ C₀⁻¹ K_E)⁻¹ K_Eᵀ C₀⁻¹`` with ``R = V_E − W K_E`` and
``C₀ = λ C`` (``C = E[k kᵀ]``, :mod:`editlens.edit.stats`; λ = ``mom2_update_weight``). The edited keys then map
exactly to their targets: ``ΔW K_E = R``.

Ill-conditioning: in large batches ``D = K_Eᵀ C₀⁻¹ K_E`` becomes ill-conditioned (near-duplicate keys); as in the
paper, a multiple of the identity is added, ``D + emmet_lambda·I`` (``emmet_lambda`` = 0 gives the exact
equality constraint; the default 0.1 is the paper's value, which relaxes the constraint slightly — the
``fit_error/<l>`` diagnostic reports ‖ΔW K − R‖/‖R‖). The solve is done in float64 with Cholesky-free
``torch.linalg.solve``.

Multi-layer: EMMET is applied over MEMIT's layer range with MEMIT's residual spreading
(:class:`~editlens.edit.memit.MultiLayerEditor`), as in the paper's batched experiments.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from editlens.edit.base import register_method, NON_NEGATIVE, POSITIVE
from editlens.edit.memit import MEMITHParams, MultiLayerEditor
from editlens.errors import HParamsError


def emmet_update(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float = 1.0,
                 emmet_lambda: float = 0.0) -> torch.Tensor:
    """``ΔW = R (K_Eᵀ C₀⁻¹ K_E + μ I)⁻¹ K_Eᵀ C₀⁻¹`` with ``C₀ = lam·C`` and ``μ = emmet_lambda`` (float64).

    With ``μ = 0``: ``ΔW K_E = R`` exactly (equality constraint) and ``ΔW`` has the smallest ``tr(ΔW C ΔWᵀ)``
    among all such updates.

    Args:
        K: ``[d_in, n]`` edited keys; R: ``[d_out, n]`` residuals ``V_E − W K_E``; C: ``[d_in, d_in]``.
    """
    K64, R64 = K.double(), R.double()
    C0 = lam * C.to(device=K64.device, dtype=torch.float64)
    CinvK = torch.linalg.solve(C0, K64)  # C₀⁻¹ K  [d_in, n]
    D = K64.T @ CinvK  # [n, n]
    if emmet_lambda:
        D = D + emmet_lambda * torch.eye(D.shape[0], dtype=D.dtype, device=D.device)
    # ΔW = R D⁻¹ (C₀⁻¹K)ᵀ   (C₀ symmetric)
    return torch.linalg.solve(D.T, R64.T).T @ CinvK.T


@dataclass
class EMMETHParams(MEMITHParams):
    """EMMET hyperparameters (MEMIT's plus ``emmet_lambda``).

    Attributes:
        emmet_lambda: μ added to ``K_Eᵀ C₀⁻¹ K_E`` against ill-conditioning (0 = exact equality).
    """

    emmet_lambda: float = 0.1
    RANGES = {"emmet_lambda": NON_NEGATIVE, "mom2_update_weight": POSITIVE}

    def validate(self) -> None:
        super().validate()
        if self.emmet_lambda < 0:
            raise HParamsError(f"hyperparameter 'emmet_lambda' of method {self.method!r} must be >= 0")
        if self.mom2_update_weight <= 0:
            raise HParamsError(f"hyperparameter 'mom2_update_weight' of method {self.method!r} must be > 0")


@register_method("emmet")
class EMMET(MultiLayerEditor):
    """EMMET (equality-constrained batched editing)."""

    hparams_class = EMMETHParams

    def solve(self, lm, layer, K, R, C, hparams, sequence):
        return emmet_update(K, R, C, hparams.mom2_update_weight, hparams.emmet_lambda)
