"""Editing methods behind one API: :func:`edit`, :func:`edit_sequential`, reversible :class:`Edit` handles.

Methods register themselves by name (:func:`register_method`) in their own modules and are imported on demand
by :func:`get_method`: ``rome``, ``memit``, ``alphaedit``, ``emmet`` (and ``ft``, ``rect``, ``prune``, ``pmet``,
``grace``, ``wise``, ``ike``, ``scr`` when present).
"""
from editlens.edit.base import (Edit, Editor, HParams, SequenceState, WeightSnapshot, edit, edit_sequential,
                                get_method, model_keys, register_method, registered_methods)

__all__ = ["Edit", "Editor", "HParams", "SequenceState", "WeightSnapshot", "edit", "edit_sequential", "get_method",
           "model_keys", "register_method", "registered_methods"]


def _make_callable() -> None:
    """Let ``editlens.edit(lm, cases, method=...)`` work although ``editlens.edit`` is also this package."""
    import sys
    import types

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return edit(*args, **kwargs)

    sys.modules[__name__].__class__ = _CallableModule


_make_callable()
