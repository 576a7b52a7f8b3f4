"""PRUNE: perturbation restraint on the accumulated update of sequential editing (Ma et al., ICLR 2025).

Paper: Jun-Yu Ma, Hong Wang, Hao-Xiang Xu, Zhen-Hua Ling, Jia-Chen Gu, "Perturbation-Restrained Sequential
Model Editing" (ICLR 2025, arXiv 2405.16821).

Sequential editing accumulates updates ``Δ = Σ_t ΔW_t`` on a weight ``W``; the paper shows that the condition
number of the edited matrix ``W + Δ`` (and with it the perturbation of the model's general abilities) grows with
the number of edits, driven by the singular values of ``Δ`` that become larger than those of ``W``. PRUNE
restrains them: with ``Δ = U diag(σ̄) Vᵀ`` and ``σ_max`` the largest singular value of the original ``W``, every
``σ̄_i > σ_max`` is replaced by

    F(σ̄_i) = log_α(σ̄_i) − log_α(σ_max) + σ_max          (α > 1)

so the large singular values of the update grow only logarithmically and the condition number of
``W + Δ`` stays bounded, while singular values ``≤ σ_max`` (which carry most of the edits' information) are
untouched (:func:`prune_restrain`). The edited weight after every step is ``W + F(Δ)``.

Here the per-step update ``ΔW_t`` is MEMIT's (:mod:`editlens.edit.memit`), the paper's strongest base. In a
sequential run (:func:`editlens.edit.edit_sequential`) the original weights come from the run's snapshot and
``σ_max(W)`` is computed once per layer and kept in the run state; after each step the accumulated update of
every edited layer (current weight − original + this step's ΔW) is restrained. A single (non-sequential) edit
restrains that one update.

Deviations (documented):

* ``F`` is applied as ``min(σ̄, F(σ̄))``: for ``σ_max < 1/ln α`` (tiny random models; never for real LLM
  matrices, whose ``σ_max`` is far larger) ``F(σ̄)`` can exceed ``σ̄`` just above ``σ_max``, which would
  *increase* the perturbation; the min keeps PRUNE a restraint.
* Only the singular directions that are restrained are changed: ``F(Δ) = Δ + U_b diag(F(σ̄_b) − σ̄_b) V_bᵀ``,
  so the rest of ``Δ`` is kept bit for bit (the authors reconstruct the whole matrix from its numerical-rank
  truncated SVD, equal up to round-off).
* Default ``α = 1.2`` (the authors' released default; the paper tunes α per method/model/dataset).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from editlens.edit.base import Edit, SequenceState, register_method, Range
from editlens.edit.memit import MEMITHParams, MultiLayerEditor, memit_update
from editlens.errors import HParamsError
from editlens.lm.arch import is_conv1d, weight_param, weight_view


def prune_F(sigma: torch.Tensor, sigma_max: float, alpha: float = 1.2) -> torch.Tensor:
    """The paper's restraint ``F(σ) = log_α(σ) − log_α(σ_max) + σ_max`` for ``σ > σ_max``, identity below.

    Applied as ``min(σ, F(σ))`` above ``σ_max`` (see the module docstring).
    """
    if not alpha > 1.0:
        raise HParamsError(f"PRUNE alpha must be > 1 (the base of the logarithm), got {alpha}")
    if not sigma_max > 0:
        return sigma.clone()
    s = sigma.double()
    f = torch.log(s.clamp_min(1e-300) / sigma_max) / math.log(alpha) + sigma_max
    out = torch.where(s > sigma_max, torch.minimum(s, f), s)
    return out.to(sigma.dtype)


def largest_singular_value(W: torch.Tensor) -> float:
    """``σ_max(W)`` (spectral norm), computed in float64."""
    return float(torch.linalg.matrix_norm(W.detach().double(), ord=2))


def prune_restrain(W: torch.Tensor | None, Delta: torch.Tensor, alpha: float = 1.2, *,
                   sigma_max: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Restrain the singular values of the accumulated update ``Delta`` that exceed ``σ_max(W)``.

    Args:
        W: the original (unedited) weight; may be ``None`` when ``sigma_max`` is given.
        Delta: the accumulated update (same shape as ``W``).
        alpha: base of the logarithm in ``F`` (> 1).
        sigma_max: ``σ_max(W)`` when already known (saves an SVD of ``W``).

    Returns:
        ``(restrained Delta, info)`` where the restrained update has the dtype/device of ``Delta`` and ``info``
        holds ``sigma_max_W``, ``n_restrained`` (how many singular values were above ``σ_max``),
        ``top_sv_before`` and ``top_sv_after``.
    """
    if W is not None and tuple(W.shape) != tuple(Delta.shape):
        raise HParamsError(f"PRUNE: update of shape {tuple(Delta.shape)} does not match weight {tuple(W.shape)}")
    if sigma_max is None:
        if W is None:
            raise HParamsError("PRUNE: give the original weight W or its sigma_max")
        sigma_max = largest_singular_value(W)
    D = Delta.detach().double()
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    big = S > sigma_max
    info = {"sigma_max_W": float(sigma_max), "n_restrained": int(big.sum()),
            "top_sv_before": float(S[0]) if S.numel() else 0.0}
    if not bool(big.any()):
        info["top_sv_after"] = info["top_sv_before"]
        return Delta.clone(), info
    S_new = prune_F(S, sigma_max, alpha)
    corr = (U[:, big] * (S_new[big] - S[big])) @ Vh[big, :]
    out = (D + corr).to(dtype=Delta.dtype, device=Delta.device)
    info["top_sv_after"] = float(S_new.max())
    return out, info


@dataclass
class PRUNEHParams(MEMITHParams):
    """PRUNE hyperparameters: MEMIT's (:class:`~editlens.edit.memit.MEMITHParams`) plus ``alpha``.

    Attributes:
        alpha: base of the logarithm in ``F`` (> 1; smaller restrains less). Default 1.2.
    """

    method: ClassVar[str] = "prune"
    alpha: float = 1.2
    RANGES = {"alpha": Range(1.0, lo_open=True)}

    def validate(self) -> None:
        super().validate()
        if not self.alpha > 1.0:
            raise HParamsError(f"hyperparameter 'alpha' of method 'prune' must be > 1, got {self.alpha}")


@register_method("prune")
class PRUNE(MultiLayerEditor):
    """PRUNE on MEMIT: after every edit step, restrain the accumulated update's large singular values."""

    hparams_class = PRUNEHParams

    def solve(self, lm, layer, K, R, C, hparams, sequence):
        return memit_update(K, R, C, hparams.mom2_update_weight)

    def apply(self, lm, cases, hparams, *, evk_align=None, progress=True, sequence=None) -> Edit:
        hp = hparams
        run = sequence if sequence is not None else SequenceState()
        try:
            inner = super().apply(lm, cases, hp, evk_align=evk_align, progress=progress, sequence=run)
            diag = dict(inner.diagnostics)
            sig: dict[str, float] = run.data.setdefault("prune/sigma_max", {})
            totals: dict[str, torch.Tensor] = {}
            for layer in diag.get("layers", []):
                name = lm.arch.mlp_out_at(layer)
                module = lm.module(name)
                param = weight_param(module)
                W0 = run.snapshot.original(name)
                W0v = W0.t() if is_conv1d(module) else W0
                if name not in sig:
                    sig[name] = largest_singular_value(W0v)
                total = weight_view(module).detach().double() - W0v.double()
                restrained, info = prune_restrain(None, total, hp.alpha, sigma_max=sig[name])
                with torch.no_grad():
                    new = (W0v.double() + restrained).to(param.dtype)
                    param.copy_(new.t() if is_conv1d(module) else new)
                totals[name] = restrained
                diag[f"prune/n_restrained/{layer}"] = info["n_restrained"]
                diag[f"prune/top_sv_before/{layer}"] = info["top_sv_before"]
                diag[f"prune/top_sv_after/{layer}"] = info["top_sv_after"]
                diag[f"prune/sigma_max_W/{layer}"] = info["sigma_max_W"]
                diag[f"prune/total_norm/{layer}"] = float(restrained.norm())
        except BaseException:
            if sequence is None:
                run.snapshot.restore()
            raise
        return self.weight_edit(lm, cases, hp, totals, diag, sequence, snapshot=run.snapshot, applied=True)
