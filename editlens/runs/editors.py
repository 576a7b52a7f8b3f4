"""The trained editors of a spec's units: a saved editor (``trained = "DIR"``) or one the run trains and caches.

A ``[methods.train]`` table is trained once per (method, base-model fingerprint, training settings: data by content
hash, validation data, limit, seed, training hyperparameters) and cached as a saved editor under
``$EDITLENS_EDITORS_DIR`` (default ``editlens.lm.cache_dir()/"editors"``), so a resumed or repeated run does not
train again. A cached editor is read with :meth:`editlens.edit.trained.TrainedEditor.load` (JSON and safetensors,
checked against its sha256; no code runs) and, like any editor, must match the model it edits.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from editlens.edit.trained import TrainedEditor
    from editlens.lm.load import LM

_LOCK = threading.Lock()
_MEMO: dict[tuple[str, str], "TrainedEditor"] = {}


def editors_dir() -> Path:
    """Where trained editors are cached: ``$EDITLENS_EDITORS_DIR`` or ``editlens.lm.cache_dir()/"editors"``."""
    env = os.environ.get("EDITLENS_EDITORS_DIR")
    if env:
        return Path(env).expanduser()
    from editlens.lm.load import cache_dir

    return cache_dir() / "editors"


def train_key(method: str, lm: "LM", train: Mapping[str, Any]) -> str:
    """The cache key of an editor trained by a ``[methods.train]`` table for ``lm``."""
    from editlens.edit.trained import FORMAT_VERSION

    settings = {k: v for k, v in train.items() if k not in ("data_path", "val_path", "data", "val")}
    doc = {"method": method, "model": lm.base_fingerprint, "format": FORMAT_VERSION, "train": settings}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def unit_editor(lm: "LM", method: str, trained: Mapping[str, Any], *, progress: bool = False) -> "TrainedEditor":
    """The :class:`~editlens.edit.trained.TrainedEditor` a unit edits with (loaded, or trained and cached)."""
    from editlens.edit.trained import EDITOR_JSON, TrainedEditor, train

    if "path" in trained:
        return TrainedEditor.load(trained["path"])
    t = dict(trained["train"])
    key = train_key(method, lm, t)
    with _LOCK:  # units of one process share the editor; training runs once
        memo = _MEMO.get((method, key))
        if memo is not None:
            return memo
        d = editors_dir() / f"{method}-{key}"
        if (d / EDITOR_JSON).is_file():
            te = TrainedEditor.load(d)
        else:
            from editlens.data import load_cases, synthetic_cases

            cases = (load_cases(t["data_path"], limit=t.get("limit")) if t.get("data_path")
                     else synthetic_cases(int(t["synthetic"]), seed=int(t.get("seed", 0)))[:t.get("limit")])
            val = load_cases(t["val_path"]) if t.get("val_path") else None
            te = train(method, lm, cases, val_cases=val, progress=progress, seed=int(t.get("seed", 0)),
                       **dict(t.get("hparams", {})))
            te.meta["cache_key"] = key
            te.save(d, force=True)
        _MEMO[(method, key)] = te
        return te
