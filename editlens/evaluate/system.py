"""Kept for users: ``editlens.evaluate.system`` re-exports :mod:`editlens.system`, where the :class:`System`
protocol, :class:`ModelSystem` and :class:`WrappedSystem` live.

They moved below both ``editlens.edit`` (methods build systems) and ``editlens.evaluate`` (metrics query them), so
that neither package imports the other. New code imports from :mod:`editlens.system`; code inside editlens
must (``tests/unit/test_layering.py``). This module stays importable, unchanged in what it offers.
"""
from editlens.system import ModelSystem, System, WrappedSystem

__all__ = ["System", "ModelSystem", "WrappedSystem"]
