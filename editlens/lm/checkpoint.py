"""Saving a loaded (possibly edited) model as a standard Hugging Face checkpoint directory.

:func:`save_checkpoint` writes ``model.safetensors`` (or shards and their index), ``config.json``,
``generation_config.json``, the tokenizer files and :data:`METADATA_FILE` (what editlens knows about the weights:
base model, base fingerprint, applied edits, and what the caller adds: method, hyperparameters, case ids). The
directory is read back by :func:`editlens.load_model` and by ``transformers.AutoModelForCausalLM.from_pretrained``.
:meth:`editlens.edit.Edit.save_pretrained` and ``editlens edit --save`` use it; :mod:`editlens.audit` reads it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from editlens.errors import EditlensError

if TYPE_CHECKING:  # pragma: no cover
    from editlens.lm.load import LM

#: name of the metadata file editlens writes next to a saved checkpoint
METADATA_FILE = "editlens.json"
#: files a checkpoint consists of (removed from the target by ``force=True`` when the new save does not write them)
_CHECKPOINT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                        "pytorch_model.bin.index.json")


def _dir_problem(directory: Path, force: bool) -> str | None:
    if directory.exists() and not directory.is_dir():
        return f"{directory} exists and is not a directory"
    if directory.is_dir() and not force:
        entries = sorted(p.name for p in directory.iterdir())
        if entries:
            shown = ", ".join(entries[:8]) + (f", ... ({len(entries)} entries)" if len(entries) > 8 else "")
            return (f"{directory} is not empty ({shown}); refusing to overwrite it: choose a new or empty directory, "
                    f"or pass force=True (--force) to replace the checkpoint files in it")
    return None


def check_save_target(directory: str | os.PathLike, force: bool = False) -> Path:
    """Raise :class:`EditlensError` when ``directory`` cannot take a checkpoint (a file, or a non-empty directory
    without ``force``); returns it as a :class:`Path`. Nothing is written."""
    d = Path(directory).expanduser()
    problem = _dir_problem(d, force)
    if problem is not None:
        raise EditlensError(problem)
    return d


def _plain(v: Any) -> Any:
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return repr(v)


def save_checkpoint(lm: "LM", directory: str | os.PathLike, *, force: bool = False,
                    state: Sequence[str] | None = None, metadata: Mapping[str, Any] | None = None,
                    verify: bool = True) -> Path:
    """Write ``lm``'s weights (as they are in ``state``; default: now) as a standard Hugging Face checkpoint.

    The directory gets ``model.safetensors`` (or shards and their index), ``config.json``,
    ``generation_config.json``, the tokenizer files and :data:`METADATA_FILE`. It is read back by
    :func:`editlens.load_model` and by ``transformers.AutoModelForCausalLM.from_pretrained``. A model loaded
    from a ``.gguf`` file (dequantised) is saved as plain safetensors in its loaded dtype.

    The checkpoint is written to a temporary sibling directory, checked (``verify``: every stored tensor read
    back with ``safetensors.safe_open`` one at a time and compared with the model's bit for bit) and only then
    moved into place, so an interrupted save never leaves a half-written checkpoint under ``directory``.

    Args:
        force: replace the checkpoint files of a non-empty ``directory`` (other files in it are kept; weight files
            the new save does not write are removed so that no stale shard is loaded).
        state: the edit tags the weights must have (``lm.state`` of a pinned system); the weights are swapped to
            that state for the duration of the save (:meth:`~editlens.lm.LM.state_view`).
        metadata: extra JSON-able facts written into :data:`METADATA_FILE`.

    Raises:
        EditlensError: ``directory`` is a file, or not empty and ``force`` is false (checked before any work),
            or the read-back differs.
    """
    from safetensors import safe_open

    from editlens.lm import placement

    target = check_save_target(directory, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=str(target.parent)))
    try:
        with lm.lock, lm.state_view(tuple(lm.state if state is None else state)):
            lm.model.save_pretrained(str(tmp), safe_serialization=True)
            lm.tokenizer.save_pretrained(str(tmp))
            n_checked = 0
            if verify:
                # offloaded (``meta``) parameters of a dispatched model are compared with their stored values
                params = dict(placement.state_tensors(lm.model))
                files = sorted(tmp.glob("*.safetensors"))
                if not files:
                    raise EditlensError(f"saving {lm.name} wrote no .safetensors file into {tmp}")
                for f in files:
                    with safe_open(str(f), framework="pt", device="cpu") as st:
                        for key in st.keys():
                            mine = params.get(key)
                            if mine is None:
                                raise EditlensError(f"the saved checkpoint holds a tensor {key!r} ({f.name}) the "
                                                    f"model does not have")
                            got = st.get_tensor(key)
                            if got.dtype != mine.dtype or got.shape != mine.shape or not torch.equal(
                                    got, mine.detach().to("cpu")):
                                raise EditlensError(f"the saved tensor {key!r} ({f.name}) differs from the model's "
                                                    "weights after writing; nothing was saved")
                            n_checked += 1
        meta = {
            "format": "editlens checkpoint v1",
            "base_model": lm.name,
            "base_fingerprint": lm.base_fingerprint,
            "fingerprint": lm.fingerprint_of(tuple(lm.state if state is None else state)),
            "edits": list(lm.state if state is None else state),
            "dtype": str(lm.dtype).replace("torch.", ""),
            "tensors_verified": n_checked if verify else None,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **_plain(dict(metadata or {})),
        }
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if not target.exists() or not any(target.iterdir()):
            if target.exists():
                target.rmdir()
            os.replace(tmp, target)
        else:  # force: replace the checkpoint files, keep the rest
            new = {p.name for p in tmp.iterdir()}
            for pat in _CHECKPOINT_PATTERNS:
                for old in target.glob(pat):
                    if old.name not in new and old.is_file():
                        old.unlink()
            for p in tmp.iterdir():
                os.replace(p, target / p.name)
            tmp.rmdir()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The :data:`METADATA_FILE` of a checkpoint directory (``None`` when it has none or it is unreadable)."""
    p = Path(path).expanduser()
    f = p / METADATA_FILE if p.is_dir() else None
    if f is None or not f.is_file():
        return None
    try:
        out = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None
