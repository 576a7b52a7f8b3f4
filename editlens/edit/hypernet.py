"""The gradient-transforming hyper-network shared by MEND and MALMEN, and the training loop of both.

Background (Mitchell et al., 2022, "Fast Model Editing at Scale", §3): for a linear layer ``y = W u`` the
fine-tuning gradient of a loss over a sequence is ``∇_W L = Σ_t δ_t u_tᵀ`` (``u_t`` the layer's input at token
``t``, ``δ_t = ∂L/∂y_t`` the gradient w.r.t. its output), a sum of rank-1 terms. An editor network maps each pair
``(u_t, δ_t)`` to ``(ũ_t, δ̃_t)``:

* :func:`capture_factors` computes the pairs on the unedited model for the rewrite prompts (teacher-forced
  NLL of ``target_new``, the mean over the target's tokens, summed over the edits). ``δ`` is read as the gradient
  of a zero tensor added to each module's output, so autograd goes back only to the first edited layer and no
  weight gradient is formed;
* :class:`HyperBank` holds one :class:`ShapeNet` per weight shape (shared by every edited module of that shape, as
  in the paper), per-module input normalisation (running mean / standard deviation of ``u`` and ``δ``, updated
  during training, frozen afterwards), per-module scale and shift of each block, the learned per-module step size
  ``α_l`` (MEND) and the learned ridge ``λ_l`` (MALMEN);
* MEND's edit is ``ΔW_l = −α_l Σ_t δ̃_t ũ_tᵀ`` (:meth:`HyperBank.mend_delta`); MALMEN's is the least-squares shift
  of :func:`ls_shift` (:meth:`HyperBank.malmen_delta`).

:func:`train_hypernet` trains a bank on edit cases (see the docstring there); MEND and MALMEN
(``editlens/edit/mend.py``, ``malmen.py``) are thin :class:`~editlens.edit.trained.TrainableEditor` classes over it.

Module layouts: the edited modules are named through :class:`~editlens.lm.arch.Arch` (``mlp_in``, ``mlp_gate``
when the MLP is gated, ``mlp_out``); GPT-2's ``Conv1D`` stores ``W`` as ``[in, out]``, which the hooks never see
(they work on the module's input and output) and :func:`editlens.lm.arch.add_delta` transposes, so every delta here
is ``[out, in]``.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping, Sequence

import torch
from torch import nn

from editlens.edit.base import NON_NEGATIVE, POSITIVE, HParams, Range
from editlens.edit.trained import TrainableEditor
from editlens.errors import HParamsError, MethodError
from editlens.lm.arch import in_out_features
from editlens.lm.ops import _pad_id, pad_left, target_token_ids

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM

#: module kinds that can be edited (attributes of :class:`~editlens.lm.arch.Arch`)
MODULE_KINDS = ("mlp_in", "mlp_gate", "mlp_out")
_EPS = 1e-7


# ============================================================================================ module selection
def resolve_layers(lm: "LM", layers: Sequence[int], n_last: int = 3) -> list[int]:
    """``layers`` as absolute indices (negative counts from the end); empty = the last ``n_last`` blocks."""
    n = lm.n_layers
    if not layers:
        return list(range(max(0, n - n_last), n))
    out = []
    for l in layers:
        a = int(l) + n if int(l) < 0 else int(l)
        if not 0 <= a < n:
            raise HParamsError(f"layer {l} does not exist in {lm.name!r} ({n} blocks)")
        out.append(a)
    if len(set(out)) != len(out):
        raise HParamsError(f"hyperparameter 'layers' names a block twice: {list(layers)}")
    return out


def edited_modules(lm: "LM", layers: Sequence[int], kinds: Sequence[str]) -> list[str]:
    """Module paths of the edited linear layers: for each layer, each kind in ``kinds`` (``mlp_gate`` is skipped on
    architectures without a gated MLP)."""
    bad = [k for k in kinds if k not in MODULE_KINDS]
    if bad or not kinds:
        raise HParamsError(f"hyperparameter 'modules' must name some of {', '.join(MODULE_KINDS)}, got {list(kinds)}")
    out = []
    for l in layers:
        for k in kinds:
            if k == "mlp_gate":
                if lm.arch.mlp_gate is None:
                    continue
                out.append(lm.arch.mlp_gate.format(l))
            else:
                out.append(getattr(lm.arch, f"{k}_at")(l))
    return out


# ============================================================================================ batches and losses
@dataclass
class Rows:
    """A left-padded teacher-forcing batch: each row is ``prompt + target[:-1]``; the last ``len(target)`` logits of
    a row predict the target. ``h`` (with ``cache``): the hidden states at the input of the first edited block, so
    that only the blocks from there on run (see :class:`PrefixCache`)."""

    inputs: dict[str, torch.Tensor]
    targets: list[torch.Tensor]
    keep: int
    h: torch.Tensor | None = None
    cache: "PrefixCache | None" = None

    @property
    def n(self) -> int:
        return len(self.targets)


def _row_ids(lm: "LM", pairs: Sequence[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]]]:
    seqs, targets = [], []
    for prompt, target in pairs:
        p, t = target_token_ids(lm.tokenizer, prompt, target)
        seqs.append(p + t[:-1])
        targets.append(t)
    return seqs, targets


def make_rows(lm: "LM", pairs: Sequence[tuple[str, str]], cache: "PrefixCache | None" = None) -> Rows:
    """A :class:`Rows` batch of ``(prompt, target)`` pairs on ``lm``'s device (with the cached prefix states when
    ``cache`` is given and enabled)."""
    seqs, targets = _row_ids(lm, pairs)
    inputs = pad_left(seqs, _pad_id(lm), lm.device)
    keep = min(max(len(t) for t in targets), inputs["input_ids"].shape[1])
    rows = Rows(inputs, [torch.tensor(t, dtype=torch.long, device=lm.device) for t in targets], keep)
    if cache is not None and cache.enabled:
        rows.h, rows.cache = cache.states(seqs, inputs), cache
    return rows


def row_logprobs(lm: "LM", rows: Rows) -> torch.Tensor:
    """Log-probabilities at the last ``rows.keep`` positions ``[rows, keep, vocab]`` (float32)."""
    if rows.h is not None and rows.cache is not None:
        with rows.cache.suffix_only():
            out = lm.model(inputs_embeds=rows.h, attention_mask=rows.inputs["attention_mask"],
                           position_ids=rows.inputs["position_ids"], logits_to_keep=rows.keep, use_cache=False)
    else:
        out = lm.model(**rows.inputs, logits_to_keep=rows.keep, use_cache=False)
    return torch.log_softmax(out.logits[:, -rows.keep:, :].float(), dim=-1)


class _Stop(Exception):
    pass


class PrefixCache:
    """Hidden states at the input of block ``first`` (the first edited block), per token sequence.

    The blocks before ``first`` are never edited, so during training their output for a given sequence never
    changes: it is computed once (the forward pass is stopped at block ``first``) and each later pass runs only
    the blocks from ``first`` on (the model is called with ``inputs_embeds`` = the cached states and its block list
    temporarily cut to ``[first:]``). On SmolLM2 with the last 3 of 30 blocks edited this removes ~90 % of the
    model's work from every training and validation pass.

    The shortcut is used only when it is verified on this model: on construction, the logits of a test sequence by
    the cut model must equal the full model's (``rtol 1e-4``); architectures that transform ``inputs_embeds`` before
    the first block (GPT-2 adds position embeddings, Gemma scales them) fail the check and run the full model
    (``enabled`` is ``False``, ``reason`` says why)."""

    def __init__(self, lm: "LM", first: int):
        self.lm, self.first = lm, int(first)
        self._store: dict[tuple[int, ...], torch.Tensor] = {}
        parent, _, attr = lm.arch.layers.rpartition(".")
        self._parent = lm.module(parent) if parent else lm.model
        self._attr = attr
        self.enabled, self.reason = False, "first edited block is block 0"
        if self.first > 0:
            self.enabled, self.reason = True, ""
            self._verify()

    @contextlib.contextmanager
    def suffix_only(self) -> Iterator[None]:
        full = getattr(self._parent, self._attr)
        setattr(self._parent, self._attr, nn.ModuleList(list(full)[self.first:]))
        try:
            yield
        finally:
            setattr(self._parent, self._attr, full)

    def _prefix(self, seqs: Sequence[list[int]]) -> list[torch.Tensor]:
        """Hidden states at the input of block ``first`` of each sequence ``[len, d]`` (the pass stops there)."""
        inputs = pad_left(seqs, _pad_id(self.lm), self.lm.device)
        got: dict[str, torch.Tensor] = {}

        def hook(_m, args, kwargs):
            got["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
            raise _Stop

        block = getattr(self._parent, self._attr)[self.first]
        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                self.lm.model(**inputs, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        h, width = got["h"], inputs["input_ids"].shape[1]
        return [h[r, width - len(s):].clone() for r, s in enumerate(seqs)]

    def states(self, seqs: Sequence[list[int]], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Left-padded cached states ``[rows, width, d]`` of ``seqs`` (computing the missing ones in one pass)."""
        missing = list(dict.fromkeys(tuple(s) for s in seqs if tuple(s) not in self._store))
        if missing:
            for key, h in zip(missing, self._prefix([list(k) for k in missing])):
                self._store[key] = h
        width = inputs["input_ids"].shape[1]
        first = self._store[tuple(seqs[0])]
        out = torch.zeros((len(seqs), width, first.shape[-1]), dtype=first.dtype, device=first.device)
        for r, s in enumerate(seqs):
            out[r, width - len(s):] = self._store[tuple(s)]
        return out

    def _verify(self) -> None:
        pairs = [("The capital of France is", "Paris"), ("A cat sat on", "the mat today")]
        seqs, _ = _row_ids(self.lm, pairs)
        inputs = pad_left(seqs, _pad_id(self.lm), self.lm.device)
        try:
            with torch.no_grad():
                ref = self.lm.model(**inputs, use_cache=False).logits.float()
                h = self.states(seqs, inputs)
                with self.suffix_only():
                    got = self.lm.model(inputs_embeds=h, attention_mask=inputs["attention_mask"],
                                        position_ids=inputs["position_ids"], use_cache=False).logits.float()
            mask = inputs["attention_mask"].bool()
            ok = torch.allclose(got[mask], ref[mask], rtol=1e-4, atol=1e-4 * float(ref[mask].abs().max()))
            reason = "" if ok else (f"the cut model's logits differ from the full model's by "
                                    f"{float((got[mask] - ref[mask]).abs().max()):.3g}")
        except Exception as e:  # noqa: BLE001 - any failure means: run the full model
            ok, reason = False, f"{type(e).__name__}: {e}"
        self._store.clear()
        self.enabled, self.reason = ok, reason


def row_nll(lp: torch.Tensor, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean NLL of each row's target [rows], token accuracy of each row [rows])`` from :func:`row_logprobs`."""
    nll, acc = [], []
    for r, t in enumerate(rows.targets):
        m = len(t)
        sl = lp[r, rows.keep - m:, :]
        nll.append(-sl.gather(-1, t[:, None])[:, 0].mean())
        acc.append((sl.argmax(-1) == t).float().mean().detach())
    return torch.stack(nll), torch.stack(acc)


def row_kl(lp_pre: torch.Tensor, lp_post: torch.Tensor, rows: Rows) -> torch.Tensor:
    """``KL(pre ‖ post)`` of each row, averaged over the positions that predict the row's target (the next token
    after the prompt and the target's continuation) ``[rows]``."""
    out = []
    for r, t in enumerate(rows.targets):
        m = len(t)
        a, b = lp_pre[r, rows.keep - m:, :], lp_post[r, rows.keep - m:, :]
        out.append((a.exp() * (a - b)).sum(-1).mean())
    return torch.stack(out)


def capture_factors(lm: "LM", modules: Sequence[str], rows: Rows,
                    extra: Callable[[], Any] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The rank-1 factors of the fine-tuning gradient of ``Σ_rows mean-NLL(target)`` for each module:
    ``{module: (U [N, in], D [N, out])}`` over the ``N`` non-padding tokens, so that ``∇_W = Dᵀ U`` (``[out, in]``).

    ``extra`` (optional) returns a context manager entered around the forward pass (e.g. hooks of earlier edits).
    The model's weights get no gradient; only the zero tensors added to the modules' outputs do.
    """
    inputs: dict[str, torch.Tensor] = {}
    leaves: dict[str, torch.Tensor] = {}
    handles = []

    def make(name: str):
        def pre(_m, args):
            inputs[name] = args[0].detach()

        def post(_m, _args, out):
            z = torch.zeros_like(out, requires_grad=True)
            leaves[name] = z
            return out + z
        mod = lm.module(name)
        return [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]

    for name in modules:
        handles += make(name)
    try:
        with torch.enable_grad(), (extra() if extra is not None else contextlib.nullcontext()):
            lp = row_logprobs(lm, rows)
            loss = row_nll(lp, rows)[0].sum()
            grads = torch.autograd.grad(loss, [leaves[m] for m in modules])
    finally:
        for h in handles:
            h.remove()
    mask = rows.inputs["attention_mask"].bool()
    return {m: (inputs[m][mask].float(), g[mask].float()) for m, g in zip(modules, grads)}


@contextlib.contextmanager
def added_outputs(lm: "LM", adds: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Add ``fn(input)`` to the output of each named module during forward passes (a weight change ``ΔW`` is
    ``fn = lambda x: x @ ΔWᵀ``), without touching the weights."""
    handles = []
    for name, fn in adds.items():
        def hook(_m, args, out, fn=fn):
            return out + fn(args[0]).to(out.dtype)
        handles.append(lm.module(name).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ============================================================================================ least squares
def ls_shift(keys: torch.Tensor, diffs: torch.Tensor, lamda: torch.Tensor | float) -> torch.Tensor:
    """MALMEN's parameter shift: ``S = argmin_S Σ_t ‖S k_t − d_t‖² + λ‖S‖²_F = Dᵀ K (KᵀK + λI)⁻¹`` ``[out, in]``
    for keys ``K [N, in]`` and value differences ``D [N, out]`` (the normal equation of Tan et al. 2024, §4).

    Solved in whichever of the two equivalent forms is smaller: ``Dᵀ K (KᵀK + λI_in)⁻¹`` or, by the push-through
    identity, ``Dᵀ (KKᵀ + λI_N)⁻¹ K``; differentiable in ``D`` and ``λ``."""
    n, d_in = keys.shape
    if n <= d_in:
        gram = keys @ keys.T + lamda * torch.eye(n, dtype=keys.dtype, device=keys.device)
        return torch.linalg.solve(gram, diffs).T @ keys
    gram = keys.T @ keys + lamda * torch.eye(d_in, dtype=keys.dtype, device=keys.device)
    return torch.linalg.solve(gram, keys.T @ diffs).T  # gram is symmetric


# ============================================================================================ the networks
class ShapeNet(nn.Module):
    """The editor network of one weight shape: ``n_blocks`` residual low-rank MLP blocks on ``z = [u; δ]``
    (``D = in + out`` features, hidden width ``rank``), each ``h ← h + s_l ⊙ (U relu(V h + b)) + o_l`` with the
    per-module scale ``s_l`` and shift ``o_l``. ``U`` starts at zero, so the network starts as the identity (the
    edit starts as a plain, normalised gradient step), as in the paper."""

    def __init__(self, d_in: int, d_out: int, n_modules: int, rank: int, n_blocks: int, generator: torch.Generator):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        D = d_in + d_out
        self.V = nn.ParameterList([nn.Parameter(torch.randn(rank, D, generator=generator) / math.sqrt(D))
                                   for _ in range(n_blocks)])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(rank)) for _ in range(n_blocks)])
        self.U = nn.ParameterList([nn.Parameter(torch.zeros(D, rank)) for _ in range(n_blocks)])
        self.scale = nn.ParameterList([nn.Parameter(torch.ones(n_modules, D)) for _ in range(n_blocks)])
        self.shift = nn.ParameterList([nn.Parameter(torch.zeros(n_modules, D)) for _ in range(n_blocks)])

    def forward(self, z: torch.Tensor, idx: int) -> torch.Tensor:
        h = z
        for V, b, U, s, o in zip(self.V, self.b, self.U, self.scale, self.shift):
            h = h + s[idx] * (torch.relu(h @ V.T + b) @ U.T) + o[idx]
        return h


class HyperBank(nn.Module):
    """Every learned tensor of a MEND / MALMEN editor (see the module docstring).

    Args:
        shapes: ``(in, out)`` of each edited module, in order.
        rank, n_blocks: size of each :class:`ShapeNet`.
        edit_lr: initial step size ``α_l`` of every module.
        lamda: initial ridge ``λ_l`` of every module (MALMEN; stored as ``log λ``).
    """

    def __init__(self, shapes: Sequence[tuple[int, int]], *, rank: int, n_blocks: int, edit_lr: float,
                 lamda: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.shapes = [tuple(int(x) for x in s) for s in shapes]
        keys = sorted(set(self.shapes))
        self.group = [keys.index(s) for s in self.shapes]
        self.local = [sum(1 for j in range(i) if self.shapes[j] == s) for i, s in enumerate(self.shapes)]
        self.nets = nn.ModuleList([ShapeNet(di, do, self.shapes.count((di, do)), rank, n_blocks, g)
                                   for di, do in keys])
        n = len(self.shapes)
        self.alpha = nn.Parameter(torch.full((n,), float(edit_lr)))
        self.log_lamda = nn.Parameter(torch.full((n,), math.log(lamda)))
        for i, (di, do) in enumerate(self.shapes):  # running moments of u and δ (float64: sums of many tokens)
            self.register_buffer(f"count_{i}", torch.zeros((), dtype=torch.float64))
            for side, d in (("u", di), ("d", do)):
                self.register_buffer(f"{side}_mean_{i}", torch.zeros(d, dtype=torch.float64))
                self.register_buffer(f"{side}_m2_{i}", torch.zeros(d, dtype=torch.float64))

    # ------------------------------------------------------------------ normalisation
    @torch.no_grad()
    def update_stats(self, i: int, U: torch.Tensor, D: torch.Tensor) -> None:
        """Merge a batch of tokens into module ``i``'s running moments (Chan et al.'s parallel Welford update)."""
        n_b = U.shape[0]
        if n_b == 0:
            return
        cnt = getattr(self, f"count_{i}")
        n_a = float(cnt)
        for side, x in (("u", U), ("d", D)):
            x = x.double()
            mean, m2 = getattr(self, f"{side}_mean_{i}"), getattr(self, f"{side}_m2_{i}")
            mb = x.mean(0)
            m2b = ((x - mb) ** 2).sum(0)
            delta = mb - mean
            tot = n_a + n_b
            mean.add_(delta * n_b / tot)
            m2.add_(m2b + delta ** 2 * n_a * n_b / tot)
        cnt.add_(n_b)

    def normalise(self, i: int, U: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cnt = float(getattr(self, f"count_{i}"))
        if cnt < 2:
            raise MethodError(f"hyper-network module {i} has no input statistics (the editor was not trained)")
        out = []
        for side, x in (("u", U), ("d", D)):
            mean = getattr(self, f"{side}_mean_{i}")
            std = (getattr(self, f"{side}_m2_{i}") / (cnt - 1)).sqrt()
            out.append(((x - mean.to(x)) / (std.to(x) + _EPS)))
        return out[0], out[1]

    # ------------------------------------------------------------------ the edit
    def pseudo(self, i: int, U: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ũ [N, in], δ̃ [N, out])`` of module ``i`` from its raw gradient factors."""
        un, dn = self.normalise(i, U, D)
        net = self.nets[self.group[i]]
        z = net(torch.cat([un, dn], dim=-1), self.local[i])
        return z[:, :net.d_in], z[:, net.d_in:]

    def mend_factors(self, i: int, U: torch.Tensor, D: torch.Tensor, lr_scale: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [N, in], B [N, out])`` with MEND's ``ΔW_i = Bᵀ A = −α_i Σ_t δ̃_t ũ_tᵀ``."""
        ut, dt = self.pseudo(i, U, D)
        return ut, -(self.alpha[i] * lr_scale) * dt

    def mend_delta(self, i: int, U: torch.Tensor, D: torch.Tensor, lr_scale: float = 1.0) -> torch.Tensor:
        """MEND's ``ΔW_i = −α_i Σ_t δ̃_t ũ_tᵀ`` ``[out, in]``."""
        a, b = self.mend_factors(i, U, D, lr_scale)
        return b.T @ a

    def lamda(self, i: int) -> torch.Tensor:
        return self.log_lamda[i].exp()

    def value_diffs(self, i: int, U: torch.Tensor, D: torch.Tensor, lr_scale: float = 1.0) -> torch.Tensor:
        """MALMEN's value differences ``d_t = −α_i (ũ_tᵀ u_t) δ̃_t`` ``[N, out]``: the change MEND's rank-1 term of
        token ``t`` alone would make at its own key ``u_t``."""
        ut, dt = self.pseudo(i, U, D)
        return -(self.alpha[i] * lr_scale) * (ut * U).sum(-1, keepdim=True) * dt

    def malmen_delta(self, i: int, U: torch.Tensor, D: torch.Tensor, lr_scale: float = 1.0) -> torch.Tensor:
        """MALMEN's shift ``S_i = ls_shift(U, d, λ_i)`` ``[out, in]``."""
        return ls_shift(U, self.value_diffs(i, U, D, lr_scale), self.lamda(i))

    # ------------------------------------------------------------------ persistence
    def flat_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in self.state_dict().items()}

    def load_flat(self, tensors: Mapping[str, torch.Tensor]) -> None:
        own = self.state_dict()
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            raise MethodError(f"trained editor tensors do not fit its architecture (missing {missing[:4]}, "
                              f"unexpected {extra[:4]})")
        for k, v in own.items():
            if tuple(tensors[k].shape) != tuple(v.shape):
                raise MethodError(f"trained editor tensor {k!r} has shape {tuple(tensors[k].shape)}, expected "
                                  f"{tuple(v.shape)}")
        self.load_state_dict({k: tensors[k] for k in own}, strict=True)


# ============================================================================================ editing
def rewrite_pairs(cases: Sequence["EditCase"]) -> list[tuple[str, str]]:
    """``(prompt, target_new)`` of every rewrite of ``cases`` (extra rewrites included)."""
    return [(r.text, r.target_new) for c in cases for r in c.rewrites]


def bank_from_trained(te: Any, lm: "LM") -> tuple[HyperBank, list[str]]:
    """Rebuild the :class:`HyperBank` of a :class:`~editlens.edit.trained.TrainedEditor` on ``lm``'s device, checking
    that the modules it was trained for exist with the same shapes."""
    cached = te.__dict__.get("_hyper_bank")
    if cached is not None and cached[0] == str(lm.device) and cached[1] is te.tensors:
        return cached[2], cached[3]
    arch = te.meta.get("arch") or {}
    modules = list(arch.get("modules") or [])
    shapes = [tuple(s) for s in arch.get("shapes") or []]
    if not modules or len(modules) != len(shapes):
        raise MethodError(f"trained {te.method!r} editor: meta['arch'] does not name its modules and shapes")
    for m, s in zip(modules, shapes):
        try:
            got = in_out_features(lm.module(m))
        except Exception as e:  # noqa: BLE001 - named below
            raise MethodError(f"trained {te.method!r} editor edits module {m!r}, which {lm.name!r} lacks ({e})") from None
        if tuple(got) != tuple(s):
            raise MethodError(f"trained {te.method!r} editor: module {m!r} is {got} (in, out) in {lm.name!r}, the editor "
                              f"was trained for {tuple(s)}")
    bank = HyperBank(shapes, rank=int(arch["rank"]), n_blocks=int(arch["n_blocks"]), edit_lr=0.0)
    bank.load_flat(te.tensors)
    bank = bank.to(lm.device).eval()
    te.__dict__["_hyper_bank"] = (str(lm.device), te.tensors, bank, modules)  # reused by later edits
    return bank, modules


def compute_deltas(kind: str, bank: HyperBank, lm: "LM", modules: Sequence[str], cases: Sequence["EditCase"],
                   lr_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The weight changes ``{module: ΔW [out, in]}`` (float32) a trained bank makes for ``cases`` on ``lm``."""
    rows = make_rows(lm, rewrite_pairs(cases))
    factors = capture_factors(lm, modules, rows)
    out = {}
    with torch.no_grad():
        for i, m in enumerate(modules):
            U, D = factors[m]
            if kind == "mend":
                out[m] = bank.mend_delta(i, U, D, lr_scale)
            else:
                out[m] = bank.malmen_delta(i, U, D, lr_scale)
    return out


# ============================================================================================ training
def _split(cases: Sequence["EditCase"], val_cases: Sequence["EditCase"] | None, fraction: float, seed: int):
    cases = list(cases)
    if val_cases is not None:
        return cases, list(val_cases)
    order = list(range(len(cases)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(cases) * fraction))
    if len(cases) >= 2:
        n_val = min(max(n_val, 1), len(cases) - 1)
    else:
        n_val = 0
    val = [cases[i] for i in sorted(order[:n_val])]
    train = [cases[i] for i in sorted(order[n_val:])]
    return train, (val or train[:1])


def _pairs(cases: Sequence["EditCase"], kind: str, max_per_case: int) -> list[tuple[str, str]]:
    out = []
    for c in cases:
        probes = [p for p in c.probes_of(kind) if p.target]
        out += [(p.prompt, p.target) for p in probes[:max_per_case]]
    return out


@dataclass
class StepResult:
    """Losses (floats) of one training or validation step: ``loss = c_edit·edit + c_loc·loc``; ``acc_rewrite`` and
    ``acc_para`` are the post-edit token accuracies of ``target_new`` on the rewrites and on the paraphrases."""

    loss: float
    edit: float
    loc: float
    acc_rewrite: float
    acc_para: float


def _edit_probes(case: "EditCase", hp: Any) -> tuple[list[tuple[str, str]], list[bool], list[tuple[str, str]]]:
    """``(post-edit pairs, is-rewrite flags, locality pairs)`` of one case."""
    rw = rewrite_pairs([case])
    para = _pairs([case], "paraphrase", hp.max_paraphrases)
    return rw + para, [True] * len(rw) + [False] * len(para), _pairs([case], "neighborhood", hp.max_neighbors)


def meta_step(kind: str, bank: HyperBank, lm: "LM", modules: Sequence[str], batch: Sequence["EditCase"], hp: Any, *,
              train: bool, cache: "PrefixCache | None" = None) -> StepResult:
    """One meta-training (``train=True``: the gradients of the loss are left in the bank's parameters) or
    validation step on a batch of edits.

    The editor sees the gradient factors of the batch's rewrites on the unedited model; the loss is
    ``c_edit · mean NLL(target_new)`` over the rewrites and paraphrases after the edit plus
    ``c_loc · mean KL(pre ‖ post)`` over the neighbourhood prompts (:func:`row_kl`).
    """
    factors = capture_factors(lm, modules, make_rows(lm, rewrite_pairs(batch), cache))
    if train:
        for i, m in enumerate(modules):
            bank.update_stats(i, *factors[m])
    per_edit = [_edit_probes(c, hp) for c in batch]
    n_post = sum(len(p) for p, _, _ in per_edit)
    n_loc = sum(len(l) for _, _, l in per_edit)
    c_edit, c_loc = float(hp.c_edit), float(hp.c_loc)

    def part_loss(adds, post, loc):
        """Sums (not means) of the NLL and KL terms over the given pairs, and the accuracies."""
        rp = make_rows(lm, post, cache)
        rl = make_rows(lm, loc, cache) if loc else None
        lp_pre = None
        if rl is not None:
            with torch.no_grad():
                lp_pre = row_logprobs(lm, rl)
        with added_outputs(lm, adds):
            nll, acc = row_nll(row_logprobs(lm, rp), rp)
            kl = row_kl(lp_pre, row_logprobs(lm, rl), rl) if rl is not None else nll.new_zeros(1)
        return nll.sum(), kl.sum(), acc

    flags = [f for _, fl, _ in per_edit for f in fl]
    with (torch.enable_grad() if train else torch.no_grad()):
        if kind == "mend":
            adds = {}
            for i, m in enumerate(modules):
                a, b = bank.mend_factors(i, *factors[m])
                adds[m] = (lambda x, a=a, b=b: (x.float() @ a.T) @ b)
            nll_s, kl_s, acc = part_loss(adds, [p for ps, _, _ in per_edit for p in ps],
                                         [l for _, _, ls in per_edit for l in ls])
            l_edit, l_loc = nll_s / n_post, kl_s / max(n_loc, 1)
            total = c_edit * l_edit + c_loc * l_loc
            if train:
                total.backward()
            l_edit, l_loc = float(l_edit.detach()), float(l_loc.detach())
        else:
            # MALMEN: backpropagation separated between the LM and the hyper-network (Tan et al. 2024, §4.2). The
            # shifts S_l enter the LM as leaf tensors; the meta-loss is back-propagated through the LM one edit's
            # probes at a time (the memory of one edit's forward pass, whatever the batch size), accumulating
            # ∂L/∂S_l in the leaves; then ∂L/∂S_l alone is back-propagated through the least-squares solve and the
            # hyper-network.
            shifts = [bank.malmen_delta(i, *factors[m]) for i, m in enumerate(modules)]
            leaves = [s.detach().requires_grad_(train) for s in shifts]
            adds = {m: (lambda x, S=S: x.float() @ S.T) for m, S in zip(modules, leaves)}
            l_edit = l_loc = 0.0
            accs = []
            for post, _, loc in per_edit:
                nll_s, kl_s, acc_j = part_loss(adds, post, loc)
                part = c_edit * nll_s / n_post + c_loc * kl_s / max(n_loc, 1)
                if train:
                    part.backward()
                l_edit += float(nll_s.detach()) / n_post
                l_loc += float(kl_s.detach()) / max(n_loc, 1)
                accs.append(acc_j)
            if train:
                torch.autograd.backward(shifts, [lf.grad for lf in leaves])
            acc = torch.cat(accs)
            total = c_edit * l_edit + c_loc * l_loc
    fl = torch.tensor(flags, dtype=torch.bool, device=acc.device)
    return StepResult(float(total.detach() if torch.is_tensor(total) else total), float(l_edit), float(l_loc),
                      float(acc[fl].mean()),
                      float(acc[~fl].mean()) if bool((~fl).any()) else float("nan"))


# ============================================================================================ hyperparameters
@dataclass
class HyperEditHParams(HParams):
    """Edit-time hyperparameters of a trained hyper-network editor (MEND, MALMEN: the same for both).

    Attributes:
        lr_scale: factor on every learned step size ``α_l`` (1: as trained).
    """

    lr_scale: float = 1.0
    RANGES: ClassVar[Mapping[str, Range]] = {"lr_scale": Range(0.0, lo_open=True)}


@dataclass
class HyperTrainHParams(HParams):
    """Training hyperparameters shared by MEND and MALMEN.

    Attributes:
        layers: edited blocks (negative = from the end; empty = the last three, as in the MEND paper).
        modules: edited linear layers of each block (``mlp_in``, ``mlp_gate`` — skipped where the MLP has no gate —
            and ``mlp_out``: every MLP weight, as the papers edit).
        rank: hidden width of each low-rank residual block of the editor network (the paper: 1920 on 1.5B-20B
            models; smaller here, see the per-model defaults).
        n_blocks: residual blocks per editor network (the paper: 2).
        lr: Adam learning rate of the editor network.
        lr_lr: Adam learning rate of the per-module step sizes ``α_l`` (and MALMEN's ``log λ_l``).
        edit_lr: initial ``α_l``.
        lamda: initial ridge ``λ_l`` of MALMEN's least squares (unused by MEND).
        c_edit: weight of the edit loss (NLL of ``target_new`` on the rewrite and its paraphrases after the edit).
        c_loc: weight of the locality loss (``KL(pre ‖ post)`` on the neighbourhood prompts).
        batch_size: edits per training step (MEND sums them; MALMEN solves them together).
        epochs: passes over the training cases.
        max_steps: stop after this many steps (0: no limit).
        val_fraction: share of the cases held out for validation when no ``val_cases`` are given.
        val_every: steps between validations (early stopping counts validations).
        max_val: validation cases used at each validation.
        patience: validations without improvement before stopping early; the best editor is kept.
        grad_clip: gradient-norm clip of each step.
        max_paraphrases: paraphrase probes per case in the edit loss.
        max_neighbors: neighbourhood probes per case in the locality loss.
    """

    layers: list[int] = field(default_factory=list)
    modules: list[str] = field(default_factory=lambda: list(MODULE_KINDS))
    rank: int = 64
    n_blocks: int = 2
    lr: float = 1e-4
    lr_lr: float = 1e-4
    edit_lr: float = 1e-4
    lamda: float = 1.0
    c_edit: float = 1.0
    c_loc: float = 1.0
    batch_size: int = 1
    epochs: int = 1
    max_steps: int = 0
    val_fraction: float = 0.1
    val_every: int = 50
    max_val: int = 20
    patience: int = 3
    grad_clip: float = 100.0
    max_paraphrases: int = 2
    max_neighbors: int = 2

    RANGES = {"lr": POSITIVE, "lr_lr": NON_NEGATIVE, "edit_lr": POSITIVE, "lamda": POSITIVE, "c_edit": POSITIVE,
              "c_loc": NON_NEGATIVE, "val_fraction": Range(0.0, 1.0, hi_open=True), "grad_clip": POSITIVE}

    def validate(self) -> None:
        m = self.method
        for key in ("rank", "n_blocks", "batch_size", "epochs", "val_every", "max_val", "patience",
                    "max_paraphrases", "max_neighbors"):
            if int(getattr(self, key)) < 1:
                raise HParamsError(f"hyperparameter {key!r} of method {m!r} must be >= 1, got {getattr(self, key)}")
        if self.max_steps < 0:
            raise HParamsError(f"hyperparameter 'max_steps' of method {m!r} must be >= 0 (0: no limit), got "
                               f"{self.max_steps}")
        if not self.modules or any(k not in MODULE_KINDS for k in self.modules) or \
                len(set(self.modules)) != len(self.modules):
            raise HParamsError(f"hyperparameter 'modules' of method {m!r} must name distinct kinds among "
                               f"{', '.join(MODULE_KINDS)}, got {list(self.modules)}")
        if len({int(l) for l in self.layers}) != len(self.layers):
            raise HParamsError(f"hyperparameter 'layers' of method {m!r} names a block twice: {list(self.layers)}")


# ============================================================================================ the training loop
def _validate(kind, bank, lm, modules, val, hp, cache) -> StepResult:
    rs, ws = [], []
    for s in range(0, len(val), hp.batch_size):
        batch = val[s:s + hp.batch_size]
        rs.append(meta_step(kind, bank, lm, modules, batch, hp, train=False, cache=cache))
        ws.append(len(batch))
    tot = sum(ws)

    def avg(attr):
        vals = [(getattr(r, attr), w) for r, w in zip(rs, ws) if not math.isnan(getattr(r, attr))]
        return sum(v * w for v, w in vals) / max(sum(w for _, w in vals), 1) if vals else float("nan")
    del tot
    return StepResult(avg("loss"), avg("edit"), avg("loc"), avg("acc_rewrite"), avg("acc_para"))


def train_hypernet(kind: str, method: str, lm: "LM", cases: Sequence["EditCase"],
                   val_cases: Sequence["EditCase"] | None, hp: HyperTrainHParams, *, progress: bool, seed: int) -> Any:
    """Meta-train a :class:`HyperBank` for ``lm`` (``kind`` ``"mend"`` or ``"malmen"``); returns a
    :class:`~editlens.edit.trained.TrainedEditor`.

    Each step takes ``batch_size`` training edits, computes their gradient factors on the unedited model, lets the
    editor make the edit (added to the modules' outputs by hooks — the weights are never written) and minimises
    ``c_edit · L_edit + c_loc · L_loc`` (:func:`meta_step`) with Adam (gradient norm clipped). Every ``val_every``
    steps (and at the end) the editor is validated on held-out cases; training stops early after ``patience``
    validations without improvement and the editor with the best validation loss is returned. A NaN/inf loss or
    gradient raises :class:`~editlens.edit.trained.TrainingError` naming the step.
    """
    from editlens.edit.trained import EarlyStopping, TrainedEditor, TrainingError, check_finite, progress_bar

    layers = resolve_layers(lm, hp.layers)
    modules = edited_modules(lm, layers, hp.modules)
    shapes = [in_out_features(lm.module(m)) for m in modules]
    train, val = _split(cases, val_cases, hp.val_fraction, seed)
    val = val[:hp.max_val]
    bank = HyperBank(shapes, rank=hp.rank, n_blocks=hp.n_blocks, edit_lr=hp.edit_lr, lamda=hp.lamda,
                     seed=seed).to(lm.device)
    step_params = [bank.alpha] + ([bank.log_lamda] if kind == "malmen" else [])
    opt = torch.optim.Adam([{"params": list(bank.nets.parameters()), "lr": hp.lr},
                            {"params": step_params, "lr": hp.lr_lr}])
    n_batches = math.ceil(len(train) / hp.batch_size)
    total = hp.epochs * n_batches
    if hp.max_steps:
        total = min(total, hp.max_steps)
    cache = PrefixCache(lm, min(layers))
    rng = random.Random(seed)
    stopper = EarlyStopping(hp.patience)
    curve: dict[str, list[float]] = {"loss": [], "edit": [], "loc": [], "acc_rewrite": []}
    vals: list[dict[str, float]] = []
    best: dict[str, torch.Tensor] | None = None
    bar = progress_bar(total, f"train {method}", progress)
    step = 0
    stopped_early = False
    t0 = time.perf_counter()
    try:
        while step < total and not stopped_early:
            order = list(range(len(train)))
            rng.shuffle(order)
            for s in range(0, len(order), hp.batch_size):
                if step >= total:
                    break
                batch = [train[i] for i in order[s:s + hp.batch_size]]
                opt.zero_grad(set_to_none=True)
                r = meta_step(kind, bank, lm, modules, batch, hp, train=True, cache=cache)
                check_finite(r.loss, step=step, what=f"the {method} meta-loss (edit loss {r.edit:.4g}, locality "
                                                     f"loss {r.loc:.4g})")
                gnorm = float(torch.nn.utils.clip_grad_norm_(bank.parameters(), hp.grad_clip))
                if not math.isfinite(gnorm):
                    raise TrainingError(f"training stopped at step {step}: the gradient of the {method} meta-loss "
                                        f"is {gnorm} (lower lr / lr_lr / edit_lr; nothing was saved)")
                opt.step()
                for k in curve:
                    curve[k].append(round(getattr(r, k), 6))
                step += 1
                bar.update(1)
                post = dict(loss=f"{r.loss:.3f}", edit=f"{r.edit:.3f}", loc=f"{r.loc:.4f}")
                if vals:
                    post.update(val_loss=f"{vals[-1]['loss']:.3f}", val_acc=f"{vals[-1]['acc_rewrite']:.2f}")
                bar.set_postfix(**post)
                if step % hp.val_every == 0 or step == total:
                    v = _validate(kind, bank, lm, modules, val, hp, cache)
                    check_finite(v.loss, step=step, what=f"the {method} validation loss")
                    vals.append({"step": step, "loss": v.loss, "edit": v.edit, "loc": v.loc,
                                 "acc_rewrite": v.acc_rewrite, "acc_para": v.acc_para})
                    stop = stopper.update(v.loss)
                    if stopper.best_step == stopper.checks - 1:
                        best = bank.flat_tensors()
                    if stop and step < total:
                        stopped_early = True
                        break
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    tensors = best if best is not None else bank.flat_tensors()
    best_val = min(vals, key=lambda v: v["loss"]) if vals else None
    meta = {
        "arch": {"kind": kind, "modules": modules, "shapes": [list(s) for s in shapes], "layers": layers,
                 "module_kinds": list(hp.modules), "rank": hp.rank, "n_blocks": hp.n_blocks},
        "loss_curve": curve, "validation": vals, "best_validation": best_val, "n_steps": step,
        "stopped_early": stopped_early, "prefix_cache": cache.enabled or cache.reason, "n_train_used": len(train), "n_val_used": len(val),
        "train_loop_s": wall, "cases_per_s": step * hp.batch_size / wall if wall > 0 else None,
    }
    return TrainedEditor(method=method, hparams=hp.to_dict(), base_fingerprint=lm.base_fingerprint,
                         model_name=lm.name, tensors=tensors, meta=meta)


# ============================================================================================ the editor class
class HyperEditor(TrainableEditor):
    """What MEND and MALMEN share: training (:func:`train_hypernet`) and the weight edit made with the trained bank
    (``kind`` selects how the per-token factors become ``ΔW``)."""

    kind: str = "mend"
    edits_weights = True
    train_needs = ("paraphrase", "neighborhood")

    def fit(self, lm, cases, val_cases, hp, *, progress, seed):
        return train_hypernet(self.kind, self.name, lm, cases, val_cases, hp, progress=progress, seed=seed)

    def contract_train_overrides(self) -> dict[str, Any]:
        return dict(rank=8, epochs=1, max_steps=4, val_every=2, max_val=2, batch_size=2)

    def apply(self, lm, cases, hparams, *, evk_align=None, progress=False, sequence=None):
        te = self.trained
        if te is None:
            raise MethodError(f"method {self.name!r} edits with a trained editor: pass trained=<directory or "
                              f"TrainedEditor> (train one with editlens.train({self.name!r}, lm, cases))")
        te.check_model(lm)
        if te.meta.get("arch", {}).get("kind") != self.kind:
            raise MethodError(f"the trained editor holds a {te.meta.get('arch', {}).get('kind')!r} network, method "
                              f"{self.name!r} needs a {self.kind!r} one")
        bank, modules = bank_from_trained(te, lm)
        t0 = time.perf_counter()
        deltas = compute_deltas(self.kind, bank, lm, modules, cases, hparams.lr_scale)
        diag: dict[str, Any] = {f"delta_norm/{m}": float(d.double().norm()) for m, d in deltas.items()}
        diag["layers"] = list(te.meta["arch"]["layers"])
        diag["editor_s"] = time.perf_counter() - t0
        return self.weight_edit(lm, cases, hparams, deltas, diag, sequence)
