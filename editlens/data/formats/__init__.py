"""Dataset formats: the registry, content-based detection, and the parsing loop.

Each format module (``counterfact``, ``zsre``, ``mquake``, ``ripple``, ``knowedit``, ``jsonl``; ``pitfalls`` holds
two, ``conflictedit`` and ``roundedit``) exposes
``NAME``, ``DESCRIPTION``, ``matches(record) -> bool`` and ``parse(record, *, index, path) -> EditCase``.
Detection looks at the *content* of the first record (its keys), never only at the file name, so a renamed
``data.json`` is recognised as well as ``counterfact.json``. The container (JSON array, JSON Lines, single
object, gzip) is detected separately by :mod:`editlens.data.io`, so every format may be stored in any container.
"""
from __future__ import annotations

import gc
import random
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Sequence

from editlens.data.formats import counterfact, jsonl, knowedit, mquake, pitfalls, ripple, zsre
from editlens.data.io import PathLike, RecordSource, open_records
from editlens.data.schema import EditCase
from editlens.errors import DataFormatError


@dataclass(frozen=True)
class Format:
    """A registered dataset format."""

    name: str
    description: str
    matches: Callable[[dict], bool]
    parse: Callable[..., EditCase]


def _fmt(mod: ModuleType) -> Format:
    return Format(mod.NAME, mod.DESCRIPTION, mod.matches, mod.parse)


#: Registered formats, in detection order (the first whose ``matches`` accepts the first record wins).
FORMATS: dict[str, Format] = {f.name: f for f in map(_fmt, (jsonl, mquake, counterfact, ripple, zsre, knowedit))}
# ConflictEdit / RoundEdit share one module (editlens.data.formats.pitfalls), so they are built by hand
FORMATS[pitfalls.CONFLICT_NAME] = Format(pitfalls.CONFLICT_NAME, pitfalls.CONFLICT_DESCRIPTION,
                                         pitfalls.conflict_matches, pitfalls.parse_conflict)
FORMATS[pitfalls.ROUND_NAME] = Format(pitfalls.ROUND_NAME, pitfalls.ROUND_DESCRIPTION, pitfalls.round_matches,
                                      pitfalls.parse_round)

#: Other accepted spellings of format names.
ALIASES: dict[str, str] = {
    "cf": "counterfact", "mcf": "counterfact", "multi_counterfact": "counterfact", "multicounterfact": "counterfact",
    "zsre_mend": "zsre", "rippleedits": "ripple", "ripple_edits": "ripple", "mquake_cf": "mquake",
    "editlens": "jsonl", "kedit": "knowedit",
    "conflict_edit": "conflictedit", "conflict": "conflictedit", "round_edit": "roundedit", "round": "roundedit",
}


def format_names() -> list[str]:
    """The registered format names."""
    return list(FORMATS)


def get_format(name: str) -> Format:
    """The :class:`Format` called ``name`` (aliases accepted), else an error listing the formats."""
    key = str(name).strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in FORMATS:
        raise DataFormatError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[key]


def detect_record(record: Any, *, path: Any = None, index: int = 0) -> str:
    """The name of the format whose schema ``record`` follows (an error listing the formats otherwise)."""
    if not isinstance(record, dict):
        raise DataFormatError(f"expected each record to be a JSON object, got {type(record).__name__}; "
                              f"cannot detect the format", path=path, record=index)
    for fmt in FORMATS.values():
        if fmt.matches(record):
            return fmt.name
    keys = ", ".join(sorted(map(str, record))[:12])
    raise DataFormatError(f"unknown format: the record's fields ({keys}) match none of the known formats: "
                          f"{', '.join(FORMATS)}; pass format=... to force one", path=path, record=index)


def detect_format(path: PathLike | RecordSource) -> str:
    """Detect the format of a dataset file from its content (see :data:`FORMATS`)."""
    src = path if isinstance(path, RecordSource) else open_records(path)
    return detect_record(src[0], path=src.path, index=0)


def select_indices(n: int, limit: int | None = None, sample: int | None = None, seed: int = 0,
                   path: Any = None) -> list[int]:
    """Record indices to load: the first ``limit``, then a seeded sample of ``sample`` of those (file order)."""
    for name, value in (("limit", limit), ("sample", sample)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise DataFormatError(f"{name} must be a non-negative integer, got {value!r}", path=path, field=name)
    pool = n if limit is None else min(n, limit)
    if sample is None or sample >= pool:
        return list(range(pool))
    return sorted(random.Random(seed).sample(range(pool), sample))


def parse_records(src: RecordSource | Sequence[Any], fmt: Format, indices: Sequence[int], *, path: Any = None,
                  skip_invalid: bool = False) -> list[EditCase]:
    """Parse the records at ``indices`` with ``fmt``; with ``skip_invalid`` bad records are skipped (one warning)."""
    out: list[EditCase] = []
    skipped: list[str] = []
    parse = fmt.parse
    # Hundreds of thousands of small immutable objects are created and none is garbage: pausing the cyclic
    # collector halves the time on full-size files (it is restored even on error).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in indices:
            try:
                out.append(parse(src[i], index=i, path=path))
            except DataFormatError as e:
                if not skip_invalid:
                    raise
                skipped.append(str(e))
    finally:
        if gc_was_enabled:
            gc.enable()
    if skipped:
        warnings.warn(f"skipped {len(skipped)} invalid record(s); first: {skipped[0]}", stacklevel=3)
    return out


__all__ = ["FORMATS", "ALIASES", "Format", "format_names", "get_format", "detect_record", "detect_format",
           "select_indices", "parse_records"]
