"""A run killed with SIGKILL at a random point resumes and ends with exactly the rows of an uninterrupted run;
malformed specs fail with messages that name the key and the line, through the CLI too.

Mechanics only: tiny-llama, FT with a few steps, small synthetic datasets. The killed process is
``python -m editlens.cli.main bench SPEC`` (what ``editlens bench`` runs).
"""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from editlens.runs.runner import run_spec
from editlens.runs.store import Store

REPO = Path(__file__).resolve().parents[2]

SPEC = """
    name = "killme"
    model = "tiny-llama"
    metrics = ["kl", "topk@5", "t_acc"]

    [[datasets]]
    path = "synthetic:8"

    [[methods]]
    name = "ft"
    label = "ft"
    hparams = { steps = 3 }

    [[methods]]
    name = "none"

    [regime]
    kind = "sequential"
    checkpoints = [2, 4, 6, 8]
    batch_size = 2

    [sweep]
    "ft.lr" = [0.001, 0.005]
"""


def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _bench(spec: Path, store: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "editlens.cli.main", "bench", str(spec), "--store", str(store),
                             "--no-report"], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _progress(store: Path) -> int:
    """Committed work: done units + checkpoints (0 while the store does not exist yet)."""
    if not store.exists():
        return 0
    try:
        con = sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True, timeout=1)
        try:
            n = con.execute("SELECT (SELECT COUNT(*) FROM units WHERE status='done') + "
                            "(SELECT COUNT(*) FROM checkpoints)").fetchone()[0]
        finally:
            con.close()
        return int(n)
    except sqlite3.Error:
        return 0


def _rows(store: Path) -> tuple[str, list[tuple]]:
    with Store(store, readonly=True) as st:
        (rid,) = st.run_ids()
        df = st.rows(rid)
        units = st.units(rid)
    assert (units["status"] == "done").all()
    rows = [tuple(None if v is None or (isinstance(v, float) and v != v) else v for v in r)
            for r in df.astype(object).where(df.notna(), None).itertuples(index=False, name=None)]
    return rid, sorted(rows)


@pytest.mark.integration
def test_sigkill_at_random_point_then_resume_gives_identical_rows(tmp_path):
    pytest.importorskip("editlens.edit.ft")
    spec = tmp_path / "killme.toml"
    spec.write_text(textwrap.dedent(SPEC).lstrip())
    store = tmp_path / "killed.sqlite"
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    proc = _bench(spec, store)
    t0 = time.monotonic()
    target = rng.randint(1, 4)  # kill after this much committed work (checkpoints + units) ...
    while _progress(store) < target and proc.poll() is None and time.monotonic() - t0 < 240:
        time.sleep(0.05)
    time.sleep(rng.uniform(0, 0.8))  # ... plus a random delay, i.e. anywhere in an edit or an evaluation
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert killed, f"the run finished before it could be killed (seed {seed}):\n{out}"
    assert proc.returncode == -signal.SIGKILL
    done_before = _progress(store)
    assert done_before >= 1, out

    resumed = _bench(spec, store)
    out2, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out2
    assert "already done" in out2

    # the uninterrupted reference, in this process, on one thread like the subprocesses
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_spec(spec, store=tmp_path / "reference.sqlite", progress=False)
    finally:
        torch.set_num_threads(threads)
    rid_a, a = _rows(store)
    rid_b, b = _rows(tmp_path / "reference.sqlite")
    assert rid_a == rid_b
    assert len(a) == len(b) > 0
    assert a == b, f"kill seed {seed}: rows differ after resume"


# ------------------------------------------------------------------------------------------ malformed specs
def _cli(tmp_path: Path, text: str, *args: str):
    from click.testing import CliRunner

    from editlens.cli.main import cli

    p = tmp_path / "bad.toml"
    p.write_text(textwrap.dedent(text).lstrip())
    return CliRunner().invoke(cli, ["bench", str(p), "--dry-run", *args])


@pytest.mark.parametrize("old,new,expect", [
    ('name = "ft"', 'name = "fft"', ["bad.toml:9: methods[0].name", "unknown editing method 'fft'"]),
    ("steps = 3", "steps = 3, stepz = 4", ["bad.toml:11: methods[0].hparams.stepz", "unknown hyperparameter 'stepz'"]),
    ("[0.001, 0.005]", '[0.001, "fast"]', ['bad.toml:22: sweep."ft.lr"', "mixes numbers and strings"]),
    ("steps = 3", 'steps = "many"', ["bad.toml:11: methods[0].hparams.steps", "'many'"]),
    ('"synthetic:8"', '"missing/cases.json"', ["bad.toml:6: datasets[0].path", "not found"]),
    ('"t_acc"]', '"t_acc", "nope"]', ["bad.toml:3: metrics[3]", "unknown metric 'nope'"]),
])
def test_malformed_specs_name_key_and_line_through_the_cli(tmp_path, old, new, expect):
    pytest.importorskip("editlens.edit.ft")
    assert old in SPEC
    res = _cli(tmp_path, SPEC.replace(old, new))
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ")
    for e in expect:
        assert e in res.output, res.output
    assert "Traceback" not in res.output


def test_dry_run_prints_the_plan(tmp_path):
    pytest.importorskip("editlens.edit.ft")
    res = _cli(tmp_path, SPEC)
    assert res.exit_code == 0, res.output
    assert "units: 3 = ft: 2 point(s)" in res.output
    assert "evaluation points: 12" in res.output
    assert "the first 2 case(s) of each unit" in res.output
    assert "bad.sqlite" in res.output and not (tmp_path / "bad.sqlite").exists()
