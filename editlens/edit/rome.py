"""ROME: Rank-One Model Editing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT").

One fact at a time is written into the MLP output projection ``W`` of one layer (``arch.mlp_out_at(layer)``):

1. keys — the projection's input at the last subject token: ``k̄``, averaged over context-prefixed prompts
   (eq. 3), and ``k₀``, that of the unprefixed prompt;
2. value — ``δ``, the change of the MLP output at the last subject token optimised for the target (NLL over
   prefixed prompts + essence KL + decay, clamped; :func:`editlens.edit.locate.optimise_values` at
   :meth:`~editlens.edit.locate.Place.mlp`), so ``v* = v₀ + δ`` with ``v₀ = W k₀`` the original output at the
   unprefixed prompt;
3. the rank-one closed form (eq. 2) with ``C = E[k kᵀ]`` from :mod:`editlens.edit.stats` (:func:`rome_update`)::

       ΔW = (v − W k_pin) (C⁻¹ k̄)ᵀ / ((C⁻¹ k̄)ᵀ k_pin)        so that (W + ΔW) k_pin = v

   whose key and value are chosen by ``update_key`` (:data:`UPDATE_KEYS`):

   * ``"unprefixed"`` (default; what the public reference code of ROME computes: ``compute_u`` gives the direction
     ``C⁻¹k̄``, ``compute_v`` divides by ``k₀·C⁻¹k̄`` and takes ``v* − W k₀ = δ``): ``k_pin = k₀``, ``v = v*``. The
     update is pinned at the unprefixed key while its direction comes from the averaged one — the asymmetry that
     Gupta et al. (2024, "Rebuilding ROME") identify as the cause of ROME's disabling edits;
   * ``"consistent"`` (R-ROME, :mod:`editlens.edit.r_rome`): ``k_pin = k̄``, ``v = v*``: the same key ``k̄`` in the
     numerator and the denominator, ``(W + ΔW) k̄ = v₀ + δ``;
   * ``"mean"`` (editlens's ROME before issue 16): ``k_pin = k̄``, ``v = W k̄ + δ``: every context's output moves by
     exactly ``δ`` on average; ``ΔW = δ (C⁻¹k̄)ᵀ / (k̄ᵀ C⁻¹ k̄)``.

   For a projection with a bias the bias cancels in ``v − W k_pin − b`` (``v₀`` includes it), so it is left out.

Several cases are applied one after the other (each sees the previous updates, keys and values are recomputed on
the edited weights), as ROME is a single-fact method. ``mom2_update_weight`` (λ) multiplies ``C``; the rank-one
formula is invariant to it, so it only matters together with ``mom2_ridge`` (a ridge ``ε·tr(C)/d·I`` added before
solving, 0 by default).

The value objective is the reference code's by default (``v_decay="reference"``: ``‖δ‖/‖v₀‖²``;
``early_stop_on="total"``); editlens's earlier choices are ``v_decay="squared"``, ``early_stop_on="nll"``,
``update_key="mean"`` (see ``docs/methods.md``, "ROME as the reference computes it").

Default layers: GPT-2-XL 17, GPT-J 5, LLaMA-family 5 (the papers' causal-tracing choices); SmolLM2-135M 4 (early
middle layers 3–8 all succeed on its known facts; 4 had the best edit/locality balance in our trials); tiny
random models 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch

from editlens.edit import locate
from editlens.edit.base import Edit, Editor, register_method, NON_NEGATIVE, POSITIVE
from editlens.edit.hparams import TINY, LocateHParams, is_trace
from editlens.edit.stats import dk_norm
from editlens.errors import HParamsError
from editlens.lm.arch import weight_view


#: values of ``update_key`` (the first is ROME's default)
UPDATE_KEYS = ("unprefixed", "consistent", "mean")


def rome_update(W: torch.Tensor, C: torch.Tensor, k_star: torch.Tensor, v_star: torch.Tensor, *,
                c_is_inverse: bool = False, k_pin: torch.Tensor | None = None) -> torch.Tensor:
    """Rank-one update ``ΔW = (v* − W k_pin) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k_pin)`` (ROME eq. 2), in float64.

    With ``k_pin = k*`` (the default) this is the paper's equation, the least change of ``W`` in the metric of
    ``C`` with ``(W + ΔW) k* = v*``; ROME's reference code pins the update at the unprefixed key (``k_pin = k₀``)
    while its direction ``C⁻¹k*`` comes from the prefix-averaged key ``k*``.

    Args:
        W: ``[out, in]`` weight. C: ``[in, in]`` second moment (or its inverse with ``c_is_inverse``).
        k_star: ``[in]``, the key of the direction ``C⁻¹k*``. v_star: ``[out]``.
        k_pin: ``[in]``, the key at which ``(W + ΔW) k_pin = v*`` (default ``k_star``).

    Returns:
        ``ΔW [out, in]`` (float64) with ``(W + ΔW) k_pin = v*``.
    """
    W64 = W.double()
    k = k_star.to(device=W64.device, dtype=torch.float64).reshape(-1)  # operands join W on its device
    v = v_star.to(device=W64.device, dtype=torch.float64).reshape(-1)
    kp = k if k_pin is None else k_pin.to(device=W64.device, dtype=torch.float64).reshape(-1)
    C64 = C.to(device=W64.device, dtype=torch.float64)
    u = C64 @ k if c_is_inverse else torch.linalg.solve(C64, k)
    return torch.outer(v - W64 @ kp, u) / (u @ kp)


def rome_key_value(W: torch.Tensor, k_mean: torch.Tensor, k_unprefixed: torch.Tensor, delta: torch.Tensor,
                   update_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_pin, v)`` of :func:`rome_update` for an ``update_key`` of :data:`UPDATE_KEYS` (float64; see the
    module docstring): ``v = W k₀ + δ`` pinned at ``k₀`` (``"unprefixed"``) or ``k̄`` (``"consistent"``), or
    ``v = W k̄ + δ`` pinned at ``k̄`` (``"mean"``)."""
    W64 = W.double()
    k_bar, k0, d = (t.to(device=W64.device, dtype=torch.float64).reshape(-1) for t in (k_mean, k_unprefixed, delta))
    if update_key == "unprefixed":
        return k0, W64 @ k0 + d
    if update_key == "consistent":
        return k_bar, W64 @ k0 + d
    if update_key == "mean":
        return k_bar, W64 @ k_bar + d
    raise HParamsError(f"update_key must be one of {', '.join(map(repr, UPDATE_KEYS))}, got {update_key!r}")


@dataclass
class ROMEHParams(LocateHParams):
    """ROME hyperparameters (see :class:`~editlens.edit.hparams.LocateHParams` for the shared ones).

    Attributes:
        layer: the edited layer, or ``"trace"``: the layer of the highest average MLP indirect effect at the last
            subject token of the cases being edited (:func:`editlens.localize.trace_layers`; docs/localize.md).
        mom2_update_weight: λ multiplying ``C`` (no effect on the rank-one update unless ``mom2_ridge > 0``).
        mom2_ridge: relative ridge ``ε`` added as ``ε·tr(C)/d·I`` before solving (0: none).
        update_key: where the rank-one update is pinned (:data:`UPDATE_KEYS`): ``"unprefixed"`` (the reference
            code: direction ``C⁻¹k̄``, pinned at the unprefixed key ``k₀``), ``"consistent"`` (R-ROME: ``k̄`` in
            both places) or ``"mean"`` (editlens before issue 16: ``v = W k̄ + δ`` at ``k̄``).
    """

    layer: int | str = 5
    #: the reference code's context templates for ROME (``context_template_length_params``): 10 sampled prefixes
    #: of 5 tokens and 10 of 10 (plus the empty one), 21 in all; see LocateHParams.prefix_groups
    prefix_groups: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    #: and generated after the end-of-document token, as the reference's get_context_templates does
    prefix_start: str = "document"
    mom2_update_weight: float = 1.5e4
    mom2_ridge: float = 0.0
    update_key: str = "unprefixed"
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
        if not is_trace(self.layer) and self.layer < 0:
            raise HParamsError(f"hyperparameter 'layer' of method {self.method!r} must be >= 0")
        if self.mom2_update_weight <= 0 or self.mom2_ridge < 0:
            raise HParamsError(f"method {self.method!r}: mom2_update_weight must be > 0 and mom2_ridge >= 0")
        if self.update_key not in UPDATE_KEYS:
            raise HParamsError(f"hyperparameter 'update_key' of method {self.method!r} must be one of "
                               f"{', '.join(map(repr, UPDATE_KEYS))}, got {self.update_key!r}")


@register_method("rome")
class ROME(Editor):
    """ROME (rank-one, one fact at a time)."""

    hparams_class = ROMEHParams
    supports_evk_align = True  # passed to the value optimisation (optimise_values' extra_loss)
    supports_offloaded_weights = True  # W is read and written through weight_param / add_now only

    def apply(self, lm, cases, hparams: ROMEHParams, *, evk_align=None, progress=True, sequence=None) -> Edit:
        hp = hparams
        st = locate.setup_edit(lm, cases, hp, [hp.layer], self.name, sequence, progress)
        hp = locate.resolved_hparams(hp, st)  # layer="trace": the traced layer (the edit records "trace")
        requests, cov, prefixes = st.requests, st.cov, st.prefixes
        C = hp.mom2_update_weight * cov[hp.layer]
        if hp.mom2_ridge > 0:
            C = C + hp.mom2_ridge * torch.trace(C) / C.shape[0] * torch.eye(C.shape[0], device=C.device,
                                                                          dtype=C.dtype)
        name = lm.arch.mlp_out_at(hp.layer)
        places = [locate.Place.mlp(lm, hp.layer)]
        snap = self.snapshot_for(sequence)
        total = None
        diag: dict[str, Any] = dict(st.diagnostics)
        losses: dict[str, list[float]] = {}
        try:
            for req in requests:
                k_bar = locate.compute_keys(lm, hp.layer, [req], prefixes, batch_tokens=hp.batch_tokens)[0]
                k0 = k_bar if list(prefixes) == [""] else \
                    locate.compute_keys(lm, hp.layer, [req], [""], batch_tokens=hp.batch_tokens)[0]
                vals = locate.optimise_values(lm, [req], places, st.values, extra_loss=evk_align, progress=progress)
                # on the layer's own device (a weight offloaded by accelerate is copied there, as for a forward)
                W = weight_view(lm.module(name)).detach().to(lm.module_device(name))
                k_pin, v = rome_key_value(W, k_bar, k0, vals.delta[0], hp.update_key)
                delta = rome_update(W, C, k_bar, v, k_pin=k_pin)
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
        return self.weight_edit(lm, cases, hparams, {name: total}, diag, sequence, snapshot=snap, applied=True)
