"""AlphaEdit: null-space constrained knowledge editing (Fang et al., 2025).

AlphaEdit keeps MEMIT's targets and residual spreading (:class:`~editlens.edit.memit.MultiLayerEditor`) but
projects the update on the null space of the preserved keys ``K₀`` so that ``ΔW K₀ ≈ 0``:

* ``P = Û Ûᵀ`` where ``Û`` are the eigenvectors of ``K₀K₀ᵀ`` (here ``C = E[k kᵀ]`` from
  :mod:`editlens.edit.stats`, i.e. ``K₀K₀ᵀ`` divided by the key count, as in the paper's implementation) whose
  eigenvalues are below ``nullspace_threshold`` (:func:`nullspace_projection`). ``nullspace_mode="absolute"``
  (default, the paper's 1e-2 on the mean second moment) compares eigenvalues with the threshold directly;
  ``"relative"`` compares them with ``threshold × λ_max`` (scale-free, for models whose keys are much larger
  or smaller than GPT-2's/LLaMA's).
* ``ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹`` (paper eq. 14 with α = ``l2``, 1 in the paper), where ``K_p`` are
  the keys of earlier edits in a sequential run, accumulated as ``K_p K_pᵀ`` per layer in the run's state
  (:func:`alphaedit_update`). For any ``v`` with ``P v = 0`` the matrix maps ``v ↦ α v``, hence ``ΔW v = 0``:
  the update has no component on the preserved subspace.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from editlens.edit.base import register_method, POSITIVE
from editlens.edit.hparams import TINY
from editlens.edit.memit import MEMITHParams, MultiLayerEditor
from editlens.errors import HParamsError


def nullspace_projection(C: torch.Tensor, threshold: float = 1e-2, mode: str = "absolute") -> torch.Tensor:
    """Projection ``P = Û Ûᵀ`` on the eigenvectors of ``C`` with eigenvalue ``< threshold`` (float64).

    ``mode="relative"`` uses ``threshold × max eigenvalue``.
    """
    if mode not in ("absolute", "relative"):
        raise HParamsError(f"nullspace_mode must be 'absolute' or 'relative', got {mode!r}")
    C64 = C.double()
    C64 = (C64 + C64.T) / 2
    evals, evecs = torch.linalg.eigh(C64)
    thr = threshold * evals.max() if mode == "relative" else torch.tensor(threshold, dtype=evals.dtype)
    U = evecs[:, evals < thr]
    return U @ U.T


def alphaedit_update(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, Kp_cov: torch.Tensor | None = None,
                     l2: float = 1.0) -> torch.Tensor:
    """``ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + l2·I)⁻¹`` (AlphaEdit eq. 14), float64.

    Args:
        K: ``[d_in, n]`` keys; R: ``[d_out, n]`` residuals; P: ``[d_in, d_in]`` null-space projection;
        Kp_cov: ``K_p K_pᵀ`` of earlier edits (``None`` = 0); l2: α.
    """
    K64, R64 = K.double(), R.double()
    P64 = P.to(device=K64.device, dtype=torch.float64)
    A = K64 @ K64.T
    if Kp_cov is not None:
        A = A + Kp_cov.to(device=K64.device, dtype=torch.float64)
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    M = A @ P64 + l2 * eye
    # ΔW M = R Kᵀ P  <=>  Mᵀ ΔWᵀ = P K Rᵀ
    return torch.linalg.solve(M.T, P64 @ K64 @ R64.T).T


@dataclass
class AlphaEditHParams(MEMITHParams):
    """AlphaEdit hyperparameters (MEMIT's, with ``mom2_update_weight`` unused).

    Attributes:
        nullspace_threshold: eigenvalue threshold of the null space (paper: 1e-2).
        nullspace_mode: ``"absolute"`` or ``"relative"`` (× largest eigenvalue).
        l2: α, the ridge of eq. 14 (paper: 1).
    """

    nullspace_threshold: float = 1e-2
    nullspace_mode: str = "absolute"
    l2: float = 1.0
    RANGES: ClassVar[Mapping[str, Any]] = {"nullspace_threshold": POSITIVE, "l2": POSITIVE}

    ARCH_DEFAULTS: ClassVar[Mapping[str, Any]] = {
        "tiny": dict(layers=[1, 2], **TINY),
        "smollm2-135m": dict(layers=[4, 5, 6, 7, 8], clamp_norm_factor=0.75),
        "gpt2-xl": dict(layers=[13, 14, 15, 16, 17], clamp_norm_factor=0.75),
        "gpt2": dict(layers=[3, 4, 5, 6, 7]),
        "gpt-j": dict(layers=[3, 4, 5, 6, 7, 8], v_num_grad_steps=25),
        "gptj": dict(layers=[3, 4, 5, 6, 7, 8], v_num_grad_steps=25),
        "llama": dict(layers=[4, 5, 6, 7, 8], v_num_grad_steps=25, l2=10.0),
    }

    def validate(self) -> None:
        super().validate()
        if self.nullspace_mode not in ("absolute", "relative"):
            raise HParamsError(f"hyperparameter 'nullspace_mode' of method {self.method!r} must be 'absolute' or "
                               f"'relative', got {self.nullspace_mode!r}")
        if self.nullspace_threshold <= 0 or self.l2 <= 0:
            raise HParamsError(f"method {self.method!r}: nullspace_threshold and l2 must be > 0")


@register_method("alphaedit")
class AlphaEdit(MultiLayerEditor):
    """AlphaEdit (MEMIT with null-space projected updates; accumulates previous keys in sequential runs)."""

    hparams_class = AlphaEditHParams

    def _projection(self, layer: int, C: torch.Tensor, hp: AlphaEditHParams, sequence) -> torch.Tensor:
        store = sequence.data.setdefault("alphaedit_P", {}) if sequence is not None else {}
        if layer not in store:
            store[layer] = nullspace_projection(C, hp.nullspace_threshold, hp.nullspace_mode)
        return store[layer]

    def solve(self, lm, layer, K, R, C, hparams, sequence):
        P = self._projection(layer, C, hparams, sequence)
        kp = sequence.data.get("alphaedit_KpKp", {}).get(layer) if sequence is not None else None
        self._last_P = P
        return alphaedit_update(K, R, P, kp, hparams.l2)

    def after_layer(self, lm, layer, K, hparams, sequence, diag):
        if sequence is not None:
            acc = sequence.data.setdefault("alphaedit_KpKp", {})
            kk = K @ K.T
            acc[layer] = kk if layer not in acc else acc[layer] + kk  # fixed size: [d_in, d_in] per layer

    def extra_diagnostics(self, lm, layer, delta, K, R, hparams, sequence, diag):
        P = getattr(self, "_last_P", None)
        if P is not None:
            diag[f"nullspace_dim/{layer}"] = int(round(float(torch.trace(P))))
