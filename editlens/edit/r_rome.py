"""R-ROME (Gupta, Baskaran, Anumanchipalli, 2024, "Rebuilding ROME: Resolving Model Collapse during Sequential
Model Editing").

ROME's reference code builds the rank-one update from two different keys: its direction ``C⁻¹k̄`` from the key
averaged over context prefixes ``k̄``, its scale and its target from the key of the unprefixed prompt ``k₀``
(``ΔW = (v* − W k₀)(C⁻¹k̄)ᵀ / ((C⁻¹k̄)ᵀ k₀)``). When ``k₀`` is nearly orthogonal to ``C⁻¹k̄`` the denominator is
small and the update huge: the paper traces ROME's *disabling edits* (one edit that breaks the model, the
"collapse" of sequential ROME) to this asymmetry and fixes it by using the same key in both places:

    ΔW = (v* − W k̄) (C⁻¹k̄)ᵀ / ((C⁻¹k̄)ᵀ k̄),      v* = v₀ + δ,   so that (W + ΔW) k̄ = v*

(``v₀`` the original MLP output at the unprefixed prompt, ``δ`` the optimised value change; the value
optimisation is ROME's, unchanged). Here this is ROME with ``update_key="consistent"``
(:func:`editlens.edit.rome.rome_key_value`); everything else — layers, statistics, value objective, one fact after
the other for a batch, sequential editing, undo — is ROME's.
"""
from __future__ import annotations

from dataclasses import dataclass

from editlens.edit.base import register_method
from editlens.edit.rome import ROME, ROMEHParams
from editlens.errors import HParamsError


@dataclass
class RROMEHParams(ROMEHParams):
    """R-ROME hyperparameters: ROME's (:class:`~editlens.edit.rome.ROMEHParams`) with ``update_key`` fixed to
    ``"consistent"`` (another key is method ``rome``)."""

    update_key: str = "consistent"

    def validate(self) -> None:
        super().validate()
        if self.update_key != "consistent":
            raise HParamsError(f"hyperparameter 'update_key' of method {self.method!r} must be 'consistent' (R-ROME's "
                               f"key, got {self.update_key!r}); use method 'rome' with update_key={self.update_key!r}")


@register_method("r-rome")
class RROME(ROME):
    """R-ROME: ROME with the consistent key (the prefix-averaged key in the update's numerator and denominator)."""

    hparams_class = RROMEHParams
