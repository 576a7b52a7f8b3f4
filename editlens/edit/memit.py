"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., 2023).

A batch of facts is written into the MLP output projections of a range of layers ``R = [l₁..l_L]``:

1. target residuals (MEMIT §4.3, eq. 16): for each fact, ``δ`` added to the residual stream at the last subject
   token after the last layer ``l_L`` is optimised (:func:`editlens.edit.locate.optimise_values` at
   :meth:`~editlens.edit.locate.Place.residual`); ``z = h^{l_L} + δ``.
2. for each layer ``l`` in order (Algorithm 1): keys ``K`` (``[d_in, n]``, averaged over context prefixes) are
   recomputed with the already-updated lower layers, the remaining residual ``z − h^{l_L}`` (recomputed) is
   divided over the remaining layers, ``R_l = (z − h^{l_L}) / (L − i)``, and (eq. 14)
   ``ΔW = R_l Kᵀ (λ C + K Kᵀ)⁻¹`` (:func:`memit_update`) with ``C = E[k kᵀ]`` (:mod:`editlens.edit.stats`) and
   ``λ = mom2_update_weight`` (1.5e4 by default, the value the locality paper sweeps over 1.5e2–1.5e6).

Diagnostics per layer: ``delta_norm/<l>`` (‖ΔW‖_F), ``dk_norm/<l>`` (RMS of ‖ΔW k‖ over corpus keys,
``sqrt(tr(ΔW C ΔWᵀ))``: the quantity λ penalises), ``residual_norm/<l>`` and ``fit_error/<l>``
(‖ΔW K − R_l‖ / ‖R_l‖).

:class:`MultiLayerEditor` holds the shared loop; AlphaEdit and EMMET override :meth:`MultiLayerEditor.solve`.

Default layers: GPT-2-XL 13–17, GPT-J 3–8, LLaMA-family 4–8 (papers / AlphaEdit); SmolLM2-135M 4–8 (tried
3–7, 4–8 and 6–10: 4–8 writes the known facts at default λ and leaves unrelated greedy answers unchanged);
tiny random models 1–2.

λ per architecture: 1.5e4 (the papers' value) everywhere except SmolLM2-135M, whose keys (SiLU-gated, d_in 1536)
are small against their second moment: at λ = 1.5e4 only ~30% of the residual is written per layer
(``fit_error`` ≈ 0.7) and a batch of known facts is not overwritten, so its default is 1.5e3 (all written,
unrelated greedy answers unchanged). Sweeps should still vary λ around the default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch

from editlens.edit import locate
from editlens.edit.base import Edit, Editor, SequenceState, register_method
from editlens.edit.hparams import TINY, LocateHParams, is_trace, no_duplicate_layers as _no_duplicate_layers
from editlens.edit.base import NON_NEGATIVE
from editlens.edit.stats import dk_norm
from editlens.errors import HParamsError


def memit_update(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹`` (MEMIT eq. 14), in float64.

    Args:
        K: ``[d_in, n]`` keys of the edited facts. R: ``[d_out, n]`` residuals. C: ``[d_in, d_in]`` second moment.
        lam: λ (``mom2_update_weight``).

    Returns:
        ``ΔW [d_out, d_in]`` minimising ``‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ)``.
    """
    K64, R64 = K.double(), R.double()
    C64 = C.to(device=K64.device, dtype=torch.float64)
    A = lam * C64 + K64 @ K64.T
    # ΔW A = R Kᵀ  <=>  A ΔWᵀ = K Rᵀ (A symmetric)
    return torch.linalg.solve(A, K64 @ R64.T).T


@dataclass
class MEMITHParams(LocateHParams):
    """MEMIT hyperparameters (shared ones: :class:`~editlens.edit.hparams.LocateHParams`).

    Attributes:
        layers: edited layers (the last one holds the target residual ``z``), or ``"trace"``: the window of as many
            layers as the model's default with the largest average MLP indirect effect at the last subject token of
            the cases being edited (:func:`editlens.localize.trace_layers`; docs/localize.md).
        mom2_update_weight: λ of eq. 14.
        v_chunk_size: the value optimisation handles at most this many facts at a time (0: the whole batch at
            once). Requests are independent in the objective, so chunks give the unchunked targets up to
            floating-point summation order (see :func:`editlens.edit.locate.optimise_values`); memory of the
            optimisation then grows with the chunk, not the batch (docs/methods.md, "Bounded memory").
    """

    layers: list[int] | str = field(default_factory=lambda: [4, 5, 6, 7, 8])
    mom2_update_weight: float = 1.5e4
    clamp_norm_factor: float = 0.75
    v_chunk_size: int = 100
    RANGES: ClassVar[Mapping[str, Any]] = {"mom2_update_weight": NON_NEGATIVE, "v_chunk_size": NON_NEGATIVE}

    ARCH_DEFAULTS: ClassVar[Mapping[str, Any]] = {
        "tiny": dict(layers=[1, 2], **TINY),
        "smollm2-135m": dict(layers=[4, 5, 6, 7, 8], clamp_norm_factor=0.75, mom2_update_weight=1.5e3),
        "gpt2-xl": dict(layers=[13, 14, 15, 16, 17], clamp_norm_factor=0.75),
        "gpt2": dict(layers=[3, 4, 5, 6, 7]),
        "gpt-j": dict(layers=[3, 4, 5, 6, 7, 8], v_num_grad_steps=25),
        "gptj": dict(layers=[3, 4, 5, 6, 7, 8], v_num_grad_steps=25),
        "llama": dict(layers=[4, 5, 6, 7, 8], v_num_grad_steps=25),
    }

    def validate(self) -> None:
        super().validate()
        if not self.layers:
            raise HParamsError(f"hyperparameter 'layers' of method {self.method!r} must not be empty")
        if not is_trace(self.layers) and any(l < 0 for l in self.layers):
            raise HParamsError(f"hyperparameter 'layers' of method {self.method!r}: negative layer")
        _no_duplicate_layers(self.method, self.layers)
        if self.mom2_update_weight < 0:
            raise HParamsError(f"hyperparameter 'mom2_update_weight' of method {self.method!r} must be >= 0")


class MultiLayerEditor(Editor):
    """The MEMIT loop (targets at the last layer, residual spread over the layers); :meth:`solve` is the closed form."""

    supports_evk_align = True  # passed to the value optimisation (optimise_values' extra_loss)

    def solve(self, lm, layer: int, K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, hparams: Any,
              sequence: SequenceState | None) -> torch.Tensor:
        """``ΔW [d_out, d_in]`` for keys ``K [d_in, n]`` and residuals ``R [d_out, n]`` (float64, device)."""
        raise NotImplementedError

    def after_layer(self, lm, layer: int, K: torch.Tensor, hparams: Any, sequence: SequenceState | None,
                    diag: dict[str, Any]) -> None:
        """Hook run after a layer is updated (e.g. AlphaEdit accumulates ``K Kᵀ``)."""

    def extra_diagnostics(self, lm, layer: int, delta: torch.Tensor, K: torch.Tensor, R: torch.Tensor,
                          hparams: Any, sequence: SequenceState | None, diag: dict[str, Any]) -> None:
        """Hook adding method-specific per-layer diagnostics."""

    def apply(self, lm, cases, hparams, *, evk_align=None, progress=True, sequence=None) -> Edit:
        hp = hparams
        st = locate.setup_edit(lm, cases, hp, hp.layers, self.name, sequence, progress)
        layers, requests, cov, prefixes = st.layers, st.requests, st.cov, st.prefixes
        last = layers[-1]
        vals = locate.optimise_values(lm, requests, [locate.Place.residual(lm, last)], st.values,
                                      extra_loss=evk_align, progress=progress,
                                      chunk_size=int(hp.v_chunk_size) or None)
        z = vals.target.double()  # [n, d]
        snap = self.snapshot_for(sequence)
        deltas: dict[str, torch.Tensor] = {}
        diag: dict[str, Any] = {**vals.losses, **st.diagnostics}
        try:
            for i, l in enumerate(layers):
                K = locate.compute_keys(lm, l, requests, prefixes, batch_tokens=hp.batch_tokens).double().T
                cur = locate.capture_at_subject(lm, requests, lm.arch.block(last), kind="output").double()
                R = ((z - cur) / (len(layers) - i)).T  # [d_out, n]
                delta = self.solve(lm, l, K, R, cov[l], hp, sequence)
                name = lm.arch.mlp_out_at(l)
                self.add_now(lm, snap, name, delta)
                deltas[name] = delta
                diag[f"delta_norm/{l}"] = locate.fro(delta)
                diag[f"dk_norm/{l}"] = dk_norm(delta, cov[l])
                diag[f"residual_norm/{l}"] = locate.fro(R)
                diag[f"fit_error/{l}"] = locate.fro(delta @ K - R) / max(locate.fro(R), 1e-30)
                self.extra_diagnostics(lm, l, delta, K, R, hp, sequence, diag)
                self.after_layer(lm, l, K, hp, sequence, diag)
        except BaseException:
            if sequence is None:
                snap.restore()
            raise
        diag["layers"] = list(layers)
        return self.weight_edit(lm, cases, hp, deltas, diag, sequence, snapshot=snap, applied=True)


@register_method("memit")
class MEMIT(MultiLayerEditor):
    """MEMIT (batched, multi-layer, λ-regularised least squares)."""

    hparams_class = MEMITHParams
    supports_offloaded_weights = True  # weights are written through add_now only

    def solve(self, lm, layer, K, R, C, hparams, sequence):
        return memit_update(K, R, C, hparams.mom2_update_weight)
