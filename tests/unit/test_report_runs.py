"""Reports never pool runs; Markdown output escapes HTML; stores on read-only media can be reported."""
from __future__ import annotations

import math
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from editlens.cli.report import report as report_cmd
from editlens.errors import StoreError
from editlens.report import build_report
from editlens.report.tables import methods_table, summarize, to_markdown
from editlens.runs.store import Store

A_VALUES = [0.1, 0.5, 0.9, 0.3]   # run A: one value per case
B_VALUES = [0.2, 0.4, 0.6, 0.8]   # run B (the changed spec re-run into the same store): same units, same cases


def _sem(values):
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def two_run_store(path: Path) -> Path:
    """The issue's situation: a spec run into a store, changed, and run again into the same store (new run id,
    same unit ids, same case ids)."""
    with Store(path) as st:
        for rid, values, lr in (("spec-aaaa", A_VALUES, 0.1), ("spec-bbbb", B_VALUES, 0.2)):
            st.start_run(rid, {"name": "spec", "methods": [{"name": "ft", "hparams": {"lr": lr}}]}, {}, "fp", [0])
            rows = [(1, 4, f"c{i}", "rewrite", "s_acc", v) for i, v in enumerate(values)]
            st.commit_unit(rid, "ft-mcf-n4-s0", rows, meta={"method": "ft", "label": "ft", "dataset": "mcf",
                                                             "n_edits": 4, "hparams": {"lr": lr}})
    return path


def _cell(rep, col="rewrite/s_acc"):
    t = rep.table("methods")
    flat = {c[1] if isinstance(c, tuple) else c: c for c in t.columns}
    return t, list(t[flat[col]])


# ------------------------------------------------------------------------------------------------ item 7
def test_report_shows_the_latest_run_by_default_never_pooled(tmp_path):
    path = two_run_store(tmp_path / "s.sqlite")
    rep = build_report(path, plots_enabled=False)
    t, cells = _cell(rep)
    assert len(t) == 1
    assert cells == [f"{sum(B_VALUES) / 4:.3f} ± {_sem(B_VALUES):.3f}"]   # run B alone: n = 4, not 8
    assert any("spec-bbbb" in n and "spec-aaaa" in n for n in rep.notes)  # says which run and that others exist


def test_report_run_and_all_runs_side_by_side(tmp_path):
    path = two_run_store(tmp_path / "s.sqlite")
    _, cells = _cell(build_report(path, run_id="spec-aaaa", plots_enabled=False))
    assert cells == [f"{sum(A_VALUES) / 4:.3f} ± {_sem(A_VALUES):.3f}"]
    t, cells = _cell(build_report(path, all_runs=True, plots_enabled=False))
    runs = list(t[("", "run")])
    assert runs == ["spec-aaaa", "spec-bbbb"]
    assert cells == [f"{sum(A_VALUES) / 4:.3f} ± {_sem(A_VALUES):.3f}", f"{sum(B_VALUES) / 4:.3f} ± {_sem(B_VALUES):.3f}"]
    with pytest.raises(StoreError, match="not both"):
        build_report(path, run_id="spec-aaaa", all_runs=True)


def test_tables_never_pool_runs_given_a_multi_run_frame(tmp_path):
    """The table functions themselves keep runs apart (a frame of two runs, e.g. from Store.rows_with_meta())."""
    path = two_run_store(tmp_path / "s.sqlite")
    with Store(path, readonly=True) as st:
        df = st.rows_with_meta()
    s = summarize(df)
    assert sorted(s["n"]) == [4, 4] and list(s["run_id"]) == ["spec-aaaa", "spec-bbbb"]
    assert sorted(s["sem"].round(12)) == sorted([round(_sem(A_VALUES), 12), round(_sem(B_VALUES), 12)])
    assert len(methods_table(df)) == 2


def test_cli_report_latest_run_flags(tmp_path):
    path = two_run_store(tmp_path / "s.sqlite")
    runner = CliRunner()
    res = runner.invoke(report_cmd, [str(path), "--no-plots"])
    assert res.exit_code == 0, res.output
    b = f"{sum(B_VALUES) / 4:.3f} ± {_sem(B_VALUES):.3f}"
    assert b in res.output and f"{sum(A_VALUES) / 4:.3f}" not in res.output
    pooled = A_VALUES + B_VALUES
    assert f"± {_sem(pooled):.3f}" not in res.output
    res = runner.invoke(report_cmd, [str(path), "--all-runs", "--export", str(tmp_path / "x.csv")])
    assert res.exit_code == 0, res.output
    assert "spec-aaaa" in res.output and "spec-bbbb" in res.output and b in res.output
    assert set(pd.read_csv(tmp_path / "x.csv")["run_id"]) == {"spec-aaaa", "spec-bbbb"}
    res = runner.invoke(report_cmd, [str(path), "--export", str(tmp_path / "y.csv")])
    assert set(pd.read_csv(tmp_path / "y.csv")["run_id"]) == {"spec-bbbb"}   # export = what the report shows
    res = runner.invoke(report_cmd, [str(path), "--run", "spec-aaaa", "--all-runs"])
    assert res.exit_code != 0 and "--run" in res.output and "--all-runs" in res.output


# ------------------------------------------------------------------------------------------------ item 3
def test_markdown_escapes_html_from_spec_strings(tmp_path):
    path = tmp_path / "x.sqlite"
    evil = "<script>alert(1)</script>"
    with Store(path) as st:
        st.start_run("r", {"name": "n", "report": {"title": f"T {evil}"}}, {}, None, [0])
        st.commit_unit("r", "u", [(1, 1, "c0", "rewrite", "<img src=x onerror=alert(2)>", 0.5),
                                  (1, 1, "c1", "rewrite", "<img src=x onerror=alert(2)>", 0.7)],
                       meta={"method": "ft", "label": "<b>ft</b>", "dataset": "d<i>",
                             "sweep": {"ft.lr": "<u>1</u>"}})
    rep = build_report(path, plots_enabled=False)
    files = rep.write_dir(tmp_path / "out")
    texts = [p.read_text() for p in files if p.suffix == ".md"]
    index = (tmp_path / "out" / "index.md").read_text()
    for text in texts:
        for raw in ("<script", "<img", "<b>", "<u>"):
            assert raw not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index and "&lt;b&gt;ft&lt;/b&gt;" in index
    assert "&lt;img src=x onerror=alert(2)&gt;" in index
    md = to_markdown(pd.DataFrame({"a<x>": ["1 & 2 <y>"]}))
    assert "<" not in md and "a&lt;x&gt;" in md and "1 &amp; 2 &lt;y&gt;" in md
    res = CliRunner().invoke(report_cmd, [str(path), "--no-plots"])  # the printed Markdown too
    assert res.exit_code == 0 and "<script" not in res.output and "&lt;script&gt;" in res.output


# ------------------------------------------------------------------------------------------------ item 10
NO_DAC = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--"]


def _capsh_works() -> bool:
    """Root ignores permission bits; without CAP_DAC_OVERRIDE it does not (the honest way to make a directory
    read-only for the test process when tests run as root). Non-root test runs need no capsh."""
    if os.geteuid() != 0:
        return True
    if shutil.which("capsh") is None:
        return False
    d = Path(tempfile.mkdtemp())
    try:
        d.chmod(0o555)
        r = subprocess.run(NO_DAC + ["-c", f"touch {d}/x"], capture_output=True)
        return r.returncode != 0
    finally:
        d.chmod(0o755)
        shutil.rmtree(d)


def _run_unprivileged(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        cmd = NO_DAC + ["-c", " ".join(_q(c) for c in cmd)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
                          cwd=str(Path(__file__).resolve().parents[2]))


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def _readonly_copy_with_wal(tmp_path: Path) -> Path:
    """A store whose last commits are still in its -wal file (writer killed, or copied while open), copied to a
    read-only directory without the -shm file: what `cp`/archives of a live store leave on read-only media."""
    src = tmp_path / "live"
    st = Store(src / "s.sqlite")
    st.start_run("r", {"name": "ro"}, {}, None, [0])
    st.commit_unit("r", "u", [(1, 2, f"c{i}", "rewrite", "s_acc", v) for i, v in enumerate((0.25, 0.75))],
                   meta={"method": "ft"})
    assert (src / "s.sqlite-wal").stat().st_size > 0
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(src / "s.sqlite", ro / "s.sqlite")
    shutil.copy(src / "s.sqlite-wal", ro / "s.sqlite-wal")
    st.close()
    for p in (ro / "s.sqlite", ro / "s.sqlite-wal"):
        p.chmod(0o444)
    ro.chmod(0o555)
    for p in (tmp_path, *tmp_path.parents):  # the unprivileged child must reach it
        if p == Path("/"):
            break
        p.chmod(p.stat().st_mode | stat.S_IXOTH | stat.S_IROTH)
    return ro / "s.sqlite"


REPORT_CODE = """
import sys
from click.testing import CliRunner
from editlens.cli.report import report
res = CliRunner().invoke(report, [sys.argv[1] if len(sys.argv) > 1 else {path!r}, '--no-plots'])
print(res.output)
if res.exception is not None and not isinstance(res.exception, SystemExit):
    print('EXC', type(res.exception).__name__, res.exception)
print('EXIT', res.exit_code)
"""


@pytest.mark.skipif(not _capsh_works(), reason="cannot drop CAP_DAC_OVERRIDE here (needs capsh)")
def test_report_from_readonly_directory(tmp_path):
    db = _readonly_copy_with_wal(tmp_path)
    try:
        r = _run_unprivileged(REPORT_CODE.format(path=str(db)))
        out = r.stdout + r.stderr
        assert "EXIT 0" in out, out
        assert "0.500 ± 0.250" in out  # both rows, including those only in the -wal file
        assert sorted(os.listdir(db.parent)) == ["s.sqlite", "s.sqlite-wal"]  # nothing written there
        # when a read-only directory really is the problem (here: no temporary copy can be made either, as on a
        # full disk), the message says so
        no_tmp = ("import tempfile\ndef _full(*a, **k):\n    raise OSError(28, 'No space left on device')\n"
                  "tempfile.mkdtemp = _full\n")
        r = _run_unprivileged(no_tmp + REPORT_CODE.format(path=str(db)))
        out = r.stdout + r.stderr
        assert "EXIT 0" not in out and "read-only directory" in out, out
    finally:
        db.parent.chmod(0o755)


@pytest.mark.skipif(not _capsh_works(), reason="cannot drop CAP_DAC_OVERRIDE here (needs capsh)")
def test_readonly_store_without_wal_opens_immutable(tmp_path):
    src = tmp_path / "d"
    with Store(src / "s.sqlite") as st:
        st.start_run("r", {"name": "ro"}, {}, None, [0])
        st.commit_unit("r", "u", [(1, 1, "c0", "rewrite", "s_acc", 1.0)], meta={"method": "ft"})
    assert not (src / "s.sqlite-wal").exists()
    src.chmod(0o555)
    for p in (tmp_path, *tmp_path.parents):
        if p == Path("/"):
            break
        p.chmod(p.stat().st_mode | stat.S_IXOTH | stat.S_IROTH)
    try:
        code = ("from editlens.runs.store import Store\n"
                f"st = Store({str(src / 's.sqlite')!r}, readonly=True)\n"
                "print('ROWS', len(st.rows()))\n"
                "try:\n"
                f"    Store({str(src / 'new.sqlite')!r})\n"
                "except Exception as e:\n"
                "    print('WRITER', type(e).__name__, e)\n"
                "from editlens.runs.store import StoreLock\n"
                "try:\n"
                f"    StoreLock({str(src / 's.sqlite')!r}).acquire()\n"
                "except Exception as e:\n"
                "    print('LOCK', type(e).__name__, e)\n")
        r = _run_unprivileged(code)
        assert "ROWS 1" in r.stdout, r.stdout + r.stderr
        assert "WRITER StoreError" in r.stdout and "read-only directory" in r.stdout, r.stdout + r.stderr
        lock_line = [x for x in r.stdout.splitlines() if x.startswith("LOCK")]
        assert lock_line and "StoreError" in lock_line[0] and "read-only directory" in lock_line[0], r.stdout
        assert sorted(os.listdir(src)) == ["s.sqlite"]
    finally:
        src.chmod(0o755)


def test_sqlite_really_refuses_wal_without_shm_in_readonly_dir(tmp_path):
    """Guard for the test above: the situation it builds is the one that failed (not vacuous)."""
    if not _capsh_works():
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here")
    db = _readonly_copy_with_wal(tmp_path)
    try:
        code = (f"import sqlite3; from pathlib import Path; c = sqlite3.connect(Path({str(db)!r}).as_uri() + '?mode=ro', "
                "uri=True)\ntry:\n    c.execute('select count(*) from rows').fetchall(); print('OPENED')\n"
                "except sqlite3.Error as e:\n    print('FAILED', e)")
        r = _run_unprivileged(code)
        assert "FAILED unable to open database file" in r.stdout, r.stdout + r.stderr
    finally:
        db.parent.chmod(0o755)
