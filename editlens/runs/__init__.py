"""Experiments: run specs (:mod:`~editlens.runs.spec`) and the results store (:mod:`~editlens.runs.store`).

The runner (batch / sequential schedules) builds on these: ``spec.plan()`` gives the units,
``Store.is_done`` / ``last_checkpoint`` say what is left, ``commit_step`` / ``commit_unit`` write results
atomically. See ``docs/experiments.md``.
"""
from editlens.runs.spec import (DatasetSpec, MethodSpec, ModelSpec, RegimeSpec, Spec, Unit, load_spec,
                                parse_spec)
from editlens.runs.store import Checkpoint, Store

__all__ = ["Checkpoint", "DatasetSpec", "MethodSpec", "ModelSpec", "RegimeSpec", "Spec", "Store", "Unit",
           "load_spec", "parse_spec"]
