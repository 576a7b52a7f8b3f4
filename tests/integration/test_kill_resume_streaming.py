"""A streamed run (``[regime] eval_chunk``) killed with SIGKILL while a unit's evaluation has written some of its
chunks -- rows in the store at a step that is not committed -- resumes and ends with exactly the rows of an
uninterrupted streamed run, without duplicates.

Mechanics only: tiny-llama, FT with a few steps, a small synthetic dataset, one case per chunk. The killed process
is ``python -m editlens.cli.main bench SPEC`` (what ``editlens bench`` runs).
"""
from __future__ import annotations

import signal
import sqlite3
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from editlens.runs.runner import run_spec
from editlens.runs.store import Store
from tests.integration.test_kill_resume import _bench

SPEC = """
    name = "killstream"
    model = "tiny-llama"
    metrics = ["kl", "topk@5", "t_acc"]

    [[datasets]]
    path = "synthetic:10"

    [[methods]]
    name = "ft"
    hparams = { steps = 2 }

    [[methods]]
    name = "none"

    [regime]
    kind = "batch"
    sizes = [10]
    eval_chunk = 1
"""


def _partial_rows(store: Path) -> int:
    """Rows of units that are not done, at steps without a checkpoint: chunks of an unfinished evaluation."""
    if not store.exists():
        return 0
    try:
        con = sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True, timeout=1)
        try:
            n = con.execute(
                "SELECT COUNT(*) FROM rows r JOIN units u ON u.run_id = r.run_id AND u.unit = r.unit "
                "WHERE u.status != 'done' AND r.step NOT IN (SELECT step FROM checkpoints c "
                "WHERE c.run_id = r.run_id AND c.unit = r.unit)").fetchone()[0]
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
    rows = sorted((r.unit, int(r.step), int(r.n_edits), r.case_id, r.probe_kind, r.metric, float(r.value))
                  for r in df.itertuples(index=False))
    keys = Counter(r[:-1] for r in rows)
    assert max(keys.values()) == 1  # no duplicates
    return rid, rows


@pytest.mark.integration
def test_sigkill_between_chunks_then_resume_gives_identical_rows(tmp_path):
    pytest.importorskip("editlens.edit.ft")
    spec = tmp_path / "killstream.toml"
    spec.write_text(textwrap.dedent(SPEC).lstrip())
    store = tmp_path / "killed.sqlite"
    proc = _bench(spec, store)
    t0 = time.monotonic()
    while _partial_rows(store) == 0 and proc.poll() is None and time.monotonic() - t0 < 300:
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert killed, f"the run finished before it could be killed:\n{out}"
    assert _partial_rows(store) > 0  # killed with some chunks of a unit written and the unit not done

    resumed = _bench(spec, store)
    out2, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out2
    assert "rows of an evaluation that did not finish" in out2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the subprocesses (OMP_NUM_THREADS=1)
    try:
        run_spec(spec, store=tmp_path / "reference.sqlite", progress=False)
    finally:
        torch.set_num_threads(threads)
    rid_a, a = _rows(store)
    rid_b, b = _rows(tmp_path / "reference.sqlite")
    assert rid_a == rid_b and len(a) == len(b) > 0
    assert a == b, "rows differ after resume"
