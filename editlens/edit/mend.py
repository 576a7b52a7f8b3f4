"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., ICLR 2022, "Fast Model Editing at
Scale").

A small editor network, trained once per model, turns the fine-tuning gradient of an edit into a weight change.
For each edited linear layer ``l`` the gradient of the edit's NLL is ``Σ_t δ_t u_tᵀ`` (``u_t`` the layer's input at
token ``t``, ``δ_t`` the gradient w.r.t. its output); the network maps every ``(u_t, δ_t)`` to ``(ũ_t, δ̃_t)`` and
the edit is ``W_l ← W_l − α_l Σ_t δ̃_t ũ_tᵀ`` with a learned per-layer step ``α_l``. The network, its
normalisation and the training loop are in :mod:`editlens.edit.hypernet` (shared with MALMEN); see
``docs/methods-trained.md`` for what follows the paper and where this implementation differs.

Use::

    te = editlens.train("mend", lm, editlens.synthetic_cases(300))      # once per model
    te.save("editors/mend")
    e = editlens.edit(lm, cases, method="mend", trained="editors/mend")  # fast: one forward/backward, no optimisation

Edit-time hyperparameters (:class:`MENDHParams`): ``lr_scale`` multiplies every learned ``α_l`` (1: as trained).
Several cases in one call are one edit of the summed gradients (the paper's batched edit); sequential editing
computes each step's gradient on the model as edited so far.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from editlens.edit.base import register_method
from editlens.edit.hypernet import HyperEditHParams, HyperEditor, HyperTrainHParams

#: training settings of the built-in tiny random models (tests: a few seconds)
_TINY_TRAIN = dict(rank=16, epochs=2, val_every=10, max_val=4, edit_lr=1e-3, lr=1e-3, lr_lr=1e-3)


@dataclass
class MENDTrainHParams(HyperTrainHParams):
    """MEND's training hyperparameters (see :class:`~editlens.edit.hypernet.HyperTrainHParams`)."""

    ARCH_DEFAULTS: ClassVar[Mapping[str, Any]] = {
        "tiny": _TINY_TRAIN,
        "smollm2-135m": dict(rank=64, epochs=1, batch_size=1, val_every=50, max_val=20),
    }


@dataclass
class MENDHParams(HyperEditHParams):
    """Edit-time hyperparameters of MEND (``lr_scale``: see :class:`~editlens.edit.hypernet.HyperEditHParams`)."""


@register_method("mend")
class MEND(HyperEditor):
    """MEND (a trained gradient-transforming editor; ``trained=`` is required)."""

    kind = "mend"
    hparams_class = MENDHParams
    TrainHParams = MENDTrainHParams
