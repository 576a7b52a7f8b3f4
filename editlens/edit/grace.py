"""GRACE — General Retrieval Adaptors for Continual Editing (Hartvigsen et al., NeurIPS 2023).

GRACE leaves the weights alone and wraps one layer with a discrete **codebook** of entries
``(key k_i, value v_i, deferral radius ε_i, label y_i)``. Here the wrapped layer is the MLP output projection of
layer ``layer`` (``hparams.layer``): the *key* of a query is that module's input at the last prompt token, and
the *value* replaces the module's output.

Inference (one query): ``h`` = the key of the query, ``i`` = the nearest entry (Euclidean distance) among those
with ``||h - k_i|| <= ε_i``. If there is one, the module's output is replaced by ``v_i`` at the last prompt
token **and at every later position** (the target tokens in teacher forcing, every generated token during
generation: the decision is taken once, on the prompt's last token, and kept for the whole continuation, as
GRACE does for autoregressive models); otherwise the layer runs unchanged (the output tensor is returned
untouched, so misses are bit-identical to the base model).

Editing (Alg. 1 of the paper), for each rewrite ``(x, y)`` in order, with ``h`` its key and ``d`` the distance
to the nearest entry ``i``:

* empty codebook, or ``d > ε_i + ε_init`` (no overlap): **add** ``(h, v, ε_init, y)``;
* overlap and the same label ``y_i == y``: **expand** ``ε_i ← max(ε_i, d)`` (the value already produces y);
* overlap and a different label: **split** ``ε_i ← d/2`` and add ``(h, v, d/2, y)``, so the two balls touch
  without overlapping.

A new value ``v`` starts from the module's own output at the key position and is optimised by gradient
descent (Adam, ``lr``, at most ``n_iter`` steps, stopping when the mean target NLL is below ``loss_stop``) so
that the model with ``v`` in place produces ``y`` (teacher forced).

Reversibility: the codebook lives in the :class:`GraceSystem`; hooks are registered only for the duration of
each System call, so the model itself is never modified; ``Edit.undo()`` empties the codebook.

Deviations: values are optimised with Adam and early stopping rather than a fixed 100 steps; an *expand*
does not re-train the existing value. Distances are computed in float32.

This module also holds the prompt-aware hook machinery shared with :mod:`editlens.edit.wise`
(:class:`LayerAdaptor`, :func:`adaptor_hooks`, :class:`AdaptorSystem`): an adaptor sees, for each row, the
column of the first real token and of the last prompt token, so that decisions depend on the prompt only.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from editlens.edit.base import Edit, Editor, HParams, SequenceState, register_method
from editlens.edit.base import NON_NEGATIVE, POSITIVE
from editlens.errors import HParamsError, MethodError
from editlens.system import ModelSystem, WrappedSystem
from editlens.lm import ops
from editlens.lm.ops import TeacherForced

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM


# ============================================================================================ shared machinery
class LayerAdaptor:
    """Base class of adaptors wrapped around one module's output (override :meth:`on_full`, :meth:`on_step`)."""

    module: str = ""

    def on_full(self, inp: torch.Tensor, out: torch.Tensor, start_cols: torch.Tensor, key_cols: torch.Tensor
                ) -> tuple[torch.Tensor, Any]:
        """A forward over whole rows: returns the (possibly) new output and a per-row state for later steps."""
        return out, None

    def on_step(self, inp: torch.Tensor, out: torch.Tensor, state: Any) -> torch.Tensor:
        """A cached decoding step (one new token per row), given the state of the preceding full forward."""
        return out


#: the keyword under which ``generate()`` hands the KV cache to the model's forward: ``past_key_values`` up to
#: transformers 5.23, ``cache`` from 5.24 (the old name is only a deprecated alias there)
_CACHE_KWARGS = ("cache", "past_key_values")


def _is_cached_step(ids: torch.Tensor, kwargs: dict) -> bool:
    """Whether a forward pass of the model is a decoding step on top of a populated KV cache.

    Either a known cache keyword holds a non-empty cache, or (independent of what the cache argument is called)
    the 2-D attention mask is wider than the new tokens: it then also covers the cached ones.
    """
    if any(_past_length(kwargs.get(k)) > 0 for k in _CACHE_KWARGS):
        return True
    mask = kwargs.get("attention_mask")
    return mask is not None and mask.dim() == 2 and int(mask.shape[-1]) > int(ids.shape[1])


def _past_length(past: Any) -> int:
    if past is None:
        return 0
    fn = getattr(past, "get_seq_length", None)
    if fn is None:
        return 0
    try:
        return int(fn())
    except Exception:  # noqa: BLE001 - an unusual cache object counts as non-empty
        return 1


@contextlib.contextmanager
def adaptor_hooks(lm: "LM", adaptor: LayerAdaptor, key_cols: torch.Tensor | None = None) -> Iterator[None]:
    """Run ``adaptor`` on its module during forward passes of ``lm.model`` (hooks removed on exit).

    A forward pass without a populated KV cache is a *full* pass: each row's first real token (from the
    attention mask) and its last prompt token (``key_cols``, default the last column) are given to
    :meth:`LayerAdaptor.on_full`. A pass with a populated cache is a decoding *step*.
    """
    ctx: dict[str, Any] = {"phase": "full", "start": None, "key": None, "state": None}

    def pre(_m: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if _is_cached_step(ids, kwargs):
            ctx["phase"] = "step"
            return
        rows, width = int(ids.shape[0]), int(ids.shape[1])
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            start = (mask.long().cumsum(-1) == 0).sum(-1)
        else:
            start = torch.zeros(rows, dtype=torch.long)
        ctx["phase"] = "full"
        ctx["start"] = start.to(ids.device)
        ctx["key"] = (key_cols.to(ids.device) if key_cols is not None
                      else torch.full((rows,), width - 1, dtype=torch.long, device=ids.device))

    def hook(_m: Any, args: tuple, out: Any) -> Any:
        inp = args[0]
        if ctx["phase"] == "full":
            new, ctx["state"] = adaptor.on_full(inp, out, ctx["start"], ctx["key"])
            return new
        return adaptor.on_step(inp, out, ctx["state"])

    h1 = lm.model.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = lm.module(adaptor.module).register_forward_hook(hook)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


def prompt_target_batch(lm: "LM", prompts: Sequence[str], targets: Sequence[str]
                        ) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[list[int]]]:
    """A left-padded teacher-forcing batch of ``prompt + target[:-1]``.

    Returns ``(batch, key_cols, target_ids)``: ``key_cols[r]`` is the column of row r's last prompt token;
    the logits at columns ``key_cols[r] .. key_cols[r] + len(target_ids[r]) - 1`` predict the target tokens.
    """
    pairs = [ops.target_token_ids(lm.tokenizer, p, t) for p, t in zip(prompts, targets)]
    seqs = [p + t[:-1] for p, t in pairs]
    batch = ops.pad_left(seqs, ops._pad_id(lm), lm.device)
    width = batch["input_ids"].shape[1]
    key_cols = torch.tensor([width - len(s) + len(p) - 1 for s, (p, _) in zip(seqs, pairs)], dtype=torch.long)
    return batch, key_cols, [t for _, t in pairs]


def target_nll(lm: "LM", batch: dict[str, torch.Tensor], key_cols: torch.Tensor, target_ids: list[list[int]]
               ) -> torch.Tensor:
    """Mean over rows of the mean negative log-likelihood of each row's target (with gradients)."""
    logits = lm.model(**batch, use_cache=False).logits.float()
    lp = torch.log_softmax(logits, dim=-1)
    losses = []
    for r, t in enumerate(target_ids):
        k = int(key_cols[r])
        ids = torch.tensor(t, dtype=torch.long, device=lp.device)
        rows = lp[r, k:k + len(t)]
        losses.append(-rows.gather(-1, ids[:, None]).mean())
    return torch.stack(losses).mean()


class AdaptorSystem(WrappedSystem):
    """A :class:`WrappedSystem` with a :class:`LayerAdaptor` that decides per row on the prompt only.

    ``next_token_logprobs`` and ``generate`` run the base operations with the hooks on (the prompt ends at the
    last column); ``teacher_forced`` re-batches prompts and targets itself so the adaptor knows where each
    prompt ends.
    """

    def __init__(self, base: ModelSystem, adaptor: LayerAdaptor, state_fingerprint: str | None = None):
        super().__init__(base, state_fingerprint if state_fingerprint is not None else adaptor.fingerprint())
        self.adaptor = adaptor

    def refresh(self) -> None:
        """Re-read the adaptor's fingerprint after its state changed (new codebook entries, side memories)."""
        self.state_fingerprint = self.adaptor.fingerprint()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with adaptor_hooks(self.lm, self.adaptor):
            yield

    def teacher_forced(self, prompts: Sequence[str], targets: Sequence[str]) -> list[TeacherForced]:
        with self.exclusive():  # the model's lock and pinned weights, as every system call (hooks installed below)
            return self._teacher_forced(prompts, targets)

    @torch.no_grad()
    def _teacher_forced(self, prompts: Sequence[str], targets: Sequence[str]) -> list[TeacherForced]:
        prompts = self._inputs(prompts)
        targets = list(targets)
        if len(prompts) != len(targets):
            raise MethodError(f"{len(prompts)} prompts but {len(targets)} targets")
        lm = self.lm
        pairs = [ops.target_token_ids(lm.tokenizer, p, t) for p, t in zip(prompts, targets)]
        seqs = [p + t[:-1] for p, t in pairs]
        results: list[TeacherForced | None] = [None] * len(pairs)
        for group in ops.plan_batches([len(s) for s in seqs], self.batch_tokens):
            cap = ops._max_rows(lm, max(len(pairs[i][1]) for i in group))
            for start in range(0, len(group), cap):
                sub = group[start:start + cap]
                batch = ops.pad_left([seqs[i] for i in sub], ops._pad_id(lm), lm.device)
                width = batch["input_ids"].shape[1]
                keys = torch.tensor([max(0, width - len(seqs[i]) + len(pairs[i][0]) - 1) for i in sub])
                keep = min(max(len(pairs[i][1]) for i in sub), width)
                with adaptor_hooks(lm, self.adaptor, key_cols=keys):
                    lp = torch.log_softmax(ops.forward_logits(lm, batch, keep=keep), dim=-1)
                for r, i in enumerate(sub):
                    t_ids = torch.tensor(pairs[i][1], dtype=torch.long, device=lp.device)
                    rows = lp[r, keep - len(t_ids):, :]
                    results[i] = TeacherForced(target_ids=t_ids.cpu(),
                                               logprobs=rows.gather(-1, t_ids[:, None])[:, 0].cpu(),
                                               argmax_ids=rows.argmax(-1).cpu())
        return results  # type: ignore[return-value]


# ============================================================================================ GRACE
@dataclass
class GraceHParams(HParams):
    """Hyperparameters of GRACE.

    Attributes:
        layer: the layer whose MLP output projection is wrapped (negative: counted from the end).
        eps_init: initial deferral radius of a new entry (Euclidean distance in the key space).
        lr: Adam learning rate of the value optimisation.
        n_iter: maximum optimisation steps per new value.
        loss_stop: stop optimising when the mean target NLL falls below this.
    """

    layer: int = -4
    eps_init: float = 3.0
    lr: float = 0.5
    n_iter: int = 60
    loss_stop: float = 0.05
    RANGES = {"eps_init": POSITIVE, "lr": POSITIVE, "loss_stop": NON_NEGATIVE}

    ARCH_DEFAULTS = {"tiny": {"layer": 2, "eps_init": 0.05, "n_iter": 20}, "smollm2-135m": {"layer": 26, "eps_init": 8.0}}

    def validate(self) -> None:
        if self.eps_init <= 0:
            raise HParamsError(f"hyperparameter 'eps_init' of method 'grace' must be > 0, got {self.eps_init}")
        if self.n_iter < 0:
            raise HParamsError(f"hyperparameter 'n_iter' of method 'grace' must be >= 0, got {self.n_iter}")

    def layer_index(self, lm: "LM") -> int:
        n = lm.n_layers
        i = self.layer + n if self.layer < 0 else self.layer
        if not 0 <= i < n:
            raise HParamsError(f"hyperparameter 'layer' of method 'grace' is {self.layer}, but the model has {n} layers")
        return i


class GraceAdaptor(LayerAdaptor):
    """The GRACE codebook at one module (keys, values, radii, labels) and its lookup."""

    def __init__(self, module: str, d_key: int, d_value: int):
        self.module = module
        self.keys = torch.zeros((0, d_key))
        self.values = torch.zeros((0, d_value))
        self.eps = torch.zeros((0,))
        self.labels: list[str] = []
        #: per row of the last full forward: index of the entry used (-1 = miss)
        self.last_hits: torch.Tensor = torch.zeros((0,), dtype=torch.long)
        #: how many entries were added / expanded / split
        self.counts = {"add": 0, "expand": 0, "split": 0}

    def __len__(self) -> int:
        return len(self.labels)

    def clear(self) -> None:
        self.keys = self.keys[:0]
        self.values = self.values[:0]
        self.eps = self.eps[:0]
        self.labels = []

    def lookup(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(entry index or -1, distance to the nearest key)`` for each query key ``[n, d_key]``."""
        n = keys.shape[0]
        if len(self) == 0:
            return torch.full((n,), -1, dtype=torch.long), torch.full((n,), float("inf"))
        d = torch.cdist(keys.float().cpu(), self.keys)
        within = d <= self.eps[None, :]
        masked = torch.where(within, d, torch.full_like(d, float("inf")))
        best_d, best = masked.min(dim=1)
        idx = torch.where(torch.isfinite(best_d), best, torch.full_like(best, -1))
        return idx, d.min(dim=1).values

    def on_full(self, inp, out, start_cols, key_cols):
        rows = torch.arange(inp.shape[0], device=inp.device)
        idx, _ = self.lookup(inp[rows, key_cols])
        self.last_hits = idx
        if bool((idx < 0).all()):
            return out, idx
        hit = (idx >= 0).to(out.device)
        vals = self.values[idx.clamp(min=0)].to(device=out.device, dtype=out.dtype)
        cols = torch.arange(out.shape[1], device=out.device)
        where = hit[:, None] & (cols[None, :] >= key_cols.to(out.device)[:, None])
        return torch.where(where[..., None], vals[:, None, :], out), idx

    def on_step(self, inp, out, state):
        idx = state
        if idx is None or bool((idx < 0).all()):
            return out
        hit = (idx >= 0).to(out.device)
        vals = self.values[idx.clamp(min=0)].to(device=out.device, dtype=out.dtype)
        return torch.where(hit[:, None, None], vals[:, None, :], out)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.module.encode())
        for t in (self.keys, self.values, self.eps):
            h.update(t.double().sum().item().hex().encode() if t.numel() else b"-")
            h.update(t.contiguous().numpy().tobytes()[:4096])
        h.update("|".join(self.labels).encode())
        return h.hexdigest()[:16]

    def add(self, key: torch.Tensor, value: torch.Tensor, eps: float, label: str) -> int:
        self.keys = torch.cat([self.keys, key.float().cpu()[None]])
        self.values = torch.cat([self.values, value.detach().float().cpu()[None]])
        self.eps = torch.cat([self.eps, torch.tensor([float(eps)])])
        self.labels.append(label)
        return len(self.labels) - 1


def codebook_update(adaptor: GraceAdaptor, key: torch.Tensor, label: str, eps_init: float) -> tuple[str, int, float]:
    """Decide what GRACE does for a new key (Alg. 1) and apply the radius changes.

    Returns ``(action, entry, radius)``: action ``"add"`` (a new entry with ``radius`` is needed),
    ``"expand"`` (entry ``entry`` now covers the key; nothing to add) or ``"split"`` (entry ``entry`` shrunk to
    ``radius``; a new entry with ``radius`` is needed). The caller adds new entries with :meth:`GraceAdaptor.add`.
    """
    if len(adaptor) == 0:
        return "add", -1, eps_init
    d = torch.linalg.vector_norm(adaptor.keys - key.float().cpu()[None], dim=-1)
    i = int(d.argmin())
    dist = float(d[i])
    if dist > float(adaptor.eps[i]) + eps_init:
        return "add", -1, eps_init
    if adaptor.labels[i] == label:
        adaptor.eps[i] = max(float(adaptor.eps[i]), dist)
        return "expand", i, float(adaptor.eps[i])
    half = dist / 2.0
    adaptor.eps[i] = half
    return "split", i, half


class GraceSystem(AdaptorSystem):
    """A model wrapped with a GRACE codebook (see the module docstring)."""

    adaptor: GraceAdaptor

    def __repr__(self) -> str:
        return f"GraceSystem(model={self.lm.name!r}, module={self.adaptor.module!r}, entries={len(self.adaptor)})"


def optimise_value(lm: "LM", module: str, prompt: str, target: str, init: torch.Tensor, lr: float, n_iter: int,
                   loss_stop: float) -> tuple[torch.Tensor, float, int]:
    """Optimise the replacement output ``v`` of ``module`` (from the last prompt token on) so that ``target`` follows.

    Returns ``(v, final loss, steps)``.
    """
    batch, key_cols, tids = prompt_target_batch(lm, [prompt], [target])
    p = lm.module(module).weight
    v = init.detach().to(device=p.device, dtype=torch.float32).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    k = int(key_cols[0])

    def hook(_m: Any, _a: Any, out: torch.Tensor) -> torch.Tensor:
        cols = torch.arange(out.shape[1], device=out.device)
        mask = (cols >= k)[None, :, None]
        return torch.where(mask, v.to(out.dtype)[None, None, :], out)

    h = lm.module(module).register_forward_hook(hook)
    loss_val, steps = float("inf"), 0
    try:
        for steps in range(1, n_iter + 1):
            loss = target_nll(lm, batch, key_cols, tids)
            loss_val = float(loss.detach())
            if loss_val < loss_stop:
                steps -= 1
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            with torch.no_grad():
                loss_val = float(target_nll(lm, batch, key_cols, tids))
    finally:
        h.remove()
    return v.detach(), loss_val, steps


@register_method("grace")
class GraceEditor(Editor):
    """GRACE as an editing method: the Edit's system is a :class:`GraceSystem`; ``undo()`` empties the codebook."""

    hparams_class = GraceHParams
    edits_weights = False  # the edit lives outside the weights (Edit.save_pretrained refuses it)

    def apply(self, lm: "LM", cases: Sequence["EditCase"], hparams: HParams, *, evk_align: Any = None,
              progress: bool = True, sequence: SequenceState | None = None) -> Edit:
        assert isinstance(hparams, GraceHParams)
        module = lm.arch.mlp_out_at(hparams.layer_index(lm))

        def make() -> GraceSystem:
            from editlens.lm.arch import in_out_features

            d_in, d_out = in_out_features(lm.module(module))
            return GraceSystem(self.base_system(lm), GraceAdaptor(module, d_in, d_out))

        system: GraceSystem = (make() if sequence is None else
                               sequence.kept("grace_system", make, lambda s: s.adaptor.clear))
        ad = system.adaptor
        losses, steps = [], []
        with torch.enable_grad():
            for c in cases:
                for r in c.rewrites:
                    prompt = system.format.apply(r.text)
                    cap_in = ops.capture(lm, [prompt], [module], [-1], kind="input")[module][0]
                    action, _, radius = codebook_update(ad, cap_in, r.target_new, hparams.eps_init)
                    ad.counts[action] += 1
                    if action == "expand":
                        continue
                    init = ops.capture(lm, [prompt], [module], [-1], kind="output")[module][0]
                    v, loss, n = optimise_value(lm, module, prompt, r.target_new, init, hparams.lr,
                                                hparams.n_iter, hparams.loss_stop)
                    ad.add(cap_in, v, radius, r.target_new)
                    losses.append(loss)
                    steps.append(n)
        system.refresh()
        diag: dict[str, Any] = {"codebook_size": len(ad), "loss/value_final": max(losses) if losses else 0.0,
                                "value_steps_mean": sum(steps) / len(steps) if steps else 0.0,
                                **{f"codebook/{k}": v for k, v in ad.counts.items()}}
        if sequence is not None:
            return Edit(system, self.name, cases, hparams, diag, lm=lm, undoable=False)

        def undo() -> None:
            ad.clear()
            system.refresh()

        return Edit(system, self.name, cases, hparams, diag, lm=lm, on_undo=undo)
