"""Diagnostics of collapse after (sequential) editing: ``hidden_rank@L`` and ``delta_spectrum`` (below).

The benchmarking paper (arXiv 2505.18690) blames the failure of sequential parameter editing partly on a
"dimensional collapse" of hidden states. ``hidden_rank@L`` measures it as the **effective rank** (Roy & Vetterli,
EUSIPCO 2007) of the hidden states at the output of block ``L`` over a fixed text set (the shipped held-out text,
every token of every paragraph, each paragraph fed alone):

    erank(H) = exp(−Σ_i p_i log p_i),   p_i = σ_i / Σ_j σ_j,

σ the singular values of the ``[tokens, d]`` matrix H (not centred; float64). A matrix of rank r with r equal
singular values has erank exactly r; erank lies in [1, rank(H)].

One row (``probe_kind = "general"``, ``case_id = "text:heldout.txt"``): ``hidden_rank@L`` = erank(edited) /
erank(base) — 1 for an unchanged model (the metric's identity), below 1 when the edited model's states collapse
onto fewer directions. The two effective ranks themselves: :func:`hidden_rank` on each system.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from editlens.errors import MetricError
from editlens.evaluate.core import BASE, EDITED, Answers, CustomRequest, Metric, Request, Row, register_metric
from editlens.evaluate.general import GENERAL_KIND, read_heldout
from editlens.lm import hooks, ops

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.system import System


def effective_rank(matrix: torch.Tensor) -> float:
    """Effective rank of a 2-D matrix: exp of the entropy of its normalised singular values (float64)."""
    if matrix.dim() != 2 or matrix.numel() == 0:
        raise MetricError(f"effective rank needs a non-empty 2-D matrix, got shape {tuple(matrix.shape)}")
    s = torch.linalg.svdvals(matrix.detach().double().cpu())
    total = float(s.sum())
    if not math.isfinite(total):
        return float("nan")
    if total <= 0:
        return float("nan")
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@dataclass(frozen=True, order=True)
class HiddenStates(CustomRequest):
    """The hidden states ``[tokens, d]`` (float32, CPU) at the output of block ``layer`` for ``text`` fed alone."""

    text: str
    layer: int

    @classmethod
    def answer_group(cls, system: "System", requests: Sequence["HiddenStates"]) -> list[torch.Tensor]:
        lm = getattr(system, "lm", None)
        if lm is None:
            raise MetricError(f"hidden_rank needs a system backed by a model; {type(system).__name__} has none")
        out = []
        with system.calling(), torch.no_grad():  # type: ignore[attr-defined]
            for r in requests:
                if not 0 <= r.layer < lm.n_layers:
                    raise MetricError(f"hidden_rank@{r.layer}: the model has layers 0..{lm.n_layers - 1}")
                ids = ops.fit_ids(lm, ops.encode(lm.tokenizer, r.text), 0, what="held-out paragraph", index=0,
                                  text=r.text)
                name = lm.arch.block(r.layer)
                with hooks.record_io(lm.model, [name], kind="output") as rec:
                    lm.model(input_ids=torch.tensor([ids], device=lm.device), logits_to_keep=1, use_cache=False)
                out.append(rec[name][0].float().cpu())
        return out


@register_metric("hidden_rank", groups=("collapse",))
class HiddenRank(Metric):
    """Effective rank of the block-``L`` hidden states over the held-out text, edited / base (see module doc)."""

    direction = "higher"
    value_range = (0.0, float("inf"))
    identity = 1.0

    def __init__(self, layer: int = 0, path: str | None = None):
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise MetricError(f"hidden_rank@L: L must be a layer index >= 0, got {layer!r}")
        super().__init__(f"hidden_rank@{layer}", layer=layer, path=path)
        self.layer = layer
        self.paragraphs = read_heldout(path)

    @classmethod
    def from_name(cls, name: str, arg: str | None) -> list[Metric]:
        """``hidden_rank@L`` (``L`` a layer index; default 0)."""
        if arg is None:
            return [cls(0)]
        try:
            layer = int(arg)
        except ValueError:
            raise MetricError(f"hidden_rank@L: L must be an integer layer index, got {arg!r}") from None
        return [cls(layer)]

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:  # pragma: no cover
        return ()

    def requests(self, cases: Sequence["EditCase"]) -> Iterable[tuple[str, Request]]:
        return [(role, HiddenStates(p, self.layer)) for role in (BASE, EDITED) for p in self.paragraphs]

    def rows(self, cases: Sequence["EditCase"], answers: Answers) -> Iterable[Row]:
        ranks = {}
        for role in (BASE, EDITED):
            h = torch.cat([answers.get(HiddenStates(p, self.layer), on=role) for p in self.paragraphs], dim=0)
            ranks[role] = effective_rank(h)
        cid = "text:heldout.txt" if self.params.get("path") is None else f"text:{self.params['path']}"
        return [Row(cid, GENERAL_KIND, self.name, ranks[EDITED] / ranks[BASE])]


def hidden_rank(system: "System", layer: int, path: str | None = None) -> float:
    """The effective rank of ``system``'s block-``layer`` outputs over the held-out text (what ``hidden_rank@L``
    divides)."""
    texts = read_heldout(path)
    states = HiddenStates.answer_group(system, [HiddenStates(t, layer) for t in texts])
    return effective_rank(torch.cat(states, dim=0))


# ================================================================================================ delta_spectrum
DELTA_TOP_K = 4
_MATRICES = {"mlp_out": "mlp_out_at", "mlp_in": "mlp_in_at", "attn_out": "attn_out_at"}


@dataclass(frozen=True, order=True)
class MatrixStack(CustomRequest):
    """The ``[layers, out, in]`` weights (float32, CPU copies) of one kind of matrix (``mlp_out``, ``mlp_in``,
    ``attn_out``) of every layer of the system's model, as the system computes with them (pinned weights)."""

    matrix: str

    @classmethod
    def answer_group(cls, system: "System", requests: Sequence["MatrixStack"]) -> list[torch.Tensor]:
        from editlens.lm.arch import weight_view

        lm = getattr(system, "lm", None)
        if lm is None:
            raise MetricError(f"delta_spectrum needs a system backed by a model; {type(system).__name__} has none")
        out = []
        with system.calling():  # type: ignore[attr-defined]
            for r in requests:
                at = getattr(lm.arch, _MATRICES[r.matrix])
                out.append(torch.stack([weight_view(lm.module(at(l))).detach().float().cpu()
                                        for l in range(lm.n_layers)]))
        return out


@register_metric("delta_spectrum", groups=("collapse",))
class DeltaSpectrum(Metric):
    """Top singular values and Frobenius norm of ΔW = W_edited − W_base of every layer's matrix of one kind
    (``delta_spectrum`` = ``delta_spectrum@mlp_out``: the MLP output projections that ROME/MEMIT edit; also
    ``@mlp_in``, ``@attn_out``). Rows per layer (``case_id`` = ``"<matrix>:<layer>"``, ``probe_kind =
    "general"``): ``delta_spectrum`` = ‖ΔW‖_F and ``delta_spectrum_s1`` … ``_s4`` = σ₁ ≥ … ≥ σ₄ of ΔW (float64
    SVD). Unedited matrices give 0 (the identity). Evaluated at the checkpoints of a sequential run against the
    unedited base, it follows the accumulated change."""

    direction = "lower"
    value_range = (0.0, float("inf"))
    aux_ranges = {f"_s{i}": (0.0, float("inf")) for i in range(1, DELTA_TOP_K + 1)}
    identity = 0.0

    def __init__(self, matrix: str = "mlp_out"):
        if matrix not in _MATRICES:
            raise MetricError(f"delta_spectrum@M: M must be one of {', '.join(_MATRICES)}, got {matrix!r}")
        super().__init__("delta_spectrum" if matrix == "mlp_out" else f"delta_spectrum@{matrix}", matrix=matrix)
        self.matrix = matrix

    @classmethod
    def from_name(cls, name: str, arg: str | None) -> list[Metric]:
        """``delta_spectrum`` (MLP output projections) or ``delta_spectrum@mlp_in`` / ``@attn_out``."""
        return [cls(arg or "mlp_out")]

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:  # pragma: no cover
        return ()

    def requests(self, cases: Sequence["EditCase"]) -> Iterable[tuple[str, Request]]:
        return [(role, MatrixStack(self.matrix)) for role in (BASE, EDITED)]

    def rows(self, cases: Sequence["EditCase"], answers: Answers) -> Iterable[Row]:
        wb = answers.get(MatrixStack(self.matrix), on=BASE)
        we = answers.get(MatrixStack(self.matrix), on=EDITED)
        if wb.shape != we.shape:
            raise MetricError(f"delta_spectrum: base and edited {self.matrix} weights differ in shape "
                              f"({tuple(wb.shape)} vs {tuple(we.shape)})")
        out = []
        for l in range(wb.shape[0]):
            d = we[l].double() - wb[l].double()
            sv = torch.linalg.svdvals(d)
            cid = f"{self.matrix}:{l}"
            out.append(Row(cid, GENERAL_KIND, self.name, float(torch.linalg.norm(d))))
            for i in range(DELTA_TOP_K):
                out.append(Row(cid, GENERAL_KIND, f"{self.name}_s{i + 1}", float(sv[i]) if i < len(sv) else 0.0))
        return out
