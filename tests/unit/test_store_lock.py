"""One writing run per store: `editlens bench` takes an exclusive lock on the store before any work.

Two real processes: A runs a spec (held just before its first unit by a file barrier), B is `editlens bench` on the
same store. B must fail at once -- before running anything -- with a message for the command line that names the
store and A; A then finishes normally and the store holds each unit once. A lock left by a killed process does not
block.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from editlens.errors import StoreBusyError, StoreError
from editlens.runs.store import Store, StoreLock

REPO = Path(__file__).resolve().parents[2]

SPEC = """
    name = "locked"
    model = "tiny-llama"
    metrics = ["kl", "t_acc"]

    [[datasets]]
    path = "synthetic:3"

    [[methods]]
    name = "none"

    [regime]
    kind = "batch"
    sizes = [2]
"""

HOLDER = """
import sys, time
from pathlib import Path
from editlens.runs.executors import LocalExecutor
from editlens.runs.runner import run_spec

spec, store, barrier = sys.argv[1], sys.argv[2], Path(sys.argv[3])

class Blocking(LocalExecutor):
    def run(self, *a, **k):
        (barrier / "started").write_text("1")
        while not (barrier / "go").exists():
            time.sleep(0.05)
        return super().run(*a, **k)

print(run_spec(spec, store=store, executor=Blocking(), progress=False))
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"holder exited early: {proc.communicate()}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError("holder did not start")
        time.sleep(0.1)


def test_second_bench_on_one_store_fails_at_once(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(textwrap.dedent(SPEC).lstrip())
    store = tmp_path / "s.sqlite"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    a = subprocess.Popen([sys.executable, "-c", HOLDER, str(spec), str(store), str(barrier)], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(barrier / "started", a)  # A holds the store and is about to run its units
        t0 = time.monotonic()
        b = subprocess.run([sys.executable, "-m", "editlens.cli.main", "bench", str(spec), "--store", str(store),
                            "--no-report"], env=_env(), capture_output=True, text=True, timeout=300)
        b_time = time.monotonic() - t0
        with Store(store, readonly=True) as st:
            rows_while_a_waits = len(st.rows())
            done_while_a_waits = sorted(st.finished_units(st.run_ids()[0]))
    finally:
        (barrier / "go").write_text("1")
        a_out, a_err = a.communicate(timeout=300)
    assert b.returncode != 0
    msg = b.stderr
    assert "error:" in msg and str(store) in msg and f"pid {a.pid}" in msg, msg
    assert "--store" in msg and "overwrite" not in msg, msg   # advice for the command line, not the Python API
    assert "  running none-" not in msg and "done:" not in msg, msg   # B ran nothing
    assert rows_while_a_waits == 0 and done_while_a_waits == []
    assert b_time < 60, b_time
    assert a.returncode == 0, a_err
    rid = a_out.strip().splitlines()[-1]
    with Store(store, readonly=True) as st:
        units = st.units(rid)
        assert list(units["status"]) == ["done"] and len(units) == 1
        rows = st.rows(rid)
        assert len(rows) == len(rows.drop_duplicates(["unit", "step", "case_id", "probe_kind", "metric"])) > 0
    # once A has finished, the store is free again: a re-run resumes (nothing to do) and succeeds
    c = subprocess.run([sys.executable, "-m", "editlens.cli.main", "bench", str(spec), "--store", str(store),
                        "--no-report"], env=_env(), capture_output=True, text=True, timeout=300)
    assert c.returncode == 0, c.stderr
    assert "1 already done, 0 to run" in c.stderr


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    store = tmp_path / "k.sqlite"
    code = ("import sys, time\nfrom editlens.runs.store import StoreLock\n"
            f"l = StoreLock({str(store)!r}).acquire()\nprint('LOCKED', flush=True)\ntime.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "LOCKED"
        with pytest.raises(StoreBusyError, match=f"pid {p.pid}"):
            StoreLock(store).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with StoreLock(store) as lock:  # the kernel released the dead holder's lock
        assert lock.held
        with pytest.raises(StoreBusyError, match="in use"):  # and this one is exclusive, also in one process
            StoreLock(store).acquire()
    assert not lock.held
    with StoreLock(store):
        pass


def test_lock_in_readonly_directory_says_so(tmp_path, monkeypatch):
    import editlens.runs.store as store_mod

    d = tmp_path / "ro"
    d.mkdir()
    monkeypatch.setattr(store_mod, "_writable_dir", lambda p: False)
    monkeypatch.setattr(store_mod.os, "open", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(StoreError, match="read-only directory"):
        StoreLock(d / "s.sqlite").acquire()
