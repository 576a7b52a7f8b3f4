"""Context managers that read or change module inputs/outputs during a forward pass.

* :func:`record_io` — keep the full input (first positional argument) or output tensor of named modules.
* :func:`add_to_output` — add a tensor to a module's output (optionally only at given ``(row, position)``
  pairs), e.g. the residual delta that ROME/MEMIT optimise.
* :func:`patch_output` — replace a module's output by ``fn(output)``.
* :func:`patch_embeddings` — replace the token embeddings by ``fn(embeddings)`` (EVK perturbations).

Hooks are always removed on exit, also when the forward pass raises.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


@contextlib.contextmanager
def record_io(model: nn.Module, modules: Sequence[str], kind: str = "input", detach: bool = True
              ) -> Iterator[dict[str, torch.Tensor]]:
    """Record the input (``kind="input"``) or output (``"output"``) of each named module."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name in modules:
        mod = model.get_submodule(name)

        def make(nm: str):
            if kind == "input":
                def hook(_m, args):
                    t = _first(args)
                    store[nm] = t.detach() if detach else t
                return _m_pre(mod, hook)

            def hook_out(_m, _args, out):
                t = _first(out)
                store[nm] = t.detach() if detach else t
            return mod.register_forward_hook(hook_out)

        handles.append(make(name))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _m_pre(mod: nn.Module, hook: Callable) -> Any:
    return mod.register_forward_pre_hook(hook)


@contextlib.contextmanager
def patch_output(model: nn.Module, module: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the output of ``module`` by ``fn(output)`` (tuple outputs: the first element)."""
    mod = model.get_submodule(module)

    def hook(_m, _args, out):
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)

    h = mod.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def add_to_output(model: nn.Module, module: str, delta: torch.Tensor,
                  rows: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> Iterator[None]:
    """Add ``delta`` to a module's output.

    Without ``rows``/``positions`` ``delta`` is broadcast over the whole output. With them (1-D long tensors of
    equal length), ``delta`` (``[d]`` or ``[len(rows), d]``) is added at ``output[rows[i], positions[i]]``.
    """
    def fn(out: torch.Tensor) -> torch.Tensor:
        # the module may compute on another device than delta's (a model dispatched over devices)
        if rows is None:
            return out + delta.to(device=out.device, dtype=out.dtype)
        d = delta.to(device=out.device, dtype=out.dtype)
        if d.dim() == 1:
            d = d.expand(len(rows), -1)
        r, p = rows.to(out.device), positions.to(out.device)
        out = out.clone()
        out[r, p] = out[r, p] + d
        return out

    with patch_output(model, module, fn):
        yield


@contextlib.contextmanager
def patch_embeddings(model: nn.Module, embed_module: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the output of the token-embedding module by ``fn(embeddings)``."""
    with patch_output(model, embed_module, fn):
        yield
