"""The results store: one SQLite file (WAL mode) holding every result row of every run.

Architecture idea 5, "results are rows": the runner writes tidy rows
``(run_id, unit, step, n_edits, case_id, probe_kind, metric, value)`` and reports read only the store.

Schema (``SCHEMA_VERSION`` 1)::

    runs(run_id PK, spec_json, versions_json, model_fingerprint, seeds_json, created)
    units(run_id, unit, status, started, finished, meta_json, PK(run_id, unit))
        status is 'running' (started or partially checkpointed) or 'done'
    rows(run_id, unit, step, n_edits, case_id, probe_kind, metric, value REAL)      index (run_id, unit)
    diagnostics(run_id, unit, step, key, value REAL, value_json TEXT)               index (run_id, unit)
        numeric diagnostics go to ``value``; anything else (lists, dicts, strings) to ``value_json``
    checkpoints(run_id, unit, step, n_edits, state_json, created, PK(run_id, unit, step))
        one row per committed step of a sequential unit (see "Resume" below)
    store_info(key PK, value)          schema_version

A *unit* is one independent piece of work, e.g. (method, hparams point, dataset, seed, regime size);
:meth:`editlens.runs.spec.Spec.plan` produces them with stable ids and the metadata that goes to
``units.meta_json`` (method, hparams, dataset, seed, n_edits, sweep values...).

Atomicity and resume
--------------------
* :meth:`Store.commit_unit` writes all rows and diagnostics of a unit and marks it ``done`` in **one**
  transaction: a process killed with SIGKILL either leaves the whole unit or nothing of it. On restart
  the runner skips units for which :meth:`Store.is_done` is true.
* Sequential units commit each evaluation checkpoint with :meth:`Store.commit_step` (equivalently
  ``commit_unit(..., partial=True, step=s)``): the rows and diagnostics of that step, plus a row in
  ``checkpoints`` (``n_edits`` and a small JSON ``state`` the runner may use, e.g. the index of the next
  case or the path of saved weights), in one transaction. Re-committing the same step replaces its
  rows. After a kill, :meth:`Store.last_checkpoint` says which step was the last to finish; the runner
  re-applies the first ``n_edits`` edits (model weights are not kept in the store unless the runner
  saved them and put the path in ``state``), skips the evaluations of the committed steps and goes on
  from the next checkpoint. When the last checkpoint is done it calls ``commit_unit`` (possibly with no
  rows) to mark the unit ``done``.
* A **streamed** evaluation (the runner's ``eval_chunk``) writes the rows of each chunk of cases with
  :meth:`Store.append_rows` in its own transaction, then commits the step: :meth:`Store.commit_step` with
  ``replace_rows=False`` (diagnostics and the ``checkpoints`` record) or :meth:`Store.commit_unit` with no rows
  (diagnostics and the ``done`` mark). Rows of a not-done unit at a step without a checkpoint are therefore
  leftovers of an evaluation that did not finish: :meth:`Store.start_unit` with ``discard_partial=True`` deletes
  them (and the diagnostics at such steps) in the transaction that starts the unit again. No schema change.
* Only one process (the driver) writes; any number of readers may read concurrently (WAL).
  ``synchronous=NORMAL`` in WAL mode is durable across application crashes; pass
  ``synchronous="FULL"`` to also survive power loss.
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import pandas as pd

from editlens.errors import StoreBusyError, StoreError

SCHEMA_VERSION = 1

#: columns of a result row, in order, as given to :meth:`Store.commit_unit` (run_id and unit come
#: from the call).
ROW_FIELDS: tuple[str, ...] = ("step", "n_edits", "case_id", "probe_kind", "metric", "value")
#: every column of the ``rows`` table.
ROW_COLUMNS: tuple[str, ...] = ("run_id", "unit", *ROW_FIELDS)
DIAG_COLUMNS: tuple[str, ...] = ("run_id", "unit", "step", "key", "value", "value_json")
#: diagnostics key of a unit copied from another run by :meth:`Store.reuse_units` (``value_json``: that run's id)
REUSED_KEY = "reused_from_run"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS store_info(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs(
    run_id TEXT PRIMARY KEY, spec_json TEXT, versions_json TEXT, model_fingerprint TEXT,
    seeds_json TEXT, created REAL);
CREATE TABLE IF NOT EXISTS units(
    run_id TEXT NOT NULL, unit TEXT NOT NULL, status TEXT NOT NULL, started REAL, finished REAL,
    meta_json TEXT, PRIMARY KEY(run_id, unit));
CREATE TABLE IF NOT EXISTS rows(
    run_id TEXT NOT NULL, unit TEXT NOT NULL, step INTEGER, n_edits INTEGER, case_id TEXT,
    probe_kind TEXT, metric TEXT NOT NULL, value REAL);
CREATE INDEX IF NOT EXISTS rows_run_unit ON rows(run_id, unit);
CREATE TABLE IF NOT EXISTS diagnostics(
    run_id TEXT NOT NULL, unit TEXT NOT NULL, step INTEGER, key TEXT NOT NULL, value REAL, value_json TEXT);
CREATE INDEX IF NOT EXISTS diagnostics_run_unit ON diagnostics(run_id, unit);
CREATE TABLE IF NOT EXISTS checkpoints(
    run_id TEXT NOT NULL, unit TEXT NOT NULL, step INTEGER NOT NULL, n_edits INTEGER, state_json TEXT,
    created REAL, PRIMARY KEY(run_id, unit, step));
"""


@dataclass(frozen=True)
class Checkpoint:
    """The last committed step of a (sequential) unit: see :meth:`Store.last_checkpoint`."""

    step: int
    n_edits: int | None
    state: dict[str, Any]


def _json(obj: Any, what: str, path: Path) -> str:
    try:
        return json.dumps(obj, sort_keys=True, default=_json_default)
    except (TypeError, ValueError) as e:
        raise StoreError(f"store {path}: {what} is not JSON-serialisable: {e}") from None


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts with dotted keys (lists become JSON strings so that they stay hashable)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        elif isinstance(v, Mapping):
            continue
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(list(v))
        else:
            out[key] = v
    return out


class Store:
    """An SQLite results store (one file, WAL mode). See the module docstring for schema and resume.

    Args:
        path: the database file (created with its parent folder unless ``readonly``).
        readonly: open an existing store for reading only (reports); writing then raises StoreError.
        synchronous: SQLite ``synchronous`` pragma: ``"NORMAL"`` (default) or ``"FULL"``.
        timeout: seconds to wait for a lock held by another connection.

    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False, synchronous: str = "NORMAL",
                 timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise StoreError(f"store {self.path}: synchronous must be NORMAL or FULL, not {synchronous!r}")
        self._snapshot_dir: str | None = None
        try:
            if readonly:
                if not self.path.is_file():
                    raise StoreError(f"store {self.path}: no such file")
                self._open_readonly(timeout)
            else:
                if self.path.exists() and not self.path.is_file():
                    raise StoreError(f"store {self.path}: exists and is not a file")
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise StoreError(f"store {self.path}: cannot create its folder: {e}") from None
                if not _writable_dir(self.path.parent):
                    raise StoreError(f"store {self.path}: read-only directory {self.path.parent}: a store is written "
                                     "with SQLite's WAL journal, which creates files beside it; put the store in a "
                                     "writable folder")
                self._con = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
                mode = self._con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"store {self.path}: could not switch to WAL journal mode (got {mode})")
                self._con.execute(f"PRAGMA synchronous={synchronous.upper()}")
                self._con.executescript(_SCHEMA)
                self._check_schema(init=True)
        except sqlite3.Error as e:
            self.close()
            raise StoreError(f"store {self.path}: cannot open SQLite database: {e}") from None
        except BaseException:
            self.close()
            raise

    def _open_readonly(self, timeout: float) -> None:
        """Open for reading only, also from a read-only directory (read-only media, a 0555 folder).

        A WAL-mode database needs its ``-shm`` index beside it; SQLite creates it on first open, which a
        read-only directory forbids. Then: without a ``-wal`` file holding commits (a store closed cleanly) the
        database file alone is complete and is opened ``immutable``; with one (the writer was killed, or the store
        was copied while open) the file and its ``-wal`` are copied to a private temporary folder and read there,
        so that no commit is missed. Nothing is ever written beside the store.
        """
        uri = self.path.resolve().as_uri()
        if _writable_dir(self.path.parent):
            self._con = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=timeout, isolation_level=None)
            self._check_schema()
            return
        shm = Path(f"{self.path}-shm")
        wal = Path(f"{self.path}-wal")
        if shm.is_file() and wal.is_file():  # SQLite can read these in place (>= 3.22)
            try:
                self._con = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=timeout, isolation_level=None)
                self._check_schema()
                return
            except (sqlite3.Error, StoreError):
                self.close()
        where = (f"read-only directory {self.path.parent}: SQLite's WAL mode needs to create {shm.name} beside "
                 "the store")
        if not (wal.is_file() and wal.stat().st_size > 0):
            self._con = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=timeout, isolation_level=None)
            self._check_schema(context=where)
            return
        import shutil
        import tempfile

        try:
            tmp = tempfile.mkdtemp(prefix="editlens-store-")
        except OSError as e:
            raise StoreError(f"store {self.path}: {where}, and its {wal.name} holds commits that are not in the "
                             f"database file yet, so it is read from a temporary copy, which could not be made "
                             f"({e}); copy the store with its {wal.name} to a writable folder") from None
        self._snapshot_dir = tmp
        try:
            shutil.copyfile(self.path, Path(tmp) / "store.sqlite")
            shutil.copyfile(wal, Path(tmp) / "store.sqlite-wal")
        except OSError as e:
            raise StoreError(f"store {self.path}: {where}; copying it with its {wal.name} to {tmp} failed: "
                             f"{e}") from None
        self._con = sqlite3.connect(f"{(Path(tmp) / 'store.sqlite').as_uri()}?mode=ro", uri=True, timeout=timeout,
                                    isolation_level=None)
        self._check_schema(context=where)

    # ------------------------------------------------------------------ plumbing
    def _check_schema(self, init: bool = False, context: str | None = None) -> None:
        try:
            row = self._con.execute("SELECT value FROM store_info WHERE key='schema_version'").fetchone()
        except sqlite3.Error as e:
            if "unable to open" in str(e) and not _writable_dir(self.path.parent):
                raise StoreError(f"store {self.path}: cannot read it from read-only directory {self.path.parent} "
                                 f"({e})") from None
            if context is not None:
                raise StoreError(f"store {self.path}: {context}; reading it anyway failed: {e}") from None
            raise StoreError(f"store {self.path}: not an editlens results store ({e})") from None
        if row is None:
            if not init:
                raise StoreError(f"store {self.path}: not an editlens results store (no schema_version)")
            self._con.execute("INSERT INTO store_info VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))
            return
        if int(row[0]) != SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path}: schema version {row[0]} is not supported (this editlens writes {SCHEMA_VERSION})"
            )

    def close(self) -> None:
        """Close the connection (idempotent)."""
        con = getattr(self, "_con", None)
        if con is not None:
            con.close()
            self._con = None  # type: ignore[assignment]
        snap = getattr(self, "_snapshot_dir", None)
        if snap is not None:
            import shutil

            shutil.rmtree(snap, ignore_errors=True)
            self._snapshot_dir = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}{', readonly=True' if self.readonly else ''})"

    def _conn(self) -> sqlite3.Connection:
        if getattr(self, "_con", None) is None:
            raise StoreError(f"store {self.path}: the store is closed")
        return self._con

    def _write(self) -> "_Tx":
        if self.readonly:
            raise StoreError(f"store {self.path}: opened read-only")
        return _Tx(self)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"store {self.path}: query failed: {e}") from None

    # ------------------------------------------------------------------ runs
    def start_run(self, run_id: str, spec: Mapping[str, Any] | Any, versions: Mapping[str, Any] | None = None,
                  fingerprint: str | None = None, seeds: Sequence[int] | None = None, *,
                  allow_changed: bool = False) -> bool:
        """Register a run, or confirm that a resumed run is the same run.

        Returns ``True`` when the run is new, ``False`` when it already existed (resume). Re-using a
        ``run_id`` with a different spec or model fingerprint raises :class:`StoreError` (results of two
        different experiments would be mixed) unless ``allow_changed`` is set.
        ``spec`` may be a mapping or an object with ``to_dict()`` (e.g. :class:`editlens.runs.spec.Spec`).
        """
        if not run_id or not isinstance(run_id, str):
            raise StoreError(f"store {self.path}: run_id must be a non-empty string, got {run_id!r}")
        if hasattr(spec, "to_dict"):
            spec = spec.to_dict()
        spec_json = _json(spec, "spec", self.path)
        versions_json = _json(dict(versions or {}), "versions", self.path)
        seeds_json = _json(list(seeds or []), "seeds", self.path)
        with self._write() as con:
            old = con.execute("SELECT spec_json, model_fingerprint FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if old is not None:
                if not allow_changed and (old[0] != spec_json or (old[1] or None) != (fingerprint or None)):
                    what = "spec" if old[0] != spec_json else "model fingerprint"
                    raise StoreError(
                        f"store {self.path}: run {run_id!r} already exists with a different {what}; "
                        "use a new run id (or allow_changed=True to resume anyway)"
                    )
                if allow_changed:
                    con.execute("UPDATE runs SET spec_json=?, versions_json=?, model_fingerprint=?, seeds_json=? "
                                "WHERE run_id=?", (spec_json, versions_json, fingerprint, seeds_json, run_id))
                return False
            con.execute("INSERT INTO runs VALUES(?,?,?,?,?,?)",
                        (run_id, spec_json, versions_json, fingerprint, seeds_json, time.time()))
            return True

    def runs(self) -> pd.DataFrame:
        """All runs: run_id, spec (dict), versions (dict), model_fingerprint, seeds (list), created."""
        rows = self._query("SELECT run_id, spec_json, versions_json, model_fingerprint, seeds_json, created "
                           "FROM runs ORDER BY created")
        return pd.DataFrame(
            [(r[0], json.loads(r[1] or "null"), json.loads(r[2] or "{}"), r[3], json.loads(r[4] or "[]"), r[5])
             for r in rows],
            columns=["run_id", "spec", "versions", "model_fingerprint", "seeds", "created"],
        )

    def run_ids(self) -> list[str]:
        """Ids of all runs, oldest first."""
        return [r[0] for r in self._query("SELECT run_id FROM runs ORDER BY created")]

    def run_spec(self, run_id: str) -> dict[str, Any]:
        """The spec dict a run was started with."""
        r = self._query("SELECT spec_json FROM runs WHERE run_id=?", (run_id,))
        if not r:
            raise StoreError(f"store {self.path}: no run {run_id!r}")
        return json.loads(r[0][0] or "null")

    def _require_run(self, con: sqlite3.Connection, run_id: str) -> None:
        if con.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone() is None:
            raise StoreError(f"store {self.path}: no run {run_id!r}; call start_run() first")

    # ------------------------------------------------------------------ units
    def start_unit(self, run_id: str, unit: str, meta: Mapping[str, Any] | None = None, *,
                   discard_partial: bool = False) -> int:
        """Mark a unit ``running`` (records its start time and metadata). Optional: commit does it too.

        ``discard_partial``: in the same transaction, delete the rows and diagnostics of this (not done) unit at
        steps without a committed checkpoint -- what :meth:`append_rows` wrote for an evaluation that did not
        finish -- so the unit can be run again from its last checkpoint without duplicates. Returns the number of
        rows deleted (0 for a done unit, whose rows are never touched)."""
        meta_json = _json(dict(meta or {}), "unit meta", self.path)
        with self._write() as con:
            self._require_run(con, run_id)
            old = con.execute("SELECT status FROM units WHERE run_id=? AND unit=?", (run_id, unit)).fetchone()
            if old is None:
                con.execute("INSERT INTO units VALUES(?,?,?,?,?,?)", (run_id, unit, "running", time.time(), None,
                                                                      meta_json))
            elif old[0] != "done" and meta:
                con.execute("UPDATE units SET meta_json=? WHERE run_id=? AND unit=?", (meta_json, run_id, unit))
            if not discard_partial or (old is not None and old[0] == "done"):
                return 0
            kept = "(SELECT step FROM checkpoints WHERE run_id=? AND unit=?)"
            n = con.execute(f"DELETE FROM rows WHERE run_id=? AND unit=? AND (step IS NULL OR step NOT IN {kept})",
                            (run_id, unit, run_id, unit)).rowcount
            con.execute(f"DELETE FROM diagnostics WHERE run_id=? AND unit=? AND (step IS NULL OR step NOT IN {kept})",
                        (run_id, unit, run_id, unit))
            return int(n)

    def append_rows(self, run_id: str, unit: str, rows: Iterable[Any] | pd.DataFrame) -> int:
        """Add rows to a unit that is not done, in one transaction, without marking anything: one chunk of a
        streamed evaluation (``RunOptions.eval_chunk``). The rows count only once the step they belong to is
        committed (:meth:`commit_step` with ``replace_rows=False``, or :meth:`commit_unit`); until then
        :meth:`start_unit` with ``discard_partial`` deletes them. Returns the number of rows written."""
        tuples = list(self._row_tuples(run_id, unit, rows))
        with self._write() as con:
            self._require_run(con, run_id)
            old = con.execute("SELECT status FROM units WHERE run_id=? AND unit=?", (run_id, unit)).fetchone()
            if old is not None and old[0] == "done":
                raise StoreError(f"store {self.path}: unit {unit!r} of run {run_id!r} is already done; "
                                 "cannot add rows")
            if old is None:
                con.execute("INSERT INTO units VALUES(?,?,?,?,?,?)", (run_id, unit, "running", time.time(), None,
                                                                      "{}"))
            con.executemany("INSERT INTO rows VALUES(?,?,?,?,?,?,?,?)", tuples)
        return len(tuples)

    def reuse_units(self, run_id: str, metas: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
        """Copy into ``run_id`` the finished units of other runs of this store that did exactly the same work.

        A spec that gains a method, dataset or seed gets a new run id (its hash changed), yet its old units are
        the same computations. A unit ``u`` of ``metas`` (``{unit id: unit metadata}``, as the runner stores
        them) that is not done in ``run_id`` is taken from another run ``R`` when all of these hold: ``R`` has
        ``u`` done with the same metadata (method, hyperparameters, dataset name and source, seed, regime,
        metrics, evaluation sample...; the unit id itself hashes the method, data, regime and model settings);
        ``R`` has the same model fingerprint, the same versions (editlens, runner, torch, transformers, torch
        thread count: the rows are bit-reproducible only then), the same ``model`` and ``runner`` entries of
        its spec, and the same entry for the unit's dataset (resolved path, limit, sample, seed). The unit's
        rows, diagnostics and checkpoints are copied in one transaction with its start and finish times, plus
        a diagnostics row ``(step NULL, key`` :data:`REUSED_KEY` ``, value_json = R)`` saying where they came
        from; a partial attempt of ``u`` in ``run_id`` is deleted first. The newest matching run wins.

        Returns ``{unit id: source run id}`` of the units copied.
        """
        out: dict[str, str] = {}
        with self._write() as con:
            me = con.execute("SELECT spec_json, versions_json, model_fingerprint FROM runs WHERE run_id=?",
                             (run_id,)).fetchone()
            if me is None:
                raise StoreError(f"store {self.path}: no run {run_id!r}; call start_run() first")
            spec = json.loads(me[0] or "null") or {}
            candidates = []
            for rid, sj, vj, fp in con.execute(
                    "SELECT run_id, spec_json, versions_json, model_fingerprint FROM runs WHERE run_id<>? "
                    "ORDER BY created DESC", (run_id,)).fetchall():
                other = json.loads(sj or "null") or {}
                if (json.loads(vj or "{}") == json.loads(me[1] or "{}") and (fp or None) == (me[2] or None)
                        and other.get("model") == spec.get("model") and other.get("runner") == spec.get("runner")):
                    candidates.append((rid, other))
            if not candidates:
                return out
            done = {r[0] for r in con.execute("SELECT unit FROM units WHERE run_id=? AND status='done'", (run_id,))}
            for unit, meta in metas.items():
                if unit in done:
                    continue
                want = json.loads(_json(dict(meta), "unit meta", self.path))
                dataset = _dataset_entry(spec, want.get("dataset"))
                for rid, other in candidates:
                    if dataset is None or _dataset_entry(other, want.get("dataset")) != dataset:
                        continue
                    row = con.execute("SELECT started, finished, meta_json FROM units WHERE run_id=? AND unit=? "
                                      "AND status='done'", (rid, unit)).fetchone()
                    if row is None or json.loads(row[2] or "{}") != want:
                        continue
                    for table in ("rows", "diagnostics", "checkpoints", "units"):
                        con.execute(f"DELETE FROM {table} WHERE run_id=? AND unit=?", (run_id, unit))
                    con.execute("INSERT INTO units VALUES(?,?,?,?,?,?)", (run_id, unit, "done", *row))
                    con.execute("INSERT INTO rows SELECT ?, unit, step, n_edits, case_id, probe_kind, metric, value "
                                "FROM rows WHERE run_id=? AND unit=? ORDER BY rowid", (run_id, rid, unit))
                    con.execute("INSERT INTO diagnostics SELECT ?, unit, step, key, value, value_json "
                                "FROM diagnostics WHERE run_id=? AND unit=? ORDER BY rowid", (run_id, rid, unit))
                    con.execute("INSERT INTO checkpoints SELECT ?, unit, step, n_edits, state_json, created "
                                "FROM checkpoints WHERE run_id=? AND unit=?", (run_id, rid, unit))
                    con.execute("INSERT INTO diagnostics VALUES(?,?,?,?,?,?)",
                                (run_id, unit, None, REUSED_KEY, None, json.dumps(rid)))
                    out[unit] = rid
                    break
        return out

    def is_done(self, run_id: str, unit: str) -> bool:
        """Whether the unit was committed completely."""
        r = self._query("SELECT status FROM units WHERE run_id=? AND unit=?", (run_id, unit))
        return bool(r) and r[0][0] == "done"

    def finished_units(self, run_id: str) -> set[str]:
        """Ids of the units of ``run_id`` that are done."""
        return {r[0] for r in self._query("SELECT unit FROM units WHERE run_id=? AND status='done'", (run_id,))}

    def units(self, run_id: str | None = None) -> pd.DataFrame:
        """Units with status, times and ``meta`` (dict) columns."""
        sql = "SELECT run_id, unit, status, started, finished, meta_json FROM units"
        rows = self._query(sql + (" WHERE run_id=?" if run_id else "") + " ORDER BY started, unit",
                           (run_id,) if run_id else ())
        return pd.DataFrame([(*r[:5], json.loads(r[5] or "{}")) for r in rows],
                            columns=["run_id", "unit", "status", "started", "finished", "meta"])

    def unit_meta(self, run_id: str, unit: str) -> dict[str, Any]:
        """The metadata dict of one unit."""
        r = self._query("SELECT meta_json FROM units WHERE run_id=? AND unit=?", (run_id, unit))
        if not r:
            raise StoreError(f"store {self.path}: run {run_id!r} has no unit {unit!r}")
        return json.loads(r[0][0] or "{}")

    def commit_unit(self, run_id: str, unit: str, rows: Iterable[Any] | pd.DataFrame = (), *,
                    diagnostics: Iterable[Any] | Mapping[str, Any] | pd.DataFrame | None = None,
                    meta: Mapping[str, Any] | None = None, partial: bool = False, step: int | None = None,
                    n_edits: int | None = None, state: Mapping[str, Any] | None = None,
                    overwrite: bool = False) -> int:
        """Write a unit's rows and diagnostics and mark it done, in one transaction.

        Args:
            rows: tuples ``(step, n_edits, case_id, probe_kind, metric, value)``, mappings with those keys,
                or a DataFrame with those columns (``run_id``/``unit`` columns, if present, must match).
            diagnostics: tuples ``(step, key, value)``, a mapping ``{key: value}`` (step 0, or ``step``), or a
                DataFrame with columns step, key, value. Non-numeric values are stored as JSON.
            meta: unit metadata (method, hparams, dataset, n_edits, sweep values...), queryable through
                :meth:`rows_with_meta`.
            partial: commit one checkpoint of a sequential unit instead (same as :meth:`commit_step`;
                ``step`` is then required, ``n_edits``/``state`` are recorded in ``checkpoints``).
            overwrite: allow re-committing a unit that is already done (its old rows are deleted first).

        Rows with a step that was already committed for this unit (checkpoints) replace the old ones.
        Returns the number of rows written.
        """
        if partial:
            if step is None:
                raise StoreError(f"store {self.path}: commit_unit(partial=True) needs step=")
            return self.commit_step(run_id, unit, step, rows, diagnostics=diagnostics, meta=meta,
                                    n_edits=n_edits, state=state)
        tuples = list(self._row_tuples(run_id, unit, rows))
        diags = list(self._diag_tuples(run_id, unit, diagnostics, default_step=step if step is not None else 0))
        meta_json = _json(dict(meta), "unit meta", self.path) if meta is not None else None
        with self._write() as con:
            self._require_run(con, run_id)
            old = con.execute("SELECT status FROM units WHERE run_id=? AND unit=?", (run_id, unit)).fetchone()
            now = time.time()
            if old is not None and old[0] == "done":
                if not overwrite:
                    raise StoreError(f"store {self.path}: unit {unit!r} of run {run_id!r} is already committed "
                                     "(pass overwrite=True to replace it)")
                con.execute("DELETE FROM rows WHERE run_id=? AND unit=?", (run_id, unit))
                con.execute("DELETE FROM diagnostics WHERE run_id=? AND unit=?", (run_id, unit))
                con.execute("DELETE FROM checkpoints WHERE run_id=? AND unit=?", (run_id, unit))
            self._replace_steps(con, run_id, unit, {t[2] for t in tuples}, {d[2] for d in diags})
            con.executemany("INSERT INTO rows VALUES(?,?,?,?,?,?,?,?)", tuples)
            con.executemany("INSERT INTO diagnostics VALUES(?,?,?,?,?,?)", diags)
            if old is None:
                con.execute("INSERT INTO units VALUES(?,?,?,?,?,?)",
                            (run_id, unit, "done", now, now, meta_json or "{}"))
            else:
                con.execute("UPDATE units SET status='done', finished=?, meta_json=COALESCE(?, meta_json) "
                            "WHERE run_id=? AND unit=?", (now, meta_json, run_id, unit))
        return len(tuples)

    def commit_step(self, run_id: str, unit: str, step: int, rows: Iterable[Any] | pd.DataFrame = (), *,
                    diagnostics: Iterable[Any] | Mapping[str, Any] | pd.DataFrame | None = None,
                    meta: Mapping[str, Any] | None = None, n_edits: int | None = None,
                    state: Mapping[str, Any] | None = None, replace_rows: bool = True) -> int:
        """Commit one checkpoint of a sequential unit (rows, diagnostics, checkpoint record) atomically.

        Rows without a step take ``step``; rows must not carry another step. The unit stays ``running``.
        Re-committing the same step replaces its rows and diagnostics. ``state`` is any small JSON dict the
        runner needs to resume (returned by :meth:`last_checkpoint`). ``replace_rows=False`` keeps the rows
        already in the store at ``step`` (a streamed evaluation wrote them with :meth:`append_rows`; this commit
        makes them count). Returns the number of rows written.
        """
        if isinstance(step, bool) or not isinstance(step, int):
            raise StoreError(f"store {self.path}: step must be an int, got {step!r}")
        tuples = list(self._row_tuples(run_id, unit, rows, default_step=step))
        bad = {t[2] for t in tuples} - {step}
        if bad:
            raise StoreError(f"store {self.path}: commit_step(step={step}) got rows for other steps {sorted(bad)}")
        if n_edits is None:
            ns = {t[3] for t in tuples if t[3] is not None}
            n_edits = ns.pop() if len(ns) == 1 else None
        diags = list(self._diag_tuples(run_id, unit, diagnostics, default_step=step))
        meta_json = _json(dict(meta), "unit meta", self.path) if meta is not None else None
        state_json = _json(dict(state or {}), "checkpoint state", self.path)
        with self._write() as con:
            self._require_run(con, run_id)
            old = con.execute("SELECT status FROM units WHERE run_id=? AND unit=?", (run_id, unit)).fetchone()
            if old is not None and old[0] == "done":
                raise StoreError(f"store {self.path}: unit {unit!r} of run {run_id!r} is already done; "
                                 "cannot add a checkpoint")
            now = time.time()
            if old is None:
                con.execute("INSERT INTO units VALUES(?,?,?,?,?,?)",
                            (run_id, unit, "running", now, None, meta_json or "{}"))
            elif meta_json is not None:
                con.execute("UPDATE units SET meta_json=? WHERE run_id=? AND unit=?", (meta_json, run_id, unit))
            self._replace_steps(con, run_id, unit, {step} if replace_rows else set(), {step})
            con.executemany("INSERT INTO rows VALUES(?,?,?,?,?,?,?,?)", tuples)
            con.executemany("INSERT INTO diagnostics VALUES(?,?,?,?,?,?)", diags)
            con.execute("INSERT OR REPLACE INTO checkpoints VALUES(?,?,?,?,?,?)",
                        (run_id, unit, step, n_edits, state_json, now))
        return len(tuples)

    def last_checkpoint(self, run_id: str, unit: str) -> Checkpoint | None:
        """The highest committed step of a unit (``None`` when it has none)."""
        r = self._query("SELECT step, n_edits, state_json FROM checkpoints WHERE run_id=? AND unit=? "
                        "ORDER BY step DESC LIMIT 1", (run_id, unit))
        if not r:
            return None
        return Checkpoint(step=int(r[0][0]), n_edits=None if r[0][1] is None else int(r[0][1]),
                          state=json.loads(r[0][2] or "{}"))

    def checkpoints(self, run_id: str, unit: str) -> list[Checkpoint]:
        """All committed checkpoints of a unit, in step order."""
        r = self._query("SELECT step, n_edits, state_json FROM checkpoints WHERE run_id=? AND unit=? ORDER BY step",
                        (run_id, unit))
        return [Checkpoint(int(s), None if n is None else int(n), json.loads(j or "{}")) for s, n, j in r]

    @staticmethod
    def _replace_steps(con: sqlite3.Connection, run_id: str, unit: str, row_steps: set, diag_steps: set) -> None:
        for s in row_steps:
            if s is None:
                con.execute("DELETE FROM rows WHERE run_id=? AND unit=? AND step IS NULL", (run_id, unit))
            else:
                con.execute("DELETE FROM rows WHERE run_id=? AND unit=? AND step=?", (run_id, unit, s))
        for s in diag_steps:
            if s is None:
                con.execute("DELETE FROM diagnostics WHERE run_id=? AND unit=? AND step IS NULL", (run_id, unit))
            else:
                con.execute("DELETE FROM diagnostics WHERE run_id=? AND unit=? AND step=?", (run_id, unit, s))

    # ------------------------------------------------------------------ conversion of inputs
    def _row_tuples(self, run_id: str, unit: str, rows: Iterable[Any] | pd.DataFrame,
                    default_step: int | None = None) -> Iterator[tuple]:
        if isinstance(rows, pd.DataFrame):
            missing = {"metric", "value"} - set(rows.columns)
            if missing:
                raise StoreError(f"store {self.path}: unit {unit!r}: rows DataFrame lacks columns {sorted(missing)}")
            for col, want in (("run_id", run_id), ("unit", unit)):
                if col in rows.columns and not (rows[col] == want).all():
                    raise StoreError(f"store {self.path}: unit {unit!r}: rows DataFrame has {col} values other "
                                     f"than {want!r}")
            cols = [c for c in ROW_FIELDS if c in rows.columns]
            records: Iterable[Any] = ({**dict.fromkeys(ROW_FIELDS), **dict(zip(cols, r))}
                                      for r in rows[cols].itertuples(index=False, name=None))
        else:
            records = rows
        for i, rec in enumerate(records):
            if isinstance(rec, Mapping):
                rec = tuple(rec.get(f) for f in ROW_FIELDS)
            elif hasattr(rec, "_fields"):  # namedtuple
                d = rec._asdict()  # type: ignore[union-attr]
                rec = tuple(d.get(f) for f in ROW_FIELDS)
            else:
                rec = tuple(rec)
            if len(rec) != len(ROW_FIELDS):
                raise StoreError(f"store {self.path}: unit {unit!r}: row {i} has {len(rec)} fields, expected "
                                 f"{len(ROW_FIELDS)} {ROW_FIELDS}")
            step, n_edits, case_id, probe_kind, metric, value = rec
            if step is None or (isinstance(step, float) and math.isnan(step)):
                step = default_step
            if not metric or not isinstance(metric, str):
                raise StoreError(f"store {self.path}: unit {unit!r}: row {i} has no metric name")
            yield (run_id, unit, _opt_int(step, "step", i, unit, self.path),
                   _opt_int(n_edits, "n_edits", i, unit, self.path),
                   None if case_id is None else str(case_id),
                   None if probe_kind is None else str(getattr(probe_kind, "value", probe_kind)),
                   metric, _opt_float(value, f"row {i} ({metric}) value", unit, self.path))

    def _diag_tuples(self, run_id: str, unit: str, diagnostics: Any, default_step: int | None) -> Iterator[tuple]:
        if diagnostics is None:
            return
        if isinstance(diagnostics, pd.DataFrame):
            if not {"key", "value"} <= set(diagnostics.columns):
                raise StoreError(f"store {self.path}: unit {unit!r}: diagnostics DataFrame needs key and value columns")
            steps = diagnostics["step"] if "step" in diagnostics.columns else [default_step] * len(diagnostics)
            items: Iterable[Any] = zip(steps, diagnostics["key"], diagnostics["value"])
        elif isinstance(diagnostics, Mapping):
            items = ((default_step, k, v) for k, v in diagnostics.items())
        else:
            items = diagnostics
        for i, item in enumerate(items):
            item = tuple(item)
            if len(item) == 2:
                item = (default_step, *item)
            if len(item) != 3:
                raise StoreError(f"store {self.path}: unit {unit!r}: diagnostic {i} must be (step, key, value)")
            step, key, value = item
            if not key or not isinstance(key, str):
                raise StoreError(f"store {self.path}: unit {unit!r}: diagnostic {i} has no key")
            value = _scalar(value)
            if isinstance(value, bool):
                num, js = float(value), None
            elif isinstance(value, (int, float)):
                num, js = float(value), None
            elif value is None:
                num, js = None, None
            else:
                num, js = None, _json(value, f"diagnostic {key!r}", self.path)
            yield (run_id, unit, _opt_int(step, "step", i, unit, self.path), key, num, js)

    # ------------------------------------------------------------------ reading
    def rows(self, run_id: str | None = None, unit: str | None = None, metric: str | None = None) -> pd.DataFrame:
        """Result rows (columns :data:`ROW_COLUMNS`), optionally filtered."""
        where, params = self._where(run_id=run_id, unit=unit, metric=metric)
        rows = self._query(f"SELECT {', '.join(ROW_COLUMNS)} FROM rows{where} ORDER BY rowid", params)
        df = pd.DataFrame(rows, columns=list(ROW_COLUMNS))
        df["value"] = pd.to_numeric(df["value"], errors="coerce").astype(float)
        for c in ("step", "n_edits"):
            df[c] = pd.array(df[c], dtype="Int64")
        return df

    def diagnostics(self, run_id: str | None = None, unit: str | None = None, key: str | None = None,
                    *, decode: bool = True) -> pd.DataFrame:
        """Diagnostics: run_id, unit, step, key, value (float or, with ``decode``, the decoded JSON object)."""
        where, params = self._where(run_id=run_id, unit=unit, key=key)
        rows = self._query(f"SELECT {', '.join(DIAG_COLUMNS)} FROM diagnostics{where} ORDER BY rowid", params)
        out = []
        for r in rows:
            v = r[4]
            if r[5] is not None:
                v = json.loads(r[5]) if decode else r[5]
            out.append((r[0], r[1], r[2], r[3], v))
        df = pd.DataFrame(out, columns=["run_id", "unit", "step", "key", "value"])
        df["step"] = pd.array(df["step"], dtype="Int64")
        return df

    def rows_with_meta(self, run_id: str | None = None, metric: str | None = None) -> pd.DataFrame:
        """Result rows joined with their unit's metadata, flattened into columns.

        Nested metadata becomes dotted columns (``hparams.mom2_update_weight``,
        ``sweep.memit.mom2_update_weight``); lists become JSON strings. A metadata key that collides with
        a row column gets the prefix ``meta.`` (e.g. the unit's planned ``n_edits`` is ``meta.n_edits``
        beside the row's ``n_edits``).
        """
        df = self.rows(run_id=run_id, metric=metric)
        units = self.units(run_id)
        if units.empty:
            return df
        flat = []
        for r in units.itertuples(index=False):
            d = {("meta." + k if k in ROW_COLUMNS else k): v for k, v in _flatten(r.meta).items()}
            d["run_id"], d["unit"], d["unit_status"] = r.run_id, r.unit, r.status
            flat.append(d)
        meta = pd.DataFrame(flat)
        return df.merge(meta, on=["run_id", "unit"], how="left")

    @staticmethod
    def _where(**kw: Any) -> tuple[str, list[Any]]:
        parts, params = [], []
        for k, v in kw.items():
            if v is not None:
                parts.append(f"{k}=?")
                params.append(v)
        return ((" WHERE " + " AND ".join(parts)) if parts else ""), params

    def export(self, path: str | Path, *, table: str = "rows_with_meta", run_id: str | None = None) -> Path:
        """Write a table to ``path``; the format follows the suffix: ``.csv``, ``.parquet`` or ``.json``.

        ``table`` is ``rows_with_meta`` (default), ``rows``, ``diagnostics`` or ``units``.
        """
        path = Path(path)
        getters = {"rows_with_meta": lambda: self.rows_with_meta(run_id), "rows": lambda: self.rows(run_id),
                   "diagnostics": lambda: self.diagnostics(run_id), "units": lambda: self.units(run_id)}
        if table not in getters:
            raise StoreError(f"store {self.path}: cannot export table {table!r}; choose one of {sorted(getters)}")
        suffix = path.suffix.lower()
        if suffix not in (".csv", ".parquet", ".json"):
            raise StoreError(f"store {self.path}: cannot export to {path}: unknown suffix {path.suffix!r} "
                             "(use .csv, .parquet or .json)")
        df = getters[table]()
        for c in df.columns:  # dict/list cells (units.meta, JSON diagnostics) -> JSON text
            if df[c].dtype == object and df[c].map(lambda v: isinstance(v, (dict, list))).any():
                df[c] = df[c].map(lambda v: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if suffix == ".csv":
                df.to_csv(path, index=False)
            elif suffix == ".json":
                df.to_json(path, orient="records", indent=1)
            else:
                try:
                    df.to_parquet(path, index=False)
                except ImportError as e:
                    raise StoreError(f"store {self.path}: Parquet export needs pyarrow "
                                     f"(pip install 'editlens[parquet]'): {e}") from None
        except OSError as e:
            raise StoreError(f"store {self.path}: cannot write {path}: {e}") from None
        return path


class StoreLock:
    """An exclusive lock on a store for one writing run: ``fcntl.flock`` on ``<store>.lock`` beside it.

    :func:`editlens.runs.runner.run_spec` (hence ``editlens bench``) holds it from before the model is loaded until
    the run ends, so a second run on the same store fails at once with :class:`StoreBusyError` naming the store
    and the holder (pid, host, command, start time, written into the lock file) instead of repeating units. The
    kernel releases the lock when the holding process exits or is killed, so a stale lock file never blocks; the
    file itself stays (removing it would race with a process about to lock it). Advisory: plain
    :class:`Store` writers do not take it. Locks are per open file, so a second lock in the same process is
    refused too. Network file systems may not honour ``flock``.
    """

    def __init__(self, store_path: str | Path):
        self.store_path = Path(store_path)
        self.path = Path(f"{self.store_path}.lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "StoreLock":
        if self._fd is not None:
            return self
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return self
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if not _writable_dir(folder) or getattr(e, "errno", None) in (13, 30):  # EACCES, EROFS
                raise StoreError(f"store {self.store_path}: read-only directory {folder}: cannot create the lock "
                                 f"file {self.path.name} a writing run takes ({e}); put the store in a writable "
                                 "folder (--store PATH)") from None
            raise StoreError(f"store {self.store_path}: cannot create its lock file {self.path}: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise StoreBusyError(
                f"store {self.store_path} is in use: another editlens run is writing it ({holder}). Two runs on one "
                "store would repeat each other's units. Wait for that run to finish (running the spec again then "
                "resumes it and skips finished units), or write this run to another store (--store PATH; store= "
                "in Python).") from None
        info = {"pid": os.getpid(), "host": _hostname(), "started": time.time(),
                "command": " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
                                     *sys.argv[1:]])[:500]}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # no stale holder information
        except OSError:  # pragma: no cover
            pass
        os.close(fd)  # releases the flock

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - release() is the way
        try:
            self.release()
        except Exception:
            pass



def _dataset_entry(spec: Mapping[str, Any], name: Any) -> Any:
    """The ``datasets`` entry named ``name`` of a stored spec dict (``None`` when there is none)."""
    for d in spec.get("datasets") or ():
        if isinstance(d, Mapping) and d.get("name") == name:
            return d
    return None

def _hostname() -> str:
    import socket

    try:
        return socket.gethostname()
    except OSError:  # pragma: no cover
        return "?"


def _lock_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, 0)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if "started" in info else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, `{info.get('command', '?')}`, since {when}"


def _writable_dir(d: Path) -> bool:
    """Whether files can be created in ``d`` (``os.access``: permission bits, read-only mounts)."""
    return os.access(d if str(d) else Path("."), os.W_OK | os.X_OK)


def _scalar(v: Any) -> Any:
    """numpy / torch scalars and one-element arrays -> Python scalars; anything else unchanged."""
    size = getattr(v, "size", None)
    if callable(size):  # torch
        try:
            size = v.numel()
        except Exception:  # pragma: no cover
            size = None
    if hasattr(v, "item") and size == 1:
        try:
            return v.item()
        except (ValueError, RuntimeError):  # pragma: no cover
            return v
    if hasattr(v, "tolist") and not isinstance(v, (list, tuple)):
        return v.tolist()
    return v


def _opt_int(v: Any, what: str, i: int, unit: str, path: Path) -> int | None:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return None
    try:
        iv = int(v)
    except (TypeError, ValueError):
        raise StoreError(f"store {path}: unit {unit!r}: item {i}: {what} must be an integer, got {v!r}") from None
    if iv != v:
        raise StoreError(f"store {path}: unit {unit!r}: item {i}: {what} must be an integer, got {v!r}")
    return iv


def _opt_float(v: Any, what: str, unit: str, path: Path) -> float | None:
    if v is None or v is pd.NA:
        return None
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            raise StoreError(f"store {path}: unit {unit!r}: {what} must be a number, got an array") from None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise StoreError(f"store {path}: unit {unit!r}: {what} must be a number, got {v!r}") from None
    return None if math.isnan(f) else f


class _Tx:
    """``with store._write() as con:`` — one IMMEDIATE transaction, rolled back on any exception."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        con = self.store._conn()
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StoreError(f"store {self.store.path}: cannot start a write transaction: {e}") from None
        self.con = con
        return con

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None:
            try:
                self.con.execute("COMMIT")
            except sqlite3.Error as e:
                self.con.execute("ROLLBACK")
                raise StoreError(f"store {self.store.path}: commit failed: {e}") from None
            return False
        self.con.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"store {self.store.path}: write failed: {exc}") from None
        return False
