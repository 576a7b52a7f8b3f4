"""KE: Knowledge Editor (De Cao, Aziz & Titov, EMNLP 2021, "Editing Factual Knowledge in Language Models").

A hyper-network ``g(x, a; φ)`` is trained to turn one fact -- the prompt ``x`` and the new answer ``a`` -- into a
weight update of the language model, such that the model then answers ``a`` for ``x`` *and its paraphrases* while
its predictions on unrelated inputs barely move.

Architecture (paper §3.2):

* **Fact encoder.** The tokens of ``x ⊕ a`` (the rewrite prompt followed by the new target, as the model would
  read them) are embedded with the language model's own input embeddings (frozen, read from the model at edit
  time, so the saved editor does not copy the vocabulary), layer-normalised, and read by a one-layer
  bidirectional LSTM; the final states of both directions, through a linear map, are the condition ``h``.
* **Per-matrix conditioners.** For every edited weight ``W ∈ R^{m×n}`` (``[out, in]``) an FFN
  ``h → tanh → (α ∈ R^m, γ ∈ R^n, β ∈ R^m, δ ∈ R^n, η ∈ R)`` gives the update (:func:`ke_update`)

      ΔW = c · σ(η) · ( softmax(α) γᵀ ⊙ ∇_W L(W; x, a)  +  softmax(β) δᵀ )

  -- a rank-one mask on the fine-tuning gradient of the fact plus a rank-one shift, gated by σ(η). ``c`` is the
  constant ``max_scale`` (a fixed multiplier of the whole update, as the authors' code has; it sets the step size
  the conditioner's outputs are measured in). ``∇_W L(W; x, a)`` is the gradient of the mean NLL of ``a``'s
  tokens given ``x`` at the current weights; it is computed per fact in one batched pass as the gradient with
  respect to a zero perturbation of ``W`` seen only by that fact's rows (:func:`fact_gradients`), which is exactly
  ``∂L_f/∂W`` (checked against autograd in ``tests/unit/test_ke.py``).

Edited weights: every MLP weight matrix (gate, up and down projection on gated MLPs; ``c_fc`` / ``c_proj`` on
GPT-2) of the last three blocks by default (training hyperparameters ``layers`` / ``modules``). The paper edits
all but the embedding and normalisation layers of BERT/BART; here, as in MEND and as the issue asks, the last
blocks' MLPs.

Training objective (paper eq. 2-3): for a fact, ``P^x`` is ``x`` and its paraphrases and ``O^x`` other inputs
whose predictions must not change (the case's neighbourhood probes). The hyper-network solves

    min_φ  mean_{x' ∈ P^x} NLL(a | x'; θ + ΔW)   subject to   C = mean_{x'' ∈ O^x} KL(p(·|x''; θ) ‖ p(·|x''; θ+ΔW)) ≤ m

by the Lagrangian relaxation ``min_φ max_{λ≥0} NLL + λ (C − m)``: every step takes an Adam step on φ that
*descends* the Lagrangian and an Adam step on λ that *ascends* it (``maximize=True``), then projects λ onto
``λ ≥ 0`` -- while the constraint is violated λ grows and the KL term weighs more, once it holds λ shrinks. The
margin ``m`` is annealed linearly from ``margin_start`` to ``margin`` over the training steps (the authors' code
anneals its margin; the paper states a fixed one). The KL is measured at the positions that predict the
neighbourhood answer's tokens (teacher-forced), the distributions the locality metrics read. Validation (held-out
cases) records the edit NLL, the KL and the rewrite token accuracy; early stopping watches the validation
``NLL + max(0, C − margin)`` (a fixed weighting, so that checks made at different λ compare) and the best checkpoint
is kept.

Editing (:meth:`KE.apply`): each rewrite of each case is one fact; its update is computed at the weights the edit
starts from, and a batch adds the updates of all its facts (as MEND sums its per-example updates) times the
edit-time hyperparameter ``scale`` (1 = as trained). The sum goes through :meth:`Editor.weight_edit`: undo is bit
for bit and sequential runs edit the already-edited weights (each step's gradients are taken there).

Deviations from the paper (also in ``docs/methods-trained.md``): decoder-only LMs instead of BERT/BART; the
condition is ``x ⊕ a`` (the paper also reads the model's original prediction ``y``; here the gradient carries what
the model currently predicts); the embeddings are the LM's, frozen (the authors initialise a trainable copy); a
LayerNorm before the LSTM (SmolLM2's embeddings are small; it lets one learning rate work across models); no
weight normalisation in the conditioners; the γ-bias starts at −1 so the untrained editor already is one
gradient-descent step of size ``max_scale/(2m)`` per matrix instead of a zero update.
"""
from __future__ import annotations

import copy
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Mapping, Sequence

import torch
from torch import nn

from editlens.edit.base import Edit, FRACTION, HParams, NON_NEGATIVE, POSITIVE, Range, SequenceState, register_method
from editlens.edit.trained import (EarlyStopping, TrainableEditor, TrainedEditor, check_finite, progress_bar)
from editlens.errors import HParamsError, MethodError, TrainingError
from editlens.lm import ops
from editlens.lm.arch import weight_view

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM

#: the MLP weight matrices KE can edit (``mlp_gate`` only on gated MLPs)
MODULE_KINDS = ("mlp_gate", "mlp_in", "mlp_out")


# ------------------------------------------------------------------------------------------------ hyperparameters
@dataclass
class KETrainHParams(HParams):
    """How a KE hyper-network is trained.

    Attributes:
        layers: blocks whose MLP weights are edited (``[]``: the last three).
        modules: which MLP matrices (``mlp_gate``, ``mlp_in``, ``mlp_out``; ``[]``: all the architecture has).
        lstm_dim: hidden size of each direction of the fact encoder's LSTM.
        cond_dim: size of the condition vector ``h``.
        ffn_dim: hidden size of each per-matrix conditioner FFN.
        max_scale: the constant ``c`` multiplying every update (the untrained editor is a gradient-descent step
            of ``c/(2m)``).
        lr: Adam learning rate of the hyper-network.
        lagrange_lr: Adam learning rate of the Lagrange multiplier λ (gradient ascent).
        lagrange_init: λ at the start.
        margin: KL margin ``m`` (nats) at the end of the anneal.
        margin_start: KL margin at step 0, annealed linearly to ``margin`` over ``steps``.
        steps: optimisation steps (at most; early stopping may end sooner).
        batch_size: facts per step.
        val_fraction: share of the training cases held out for validation when no ``val_cases`` are given.
        val_every: steps between validations.
        patience: validations without improvement before stopping.
        max_grad_norm: gradient-norm clip of the hyper-network (0: none).
    """

    method: ClassVar[str] = "ke"
    layers: list[int] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    lstm_dim: int = 128
    cond_dim: int = 256
    ffn_dim: int = 128
    max_scale: float = 100.0
    lr: float = 1e-3
    lagrange_lr: float = 0.2
    lagrange_init: float = 1.0
    margin: float = 0.05
    margin_start: float = 0.5
    steps: int = 200
    batch_size: int = 4
    val_fraction: float = 0.1
    val_every: int = 25
    patience: int = 4
    max_grad_norm: float = 1.0

    RANGES: ClassVar[Mapping[str, Range]] = {
        "max_scale": POSITIVE, "lr": POSITIVE, "lagrange_lr": POSITIVE, "lagrange_init": NON_NEGATIVE,
        "margin": POSITIVE, "margin_start": POSITIVE, "val_fraction": Range(0.0, 1.0, hi_open=True),
        "max_grad_norm": NON_NEGATIVE,
    }
    ARCH_DEFAULTS: ClassVar[Mapping[str, Any]] = {
        "tiny": dict(lstm_dim=16, cond_dim=32, ffn_dim=16, max_scale=50.0, steps=60, val_every=20),
    }

    def _resolve(self, lm: "LM") -> "KETrainHParams":
        over: dict[str, Any] = {}
        if not self.layers:
            over["layers"] = list(range(max(0, lm.n_layers - 3), lm.n_layers))
        if not self.modules:
            over["modules"] = [k for k in MODULE_KINDS if k != "mlp_gate" or lm.arch.mlp_gate is not None]
        return self.replace(**over) if over else self

    def validate(self) -> None:
        for key in ("lstm_dim", "cond_dim", "ffn_dim", "steps", "batch_size", "val_every", "patience"):
            if int(getattr(self, key)) < 1:
                raise HParamsError(f"hyperparameter {key!r} of method 'ke' (training) must be >= 1, got "
                                   f"{getattr(self, key)}")
        bad = [m for m in self.modules if m not in MODULE_KINDS]
        if bad:
            raise HParamsError(f"hyperparameter 'modules' of method 'ke' (training): unknown module kind(s) {bad}; "
                               f"valid: {', '.join(MODULE_KINDS)}")
        if len(set(self.modules)) != len(self.modules):
            raise HParamsError(f"hyperparameter 'modules' of method 'ke' (training) names a module twice: "
                               f"{list(self.modules)}")
        if len(set(int(l) for l in self.layers)) != len(self.layers):
            raise HParamsError(f"hyperparameter 'layers' of method 'ke' (training) names a layer twice: "
                               f"{list(self.layers)}")
        if any(int(l) < 0 for l in self.layers):
            raise HParamsError(f"hyperparameter 'layers' of method 'ke' (training) must be >= 0, got "
                               f"{list(self.layers)}")

    def module_paths(self, lm: "LM") -> list[str]:
        """The edited modules' paths on ``lm`` (block by block); :class:`HParamsError` for a layer outside the
        model or ``mlp_gate`` on an MLP without a gate."""
        if not self.layers or not self.modules:
            raise HParamsError("method 'ke' (training): 'layers' and 'modules' are resolved for a model; build the "
                               "hyperparameters with KETrainHParams.for_model(lm)")
        paths = []
        for layer in self.layers:
            if not 0 <= int(layer) < lm.n_layers:
                raise HParamsError(f"hyperparameter 'layers' of method 'ke' (training): layer {layer} is outside "
                                   f"the model's 0..{lm.n_layers - 1}")
            for kind in self.modules:
                if kind == "mlp_gate":
                    if lm.arch.mlp_gate is None:
                        raise HParamsError(f"hyperparameter 'modules' of method 'ke' (training): the "
                                           f"{lm.arch.family} architecture has no gated MLP ('mlp_gate')")
                    paths.append(lm.arch.mlp_gate.format(int(layer)))
                elif kind == "mlp_in":
                    paths.append(lm.arch.mlp_in_at(int(layer)))
                else:
                    paths.append(lm.arch.mlp_out_at(int(layer)))
        return paths


@dataclass
class KEHParams(HParams):
    """Edit-time hyperparameters of KE (the trained state is the :class:`TrainedEditor`).

    Attributes:
        scale: multiplies every predicted update (1 = as trained).
    """

    scale: float = 1.0
    RANGES: ClassVar[Mapping[str, Range]] = {"scale": POSITIVE}


# ------------------------------------------------------------------------------------------------ the update form
def ke_update(grad: torch.Tensor, alpha: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
              delta: torch.Tensor, eta: torch.Tensor, max_scale: float) -> torch.Tensor:
    """KE's update ``c·σ(η)·(softmax(α)γᵀ ⊙ G + softmax(β)δᵀ)``.

    Args:
        grad: ``G [..., m, n]`` the gradient of the fact's loss w.r.t. ``W [m, n]``.
        alpha, beta: ``[..., m]``; gamma, delta: ``[..., n]``; eta: ``[...]``. max_scale: ``c``.

    Returns:
        ``ΔW [..., m, n]``.
    """
    a = alpha.softmax(-1)[..., :, None] * gamma[..., None, :]
    b = beta.softmax(-1)[..., :, None] * delta[..., None, :]
    return max_scale * torch.sigmoid(eta)[..., None, None] * (a * grad + b)


def _key(path: str) -> str:
    return path.replace(".", "_")


class KEHyperNet(nn.Module):
    """The hyper-network: fact encoder (LayerNorm → BiLSTM → linear) and one conditioner FFN per edited matrix.

    Args:
        embed_dim: the LM's embedding size. shapes: ``{module path: (m, n)}`` of the edited ``[out, in]`` weights.
    """

    def __init__(self, embed_dim: int, shapes: Mapping[str, tuple[int, int]], *, lstm_dim: int, cond_dim: int,
                 ffn_dim: int, max_scale: float):
        super().__init__()
        self.shapes = {p: (int(m), int(n)) for p, (m, n) in shapes.items()}
        self.max_scale = float(max_scale)
        self.norm = nn.LayerNorm(embed_dim)
        self.lstm = nn.LSTM(embed_dim, lstm_dim, num_layers=1, bidirectional=True, batch_first=True)
        self.proj = nn.Linear(2 * lstm_dim, cond_dim)
        self.conditioners = nn.ModuleDict()
        for p, (m, n) in self.shapes.items():
            out = nn.Linear(ffn_dim, 2 * (m + n) + 1)
            with torch.no_grad():
                out.weight.zero_()
                out.bias.zero_()
                out.bias[m:m + n] = -1.0  # γ = −1: the untrained update is a descent step of c·σ(0)/m
            self.conditioners[_key(p)] = nn.Sequential(nn.Linear(cond_dim, ffn_dim), nn.Tanh(), out)

    def encode(self, emb: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """Condition vectors ``h [F, cond_dim]`` of right-padded fact embeddings ``emb [F, T, d]``."""
        packed = nn.utils.rnn.pack_padded_sequence(self.norm(emb), torch.as_tensor(list(lengths)).cpu(),
                                                   batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        return self.proj(torch.cat([h_n[0], h_n[1]], dim=-1))

    def factors(self, h: torch.Tensor, path: str) -> tuple[torch.Tensor, ...]:
        """``(α [F,m], γ [F,n], β [F,m], δ [F,n], η [F])`` for the matrix at ``path``."""
        m, n = self.shapes[path]
        out = self.conditioners[_key(path)](h)
        alpha, gamma, beta, delta, eta = out.split([m, n, m, n, 1], dim=-1)
        return alpha, gamma, beta, delta, eta[..., 0]

    def forward(self, emb: torch.Tensor, lengths: Sequence[int], grads: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """``{path: ΔW [F, m, n]}`` for the facts' embeddings and gradients ``{path: G [F, m, n]}``."""
        h = self.encode(emb, lengths)
        return {p: ke_update(grads[p], *self.factors(h, p), self.max_scale) for p in self.shapes}


# ------------------------------------------------------------------------------------------------ facts and rows
@dataclass
class _Row:
    """One teacher-forced sequence: ``ids`` (prompt + target[:-1]); the last ``len(labels)`` positions predict
    ``labels``."""

    ids: list[int]
    labels: list[int]


def _row(lm: "LM", prompt: str, target: str | None) -> _Row:
    if target is None or not str(target).strip():  # no answer: the next-token distribution after the prompt
        p = ops.encode(lm.tokenizer, prompt)
        return _Row(p, [-1])
    p, t = ops.target_token_ids(lm.tokenizer, prompt, target)
    return _Row(p + t[:-1], t)


@dataclass
class _Fact:
    """A fact to edit: its condition tokens (``x ⊕ a``), its rewrite row (gradient), and for training its
    edit rows (rewrite + paraphrases) and locality rows (neighbourhood)."""

    cond: list[int]
    rewrite: _Row
    edit_rows: list[_Row] = field(default_factory=list)
    loc_rows: list[_Row] = field(default_factory=list)
    where: str = ""


def _fact(lm: "LM", prompt: str, target: str, where: str) -> _Fact:
    p, t = ops.target_token_ids(lm.tokenizer, prompt, target)
    return _Fact(cond=p + t, rewrite=_Row(p + t[:-1], t), where=where)


def edit_facts(lm: "LM", cases: Sequence["EditCase"]) -> list[_Fact]:
    """One fact per rewrite of every case (what :meth:`KE.apply` edits)."""
    return [_fact(lm, r.text, r.target_new, f"case {c.case_id!r}") for c in cases for r in c.rewrites]


def training_facts(lm: "LM", cases: Sequence["EditCase"], what: str) -> list[_Fact]:
    """One fact per case (its primary rewrite) with paraphrase edit rows and neighbourhood locality rows."""
    out = []
    for i, c in enumerate(cases):
        r = c.rewrite
        f = _fact(lm, r.text, r.target_new, f"{what} case {i} ({c.case_id!r})")
        f.edit_rows = [f.rewrite] + [_row(lm, p.prompt, p.target if p.target is not None else r.target_new)
                                     for p in c.probes_of("paraphrase")]
        f.loc_rows = [_row(lm, p.prompt, p.target) for p in c.probes_of("neighborhood")]
        if not f.loc_rows:
            raise TrainingError(f"{what} case {i} (case_id {c.case_id!r}) has no 'neighborhood' probe, which 'ke' "
                                "trains its locality constraint on")
        out.append(f)
    return out


def _tf_forward(lm: "LM", rows: Sequence[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``[R, K, V]`` (float32) at the last ``K = max len(labels)`` positions of the left-padded rows and
    the label matrix ``[R, K]`` (``-1`` where a row has no label there; a ``-1`` label in a row's own span means
    "position used, no target", e.g. a locality prompt without an answer)."""
    enc = ops.pad_left([r.ids for r in rows], ops._pad_id(lm), lm.device)
    keep = min(max(len(r.labels) for r in rows), enc["input_ids"].shape[1])
    out = lm.model(**enc, logits_to_keep=keep, use_cache=False)
    logp = torch.log_softmax(out.logits[:, -keep:, :].float(), dim=-1)
    labels = torch.full((len(rows), keep), -2, dtype=torch.long, device=logp.device)
    for b, r in enumerate(rows):
        labels[b, keep - len(r.labels):] = torch.as_tensor(r.labels, dtype=torch.long)
    return logp, labels


def row_nll(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean NLL of the labels (``[R]``); positions with a negative label are skipped."""
    mask = labels >= 0
    nll = -logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return (nll * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def row_kl(base_logp: torch.Tensor, new_logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean over the row's positions (label ``>= -1``) of ``KL(p_base ‖ p_new)`` (``[R]``)."""
    mask = labels >= -1
    kl = (base_logp.exp() * (base_logp - new_logp)).sum(-1)
    return (kl * mask).sum(-1) / mask.sum(-1).clamp_min(1)


@contextmanager
def per_fact_deltas(lm: "LM", deltas: Mapping[str, Sequence[torch.Tensor]],
                    slices: Sequence[tuple[int, int]]) -> Iterator[None]:
    """Forward hooks making the modules at ``deltas``' paths compute ``x (W + ΔW_f)ᵀ`` for the rows
    ``slices[f]`` of a batch (fact ``f``'s rows see only its own ``ΔW_f [m, n]``). ``slices`` cover the batch in
    order. Gradients flow into the ``ΔW_f``; the weights are not touched."""
    handles = []

    def make(ds: Sequence[torch.Tensor]):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            parts = [out[s:e] + (x[s:e].to(d.dtype) @ d.t()).to(out.dtype) for (s, e), d in zip(slices, ds)]
            return torch.cat(parts, 0)
        return hook

    try:
        for path, ds in deltas.items():
            handles.append(lm.module(path).register_forward_hook(make(ds)))
        yield
    finally:
        for h in handles:
            h.remove()


def fact_gradients(lm: "LM", facts: Sequence[_Fact], paths: Sequence[str]) -> tuple[dict[str, torch.Tensor],
                                                                                       torch.Tensor]:
    """``({path: G [F, m, n]}, nll [F])``: for every fact the gradient of the mean NLL of its target given its
    prompt w.r.t. each weight ``W [out, in]``, at the current weights, and that NLL.

    One batched forward/backward: each fact's rows get their own zero perturbation ``Z_f`` of ``W`` (see
    :func:`per_fact_deltas`), and ``∂(Σ_f L_f)/∂Z_f = ∂L_f/∂W`` because rows of other facts never see ``Z_f``.
    """
    zeros = {p: [torch.zeros(weight_view(lm.module(p)).shape, device=lm.device, dtype=torch.float32,
                             requires_grad=True) for _ in facts] for p in paths}
    slices = [(i, i + 1) for i in range(len(facts))]
    with torch.enable_grad(), per_fact_deltas(lm, zeros, slices):
        logp, labels = _tf_forward(lm, [f.rewrite for f in facts])
        nll = row_nll(logp, labels)
        flat = [z for p in paths for z in zeros[p]]
        grads = torch.autograd.grad(nll.sum(), flat, allow_unused=True)
    out: dict[str, torch.Tensor] = {}
    k = 0
    for p in paths:
        gs = []
        for z in zeros[p]:
            g = grads[k]
            gs.append(torch.zeros_like(z) if g is None else g)
            k += 1
        out[p] = torch.stack(gs).detach()
    return out, nll.detach()


def fact_embeddings(lm: "LM", facts: Sequence[_Fact]) -> tuple[torch.Tensor, list[int]]:
    """Right-padded LM input embeddings ``[F, T, d]`` (float32, no gradient) of the facts' ``x ⊕ a`` tokens."""
    lengths = [len(f.cond) for f in facts]
    ids = torch.zeros((len(facts), max(lengths)), dtype=torch.long)
    for i, f in enumerate(facts):
        ids[i, :len(f.cond)] = torch.as_tensor(f.cond, dtype=torch.long)
    with torch.no_grad():
        emb = lm.model.get_input_embeddings()(ids.to(lm.device)).float()
    return emb, lengths


def shapes_of(lm: "LM", paths: Sequence[str]) -> dict[str, tuple[int, int]]:
    return {p: tuple(int(s) for s in weight_view(lm.module(p)).shape) for p in paths}  # type: ignore[misc]


def build_net(lm: "LM", hp: KETrainHParams) -> KEHyperNet:
    """A fresh hyper-network for ``lm`` (float32, on ``lm.device``)."""
    emb_dim = int(lm.model.get_input_embeddings().weight.shape[1])
    return KEHyperNet(emb_dim, shapes_of(lm, hp.module_paths(lm)), lstm_dim=int(hp.lstm_dim),
                      cond_dim=int(hp.cond_dim), ffn_dim=int(hp.ffn_dim),
                      max_scale=float(hp.max_scale)).to(lm.device)


# ------------------------------------------------------------------------------------------------ training
@dataclass
class StepResult:
    """The figures of one training / validation pass over a batch of facts."""

    loss: torch.Tensor      # the Lagrangian NLL + λ (C − m)
    edit_nll: torch.Tensor  # mean over facts of the mean NLL over the fact's edit rows (after the update)
    kl: torch.Tensor        # mean over facts of the mean KL over the fact's locality rows
    acc: float              # share of rewrite target tokens that are the argmax after the update
    pre_nll: float          # mean rewrite NLL before the update


def lagrangian(edit_nll: torch.Tensor, kl: torch.Tensor, lam: torch.Tensor, margin: float) -> torch.Tensor:
    """``NLL + λ (C − m)``: minimised by the hyper-network, maximised by λ (projected onto ``λ ≥ 0``)."""
    return edit_nll + lam * (kl - margin)


def ke_step(lm: "LM", net: KEHyperNet, facts: Sequence[_Fact], lam: torch.Tensor, margin: float) -> StepResult:
    """Predict each fact's update and evaluate KE's constrained objective on the fact's edit and locality rows
    (differentiable w.r.t. the hyper-network and λ when grad is enabled)."""
    paths = list(net.shapes)
    grads, pre_nll = fact_gradients(lm, facts, paths)
    emb, lengths = fact_embeddings(lm, facts)
    deltas = net(emb, lengths, grads)
    rows: list[_Row] = []
    slices, n_edit = [], []
    for f in facts:
        start = len(rows)
        rows += f.edit_rows + f.loc_rows
        slices.append((start, len(rows)))
        n_edit.append(len(f.edit_rows))
    loc_idx = [i for (s, _), k, f in zip(slices, n_edit, facts) for i in range(s + k, s + k + len(f.loc_rows))]
    with torch.no_grad():
        base_logp, base_labels = _tf_forward(lm, [rows[i] for i in loc_idx])
    with per_fact_deltas(lm, {p: list(deltas[p]) for p in paths}, slices):
        logp, labels = _tf_forward(lm, rows)
    nll = row_nll(logp, labels)
    K = base_logp.shape[1]
    loc = torch.as_tensor(loc_idx, device=logp.device)
    kl_rows = row_kl(base_logp, logp[loc][:, -K:], base_labels)
    edit_terms, kl_terms = [], []
    k = 0
    correct = total = 0
    for (s, _), ne, f in zip(slices, n_edit, facts):
        edit_terms.append(nll[s:s + ne].mean())
        kl_terms.append(kl_rows[k:k + len(f.loc_rows)].mean())
        k += len(f.loc_rows)
        lab = labels[s]
        m = lab >= 0
        correct += int((logp[s].argmax(-1)[m] == lab[m]).sum())
        total += int(m.sum())
    edit_nll = torch.stack(edit_terms).mean()
    kl = torch.stack(kl_terms).mean()
    return StepResult(lagrangian(edit_nll, kl, lam, margin), edit_nll, kl, correct / max(1, total),
                      float(pre_nll.mean()))


def annealed_margin(hp: KETrainHParams, step: int) -> float:
    """The KL margin at ``step``: linear from ``margin_start`` (step 0) to ``margin`` (last step)."""
    if hp.steps <= 1:
        return float(hp.margin)
    t = min(1.0, step / (hp.steps - 1))
    return float(hp.margin_start + t * (hp.margin - hp.margin_start))


def _validate(lm: "LM", net: KEHyperNet, facts: Sequence[_Fact], lam: torch.Tensor, margin: float,
              batch_size: int) -> dict[str, float]:
    """Validation figures; ``objective = NLL + max(0, C − margin)`` (``margin``: the final one), a fixed weighting
    so that checks made at different λ compare."""
    nll = kl = acc = pre = 0.0
    for s in range(0, len(facts), batch_size):
        chunk = facts[s:s + batch_size]
        with torch.no_grad():
            r = ke_step(lm, net, chunk, lam, margin)
        w = len(chunk) / len(facts)
        nll += float(r.edit_nll) * w
        kl += float(r.kl) * w
        acc += r.acc * w
        pre += r.pre_nll * w
    return {"edit_nll": nll, "kl": kl, "acc": acc, "pre_nll": pre, "objective": nll + max(0.0, kl - margin)}


def fit_ke(lm: "LM", cases: Sequence["EditCase"], val_cases: Sequence["EditCase"] | None, hp: KETrainHParams, *,
           progress: bool, seed: int) -> TrainedEditor:
    """Train a KE hyper-network (see the module docstring); the model's weights are never written."""
    paths = hp.module_paths(lm)  # HParamsError before any work
    facts = training_facts(lm, cases, "training")
    rng = random.Random(seed)
    if val_cases is not None:
        val_facts = training_facts(lm, val_cases, "validation")
    else:
        n_val = int(round(hp.val_fraction * len(facts)))
        if n_val >= len(facts):
            n_val = len(facts) - 1
        order = list(range(len(facts)))
        rng.shuffle(order)
        val_facts = [facts[i] for i in order[:n_val]]
        facts = [facts[i] for i in order[n_val:]]
    torch.manual_seed(seed)
    net = build_net(lm, hp)
    opt = torch.optim.Adam(net.parameters(), lr=float(hp.lr))
    lam = torch.tensor(float(hp.lagrange_init), device=lm.device, requires_grad=True)
    lam_opt = torch.optim.Adam([lam], lr=float(hp.lagrange_lr), maximize=True)
    stopper = EarlyStopping(int(hp.patience))
    best_state: dict[str, torch.Tensor] | None = None
    curve: list[dict[str, float]] = []
    val_curve: list[dict[str, float]] = []
    order: list[int] = []
    bar = progress_bar(int(hp.steps), "ke train", progress)
    t0 = time.perf_counter()
    step = 0
    try:
        for step in range(int(hp.steps)):
            if len(order) < hp.batch_size:
                more = list(range(len(facts)))
                rng.shuffle(more)
                order += more
            batch = [facts[i] for i in order[:hp.batch_size]]
            del order[:hp.batch_size]
            margin = annealed_margin(hp, step)
            res = ke_step(lm, net, batch, lam, margin)
            check_finite(float(res.edit_nll.detach()), step=step, what="the KE edit loss (NLL after the update)")
            check_finite(float(res.kl.detach()), step=step, what="the KE locality KL")
            opt.zero_grad(set_to_none=True)
            lam_opt.zero_grad(set_to_none=True)
            res.loss.backward()
            if hp.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(net.parameters(), float(hp.max_grad_norm))
            opt.step()
            lam_opt.step()
            with torch.no_grad():
                lam.clamp_(min=0.0)
            curve.append({"step": step, "edit_nll": float(res.edit_nll.detach()), "kl": float(res.kl.detach()),
                          "acc": res.acc, "pre_nll": res.pre_nll, "lambda": float(lam.detach()), "margin": margin})
            bar.update(1)
            bar.set_postfix(nll=f"{curve[-1]['edit_nll']:.3f}", kl=f"{curve[-1]['kl']:.2e}", lam=f"{curve[-1]['lambda']:.2f}")
            last = step == int(hp.steps) - 1
            if val_facts and ((step + 1) % int(hp.val_every) == 0 or last):
                v = _validate(lm, net, val_facts, lam.detach(), float(hp.margin), int(hp.batch_size))
                v["step"] = step
                val_curve.append(v)
                check_finite(v["objective"], step=step, what="the KE validation objective")
                stop = stopper.update(v["objective"])
                if stopper.best_step == stopper.checks - 1:
                    best_state = copy.deepcopy(net.state_dict())
                if stop:
                    break
    finally:
        bar.close()
    if best_state is not None:
        net.load_state_dict(best_state)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    steps_run = len(curve)
    meta = {
        "loss_curve": [round(c["edit_nll"], 6) for c in curve],
        "kl_curve": [float(f"{c['kl']:.4g}") for c in curve],
        "lambda_curve": [round(c["lambda"], 6) for c in curve],
        "validation": val_curve,
        "best_validation": (val_curve[stopper.best_step] if val_curve and stopper.best_step >= 0 else None),
        "steps_run": steps_run, "early_stopped": steps_run < int(hp.steps),
        "n_train_facts": len(facts), "n_val_facts": len(val_facts),
        "cases_per_s": steps_run * int(hp.batch_size) / max(1e-9, time.perf_counter() - t0),
        "modules": paths, "shapes": {p: list(s) for p, s in net.shapes.items()},
        "final_lambda": float(lam.detach()),
    }
    return TrainedEditor("ke", hp.to_dict(), lm.base_fingerprint, lm.name, tensors, meta)


# ------------------------------------------------------------------------------------------------ the method
@register_method("ke")
class KE(TrainableEditor):
    """KE (De Cao et al. 2021): a hyper-network trained to turn a fact into a weight update (see the module)."""

    hparams_class = KEHParams
    TrainHParams = KETrainHParams
    train_needs: ClassVar[tuple[str, ...]] = ("paraphrase", "neighborhood")
    edits_weights = True

    def __init__(self) -> None:
        self._net: tuple[int, KEHyperNet] | None = None

    def fit(self, lm: "LM", cases: Sequence["EditCase"], val_cases: Sequence["EditCase"] | None, hp: HParams, *,
            progress: bool, seed: int) -> TrainedEditor:
        if not isinstance(hp, KETrainHParams):
            raise HParamsError(f"method 'ke' trains with KETrainHParams, got {type(hp).__name__}")
        return fit_ke(lm, cases, val_cases, hp, progress=progress, seed=seed)

    def contract_train_overrides(self) -> dict[str, Any]:
        return {"steps": 4, "batch_size": 2, "val_every": 2, "lstm_dim": 8, "cond_dim": 8, "ffn_dim": 8}

    def network(self, lm: "LM") -> KEHyperNet:
        """The trained hyper-network of :attr:`trained`, built for ``lm`` (kept for the next steps of a run)."""
        te = self.trained
        if te is None:
            raise MethodError("method 'ke' edits with a trained editor: pass trained=<directory or TrainedEditor> "
                              "(train one with editlens.train('ke', lm, cases))")
        if self._net is not None and self._net[0] == id(te):
            return self._net[1]
        hp = KETrainHParams(**{k: v for k, v in te.hparams.items() if k in KETrainHParams.field_names()})
        net = build_net(lm, hp)
        state = net.state_dict()
        missing = sorted(set(state) - set(te.tensors))
        extra = sorted(set(te.tensors) - set(state))
        if missing or extra:
            raise MethodError(f"the trained 'ke' editor does not fit its hyperparameters on {lm.name!r}: missing "
                              f"tensors {missing[:4]}, unexpected {extra[:4]}")
        for k, v in state.items():
            t = te.tensors[k]
            if tuple(t.shape) != tuple(v.shape):
                raise MethodError(f"the trained 'ke' editor's tensor {k!r} has shape {tuple(t.shape)}; "
                                  f"{lm.name!r} needs {tuple(v.shape)}")
        net.load_state_dict({k: te.tensors[k].to(lm.device) for k in state})
        net.eval()
        self._net = (id(te), net)
        return net

    def apply(self, lm: "LM", cases: Sequence["EditCase"], hparams: HParams, *, evk_align: Any = None,
              progress: bool = False, sequence: SequenceState | None = None) -> Edit:
        if not isinstance(hparams, KEHParams):
            raise HParamsError(f"method 'ke' expects KEHParams, got {type(hparams).__name__}")
        net = self.network(lm)
        facts = edit_facts(lm, cases)
        paths = list(net.shapes)
        grads, pre_nll = fact_gradients(lm, facts, paths)
        emb, lengths = fact_embeddings(lm, facts)
        with torch.no_grad():
            h = net.encode(emb, lengths)
            deltas: dict[str, torch.Tensor] = {}
            diag: dict[str, Any] = {"loss/pre_edit_nll": float(pre_nll.mean()), "ke/n_facts": len(facts)}
            gates = []
            for p in paths:
                alpha, gamma, beta, delta, eta = net.factors(h, p)
                d = ke_update(grads[p], alpha, gamma, beta, delta, eta, net.max_scale).sum(0)
                deltas[p] = float(hparams.scale) * d
                gates.append(torch.sigmoid(eta).mean())
            diag["ke/gate_mean"] = float(torch.stack(gates).mean())
        per_layer: dict[int, float] = {}
        for p, d in deltas.items():
            layer = _layer_of(lm, p)
            per_layer[layer] = per_layer.get(layer, 0.0) + float(d.double().pow(2).sum())
        for layer, sq in sorted(per_layer.items()):
            diag[f"delta_norm/{layer}"] = math.sqrt(sq)
        diag["layers"] = sorted(per_layer)
        return self.weight_edit(lm, cases, hparams, deltas, diag, sequence)


def _layer_of(lm: "LM", path: str) -> int:
    for layer in range(lm.n_layers):
        names = {lm.arch.mlp_in_at(layer), lm.arch.mlp_out_at(layer)}
        if lm.arch.mlp_gate is not None:
            names.add(lm.arch.mlp_gate.format(layer))
        if path in names:
            return layer
    raise MethodError(f"ke: {path!r} is not an MLP weight of {lm.name!r}")
