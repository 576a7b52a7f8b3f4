"""FROZEN reference: the value optimisation as it was before issue 14 item 3 (commit c835682), kept verbatim.

``_compute_values`` is the pre-refactor body of ``editlens.edit.locate._compute_values`` (ROME's v* with
``space="mlp"``, MEMIT's z with ``space="residual"``) with the private helpers it called, and
``compute_pmet_values`` the pre-refactor copy of that loop in ``editlens/edit/pmet.py``. Do NOT edit or "fix"
this file: tests/unit/test_value_optimisation.py asserts that :func:`editlens.edit.locate.optimise_values` returns
bit for bit what these return, so behaviour changes of the shared function are caught. An intended change of the
objective (e.g. issue 16's options) must keep its default bit-identical to this reference.
"""
# flake8: noqa
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from editlens.edit import locate
from editlens.edit.locate import Request, ValueLossContext, capture_at_subject
from editlens.errors import EditlensError, MethodError
from editlens.lm import ops
from editlens.lm.hooks import add_to_output


@dataclass
class ValueResult:
    delta: torch.Tensor
    init: torch.Tensor
    losses: dict[str, float] = field(default_factory=dict)


ExtraLoss = Callable[[ValueLossContext], torch.Tensor]


@dataclass
class _Row:
    req: int
    kind: str  # "nll" or "kl"
    ids: list[int]
    pos: int  # subject-last index within ids
    target: list[int]


def _build_rows(lm: "LM", requests: Sequence[Request], prefixes: Sequence[str], kl_template: str | None) -> list[_Row]:
    rows: list[_Row] = []
    for i, r in enumerate(requests):
        for p in prefixes:
            text = p + r.prompt
            p_ids, t_ids = ops.target_token_ids(lm.tokenizer, text, r.target)
            pos = ops.subject_last_token(lm.tokenizer, r.template, r.subject, prefix=p)
            if pos >= len(p_ids):
                raise MethodError(f"subject {r.subject!r} not found in the tokens of prompt {text!r}")
            rows.append(_Row(i, "nll", p_ids + t_ids[:-1], pos, t_ids))
        if kl_template:
            ids = ops.encode(lm.tokenizer, kl_template.replace("{}", r.subject, 1))
            pos = ops.subject_last_token(lm.tokenizer, kl_template, r.subject)
            rows.append(_Row(i, "kl", ids[: pos + 1], pos, []))
    return rows




def _compute_values(lm: "LM", requests: Sequence[Request], layer: int, *, prefixes: Sequence[str] = ("",),
                    space: str = "mlp", steps: int = 20, lr: float = 0.5, kl_factor: float = 0.0625,
                    weight_decay: float = 0.5, clamp_norm_factor: float = 4.0, early_stop_loss: float = 5e-2,
                    kl_template: str | None = "{} is a", batch_tokens: int = 2048,
                    extra_loss: ExtraLoss | None = None, progress: bool = False) -> ValueResult:
    """Optimise the residual change ``δ`` that makes the model answer each request's target (see module doc).

    Args:
        requests: facts to write (each gets its own ``δ``).
        layer: the layer whose MLP output (``arch.mlp_out_at(layer)``) receives ``δ`` at the last subject token.
        prefixes: context prefixes (:func:`context_prefixes`); the first should be ``""``.
        space: ``"mlp"`` — ``v₀`` is the MLP output (ROME); ``"residual"`` — ``v₀`` is the residual stream after
            the layer (MEMIT's ``h^L``). Only the clamp radius and :attr:`ValueResult.init` depend on it.
        steps: maximal number of forward passes (``steps − 1`` Adam updates at most).
        lr: Adam learning rate.
        kl_factor: weight of the essence KL term (0 disables it; ``kl_template=None`` too).
        weight_decay: weight of ``‖δ‖²/‖v₀‖²``.
        clamp_norm_factor: ``‖δ‖`` is clamped to ``clamp_norm_factor · ‖v₀‖`` after each update.
        early_stop_loss: a request stops updating once its target NLL is below this.
        batch_tokens: token budget of one forward chunk (gradients are accumulated over chunks).
        extra_loss: optional hook ``extra_loss(ctx: ValueLossContext) -> Tensor`` (a scalar, differentiable in
            ``ctx.delta``) added to the loss at every step (the EVK-Align regulariser plugs in here). It is called
            once per step after the chunked forward passes; use ``ctx.run(...)`` to forward any batch (token ids or
            perturbed ``inputs_embeds``) with ``δ`` applied at chosen positions, ``use_delta=False`` for reference
            outputs (wrap those in ``torch.no_grad()``).
        progress: show a tqdm bar over steps.

    Returns:
        :class:`ValueResult` (``delta``, ``init`` and mean losses).
    """
    if space not in ("mlp", "residual"):
        raise MethodError(f"space must be 'mlp' or 'residual', got {space!r}")
    if not requests:
        raise MethodError("no requests")
    dev = lm.device
    module = lm.arch.mlp_out_at(layer)
    n = len(requests)
    n_pref = len(prefixes)
    # v0 at the unprefixed prompt
    init_module = module if space == "mlp" else lm.arch.block(layer)
    init = capture_at_subject(lm, requests, init_module, kind="output")
    init_norm = init.norm(dim=-1)
    rows = _build_rows(lm, requests, prefixes, kl_template if kl_factor > 0 else None)
    groups = ops.plan_batches([len(r.ids) for r in rows], batch_tokens)
    pad = ops._pad_id(lm)
    batches = []
    for g in groups:
        b = ops.pad_left([rows[i].ids for i in g], pad, dev)
        width = b["input_ids"].shape[1]
        keep = max([len(rows[i].target) for i in g if rows[i].kind == "nll"] + [1])
        pos = torch.tensor([width - len(rows[i].ids) + rows[i].pos for i in g], device=dev)
        req = torch.tensor([rows[i].req for i in g], device=dev)
        # target gather indices: for nll rows the last m positions; padded with -1 (ignored)
        tgt = torch.full((len(g), keep), -1, dtype=torch.long)
        for r, i in enumerate(g):
            if rows[i].kind == "nll":
                m = len(rows[i].target)
                tgt[r, keep - m:] = torch.tensor(rows[i].target)
        is_kl = torch.tensor([rows[i].kind == "kl" for i in g], device=dev)
        n_tok = torch.tensor([max(1, len(rows[i].target)) for i in g], device=dev, dtype=torch.float32)
        batches.append(dict(batch=b, keep=keep, pos=pos, req=req, tgt=tgt.to(dev), is_kl=is_kl, n_tok=n_tok))
    # original next-token log-probs of the KL rows
    kl_init: list[torch.Tensor | None] = []
    with torch.no_grad():
        for bt in batches:
            if bool(bt["is_kl"].any()):
                lg = lm.model(**bt["batch"], logits_to_keep=1, use_cache=False).logits[:, -1, :].float()
                kl_init.append(torch.log_softmax(lg, -1)[bt["is_kl"]])
            else:
                kl_init.append(None)

    delta = torch.zeros((n, init.shape[1]), device=dev, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    max_norm = (clamp_norm_factor * init_norm).unsqueeze(1)
    active = torch.ones(n, dtype=torch.bool, device=dev)
    ctx = ValueLossContext(lm=lm, layer=layer, module=module, requests=requests, delta=delta, init=init,
                           prefixes=list(prefixes))
    losses: dict[str, float] = {}
    nll_first: torch.Tensor | None = None
    it_bar = range(max(1, steps))
    if progress:
        from tqdm.auto import tqdm

        it_bar = tqdm(it_bar, desc=f"values L{layer}", leave=False)
    last_step = 0
    nll_prev = torch.zeros(n, device=dev)
    kl_prev = torch.zeros(n, device=dev)
    for it in it_bar:
        last_step = it
        update = it < steps - 1
        opt.zero_grad(set_to_none=True)
        # rows of requests that stopped (early stop) are not forwarded again: their δ is frozen and each row sees
        # only its own request's δ, so their losses are exactly the last ones computed (kept in nll_prev/kl_prev)
        nll = torch.where(active, torch.zeros_like(nll_prev), nll_prev)
        kl = torch.where(active, torch.zeros_like(kl_prev), kl_prev)
        for bt0, kli0 in zip(batches, kl_init):
            bt, kli = _active_rows(bt0, kli0, active)
            if bt is None:
                continue
            with torch.set_grad_enabled(update or extra_loss is not None):
                d = delta[bt["req"]]
                with add_to_output(lm.model, module, d, rows=torch.arange(len(bt["req"]), device=dev),
                                   positions=bt["pos"]):
                    logits = lm.model(**bt["batch"], logits_to_keep=bt["keep"], use_cache=False).logits
                chunk_loss, chunk_nll, chunk_kl = chunk_losses(logits, bt, kli, n, n_pref, kl_factor)
                if chunk_kl is not None:
                    kl = kl + chunk_kl.detach()
                nll = nll + chunk_nll.detach()
                if update:
                    chunk_loss.backward()
        if nll_first is None:
            nll_first = nll.clone()
        nll_prev, kl_prev = nll.clone(), kl.clone()
        wd = weight_decay * (delta.pow(2).sum(-1) / init_norm.pow(2).clamp(min=1e-12))
        active, losses = finish_step(ctx, it, extra_loss, nll, kl, wd, active, early_stop_loss, update)
        if not update or not bool(active.any()):
            break
        old = delta.detach().clone()
        opt.step()
        with torch.no_grad():
            norms = delta.norm(dim=-1, keepdim=True)
            scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
            delta.mul_(scale)
            delta.copy_(torch.where(active.unsqueeze(1), delta, old))
    assert nll_first is not None
    losses["loss/nll_init"] = float(nll_first.mean())
    losses["loss/steps"] = float(last_step + 1)
    return ValueResult(delta=delta.detach(), init=init, losses=losses)


def finish_step(ctx: Any, it: int, extra_loss: Callable[[Any], torch.Tensor] | None, nll: torch.Tensor,
                kl: torch.Tensor, wd: torch.Tensor, active: torch.Tensor, early_stop_loss: float,
                update: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """The end of one value-optimisation step, shared by :func:`compute_values` and PMET: evaluate the optional
    ``extra_loss(ctx)`` (a scalar, e.g. EVK-Align), mark requests whose NLL fell below ``early_stop_loss`` as
    done, backpropagate weight decay + extra loss (the chunk losses were backpropagated already) and return
    the new ``active`` mask with the step's loss figures."""
    extra = None
    if extra_loss is not None:
        ctx.step = it
        with torch.set_grad_enabled(True):
            extra = extra_loss(ctx)
        if not (torch.is_tensor(extra) and extra.dim() == 0):
            raise EditlensError("extra_loss must return a scalar tensor")
    active = active & (nll > early_stop_loss)
    if update:
        total = wd.sum() + (extra if extra is not None else 0.0)
        if torch.is_tensor(total) and total.requires_grad:
            total.backward()
    losses = {"loss/nll": float(nll.mean()), "loss/kl": float(kl.mean()), "loss/wd": float(wd.detach().mean())}
    if extra is not None:
        losses["loss/extra"] = float(extra.detach())
    return active, losses


def chunk_losses(logits: torch.Tensor, bt: dict, kli: torch.Tensor | None, n: int, n_pref: int, kl_factor: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loss of one prepared chunk of the value optimisation: ``(loss, per-request NLL [n], per-request KL [n])``.

    The NLL of each ``nll`` row is the mean over its target tokens, divided by the number of prefixes (so a
    request's NLL is the mean over its prefixed prompts); ``kl`` rows add ``kl_factor · KL(now ‖ original)`` of
    their next-token distribution (ROME's essence term; ``kli`` = the original log-probs of those rows)."""
    dev = logits.device
    lp = torch.log_softmax(logits[:, -bt["keep"]:, :].float(), -1)
    tgt = bt["tgt"]
    tok_lp = lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (tgt >= 0)
    row_nll = -tok_lp.sum(-1) / bt["n_tok"] / n_pref
    row_nll = torch.where(bt["is_kl"], torch.zeros_like(row_nll), row_nll)
    chunk_nll = torch.zeros(n, device=dev).index_add(0, bt["req"], row_nll)
    loss = chunk_nll.sum()
    chunk_kl = None
    if kli is not None:
        lp_kl = lp[bt["is_kl"], -1, :]
        row_kl = (lp_kl.exp() * (lp_kl - kli)).sum(-1)
        chunk_kl = torch.zeros(n, device=dev).index_add(0, bt["req"][bt["is_kl"]], row_kl)
        loss = loss + kl_factor * chunk_kl.sum()
    return loss, chunk_nll, chunk_kl


def _active_rows(bt: dict, kli: torch.Tensor | None, active: torch.Tensor) -> tuple[dict | None, Any]:
    """The rows of a prepared chunk whose request is still optimised (``None`` when there is none)."""
    keep = active[bt["req"]]
    if bool(keep.all()):
        return bt, kli
    if not bool(keep.any()):
        return None, None
    idx = keep.nonzero().squeeze(1)
    out = dict(bt)
    out["batch"] = {k: (v.index_select(0, idx) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == keep.shape[0]
                        else v) for k, v in bt["batch"].items()}
    for k in ("pos", "req", "tgt", "is_kl", "n_tok"):
        out[k] = bt[k].index_select(0, idx)
    if kli is not None:
        kli = kli[keep[bt["is_kl"]]]
    return out, kli



# ------------------------------------------------------------------------------------------------ PMET (pmet.py)
@dataclass
class PMETLossContext(ValueLossContext):
    delta_attn: torch.Tensor | None = None
    attn_module: str = ""

    def applied(self) -> list[tuple[str, torch.Tensor]]:  # (added: the leaves EVK-Align now asks for)
        return [(self.module, self.delta)] + ([(self.attn_module, self.delta_attn)] if self.delta_attn is not None
                                              else [])

    @contextlib.contextmanager
    def with_delta(self, rows: torch.Tensor, positions: torch.Tensor, request_index: torch.Tensor) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(add_to_output(self.lm.model, self.module, self.delta[request_index], rows=rows,
                                              positions=positions))
            if self.delta_attn is not None:
                stack.enter_context(add_to_output(self.lm.model, self.attn_module, self.delta_attn[request_index],
                                                  rows=rows, positions=positions))
            yield


@dataclass
class PMETValues:
    delta_mlp: torch.Tensor
    delta_attn: torch.Tensor
    init_mlp: torch.Tensor
    init_attn: torch.Tensor
    losses: dict[str, float] = field(default_factory=dict)


def compute_pmet_values(lm: "LM", requests: Sequence[locate.Request], layer: int, *,
                        prefixes: Sequence[str] = ("",), steps: int = 20, lr: float = 0.5, kl_factor: float = 0.0625,
                        weight_decay: float = 0.5, clamp_norm_factor: float = 1.0, early_stop_loss: float = 5e-2,
                        kl_template: str | None = "{} is a", batch_tokens: int = 2048,
                        extra_loss: Any = None, progress: bool = False) -> PMETValues:
    """Jointly optimise ``δ_attn`` and ``δ_mlp`` at ``layer`` (see the module docstring, step 1)."""
    if not requests:
        raise MethodError("no requests")
    dev = lm.device
    mlp_mod = lm.arch.mlp_out_at(layer)
    attn_mod = lm.arch.attn_out_at(layer)
    n = len(requests)
    n_pref = len(prefixes)
    init_mlp = locate.capture_at_subject(lm, requests, mlp_mod, kind="output")
    init_attn = locate.capture_at_subject(lm, requests, attn_mod, kind="output")
    nm = init_mlp.norm(dim=-1).clamp(min=1e-12)
    na = init_attn.norm(dim=-1).clamp(min=1e-12)
    rows = _build_rows(lm, requests, prefixes, kl_template if kl_factor > 0 else None)
    pad = ops._pad_id(lm)
    batches = []
    for g in ops.plan_batches([len(r.ids) for r in rows], batch_tokens):
        b = ops.pad_left([rows[i].ids for i in g], pad, dev)
        width = b["input_ids"].shape[1]
        keep = max([len(rows[i].target) for i in g if rows[i].kind == "nll"] + [1])
        tgt = torch.full((len(g), keep), -1, dtype=torch.long)
        for r, i in enumerate(g):
            if rows[i].kind == "nll":
                tgt[r, keep - len(rows[i].target):] = torch.tensor(rows[i].target)
        batches.append(dict(
            batch=b, keep=keep, tgt=tgt.to(dev),
            pos=torch.tensor([width - len(rows[i].ids) + rows[i].pos for i in g], device=dev),
            req=torch.tensor([rows[i].req for i in g], device=dev),
            is_kl=torch.tensor([rows[i].kind == "kl" for i in g], device=dev),
            n_tok=torch.tensor([max(1, len(rows[i].target)) for i in g], device=dev, dtype=torch.float32)))
    kl_init: list[torch.Tensor | None] = []
    with torch.no_grad():
        for bt in batches:
            if bool(bt["is_kl"].any()):
                lg = lm.model(**bt["batch"], logits_to_keep=1, use_cache=False).logits[:, -1, :].float()
                kl_init.append(torch.log_softmax(lg, -1)[bt["is_kl"]])
            else:
                kl_init.append(None)
    d_mlp = torch.zeros((n, init_mlp.shape[1]), device=dev, dtype=torch.float32, requires_grad=True)
    d_attn = torch.zeros((n, init_attn.shape[1]), device=dev, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([d_mlp, d_attn], lr=lr)
    max_m = (clamp_norm_factor * nm).unsqueeze(1)
    max_a = (clamp_norm_factor * na).unsqueeze(1)
    ctx = PMETLossContext(lm=lm, layer=layer, module=mlp_mod, requests=requests, delta=d_mlp, init=init_mlp,
                          prefixes=list(prefixes), delta_attn=d_attn, attn_module=attn_mod)
    active = torch.ones(n, dtype=torch.bool, device=dev)
    losses: dict[str, float] = {}
    nll_first = None
    last = 0
    it_range: Any = range(max(1, steps))
    if progress:
        from tqdm.auto import tqdm

        it_range = tqdm(it_range, desc=f"PMET values L{layer}", leave=False)
    for it in it_range:
        last = it
        update = it < steps - 1
        opt.zero_grad(set_to_none=True)
        nll = torch.zeros(n, device=dev)
        kl = torch.zeros(n, device=dev)
        for bt, kli in zip(batches, kl_init):
            with torch.set_grad_enabled(update):
                ridx = torch.arange(len(bt["req"]), device=dev)
                with ctx.with_delta(ridx, bt["pos"], bt["req"]):
                    logits = lm.model(**bt["batch"], logits_to_keep=bt["keep"], use_cache=False).logits
                loss, chunk_nll, chunk_kl = chunk_losses(logits, bt, kli, n, n_pref, kl_factor)
                if chunk_kl is not None:
                    kl = kl + chunk_kl.detach()
                nll = nll + chunk_nll.detach()
                if update:
                    loss.backward()
        if nll_first is None:
            nll_first = nll.clone()
        wd = weight_decay * (d_mlp.pow(2).sum(-1) / nm.pow(2) + d_attn.pow(2).sum(-1) / na.pow(2))
        active, losses = finish_step(ctx, it, extra_loss, nll, kl, wd, active, early_stop_loss, update)
        if not update or not bool(active.any()):
            break
        old_m, old_a = d_mlp.detach().clone(), d_attn.detach().clone()
        opt.step()
        with torch.no_grad():
            for d, mx, old in ((d_mlp, max_m, old_m), (d_attn, max_a, old_a)):
                norms = d.norm(dim=-1, keepdim=True)
                d.mul_(torch.where(norms > mx, mx / norms.clamp(min=1e-12), torch.ones_like(norms)))
                d.copy_(torch.where(active.unsqueeze(1), d, old))
    assert nll_first is not None
    losses["loss/nll_init"] = float(nll_first.mean())
    losses["loss/steps"] = float(last + 1)
    return PMETValues(delta_mlp=d_mlp.detach(), delta_attn=d_attn.detach(), init_mlp=init_mlp,
                      init_attn=init_attn, losses=losses)


