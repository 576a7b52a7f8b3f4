"""Per-architecture module names (:class:`Arch`).

Editing methods and metrics address a model through an :class:`Arch`: where the token embeddings, the
transformer blocks, the MLP input and output projections (ROME/MEMIT edit the *output* projection, whose
input is the "key" and output the "value"), the attention output projection, the final norm and the LM head
live. Names with ``{}`` are templates filled with the layer index.

GPT-2 style models store linear maps as ``Conv1D`` with weights of shape ``[in, out]``; :func:`weight_view`
and :func:`add_delta` hide that so editing code always works with ``[out, in]`` matrices.

Register a new architecture with :func:`register_arch` (keyed by the model class name or ``config.model_type``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from editlens.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Arch:
    """Module paths of one architecture family (``{}`` = layer index)."""

    family: str
    embed: str
    layers: str
    mlp_in: str
    mlp_out: str
    attn_out: str
    final_norm: str
    lm_head: str
    mlp: str
    attn: str
    #: True when linear weights are stored ``[in, out]`` (GPT-2 ``Conv1D``)
    conv1d: bool = False
    #: extra MLP input projection (the gate of gated MLPs), informational
    mlp_gate: str | None = None

    def block(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def mlp_out_at(self, layer: int) -> str:
        return self.mlp_out.format(layer)

    def mlp_in_at(self, layer: int) -> str:
        return self.mlp_in.format(layer)

    def attn_out_at(self, layer: int) -> str:
        return self.attn_out.format(layer)

    def mlp_at(self, layer: int) -> str:
        return self.mlp.format(layer)

    def attn_at(self, layer: int) -> str:
        return self.attn.format(layer)


def _llama_like(family: str) -> Arch:
    return Arch(family=family, embed="model.embed_tokens", layers="model.layers",
                mlp_in="model.layers.{}.mlp.up_proj", mlp_gate="model.layers.{}.mlp.gate_proj",
                mlp_out="model.layers.{}.mlp.down_proj", attn_out="model.layers.{}.self_attn.o_proj",
                mlp="model.layers.{}.mlp", attn="model.layers.{}.self_attn",
                final_norm="model.norm", lm_head="lm_head")


GPT2 = Arch(family="gpt2", embed="transformer.wte", layers="transformer.h",
            mlp_in="transformer.h.{}.mlp.c_fc", mlp_out="transformer.h.{}.mlp.c_proj",
            attn_out="transformer.h.{}.attn.c_proj", mlp="transformer.h.{}.mlp", attn="transformer.h.{}.attn",
            final_norm="transformer.ln_f", lm_head="lm_head", conv1d=True)
GPTJ = Arch(family="gptj", embed="transformer.wte", layers="transformer.h",
            mlp_in="transformer.h.{}.mlp.fc_in", mlp_out="transformer.h.{}.mlp.fc_out",
            attn_out="transformer.h.{}.attn.out_proj", mlp="transformer.h.{}.mlp", attn="transformer.h.{}.attn",
            final_norm="transformer.ln_f", lm_head="lm_head")
NEOX = Arch(family="gpt_neox", embed="gpt_neox.embed_in", layers="gpt_neox.layers",
            mlp_in="gpt_neox.layers.{}.mlp.dense_h_to_4h", mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
            attn_out="gpt_neox.layers.{}.attention.dense", mlp="gpt_neox.layers.{}.mlp",
            attn="gpt_neox.layers.{}.attention", final_norm="gpt_neox.final_layer_norm", lm_head="lm_head")
LLAMA = _llama_like("llama")

_REGISTRY: dict[str, Arch] = {
    "gpt2": GPT2, "GPT2LMHeadModel": GPT2,
    "gptj": GPTJ, "GPTJForCausalLM": GPTJ,
    "gpt_neox": NEOX, "GPTNeoXForCausalLM": NEOX,
}
for _mt, _cls in [("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                  ("qwen3", "Qwen3ForCausalLM"), ("gemma", "GemmaForCausalLM"), ("gemma2", "Gemma2ForCausalLM"),
                  ("gemma3_text", "Gemma3ForCausalLM"), ("phi3", "Phi3ForCausalLM"), ("olmo", "OlmoForCausalLM")]:
    _REGISTRY[_mt] = _llama_like(_mt)
    _REGISTRY[_cls] = _REGISTRY[_mt]


def register_arch(key: str, arch: Arch) -> None:
    """Register ``arch`` for a model class name (``type(model).__name__``) or a ``config.model_type``."""
    _REGISTRY[key] = arch


def arch_for(model: nn.Module) -> Arch:
    """The :class:`Arch` of a model, checking that its named modules exist.

    Raises:
        UnsupportedArchitectureError: naming the model class and how to register an ``Arch``.
    """
    cls = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = _REGISTRY.get(cls) or (_REGISTRY.get(model_type) if model_type else None)
    if arch is None:
        raise UnsupportedArchitectureError(
            f"model class {cls} (model_type={model_type!r}) has no registered Arch. Register one with "
            f"editlens.lm.arch.register_arch({cls!r}, Arch(family=..., embed=..., layers=..., mlp_in=..., "
            f"mlp_out=..., attn_out=..., mlp=..., attn=..., final_norm=..., lm_head=...)) naming its modules "
            f"(see `print(model)`).")
    names = dict(model.named_modules())
    missing = [p for p in (arch.embed, arch.layers, arch.final_norm, arch.lm_head, arch.mlp_out_at(0),
                           arch.mlp_in_at(0), arch.attn_out_at(0)) if p not in names]
    if missing:
        raise UnsupportedArchitectureError(
            f"model class {cls}: Arch {arch.family!r} names modules that do not exist: {missing}. "
            f"Register a matching Arch with editlens.lm.arch.register_arch({cls!r}, Arch(...)).")
    return arch


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (error naming the path when absent)."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise UnsupportedArchitectureError(f"model {type(model).__name__} has no module {path!r}") from None


def weight_param(module: nn.Module) -> torch.nn.Parameter:
    """The weight parameter of a linear or Conv1D module (of an offloaded module: the tensor in accelerate's weights
    map that holds its value, see :func:`editlens.lm.placement.storage_weight`)."""
    w = getattr(module, "weight", None)
    if w is None:
        raise UnsupportedArchitectureError(f"module {type(module).__name__} has no weight")
    if getattr(module, "_editlens_offload", None):  # offloaded by accelerate: the value lives in its weights map
        from editlens.lm.placement import storage_weight

        return storage_weight(module)
    return w


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def weight_view(module: nn.Module) -> torch.Tensor:
    """The module's weight as an ``[out, in]`` matrix (a view; transposed for Conv1D)."""
    w = weight_param(module)
    return w.t() if is_conv1d(module) else w


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear or Conv1D module."""
    w = weight_view(module)
    return int(w.shape[1]), int(w.shape[0])


@torch.no_grad()
def add_delta(module: nn.Module, delta_out_in: torch.Tensor) -> None:
    """Add ``delta`` (shape ``[out, in]``, any float dtype) to the module's weight in place."""
    w = weight_param(module)
    d = delta_out_in.t() if is_conv1d(module) else delta_out_in
    if tuple(d.shape) != tuple(w.shape):
        raise UnsupportedArchitectureError(
            f"delta of shape {tuple(delta_out_in.shape)} does not fit weight {tuple(weight_view(module).shape)}")
    w.add_(d.to(device=w.device, dtype=w.dtype))


def map_layers(arch: Arch, fn: Callable[[int], str], n_layers: int) -> list[str]:
    """Module paths for every layer (e.g. ``map_layers(arch, arch.mlp_out_at, n)``)."""
    return [fn(i) for i in range(n_layers)]
