"""EVK-Align: keep the edited model's behaviour in place on embedding-virtualized knowledge (after arXiv 2602.01977).

The EVK paper adds a plug-in regulariser to existing editors that "confines embedding drift": on virtual samples
around the edited fact (Gaussian noise on input embeddings, see :mod:`editlens.evaluate.evk`) the edited model
should answer like the original one. The paper's loss form, weight and insertion point are not available to us;
**this loss is ours**:

    L_EVK = weight · mean_{x̃ ∈ V} KL( p_orig(· | x̃) ‖ p_edit(· | x̃) )

over the set ``V`` of virtual samples — for every σ of the ladder ``sigmas`` and ``j < n_samples``:

* the edit prompt with noise on ``spans`` (default ``relation``: the template words around an unchanged subject,
  i.e. "other relations of the same subject", which the edit should not reach);
* (weight-space methods only) the case's neighbourhood prompts with noise on the same spans (``full`` when their
  subject cannot be located), at most ``max_neighbors`` per case.

``p`` is the next-token distribution at the last prompt token over the full vocabulary; the noise is the EVK-Bench
noise ``e' = e + σ‖e‖ε/√d`` with the same seeded generator, so EVK-Align constrains exactly the kind of samples
EVK-Bench measures (but with its own seed by default, ``seed=1``, so the benchmark's samples are not the ones
trained on).

Where it plugs in
-----------------
* **Value optimisation** (ROME, MEMIT, AlphaEdit, EMMET, RECT, PRUNE, PMET, ... — anything calling
  :func:`editlens.edit.locate.optimise_values` with ``extra_loss=evk_align``): the object is called with the
  :class:`~editlens.edit.locate.ValueLossContext`; virtual samples of each request's *unprefixed* prompt are run
  with the request's ``δ`` added at its last subject token (``ctx.with_delta``), the original distributions are
  computed once (without ``δ``) at the first step. Only edit-prompt samples enter here: ``δ`` acts at the edited
  subject's position only, so neighbour prompts (other subjects) would add a constant. With the ``relation`` span
  the subject tokens are untouched, so applying ``δ`` there is exact within the value-optimisation model; with
  ``full``/``subject`` spans ``δ`` is still applied in full (an approximation: the real weight edit answers a
  perturbed subject key only partly).
* **Weight-space losses** (FT-L/FT-M and any method calling ``evk_align.extra_loss(lm, cases)`` with the current,
  trainable weights): edit-prompt and neighbour samples are both used; the original distributions are computed at
  the first call (the weights are still the original ones then) and kept for the same model fingerprint and cases.

Both paths return a scalar whose value is ``L_EVK`` and whose gradient is exact: the KL is accumulated chunk by
chunk (``batch_tokens`` per chunk) with ``torch.autograd.grad`` so memory stays bounded, and the returned tensor is
the first-order surrogate ``L + Σ_θ ⟨θ, g_θ⟩ − Σ_θ ⟨θ, g_θ⟩.detach()`` (value L, gradient g w.r.t. every leaf θ being
optimised: ``ctx.leaves()``, every place's ``δ`` (PMET: MHSA and FFN), or the model's trainable parameters).

Switch it on with ``editlens.edit(lm, cases, "memit", evk_align=EvkAlign(weight=...))``; the settings are recorded in
``Edit.diagnostics["evk_align"]`` and the last value in ``diagnostics["loss/extra"]`` (value optimisation).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from editlens.errors import HParamsError
from editlens.lm import perturb as evk  # embedding perturbation shared with the EVK metrics
from editlens.lm import ops

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.edit.locate import ValueLossContext
    from editlens.lm.load import LM


@dataclass
class EvkAlign:
    """The EVK-Align regulariser (see the module docstring).

    Attributes:
        weight: λ_EVK, the weight of the mean KL term.
        sigmas: relative drift scales of the virtual samples (``e' = e + σ‖e‖ε/√d``).
        n_samples: samples per prompt and σ.
        spans: perturbed spans of the edit prompt (``relation``, ``full``, ``subject``).
        neighbors: also align neighbourhood prompts (weight-space losses only).
        max_neighbors: neighbourhood prompts per case at most.
        seed: base seed of the noise (EVK-Bench uses 0 by default; 1 here keeps them apart).
        batch_tokens: token budget of one forward chunk.
    """

    weight: float = 1.0
    sigmas: tuple[float, ...] = (0.2, 0.4)
    n_samples: int = 4
    spans: tuple[str, ...] = ("relation",)
    neighbors: bool = True
    max_neighbors: int = 3
    seed: int = 1
    batch_tokens: int = 1024
    _ref: Any = field(default=None, init=False, repr=False, compare=False)
    _ref_key: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.sigmas = tuple(float(s) for s in (self.sigmas if isinstance(self.sigmas, (list, tuple)) else [self.sigmas]))
        self.spans = tuple(str(s) for s in (self.spans if isinstance(self.spans, (list, tuple)) else [self.spans]))
        if not (isinstance(self.weight, (int, float)) and math.isfinite(float(self.weight)) and self.weight >= 0):
            raise HParamsError(f"evk_align: 'weight' must be a non-negative number, got {self.weight!r}")
        self.weight = float(self.weight)
        if not self.sigmas or any(not math.isfinite(s) or s <= 0 for s in self.sigmas):
            raise HParamsError(f"evk_align: 'sigmas' must be positive numbers, got {self.sigmas!r}")
        bad = [s for s in self.spans if s not in evk.SPANS]
        if bad or not self.spans:
            raise HParamsError(f"evk_align: 'spans' must be among {', '.join(evk.SPANS)}, got {list(self.spans)!r}")
        for key in ("n_samples", "batch_tokens"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise HParamsError(f"evk_align: {key!r} must be a positive integer, got {v!r}")
        if isinstance(self.max_neighbors, bool) or not isinstance(self.max_neighbors, int) or self.max_neighbors < 0:
            raise HParamsError(f"evk_align: 'max_neighbors' must be a non-negative integer, got {self.max_neighbors!r}")

    # ------------------------------------------------------------------ config / diagnostics
    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> "EvkAlign":
        """From a spec's ``[methods.evk_align]`` table; unknown keys raise :class:`HParamsError` naming them."""
        config = dict(config or {})
        names = [f.name for f in fields(cls) if f.init]
        unknown = [k for k in config if k not in names]
        if unknown:
            raise HParamsError(f"evk_align: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                               f"{', '.join(names)}")
        return cls(**config)

    def settings(self) -> dict[str, Any]:
        """Plain settings recorded as ``diagnostics["evk_align"]``."""
        # not asdict(): it deep-copies the private reference cache too (which holds the model and its lock)
        d = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        d["sigmas"], d["spans"] = list(self.sigmas), list(self.spans)
        return d

    # ------------------------------------------------------------------ entry points
    def __call__(self, ctx: "ValueLossContext") -> torch.Tensor:
        """The value-optimisation loss (``optimise_values(..., extra_loss=evk_align)``)."""
        return self.value_loss(ctx)

    def extra_loss(self, *args: Any) -> torch.Tensor:
        """``extra_loss(ctx)`` → :meth:`value_loss`; ``extra_loss(lm, cases)`` → :meth:`weight_loss`."""
        if len(args) == 1:
            return self.value_loss(args[0])
        if len(args) == 2:
            return self.weight_loss(args[0], args[1])
        raise TypeError("EvkAlign.extra_loss takes (ctx) or (lm, cases)")

    # ------------------------------------------------------------------ virtual samples
    def _items(self, lm: "LM", prompt: str, subj: tuple[int, int] | None, spans: Sequence[str]
               ) -> list[evk.VirtualItem]:
        ids = ops.encode(lm.tokenizer, prompt)
        sp = evk.span_tokens(lm.tokenizer, prompt, 0, len(prompt), subj)
        full = sp["full"]
        where = {t: i for i, t in enumerate(full)}
        out = []
        for j in range(self.n_samples):
            eps = evk.sample_noise(self.seed, prompt, j, len(full), lm.d_model)
            for span in spans:
                pos = sp.get(span)
                if pos is None:
                    pos, span = full, "full"
                if not pos:
                    continue
                for s in self.sigmas:
                    out.append(evk.VirtualItem(ids, list(pos), eps[[where[t] for t in pos]], s))
        return out

    def _chunks(self, items: Sequence[evk.VirtualItem]) -> list[list[int]]:
        return ops.plan_batches([len(it.ids) for it in items], self.batch_tokens, max_rows=128)

    # ------------------------------------------------------------------ value optimisation
    def value_loss(self, ctx: "ValueLossContext") -> torch.Tensor:
        """EVK-Align on the value optimisation of locate-then-edit methods (see the module docstring)."""
        lm = ctx.lm
        leaves = ctx.leaves()
        if self.weight == 0 or not leaves:
            return torch.zeros((), device=lm.device)
        if ctx.step == 0 or self._ref_key is not ctx:
            items, req_idx, sub_pos = [], [], []
            for i, r in enumerate(ctx.requests):
                subj = evk.subject_range(r.prompt, r.template, r.subject)
                its = self._items(lm, r.prompt, subj, self.spans)
                last = ops.subject_last_token(lm.tokenizer, r.template, r.subject)
                items += its
                req_idx += [i] * len(its)
                sub_pos += [last] * len(its)
            chunks = self._chunks(items)
            self._ref = (items, req_idx, sub_pos, chunks, _reference_logprobs(lm, items, chunks))
            self._ref_key = ctx
        items, req_idx, sub_pos, chunks, refs = self._ref

        def with_delta(g: list[int], width: int) -> Any:
            rows = torch.arange(len(g), device=lm.device)
            pos = torch.tensor([width - len(items[i].ids) + sub_pos[i] for i in g], device=lm.device)
            ridx = torch.tensor([req_idx[i] for i in g], device=lm.device)
            return ctx.with_delta(rows, pos, ridx)

        return _kl_surrogate(lm, items, chunks, refs, leaves, self.weight, with_delta)

    # ------------------------------------------------------------------ weight-space losses
    def weight_loss(self, lm: "LM", cases: Sequence["EditCase"]) -> torch.Tensor:
        """EVK-Align on a weight-space objective (FT): differentiable in ``lm``'s trainable parameters."""
        params = [p for p in lm.model.parameters() if p.requires_grad]
        if self.weight == 0 or not params:
            return torch.zeros((), device=lm.device)
        key = (lm.fingerprint, tuple(c.case_id for c in cases), id(lm))
        if self._ref_key != key:
            items: list[evk.VirtualItem] = []
            for c in cases:
                rw = c.rewrite
                items += self._items(lm, rw.text, evk.subject_range(rw.text, rw.prompt, rw.subject), self.spans)
                if self.neighbors and self.max_neighbors:
                    for p, subj in evk.case_prompts(c, "neighborhood", self.max_neighbors):
                        items += self._items(lm, p, subj, self.spans)
            chunks = self._chunks(items)
            self._ref = (items, chunks, _reference_logprobs(lm, items, chunks))
            self._ref_key = key
        items, chunks, refs = self._ref
        return _kl_surrogate(lm, items, chunks, refs, params, self.weight, None)


def _reference_logprobs(lm: "LM", items: Sequence[evk.VirtualItem], chunks: Sequence[list[int]]
                        ) -> list[torch.Tensor]:
    """Last-token log-probabilities of the unedited model on every perturbed item, one tensor per chunk."""
    refs = []
    with torch.no_grad():
        for g in chunks:
            batch, Z, S = evk.virtual_batch(lm, [items[i] for i in g])
            with evk.embedding_patch(lm, Z, S):
                lg = lm.model(**batch, logits_to_keep=1, use_cache=False).logits[:, -1, :].float()
            refs.append(torch.log_softmax(lg, -1))
    return refs


def _kl_surrogate(lm: "LM", items: Sequence[evk.VirtualItem], chunks: Sequence[list[int]],
                  refs: Sequence[torch.Tensor], leaves: Sequence[torch.Tensor], weight: float,
                  context: Callable[[list[int], int], Any] | None) -> torch.Tensor:
    """``weight`` × mean KL(reference ‖ current) over the items, as a surrogate scalar (see :func:`_surrogate`).

    Chunk by chunk: forward with the chunk's embedding perturbations (inside ``context(chunk, padded width)`` when
    given, e.g. the value-optimisation delta), KL against the reference, ``autograd.grad`` into ``leaves``, and
    accumulation, so only one chunk's graph is alive at a time."""
    n = max(1, len(items))
    total = 0.0
    grads = [torch.zeros_like(t) for t in leaves]
    with torch.enable_grad():
        for g, ref in zip(chunks, refs):
            batch, Z, S = evk.virtual_batch(lm, [items[i] for i in g])
            extra = context(g, batch["input_ids"].shape[1]) if context is not None else contextlib.nullcontext()
            with evk.embedding_patch(lm, Z, S), extra:
                lg = lm.model(**batch, logits_to_keep=1, use_cache=False).logits[:, -1, :].float()
            lp = torch.log_softmax(lg, -1)
            kl = (ref.exp() * (ref - lp)).sum(-1).sum() * (weight / n)
            for acc, gr in zip(grads, torch.autograd.grad(kl, leaves, allow_unused=True)):
                if gr is not None:
                    acc.add_(gr)
            total += float(kl.detach())
    return _surrogate(total, leaves, grads)


def _surrogate(value: float, leaves: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """A scalar equal to ``value`` whose gradient w.r.t. each leaf is the matching entry of ``grads``."""
    dev = leaves[0].device
    lin = sum(((t * g.to(t.dtype)).sum() for t, g in zip(leaves, grads)), torch.zeros((), device=dev))
    return lin - lin.detach() + torch.tensor(float(value), device=dev)


def from_config(config: Mapping[str, Any] | None) -> EvkAlign:
    """:meth:`EvkAlign.from_config` (what the experiment runner calls for a spec's ``evk_align`` table)."""
    return EvkAlign.from_config(config)


#: alias with the paper's capitalisation
EVKAlign = EvkAlign
