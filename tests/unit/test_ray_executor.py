"""The Ray executor against a real local Ray cluster (make test installs Ray: ``.[test,ray]``).

One cluster for the module (``ray.init`` with 2 CPUs). A spec of several units — batch and sequential regimes, two
methods — must give exactly the rows of the local executor; a worker killed in the middle of a unit is retried and
the store stays exact; a run interrupted on the driver (Ctrl-C) resumes and loses nothing.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray", reason="the ray executor needs Ray: pip install editlens[ray] (make test installs it)")

from editlens.runs.executors import RayExecutor  # noqa: E402
from editlens.runs.runner import run_spec  # noqa: E402
from editlens.runs.store import Store  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

BATCH_SPEC = """
    name = "ray-batch"
    model = "tiny-llama"
    metrics = ["kl", "t_acc"]

    [[datasets]]
    path = "synthetic:4"

    [[methods]]
    name = "ft"
    hparams = { steps = 2 }

    [[methods]]
    name = "rome"
    hparams = { n_prefixes = 1, prefix_length = 4, v_num_grad_steps = 4, stats_n_samples = 8, stats_max_length = 16 }

    [regime]
    kind = "batch"
    sizes = [1, 2]
"""

SEQ_SPEC = BATCH_SPEC.replace('"ray-batch"', '"ray-seq"').replace('kind = "batch"\n    sizes = [1, 2]',
                                                                   'kind = "sequential"\n    checkpoints = [1, 2, 4]')
assert "checkpoints" in SEQ_SPEC


def _write(tmp: Path, name: str, text: str, stats: Path) -> Path:
    p = tmp / name
    # every unit (local or Ray task) reads and writes the same statistics cache of this test
    p.write_text(textwrap.dedent(text).lstrip().replace("stats_max_length = 16 }",
                                                         f"stats_max_length = 16, stats_dir = {str(stats)!r} }}"))
    return p


def _rows(store: Path, run_id: str) -> list[tuple]:
    with Store(store, readonly=True) as st:
        df = st.rows(run_id)
    return sorted(tuple(None if v is None or (isinstance(v, float) and v != v) else v for v in r)
                  for r in df.astype(object).where(df.notna(), None).itertuples(index=False, name=None))


def _units(store: Path, run_id: str):
    with Store(store, readonly=True) as st:
        return st.units(run_id)


def _local(spec: Path, store: Path) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the one-CPU Ray tasks
    try:
        return run_spec(spec, store=store, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module; the executors below connect to it (address="auto")."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    stats = tmp / "stats"
    return tmp, _write(tmp, "b.toml", BATCH_SPEC, stats), _write(tmp, "s.toml", SEQ_SPEC, stats)


@pytest.mark.parametrize("which", ["batch", "sequential"])
def test_ray_rows_equal_the_local_executor(cluster, specs, which):
    tmp, batch, seq = specs
    spec = batch if which == "batch" else seq
    rid = _local(spec, tmp / f"local-{which}.sqlite")
    ex = RayExecutor(num_cpus=1)
    assert run_spec(spec, store=tmp / f"ray-{which}.sqlite", executor=ex, progress=False) == rid
    a, b = _rows(tmp / f"local-{which}.sqlite", rid), _rows(tmp / f"ray-{which}.sqlite", rid)
    assert len(a) > 0 and a == b
    units = _units(tmp / f"ray-{which}.sqlite", rid)
    assert (units["status"] == "done").all() and len(units) == (4 if which == "batch" else 2)
    with Store(tmp / f"ray-{which}.sqlite", readonly=True) as st:
        assert set(st.rows_with_meta(rid)["method"]) == {"ft", "rome"}


def _unit_workers() -> list:
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline", "name"]):
        try:
            text = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        except (psutil.Error, TypeError):
            continue
        if "ray::_ray_unit" in text:
            out.append(p)
    return out


def test_a_worker_killed_mid_unit_is_retried_and_the_store_stays_exact(cluster, specs):
    tmp, _, seq = specs
    rid = _local(seq, tmp / "local-kill.sqlite")
    ex = RayExecutor(num_cpus=1)
    result: dict = {}

    def drive():
        try:
            result["rid"] = run_spec(seq, store=tmp / "ray-kill.sqlite", executor=ex, progress=False)
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    t = threading.Thread(target=drive)
    t.start()
    killed = None
    deadline = time.time() + 240
    while killed is None and t.is_alive() and time.time() < deadline:
        workers = _unit_workers()
        if workers:
            time.sleep(0.5)  # inside the unit: model loaded, editing
            with __import__("contextlib").suppress(Exception):
                workers[0].send_signal(signal.SIGKILL)
                killed = workers[0].pid
        time.sleep(0.05)
    t.join(timeout=600)
    assert killed is not None, "no Ray worker running a unit was seen"
    assert "error" not in result, result.get("error")
    assert result["rid"] == rid
    assert _rows(tmp / "local-kill.sqlite", rid) == _rows(tmp / "ray-kill.sqlite", rid)
    units = _units(tmp / "ray-kill.sqlite", rid)
    assert (units["status"] == "done").all() and len(units) == 2


DRIVER = """
import sys
from editlens.runs.executors import RayExecutor
from editlens.runs.runner import run_spec
ex = RayExecutor(num_cpus=1, init_kwargs={"num_cpus": 2})
try:
    run_spec(sys.argv[1], store=sys.argv[2], executor=ex, progress=True)
finally:
    ex.shutdown()
"""


def test_a_driver_interrupted_by_ctrl_c_resumes_and_loses_nothing(cluster, specs):
    """The driver runs in its own process and its own Ray instance; Ctrl-C (SIGINT) arrives once the first unit
    is committed; the resumed run (through Ray again) finishes with exactly the local executor's rows."""
    tmp, batch, _ = specs
    rid = _local(batch, tmp / "local-int.sqlite")
    store = tmp / "ray-int.sqlite"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(batch), str(store)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    interrupted_after = None
    deadline = time.time() + 300
    try:
        while proc.poll() is None and time.time() < deadline:
            if store.exists():
                with __import__("contextlib").suppress(Exception):
                    units = _units(store, rid)
                    done = int((units["status"] == "done").sum())
                    if done >= 1:
                        os.killpg(proc.pid, signal.SIGINT)
                        interrupted_after = done
                        break
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert interrupted_after is not None, "the driver finished before it could be interrupted"
    assert proc.returncode != 0, out[-2000:]
    units = _units(store, rid)
    assert (units["status"] == "done").sum() < len(units) or interrupted_after == len(units)
    ex = RayExecutor(num_cpus=1)
    assert run_spec(batch, store=store, executor=ex, progress=False) == rid
    assert _rows(tmp / "local-int.sqlite", rid) == _rows(store, rid)
    assert (_units(store, rid)["status"] == "done").all()


def test_cli_bench_connects_to_an_existing_cluster_with_ray_address(cluster, specs):
    """``editlens bench SPEC --executor ray --ray-address ADDR`` from another process joins the running cluster
    (the module's) as a new driver and writes the local executor's rows."""
    tmp, batch, _ = specs
    rid = _local(batch, tmp / "local-cli.sqlite")
    address = ray.get_runtime_context().gcs_address
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "editlens.cli.main", "bench", str(batch), "--executor", "ray",
                        "--ray-address", address, "--store", str(tmp / "cli.sqlite"), "--no-report", "-q"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"run {rid} complete" in p.stdout
    assert _rows(tmp / "local-cli.sqlite", rid) == _rows(tmp / "cli.sqlite", rid)
    assert ray.is_initialized()  # the command did not stop the cluster it joined


def test_ray_options_need_the_ray_executor(specs):
    from click.testing import CliRunner

    from editlens.cli.main import cli

    _, batch, _ = specs
    r = CliRunner().invoke(cli, ["bench", str(batch), "--ray-address", "auto"])
    assert r.exit_code != 0 and "--ray-address and --ray-cpus need --executor ray" in r.output
