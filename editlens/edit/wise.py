"""WISE — side memory with routing, sharding and merging (Wang et al., NeurIPS 2024, "WISE: Rethinking the
Knowledge Memory for Lifelong Model Editing of Large Language Models").

* **Main and side memory.** The *main memory* is the MLP output projection ``W`` of layer ``layer``. A *side
  memory* is a copy ``W' = W + Δ`` of it; edits train only ``Δ``. The model itself is never modified: during
  a System call a forward hook adds ``A(x) Δᵀ`` to the projection's output for the rows routed to the side
  memory, where ``A(x)`` is the projection's input (the MLP's intermediate activation) — i.e. the row is
  computed with ``W'`` instead of ``W`` (bias included, exactly).
* **Routing activation.** ``Δ_act(x) = mean over the prompt's tokens t of ||A(x_t) Δᵀ||₂`` (the norm of what the
  side memory would change). A query is answered by the side memory with the largest ``Δ_act`` among those
  whose ``Δ_act`` exceeds their threshold ``ε``; otherwise by the main memory (the output is returned
  untouched, so unrouted queries are bit-identical to the base model). The decision uses the prompt tokens
  only and holds for the target tokens (teacher forcing) and every generated token.
* **Training** of ``Δ`` (Adam, ``lr``, at most ``n_iter`` steps, early stop) minimises the target NLL with the
  side memory in place plus the paper's routing margin loss
  ``max(0, Δ_act(x_i) − α) + max(0, β − Δ_act(x_e)) + max(0, γ − (Δ_act(x_e) − Δ_act(x_i)))``
  averaged over edit prompts ``x_e`` and irrelevant prompts ``x_i`` (:func:`irrelevant_prompts`: generic
  factual cloze prompts and sentences of a held-out text shipped with editlens).
* **Threshold.** After each edit batch, ``ε`` of the memory is calibrated on its edit prompts: the midpoint
  between the largest irrelevant score and the smallest edit score when they are separated, else the smallest
  edit score (``diagnostics["router_separated"]`` says which).
* **Knowledge sharding and merging.** The edits of a batch are dealt round-robin to ``n_shards`` shards. Each
  shard trains its own copy of the memory's ``Δ`` under a fixed random gradient mask of density
  ``mask_ratio`` (a random subspace of the weight entries; seeded per shard). The shards' increments
  ``τ_s = Δ_s − Δ`` are then merged with TIES (:func:`ties_merge`: trim to the top ``ties_density`` magnitudes,
  elect the sign of the summed trimmed increments, average the increments that agree with it) and added to ``Δ``.
* **Several side memories.** In sequential editing, after ``edits_per_memory`` edits (0 = never) a new side
  memory (``Δ = 0``) is started; routing picks among all of them.

Simplifications (documented): the increments are merged relative to the memory before the batch (the paper
merges shard copies relative to the main memory; the same thing for the first batch); there is no replay of
earlier edits of a memory in later batches; ``Δ_act`` is averaged over prompt tokens; the irrelevant prompts are
a small fixed set rather than a sample of the pre-training corpus.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from editlens.edit.base import Edit, Editor, HParams, SequenceState, register_method
from editlens.edit.base import FRACTION, NON_NEGATIVE, POSITIVE
from editlens.edit.grace import AdaptorSystem, LayerAdaptor, prompt_target_batch, target_nll
from editlens.errors import HParamsError
from editlens.evaluate.system import ModelSystem
from editlens.lm import ops
from editlens.lm.arch import weight_view
from editlens.lm.hooks import record_io

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM


@dataclass
class WiseHParams(HParams):
    """Hyperparameters of WISE (see the module docstring)."""

    layer: int = -4
    n_shards: int = 2
    mask_ratio: float = 0.2
    ties_density: float = 1.0
    lr: float = 0.01
    n_iter: int = 40
    loss_stop: float = 0.05
    alpha: float = 5.0
    beta: float = 20.0
    gamma: float = 10.0
    n_irrelevant: int = 12
    edits_per_memory: int = 0
    seed: int = 0

    RANGES = {"mask_ratio": FRACTION, "ties_density": FRACTION, "lr": POSITIVE, "loss_stop": NON_NEGATIVE,
              "alpha": NON_NEGATIVE, "beta": NON_NEGATIVE, "gamma": NON_NEGATIVE}
    ARCH_DEFAULTS = {"tiny": {"layer": 2, "alpha": 0.05, "beta": 0.5, "gamma": 0.3, "lr": 0.05, "n_iter": 30,
                              "n_irrelevant": 6},
                     "smollm2-135m": {"layer": 26, "lr": 0.02, "n_iter": 25}}

    def validate(self) -> None:
        if self.n_shards < 1:
            raise HParamsError(f"hyperparameter 'n_shards' of method 'wise' must be >= 1, got {self.n_shards}")
        for key in ("mask_ratio", "ties_density"):
            v = getattr(self, key)
            if not 0 < v <= 1:
                raise HParamsError(f"hyperparameter {key!r} of method 'wise' must be in (0, 1], got {v}")

    def layer_index(self, lm: "LM") -> int:
        n = lm.n_layers
        i = self.layer + n if self.layer < 0 else self.layer
        if not 0 <= i < n:
            raise HParamsError(f"hyperparameter 'layer' of method 'wise' is {self.layer}, but the model has {n} layers")
        return i


# ============================================================================================ pure functions
def activation_scores(acts: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``Δ_act`` per row: mean over the masked tokens of ``||A_t Δᵀ||₂``.

    Args:
        acts: ``[rows, seq, d_in]`` activations (inputs of the projection).
        delta: ``[d_out, d_in]`` side-memory difference ``W' − W``.
        mask: ``[rows, seq]`` bool, the prompt tokens (default: all).
    """
    norms = torch.linalg.vector_norm(acts.to(delta.dtype) @ delta.t(), dim=-1)  # [rows, seq]
    if mask is None:
        return norms.mean(dim=-1)
    m = mask.to(norms.dtype)
    return (norms * m).sum(-1) / m.sum(-1).clamp(min=1)


def routing_loss(edit_scores: torch.Tensor, irr_scores: torch.Tensor, alpha: float, beta: float, gamma: float
                 ) -> torch.Tensor:
    """WISE's margin loss, averaged over all (edit, irrelevant) pairs."""
    e = edit_scores[:, None]
    i = irr_scores[None, :]
    l = torch.relu(i - alpha) + torch.relu(beta - e) + torch.relu(gamma - (e - i))
    return l.mean()


def ties_merge(taus: Sequence[torch.Tensor], density: float = 1.0) -> torch.Tensor:
    """TIES-merging (Yadav et al., 2023) of task vectors: trim, elect sign, disjoint mean.

    Each ``τ`` keeps its top ``density`` fraction of entries by magnitude; the elected sign of an entry is the
    sign of the sum of trimmed values; the result is the mean of the trimmed values that agree with it (0 where
    none does).
    """
    stack = torch.stack([t.float() for t in taus])
    if density < 1.0:
        flat = stack.reshape(len(taus), -1).abs()
        k = max(1, int(round(density * flat.shape[1])))
        thr = flat.kthvalue(flat.shape[1] - k + 1, dim=1).values
        stack = torch.where(stack.abs() >= thr.view(-1, *[1] * (stack.dim() - 1)), stack, torch.zeros_like(stack))
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign[None]) & (stack != 0)
    num = (stack * agree).sum(0)
    cnt = agree.sum(0).clamp(min=1)
    return num / cnt


def calibrate_threshold(edit_scores: Sequence[float], irr_scores: Sequence[float]) -> tuple[float, bool]:
    """``(ε, separated)``: midpoint between max irrelevant and min edit score when separated, else min edit."""
    lo = min(edit_scores)
    hi = max(irr_scores) if len(irr_scores) else float("-inf")
    if lo > hi:
        return (lo + hi) / 2 if hi > float("-inf") else lo / 2, True
    return lo, False


# ============================================================================================ adaptor
@dataclass
class SideMemory:
    delta: torch.Tensor  # [d_out, d_in] float32
    eps: float = float("inf")
    prompts: list[str] = field(default_factory=list)


class WiseAdaptor(LayerAdaptor):
    """Side memories at one projection and the per-row router."""

    def __init__(self, module: str):
        self.module = module
        self.memories: list[SideMemory] = []
        #: per row of the last full forward: memory used (-1 = main memory) and the best score
        self.last_route = torch.zeros((0,), dtype=torch.long)
        self.last_scores = torch.zeros((0,))

    def clear(self) -> None:
        self.memories = []

    def route(self, inp: torch.Tensor, start_cols: torch.Tensor, key_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, width = inp.shape[0], inp.shape[1]
        if not self.memories:
            return torch.full((rows,), -1, dtype=torch.long), torch.zeros(rows)
        cols = torch.arange(width, device=inp.device)
        mask = (cols[None, :] >= start_cols.to(inp.device)[:, None]) & (cols[None, :] <= key_cols.to(inp.device)[:, None])
        scores = torch.stack([activation_scores(inp.float(), m.delta.to(inp.device), mask).cpu()
                              for m in self.memories], dim=1)  # [rows, M]
        eps = torch.tensor([m.eps for m in self.memories])
        active = scores > eps[None, :]
        masked = torch.where(active, scores, torch.full_like(scores, float("-inf")))
        best_s, best = masked.max(dim=1)
        route = torch.where(torch.isfinite(best_s), best, torch.full_like(best, -1))
        return route, scores.max(dim=1).values

    def _apply(self, inp: torch.Tensor, out: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        new = out
        for j, m in enumerate(self.memories):
            rows = (route == j).nonzero().flatten().tolist()
            if not rows:
                continue
            if new is out:
                new = out.clone()
            r = torch.tensor(rows, device=out.device)
            new[r] = out[r] + (inp[r].float() @ m.delta.to(out.device).t()).to(out.dtype)
        return new

    def on_full(self, inp, out, start_cols, key_cols):
        route, best = self.route(inp, start_cols, key_cols)
        self.last_route, self.last_scores = route, best
        return self._apply(inp, out, route), route

    def on_step(self, inp, out, state):
        return out if state is None else self._apply(inp, out, state)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.module.encode())
        for m in self.memories:
            h.update(f"{m.eps!r}|{float(m.delta.double().sum())!r}|{float(m.delta.double().abs().sum())!r}".encode())
        return h.hexdigest()[:16]


class WiseSystem(AdaptorSystem):
    """A model with WISE side memories (see the module docstring)."""

    adaptor: WiseAdaptor

    def __repr__(self) -> str:
        return f"WiseSystem(model={self.lm.name!r}, module={self.adaptor.module!r}, memories={len(self.adaptor.memories)})"


# ============================================================================================ training
#: short factual cloze prompts about general topics (no people, places or works of the shipped datasets), used
#: as irrelevant inputs of the routing loss together with held-out prose
_GENERIC_CLOZE = ("Water boils at a temperature of", "The chemical symbol for gold is", "The largest planet in the solar "
                  "system is", "A week has a total of", "The opposite of hot is", "Bees make a sweet food called",
                  "The primary colours are red, blue and", "A triangle has a total of", "Ice is the solid form of",
                  "The fastest land animal is the", "Photosynthesis takes place in the", "The freezing point of "
                  "water is")


def irrelevant_prompts(n: int) -> list[str]:
    """``n`` irrelevant prompts: alternately generic factual cloze prompts and held-out prose (first 16 words)."""
    text = (Path(__file__).resolve().parents[1] / "resources" / "heldout.txt").read_text()
    sents = [" ".join(s.split()[:16]) for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 6]
    out: list[str] = []
    for a, b in zip(_GENERIC_CLOZE, sents):
        out += [a, b]
    return out[:n]


def _prompt_acts(lm: "LM", module: str, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of ``module`` for each prompt, left-padded ``[n, width, d_in]``, and the token mask ``[n, width]``."""
    ids = [ops.encode(lm.tokenizer, p) for p in prompts]
    batch = ops.pad_left(ids, ops._pad_id(lm), lm.device)
    with torch.no_grad(), record_io(lm.model, [module], kind="input") as rec:
        lm.model(**batch, logits_to_keep=1, use_cache=False)
    return rec[module].float(), batch["attention_mask"].bool()


def train_shard(lm: "LM", module: str, delta0: torch.Tensor, mask: torch.Tensor, prompts: Sequence[str],
                targets: Sequence[str], irr: tuple[torch.Tensor, torch.Tensor], hp: WiseHParams
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Train one shard's side-memory difference from ``delta0`` under the gradient ``mask``."""
    batch, key_cols, tids = prompt_target_batch(lm, prompts, targets)
    e_acts, e_mask = _prompt_acts(lm, module, prompts)
    i_acts, i_mask = irr
    d = delta0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([d], lr=hp.lr)
    fmask = mask.to(d.dtype)

    def hook(_m: Any, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + (args[0].float() @ d.t()).to(out.dtype)

    h = lm.module(module).register_forward_hook(hook)
    stats = {"nll": float("inf"), "route": float("inf"), "steps": 0.0}
    try:
        for step in range(hp.n_iter + 1):
            nll = target_nll(lm, batch, key_cols, tids)
            la = routing_loss(activation_scores(e_acts, d, e_mask), activation_scores(i_acts, d, i_mask),
                              hp.alpha, hp.beta, hp.gamma)
            stats.update(nll=float(nll.detach()), route=float(la.detach()), steps=float(step))
            if step == hp.n_iter or (stats["nll"] < hp.loss_stop and stats["route"] == 0.0):
                break
            opt.zero_grad()
            (nll + la).backward()
            d.grad.mul_(fmask)
            opt.step()
    finally:
        h.remove()
    return d.detach(), stats


@register_method("wise")
class WiseEditor(Editor):
    """WISE as an editing method: the Edit's system is a :class:`WiseSystem`; ``undo()`` drops the side memories."""

    hparams_class = WiseHParams

    def apply(self, lm: "LM", cases: Sequence["EditCase"], hparams: HParams, *, evk_align: Any = None,
              progress: bool = True, sequence: SequenceState | None = None) -> Edit:
        assert isinstance(hparams, WiseHParams)
        hp = hparams
        module = lm.arch.mlp_out_at(hp.layer_index(lm))
        def make() -> WiseSystem:
            return WiseSystem(ModelSystem(lm), WiseAdaptor(module))

        system: WiseSystem = (make() if sequence is None else
                              sequence.kept("wise_system", make, lambda s: s.adaptor.clear))
        ad = system.adaptor
        w = weight_view(lm.module(module))
        if not ad.memories or (hp.edits_per_memory and len(ad.memories[-1].prompts) >= hp.edits_per_memory):
            ad.memories.append(SideMemory(torch.zeros(w.shape, dtype=torch.float32, device=w.device)))
        mem = ad.memories[-1]
        items = [(system.format.apply(r.text), r.target_new) for c in cases for r in c.rewrites]
        irr_prompts = [system.format.apply(p) for p in irrelevant_prompts(hp.n_irrelevant)]
        irr = _prompt_acts(lm, module, irr_prompts)
        step = sequence.step if sequence is not None else 0
        taus, diag = [], {}
        with torch.enable_grad():
            for s in range(min(hp.n_shards, len(items))):
                shard = items[s::hp.n_shards]
                g = torch.Generator().manual_seed(hp.seed * 1_000_003 + step * 101 + s)
                mask = (torch.rand(w.shape, generator=g) < hp.mask_ratio).to(w.device)
                d, st = train_shard(lm, module, mem.delta, mask, [p for p, _ in shard], [t for _, t in shard], irr, hp)
                taus.append(d - mem.delta)
                for k, v in st.items():
                    diag[f"loss/shard{s}_{k}"] = v
        mem.delta = mem.delta + ties_merge(taus, hp.ties_density).to(mem.delta.device)
        mem.prompts.extend(p for p, _ in items)
        e_acts, e_mask = _prompt_acts(lm, module, mem.prompts)
        e_scores = activation_scores(e_acts, mem.delta, e_mask).tolist()
        i_scores = activation_scores(irr[0], mem.delta, irr[1]).tolist()
        mem.eps, separated = calibrate_threshold(e_scores, i_scores)
        system.refresh()
        diag.update({"side_memories": len(ad.memories), "threshold": mem.eps, "router_separated": separated,
                     "score_edit_min": min(e_scores), "score_irrelevant_max": max(i_scores),
                     "delta_norm/side": float(mem.delta.norm())})
        if sequence is not None:
            return Edit(system, self.name, cases, hparams, diag, lm=lm, undoable=False)

        def undo() -> None:
            ad.clear()
            system.refresh()

        return Edit(system, self.name, cases, hparams, diag, lm=lm, on_undo=undo)
