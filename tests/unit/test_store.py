"""Results store: atomic commits, resume checkpoints, readers, export, errors."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from editlens.errors import StoreError
from editlens.runs.store import Store


@pytest.fixture()
def store(tmp_path):
    st = Store(tmp_path / "res.sqlite")
    st.start_run("r1", {"name": "x", "seeds": [0]}, {"editlens": "0.1"}, "fp1", [0])
    yield st
    st.close()


def _rows(n=3, step=0, n_edits=10, metric="kl"):
    return [(step, n_edits, f"c{i}", "neighborhood", metric, float(i) / 10) for i in range(n)]


def test_wal_and_schema(tmp_path, store):
    con = sqlite3.connect(store.path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"rows", "units", "runs", "diagnostics", "checkpoints"} <= tables
    cols = [r[1] for r in con.execute("PRAGMA table_info(rows)")]
    assert cols == ["run_id", "unit", "step", "n_edits", "case_id", "probe_kind", "metric", "value"]
    idx = [r[1] for r in con.execute("PRAGMA index_list(rows)")]
    assert "rows_run_unit" in idx


def test_commit_unit_roundtrip(store):
    assert not store.is_done("r1", "u1")
    n = store.commit_unit("r1", "u1", _rows(), diagnostics={"wall_s": 2.5, "dk": [1.0, 2.0]},
                          meta={"method": "memit", "hparams": {"layers": [4, 5]}, "n_edits": 10,
                                "sweep": {"memit.mom2_update_weight": 1.5e4}})
    assert n == 3 and store.is_done("r1", "u1") and store.finished_units("r1") == {"u1"}
    df = store.rows("r1")
    assert list(df["value"]) == [0.0, 0.1, 0.2]
    assert list(df["case_id"]) == ["c0", "c1", "c2"]
    d = store.diagnostics("r1")
    assert d.set_index("key").loc["wall_s", "value"] == 2.5
    assert d.set_index("key").loc["dk", "value"] == [1.0, 2.0]
    m = store.rows_with_meta("r1")
    assert (m["method"] == "memit").all()
    assert (m["sweep.memit.mom2_update_weight"] == 1.5e4).all()
    assert json.loads(m["hparams.layers"].iloc[0]) == [4, 5]
    assert (m["meta.n_edits"] == 10).all() and (m["n_edits"] == 10).all()


def test_dataframe_dicts_numpy_and_nan(store):
    df = pd.DataFrame({"step": [0, 0], "n_edits": [5, 5], "case_id": ["a", "b"], "probe_kind": ["rewrite"] * 2,
                       "metric": ["t_acc", "t_acc"], "value": [np.float32(0.5), np.nan]})
    store.commit_unit("r1", "u1", df)
    store.commit_unit("r1", "u2", [{"metric": "x", "value": np.int64(3), "case_id": 7}])
    r = store.rows("r1")
    assert r["value"].iloc[0] == 0.5 and np.isnan(r["value"].iloc[1])
    assert r[r.unit == "u2"]["case_id"].iloc[0] == "7"


def test_double_commit_and_overwrite(store):
    store.commit_unit("r1", "u1", _rows())
    with pytest.raises(StoreError, match="already committed"):
        store.commit_unit("r1", "u1", _rows())
    store.commit_unit("r1", "u1", _rows(n=1), overwrite=True)
    assert len(store.rows("r1")) == 1


def test_failed_commit_writes_nothing(store):
    bad = _rows() + [(0, 10, "c9", "neighborhood", "kl", "not a number")]
    with pytest.raises(StoreError, match="must be a number"):
        store.commit_unit("r1", "u1", bad)
    assert store.rows().empty and not store.is_done("r1", "u1")
    with pytest.raises(StoreError, match="6 fields|fields"):
        store.commit_unit("r1", "u1", [(1, 2, 3)])
    # a failure inside the transaction (unserialisable diagnostic) rolls back everything too
    with pytest.raises(StoreError, match="JSON"):
        store.commit_unit("r1", "u1", _rows(), diagnostics={"obj": object()})
    assert store.rows().empty and store.diagnostics().empty


def test_unknown_run_and_changed_spec(store):
    with pytest.raises(StoreError, match="no run 'nope'"):
        store.commit_unit("nope", "u", _rows())
    assert store.start_run("r1", {"name": "x", "seeds": [0]}, {"editlens": "0.1"}, "fp1", [0]) is False
    with pytest.raises(StoreError, match="different spec"):
        store.start_run("r1", {"name": "y"}, {}, "fp1", [0])
    with pytest.raises(StoreError, match="fingerprint"):
        store.start_run("r1", {"name": "x", "seeds": [0]}, {}, "fp2", [0])


def test_sequential_checkpoints_and_resume(store):
    meta = {"method": "memit", "regime": "sequential", "checkpoints": [1, 10, 100]}
    assert store.last_checkpoint("r1", "seq") is None
    store.commit_step("r1", "seq", 0, _rows(step=0, n_edits=1), meta=meta, state={"next_case": 1})
    store.commit_unit("r1", "seq", _rows(step=1, n_edits=10), partial=True, step=1, state={"next_case": 10})
    cp = store.last_checkpoint("r1", "seq")
    assert (cp.step, cp.n_edits, cp.state) == (1, 10, {"next_case": 10})
    assert not store.is_done("r1", "seq")
    # re-committing a step replaces its rows (idempotent resume)
    store.commit_step("r1", "seq", 1, _rows(n=2, step=1, n_edits=10))
    assert len(store.rows("r1", unit="seq")) == 3 + 2
    with pytest.raises(StoreError, match="other steps"):
        store.commit_step("r1", "seq", 2, _rows(step=5))
    store.commit_unit("r1", "seq", _rows(step=2, n_edits=100))
    assert store.is_done("r1", "seq")
    assert [c.step for c in store.checkpoints("r1", "seq")] == [0, 1]
    assert sorted(store.rows("r1", unit="seq")["n_edits"].unique()) == [1, 10, 100]
    assert store.units("r1").set_index("unit").loc["seq", "meta"] == meta
    with pytest.raises(StoreError, match="already done"):
        store.commit_step("r1", "seq", 3, _rows(step=3))


def test_export_formats(tmp_path, store):
    store.commit_unit("r1", "u1", _rows(), meta={"method": "memit"}, diagnostics={"w": 1.0})
    for suffix in (".csv", ".parquet", ".json"):
        p = store.export(tmp_path / f"out{suffix}")
        df = {".csv": pd.read_csv, ".parquet": pd.read_parquet, ".json": pd.read_json}[suffix](p)
        assert len(df) == 3 and "method" in df.columns and list(df["value"]) == [0.0, 0.1, 0.2]
    store.export(tmp_path / "d.csv", table="diagnostics")
    with pytest.raises(StoreError, match="unknown suffix"):
        store.export(tmp_path / "x.xlsx")
    with pytest.raises(StoreError, match="cannot export table"):
        store.export(tmp_path / "x.csv", table="nope")


def test_readonly_and_concurrent_reader(tmp_path, store):
    store.commit_unit("r1", "u1", _rows())
    reader = Store(store.path, readonly=True)
    assert len(reader.rows()) == 3
    store.commit_unit("r1", "u2", _rows())  # writer keeps writing while a reader is open
    assert len(reader.rows()) == 6
    with pytest.raises(StoreError, match="read-only"):
        reader.commit_unit("r1", "u3", _rows())
    reader.close()


def test_open_errors_name_the_path(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="junk.sqlite"):
        Store(junk)
    with pytest.raises(StoreError, match="missing.sqlite"):
        Store(tmp_path / "missing.sqlite", readonly=True)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t(x)").connection.commit()
    with pytest.raises(StoreError, match="not an editlens results store"):
        Store(other, readonly=True)


def test_sigkill_loses_whole_unit_or_nothing(tmp_path):
    """A writer killed mid-run leaves only complete units (and each of them complete)."""
    path = tmp_path / "kill.sqlite"
    script = textwrap.dedent(f"""
        import sys
        from editlens.runs.store import Store
        st = Store({str(path)!r})
        st.start_run("r", {{}}, {{}}, None, [0])
        print("ready", flush=True)
        i = 0
        while True:
            st.commit_unit("r", f"u{{i}}", [(0, 1, f"c{{j}}", "k", "m", float(j)) for j in range(500)])
            i += 1
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), *sys.path]))
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    assert p.stdout.readline().strip() == b"ready"
    import time
    deadline = time.time() + 20
    while time.time() < deadline:
        with Store(path, readonly=True) as r:
            if len(r.finished_units("r")) >= 3:
                break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    with Store(path) as st:
        done = st.finished_units("r")
        rows = st.rows("r")
        assert len(done) >= 3
        assert set(rows["unit"]) == done  # no rows of an unfinished unit
        assert (rows.groupby("unit").size() == 500).all()  # every finished unit complete
