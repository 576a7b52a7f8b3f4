"""Reading dataset files: containers (JSON array, JSON Lines, one JSON object, gzip) and JSON errors.

The record *schema* (CounterFact, ZsRE, ...) is the business of :mod:`editlens.data.formats`; this module only
turns a file into an indexable sequence of raw records, with errors that name the file, the record and the
line/column where the text is not JSON.

* A file whose first non-blank character is ``[`` is one JSON array of records (parsed once, in C).
* A file whose first line is a complete JSON object is JSON Lines: one record per non-blank line. Lines are
  decoded lazily, so ``limit`` / ``sample`` only pay for the records they keep.
* Any other file starting with ``{`` is a single JSON object (one record).
* ``.gz`` files (detected by their magic bytes, not their name) are decompressed transparently.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Sequence

from editlens.errors import DataFormatError

PathLike = str | os.PathLike

_GZIP_MAGIC = b"\x1f\x8b"


def read_text(path: PathLike) -> str:
    """The whole file as text (UTF-8, BOM tolerated, gzip transparently decompressed)."""
    p = Path(path)
    if not p.exists():
        raise DataFormatError("no such file", path=p)
    if p.is_dir():
        raise DataFormatError("is a directory, expected a dataset file", path=p)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataFormatError(f"cannot read: {e.strerror or e}", path=p) from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataFormatError(f"corrupt gzip data: {e}", path=p) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"not UTF-8 text (byte {e.start}): not a JSON dataset file", path=p) from None


def _json_error(e: json.JSONDecodeError, path: Path, *, line_offset: int = 0, record: int | None = None) -> DataFormatError:
    return DataFormatError(f"not valid JSON: {e.msg} at line {e.lineno + line_offset}, column {e.colno}",
                           path=path, record=record)


class RecordSource(Sequence[Any]):
    """An indexable sequence of the raw (decoded JSON) records of one file.

    Attributes:
        path: the file.
        container: ``"json"`` (one array), ``"jsonl"`` (one record per line) or ``"object"`` (one record).
    """

    def __init__(self, path: Path, container: str, items: list[Any] | None = None,
                 lines: list[tuple[int, str]] | None = None):
        self.path = path
        self.container = container
        self._items = items
        self._lines = lines  # (1-based line number, text) for JSON Lines

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else len(self._lines or ())

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if self._items is not None:
            return self._items[index]
        lineno, text = self._lines[index]  # type: ignore[index]
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            i = index if index >= 0 else len(self) + index
            raise DataFormatError(f"not valid JSON: {e.msg} at line {lineno}, column {e.colno}",
                                  path=self.path, record=i) from None

    def line_of(self, index: int) -> int | None:
        """The 1-based line where record ``index`` starts (JSON Lines only)."""
        return self._lines[index][0] if self._lines is not None else None


def open_records(path: PathLike) -> RecordSource:
    """Open a dataset file as a :class:`RecordSource` (raises :class:`DataFormatError` on empty/non-JSON files)."""
    p = Path(path)
    text = read_text(p)
    stripped = text.lstrip()
    if not stripped:
        raise DataFormatError("file is empty, expected JSON records", path=p)
    lead = len(text) - len(stripped)
    first = stripped[0]
    if first == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise _json_error(e, p) from None
        if not data:
            raise DataFormatError("file contains an empty JSON array: no records", path=p)
        return RecordSource(p, "json", items=data)
    if first == "{":
        line_start = text.count("\n", 0, lead) + 1
        nl = stripped.find("\n")
        first_line = stripped if nl < 0 else stripped[:nl]
        try:
            json.loads(first_line)
            is_jsonl = True
        except json.JSONDecodeError:
            is_jsonl = False
        if is_jsonl:
            lines = [(line_start + i, ln) for i, ln in enumerate(stripped.split("\n")) if ln.strip()]
            return RecordSource(p, "jsonl", lines=lines)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise _json_error(e, p) from None
        return RecordSource(p, "object", items=[obj])
    line = text.count("\n", 0, lead) + 1
    col = lead - (text.rfind("\n", 0, lead) + 1) + 1
    raise DataFormatError(f"not valid JSON: expected '[' (a JSON array of records) or '{{' (JSON Lines) "
                          f"at line {line}, column {col}, found {first!r}", path=p)
