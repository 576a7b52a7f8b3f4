"""MALMEN: Massive Editing for Large Language Models via Meta Learning (Tan et al., ICLR 2024).

MEND's hyper-network (:mod:`editlens.edit.hypernet`) with two changes:

* **Least-squares aggregation.** Instead of summing the rank-1 updates of all edits, every token ``t`` of every
  edit gives a key ``u_t`` (the layer input) and a value difference ``d_t = −α_l (ũ_tᵀ u_t) δ̃_t`` (the change
  MEND's own rank-1 term would make at that key); the layer's shift is the ridge least-squares solution
  ``S_l = argmin Σ_t ‖S u_t − d_t‖² + λ_l‖S‖² = Dᵀ U (UᵀU + λ_l I)⁻¹`` (the normal equation;
  :func:`~editlens.edit.hypernet.ls_shift`) with a learned ``λ_l``. Many edits then interfere less than in a sum.
* **Separated backpropagation** in training: the meta-loss is back-propagated through the language model with
  the shifts ``S_l`` as leaf tensors, one edit's probes at a time (memory of one edit, whatever the batch), then
  ``∂L/∂S_l`` is back-propagated through the solve and the hyper-network alone
  (:func:`~editlens.edit.hypernet.meta_step`).

Use exactly like MEND: ``te = editlens.train("malmen", lm, cases)``; ``editlens.edit(lm, cases, "malmen",
trained=te)``. A batch of edits is one least-squares solve (MALMEN's point: editing hundreds of facts at once).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from editlens.edit.base import register_method
from editlens.edit.hypernet import HyperEditHParams, HyperEditor, HyperTrainHParams

_TINY_TRAIN = dict(rank=16, epochs=2, batch_size=4, val_every=4, max_val=4, edit_lr=1e-3, lr=1e-3, lr_lr=1e-3)


@dataclass
class MALMENTrainHParams(HyperTrainHParams):
    """MALMEN's training hyperparameters (see :class:`~editlens.edit.hypernet.HyperTrainHParams`); ``batch_size``
    is the number of edits solved together in each training step."""

    batch_size: int = 8
    ARCH_DEFAULTS: ClassVar[Mapping[str, Any]] = {
        "tiny": _TINY_TRAIN,
        "smollm2-135m": dict(rank=64, epochs=1, batch_size=8, val_every=8, max_val=16),
    }


@dataclass
class MALMENHParams(HyperEditHParams):
    """Edit-time hyperparameters of MALMEN (``lr_scale``: see :class:`~editlens.edit.hypernet.HyperEditHParams`)."""


@register_method("malmen")
class MALMEN(HyperEditor):
    """MALMEN (least-squares aggregation of a MEND-style hyper-network's shifts; ``trained=`` is required)."""

    kind = "malmen"
    hparams_class = MALMENHParams
    TrainHParams = MALMENTrainHParams
