"""Editing methods behind one API: :func:`edit`, :func:`edit_sequential`, reversible :class:`Edit` handles.

Methods register themselves by name (``@register_method``) in their own modules. The registry finds them by
scanning this package and the ``editlens.methods`` entry points of installed packages (:mod:`editlens.registry`);
:func:`registered_methods` lists them, :func:`method_import_errors` the modules that failed to import.
"""
from editlens.edit.base import (Edit, Editor, HParams, SequenceState, WeightSnapshot, edit, edit_sequential,
                                get_method, load_sequence, method_import_errors, model_keys, register_method,
                                registered_methods, save_sequence)
from editlens.edit.trained import TrainableEditor, TrainedEditor, train, trainable_methods

__all__ = ["Edit", "Editor", "HParams", "SequenceState", "WeightSnapshot", "edit", "edit_sequential", "get_method",
           "method_import_errors", "model_keys", "register_method", "registered_methods", "TrainableEditor",
           "TrainedEditor", "train", "trainable_methods", "save_sequence", "load_sequence"]


def _make_callable() -> None:
    """Let ``editlens.edit(lm, cases, method=...)`` work although ``editlens.edit`` is also this package."""
    import sys
    import types

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return edit(*args, **kwargs)

    sys.modules[__name__].__class__ = _CallableModule


_make_callable()
