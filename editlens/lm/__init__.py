"""Models: loading (:func:`load_model`), architecture names (:class:`Arch`), batched ops and hooks."""
from editlens.lm.arch import Arch, arch_for, register_arch
from editlens.lm.load import LM, cache_dir, installed_models, load_model, weights_fingerprint

__all__ = ["LM", "Arch", "arch_for", "register_arch", "load_model", "installed_models", "cache_dir",
           "weights_fingerprint"]
