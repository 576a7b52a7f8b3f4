"""editlens: edit the knowledge of causal language models and measure what an edit really did."""
from __future__ import annotations

from editlens.errors import EditlensError
from editlens.lm import LM, Arch, load_model

__version__ = "0.1.0"

__all__ = ["EditlensError", "LM", "Arch", "load_model", "load_cases", "save_cases", "synthetic_cases", "ModelSystem",
           "System", "edit", "evaluate", "train", "TrainedEditor", "__version__"]


def __getattr__(name: str):  # lazy re-exports keep `import editlens` light
    if name == "ModelSystem":
        from editlens.system import ModelSystem

        return ModelSystem
    if name == "System":
        from editlens.system import System

        return System
    if name in ("load_cases", "save_cases", "synthetic_cases"):
        import editlens.data as data

        return getattr(data, name)
    if name in ("train", "TrainedEditor"):
        from editlens.edit import trained

        return getattr(trained, name)
    if name in ("edit", "evaluate"):
        # the subpackages are callable: editlens.edit(...) is editlens.edit.edit(...), same for evaluate
        import importlib

        return importlib.import_module(f"editlens.{name}")
    raise AttributeError(f"module 'editlens' has no attribute {name!r}")
