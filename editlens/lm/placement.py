"""Models spread over several devices (``load_model(..., device_map=...)``), dispatched with accelerate.

:func:`dispatch` places a loaded model with :func:`accelerate.dispatch_model`: each module of the device map runs
on its device (``cuda:N``, ``cpu``, ...), and modules mapped to ``"disk"`` (or to ``"cpu"`` when a GPU is the main
device) are *offloaded*: their parameters are ``meta`` tensors between forward passes, and accelerate's
:class:`~accelerate.hooks.AlignDevicesHook` copies them in from its ``weights_map`` (an
:class:`~accelerate.utils.OffloadedWeightsLoader`) for each forward. ``"auto"`` (and ``"balanced"``,
``"balanced_low_0"``, ``"sequential"``) is resolved with :func:`accelerate.infer_auto_device_map`.

Editing an offloaded weight must therefore change the weights map's copy, not the ``meta`` parameter.
:func:`storage_weight` gives the tensor that holds a parameter's value wherever it lives: the parameter itself for
a resident module, the weights map's CPU tensor for a CPU-offloaded one, and for a disk-offloaded one the tensor read
from the offload folder once and from then on kept in the weights map's in-memory dictionary (which accelerate reads
before the disk). :func:`editlens.lm.arch.weight_param` returns it, so every reader and writer of edited weights
(``Editor.add_now``, ``weight_edit``, the undo snapshot, ``LM.state_view``) changes the copy the next forward pass
uses, and undo copies the saved original back into it bit for bit. (An edited disk-offloaded matrix thus stays in
CPU memory, not on disk, after its first edit; undo restores its values, not its place.)

:func:`get_weight` / :func:`set_weight` read and write a module's weight by path for code outside the editors.
"""
from __future__ import annotations

import re
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from editlens.errors import ModelLoadError

#: device-map strategies resolved by accelerate
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_DEV_RE = re.compile(r"^(cpu|disk|cuda(:\d+)?|mps|xpu(:\d+)?)$")
#: attribute set on modules whose parameters live in an offload weights map: ``{param name: (loader, key)}``
_SLOTS = "_editlens_offload"


def device_map_problem(device_map: Any) -> str | None:
    """Why ``device_map`` is not a device map :func:`dispatch` accepts (``None`` when it is one); spelling only."""
    if device_map is None:
        return None
    if isinstance(device_map, str):
        if device_map in STRATEGIES:
            return None
        return f"invalid device_map {device_map!r}: use one of {', '.join(map(repr, STRATEGIES))} or a dict"
    if not isinstance(device_map, Mapping) or not device_map:
        return (f"invalid device_map {device_map!r}: expected 'auto' or a non-empty dict "
                f"{{module path: device}} such as {{'model.layers.0': 0, 'model.layers.1': 'cpu'}}")
    for key, dev in device_map.items():
        if not isinstance(key, str):
            return f"device_map key {key!r} must be a module path (str)"
        if isinstance(dev, bool) or not (isinstance(dev, (int, str, torch.device))):
            return f"device_map[{key!r}] = {dev!r}: a device is a GPU index, 'cpu', 'disk', 'cuda:N', 'mps' or 'xpu'"
        if isinstance(dev, int) and dev < 0:
            return f"device_map[{key!r}] = {dev}: a GPU index must be >= 0"
        if isinstance(dev, (str, torch.device)) and not _DEV_RE.match(str(dev)):
            return (f"device_map[{key!r}] = {str(dev)!r} is not a device: use a GPU index, 'cpu', 'disk', 'cuda:N', "
                    f"'mps' or 'xpu'")
    return None


def _device_exists(dev: Any) -> str | None:
    """Why ``dev`` (a device-map value) does not exist on this machine (``None`` when it does)."""
    if isinstance(dev, int) or str(dev).startswith("cuda"):
        idx = dev if isinstance(dev, int) else torch.device(str(dev)).index or 0
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if idx >= n:
            return f"this machine has {n} CUDA device(s)" + (f" (0..{n - 1})" if n else "")
    elif str(dev) == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return "MPS is not available on this machine"
    elif str(dev).startswith("xpu") and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return "no XPU is available on this machine"
    return None


def resolve_device_map(model: nn.Module, device_map: Any, max_memory: Mapping[Any, Any] | None = None
                       ) -> dict[str, Any]:
    """A complete ``{module path: device}`` map for ``model`` (a strategy name resolved by accelerate).

    Raises:
        ModelLoadError: a bad spelling, a device this machine does not have, a key that names no module of the
            model, or parameters the map leaves unplaced (each named).
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    problem = device_map_problem(device_map)
    if problem is not None:
        raise ModelLoadError(problem)
    if isinstance(device_map, str):
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        if device_map in ("balanced", "balanced_low_0") or (device_map == "auto" and max_memory is None):
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        dmap = dict(infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split))
    else:
        dmap = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in device_map.items()}
        modules = dict(model.named_modules())
        for key, dev in dmap.items():
            if key != "" and key not in modules:
                raise ModelLoadError(f"device_map key {key!r} names no module of {type(model).__name__} (its "
                                     f"top-level modules: {', '.join(n for n in modules if n and '.' not in n)})")
        unplaced = [n for n, _ in model.named_parameters()
                    if not any(k == "" or n == k or n.startswith(k + ".") for k in dmap)]
        if unplaced:
            more = f" and {len(unplaced) - 5} more" if len(unplaced) > 5 else ""
            raise ModelLoadError(f"device_map places no device for the parameters {', '.join(unplaced[:5])}{more}; "
                                 f"add their modules (or a parent module) to the map")
    for key, dev in dmap.items():
        why = None if dev in ("cpu", "disk") else _device_exists(dev)
        if why is not None:
            raise ModelLoadError(f"device_map[{key!r}] = {dev!r}: no such device ({why})")
    return dmap


def dispatch(model: nn.Module, device_map: Mapping[str, Any], offload_dir: str | None = None) -> nn.Module:
    """Place ``model`` (on the CPU) by ``device_map`` with :func:`accelerate.dispatch_model` and mark the modules
    whose parameters live in an offload weights map (see :func:`storage_weight`).

    Raises:
        ModelLoadError: ``"disk"`` in the map without ``offload_dir``.
    """
    from accelerate import dispatch_model

    disk = [k for k, v in device_map.items() if v == "disk"]
    if disk and offload_dir is None:
        raise ModelLoadError(f"device_map offloads {', '.join(disk)} to 'disk': pass offload_dir= (a folder for "
                             f"the offloaded weights)")
    # force_hooks: even a map with one device gets accelerate's hooks, so inputs are placed the same way
    model = dispatch_model(model, dict(device_map), offload_dir=offload_dir, force_hooks=True)
    _mark_offloaded(model)
    return model


def _align_hooks(module: nn.Module) -> list[Any]:
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = list(hook.hooks) if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def _mark_offloaded(model: nn.Module) -> None:
    """Record on every module under an offloading hook where each of its parameters is stored."""
    from accelerate.utils import PrefixedDataset

    for name, module in model.named_modules():
        for hook in _align_hooks(module):
            wm = hook.weights_map
            if not hook.offload or wm is None:
                continue
            prefix, loader = "", wm
            if isinstance(wm, PrefixedDataset):
                prefix, loader = wm.prefix, wm.dataset
            for sub_name, sub in module.named_modules():
                for pname, p in sub._parameters.items():
                    if p is None:
                        continue
                    rel = f"{sub_name}.{pname}" if sub_name else pname
                    slots = sub.__dict__.setdefault(_SLOTS, {})
                    slots[pname] = (loader, prefix + rel)


def is_offloaded(module: nn.Module, pname: str = "weight") -> bool:
    """Whether the parameter ``pname`` of ``module`` lives in an offload weights map (``meta`` between forwards)."""
    return pname in (getattr(module, _SLOTS, None) or {})


def offloaded_modules(model: nn.Module) -> list[str]:
    """Paths of the modules of ``model`` with an offloaded weight."""
    return [n for n, m in model.named_modules() if is_offloaded(m)]


def storage_weight(module: nn.Module, pname: str = "weight") -> torch.Tensor:
    """The tensor holding the value of ``module.<pname>``; writing into it changes what the next forward uses.

    Resident modules: the parameter itself. Offloaded ones: the weights map's tensor; a disk-offloaded tensor is
    read once and kept in the map's in-memory dictionary (which accelerate reads before the offload folder).
    """
    slot = (getattr(module, _SLOTS, None) or {}).get(pname)
    if slot is None:
        return getattr(module, pname)
    loader, key = slot
    store = getattr(loader, "state_dict", None)
    if not isinstance(store, dict):
        if isinstance(loader, dict):
            store = loader
        else:
            raise ModelLoadError(f"offloaded parameter {key!r} is kept in a {type(loader).__name__}, which editlens "
                                 f"cannot write to; offload with load_model(device_map=...)")
    if key not in store:
        store[key] = loader[key].clone()  # from the offload folder into memory, writable from now on
    return store[key]


def read_offloaded(module: nn.Module, pname: str = "weight") -> torch.Tensor | None:
    """The current value of an offloaded parameter, read without keeping it in memory (``None``: not offloaded)."""
    slot = (getattr(module, _SLOTS, None) or {}).get(pname)
    if slot is None:
        return None
    loader, key = slot
    return loader[key]


def state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``model.state_dict()`` with every offloaded (``meta``) parameter replaced by its value."""
    owners: dict[str, tuple[nn.Module, str]] = {}
    for mname, m in model.named_modules():
        for pname in getattr(m, _SLOTS, None) or {}:
            owners[f"{mname}.{pname}" if mname else pname] = (m, pname)
    for name, t in model.state_dict().items():
        if torch.is_tensor(t) and t.device.type == "meta" and name in owners:
            value = read_offloaded(*owners[name])
            if value is not None:
                t = value
        yield name, t


def execution_device(model: nn.Module, path: str) -> torch.device:
    """The device a module of ``model`` computes on: the execution device of the nearest accelerate hook on it or
    an ancestor, else the device of its first non-meta parameter (else the CPU)."""
    parts = path.split(".") if path else []
    for i in range(len(parts), -1, -1):
        sub = model.get_submodule(".".join(parts[:i])) if i else model
        for hook in _align_hooks(sub):
            if hook.execution_device is not None:
                dev = hook.execution_device
                return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    module = model.get_submodule(path) if path else model
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def get_weight(lm: Any, name: str) -> torch.Tensor:
    """The weight of module ``name`` of ``lm`` as stored (``[out, in]`` for ``nn.Linear``; Conv1D keeps its
    ``[in, out]``), wherever it lives (see :func:`storage_weight`). Writing into it edits the model."""
    return storage_weight(lm.module(name))


@torch.no_grad()
def set_weight(lm: Any, name: str, value: torch.Tensor) -> None:
    """Write ``value`` (the weight's stored shape) into module ``name``'s weight in place, wherever it lives."""
    w = get_weight(lm, name)
    if tuple(value.shape) != tuple(w.shape):
        raise ModelLoadError(f"set_weight({name!r}): value of shape {tuple(value.shape)} does not fit the weight "
                             f"of shape {tuple(w.shape)}")
    w.copy_(value.to(device=w.device, dtype=w.dtype))
