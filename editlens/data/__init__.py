"""Datasets as :class:`EditCase` lists: loading (with format detection), saving, and a synthetic generator.

>>> from editlens.data import load_cases, save_cases, synthetic_cases
>>> cases = load_cases("multi_counterfact.json", limit=100)        # format detected from the content
>>> cases = load_cases("zsre_mend_eval.json", sample=500, seed=1)   # seeded random sample
>>> save_cases(cases, "cases.jsonl")                                # editlens JSON Lines
>>> cases = synthetic_cases(10, seed=0)                              # fictional facts, no file needed

Formats: see :data:`FORMATS` and ``docs/data.md``.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Iterable

from editlens.data.formats import FORMATS, detect_format, get_format, parse_records, select_indices
from editlens.data.formats.jsonl import dump_case
from editlens.data.io import PathLike, open_records
from editlens.data.schema import EditCase, Probe, ProbeKind, Rewrite, fill_template, make_case, probe_kind
from editlens.data.synthetic import synthetic_cases
from editlens.errors import DataFormatError


def load_cases(path: PathLike, format: str | None = None, limit: int | None = None, sample: int | None = None,
               seed: int = 0, *, skip_invalid: bool = False) -> list[EditCase]:
    """Load a dataset file as :class:`EditCase` objects.

    Args:
        path: a JSON array, JSON Lines or single-object JSON file (optionally gzip-compressed).
        format: one of :data:`FORMATS` (or an alias such as ``"mcf"``); ``None`` detects it from the content.
        limit: keep only the first ``limit`` records.
        sample: keep a random sample of ``sample`` records (drawn from the first ``limit`` when both are given),
            returned in file order; deterministic for a ``seed``.
        seed: seed of the sample.
        skip_invalid: skip malformed records (one warning) instead of raising.

    Only the selected records are normalised (and, for JSON Lines, decoded).

    Raises:
        DataFormatError: the file is missing, empty, not JSON (message gives line and column), of an unknown
            format (message lists the formats), or a record is malformed (message names the file, the 0-based
            record index and the field).
    """
    src = open_records(path)
    fmt = get_format(format) if format is not None else get_format(detect_format(src))
    indices = select_indices(len(src), limit, sample, seed, path=src.path)
    return parse_records(src, fmt, indices, path=src.path, skip_invalid=skip_invalid)


def save_cases(cases: Iterable[EditCase], path: PathLike) -> Path:
    """Write ``cases`` as editlens JSON Lines (gzip-compressed when ``path`` ends with ``.gz``); returns the path.

    The file loads back with :func:`load_cases` into equal :class:`EditCase` objects (meta must be JSON data).
    """
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if p.name.endswith(".gz") else open
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    with opener(tmp, "wt", encoding="utf-8") as fh:  # type: ignore[operator]
        for i, case in enumerate(cases):
            try:
                fh.write(json.dumps(dump_case(case), ensure_ascii=False) + "\n")
            except (TypeError, ValueError) as e:
                tmp.unlink(missing_ok=True)
                raise DataFormatError(f"case {case.case_id!r} cannot be written as JSON: {e}", path=p,
                                      record=i, field="meta") from None
    tmp.replace(p)
    return p


__all__ = ["load_cases", "save_cases", "synthetic_cases", "detect_format", "FORMATS", "get_format",
           "EditCase", "Rewrite", "Probe", "ProbeKind", "make_case", "probe_kind", "fill_template"]
