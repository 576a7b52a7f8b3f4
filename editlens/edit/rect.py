"""RECT: MEMIT-style editing with the update sparsified by relative change (Gu et al., EMNLP 2024).

Paper: Jia-Chen Gu, Hao-Xiang Xu, Jun-Yu Ma, Pan Lu, Zhen-Hua Ling, Kai-Wei Chang, Nanyun Peng, "Model Editing
Harms General Abilities of Large Language Models: Regularization to the Rescue" (EMNLP 2024, arXiv 2401.04700).

RECT ("RElative Change in weighT") regularises the update ``ΔW`` of a locate-then-edit method: for every element
it computes the relative change ``δ_ij = |ΔW_ij| / |W_ij|``, keeps the top-k% elements with the largest ``δ``
(the "principal editing information") with their update values and sets all other elements of ``ΔW`` to zero
(:func:`rect_mask`). The paper's default keeps 20% (it zeroes the 80% smallest relative changes; its Figure 6
illustrates k = 25).

Here the underlying update is MEMIT's (:mod:`editlens.edit.memit`: keys, value optimisation, closed form over
the edited layers, all of MEMIT's hyperparameters, same per-architecture defaults) plus ``keep_fraction``.
Each layer's ``ΔW`` is masked as soon as MEMIT's closed form produces it, relative to that layer's weight
before the update; MEMIT's loop then recomputes the remaining residual with the masked update in place, so the
following layers see what the mask removed (the RECT paper masks the finished update of ROME/MEMIT and does not
specify the interaction with MEMIT's layer loop; for a single layer both readings coincide). In a sequential
run every step's update is masked relative to the current (already edited) weight.

Conventions and deviations:

* ``W_ij = 0`` gives an infinite relative change: such an element is kept first (``ΔW_ij = 0`` as well counts as
  no change). Ties in ``δ`` are broken by flat index (deterministic).
* The number of kept elements is ``round(keep_fraction * numel)`` per matrix, exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from editlens.edit.base import register_method, FRACTION
from editlens.edit.memit import MEMITHParams, MultiLayerEditor, memit_update
from editlens.errors import HParamsError
from editlens.lm.arch import weight_view


def rect_scores(W: torch.Tensor, dW: torch.Tensor) -> torch.Tensor:
    """Relative change ``|dW| / |W|`` (float64; ``inf`` where ``W == 0 != dW``, ``0`` where both are 0)."""
    if W.shape != dW.shape:
        raise HParamsError(f"RECT: update of shape {tuple(dW.shape)} does not match weight {tuple(W.shape)}")
    a = dW.detach().double().abs()
    b = W.detach().to(device=a.device, dtype=torch.float64).abs()
    s = a / b
    return torch.where(a == 0, torch.zeros_like(s), s)


def rect_n_keep(numel: int, keep_fraction: float) -> int:
    """How many elements RECT keeps: ``round(keep_fraction * numel)``."""
    if not 0.0 <= keep_fraction <= 1.0:
        raise HParamsError(f"RECT keep_fraction must be in [0, 1], got {keep_fraction}")
    return int(round(keep_fraction * numel))


def rect_mask(W: torch.Tensor, dW: torch.Tensor, keep_fraction: float = 0.2) -> torch.Tensor:
    """RECT's regularised update: ``dW`` with all but the top ``keep_fraction`` relative changes set to zero.

    Args:
        W: the original weight (any shape, same as ``dW``).
        dW: the update.
        keep_fraction: share of elements kept (paper default 0.2).

    Returns:
        A tensor like ``dW`` (same dtype and device) where exactly ``round(keep_fraction * numel)`` positions —
        those with the largest ``|dW_ij| / |W_ij|`` — hold their ``dW`` values and all others are 0.
    """
    n = dW.numel()
    k = rect_n_keep(n, keep_fraction)
    out = torch.zeros_like(dW)
    if k == 0:
        return out
    if k == n:
        return dW.clone()
    scores = rect_scores(W, dW).reshape(-1)
    # stable descending order: ties keep the lower flat index first
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    flat = out.view(-1)
    flat[order.to(flat.device)] = dW.reshape(-1)[order.to(dW.device)]
    return out


@dataclass
class RECTHParams(MEMITHParams):
    """RECT hyperparameters: MEMIT's (:class:`~editlens.edit.memit.MEMITHParams`) plus ``keep_fraction``.

    Attributes:
        keep_fraction: share of each update matrix kept, by largest relative change (paper: 0.2).
    """

    method: ClassVar[str] = "rect"
    keep_fraction: float = 0.2
    RANGES = {"keep_fraction": FRACTION}

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.keep_fraction <= 1.0:
            raise HParamsError(f"hyperparameter 'keep_fraction' of method 'rect' must be in (0, 1], got "
                               f"{self.keep_fraction}")


@register_method("rect")
class RECT(MultiLayerEditor):
    """RECT: MEMIT whose per-layer update keeps only the top-k% relative changes."""

    hparams_class = RECTHParams

    def solve(self, lm, layer, K, R, C, hparams, sequence):
        delta = memit_update(K, R, C, hparams.mom2_update_weight)
        W = weight_view(lm.module(lm.arch.mlp_out_at(layer))).detach()
        return rect_mask(W.to(delta.device), delta, hparams.keep_fraction)

    def extra_diagnostics(self, lm, layer, delta, K, R, hparams, sequence, diag: dict[str, Any]) -> None:
        diag[f"rect/kept/{layer}"] = int((delta != 0).sum())
