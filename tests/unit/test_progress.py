"""Progress with the time left (issue 18 part 4): editlens.progress modes, and the commands that use it —
``--quiet`` prints no progress; output that is not a terminal gets plain lines, never a carriage return."""
from __future__ import annotations

import io
import re
import textwrap
import time

import pytest
from click.testing import CliRunner

from editlens import progress as P
from editlens.cli.basic import sample_data_path
from editlens.cli.main import cli

# what progress looks like: tqdm's figures "[elapsed<remaining, rate]" (or the trace's "~.. left")
PROGRESS_LINE = re.compile(r"\[\d\d:\d\d<\d\d:\d\d, |~\d\d:\d\d left")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_mode_plain_lines_with_time_left():
    s = io.StringIO()
    with P.settings("lines", interval=0, stream=s):
        with P.bar(total=4, desc="second moments", unit="batch") as b:
            for _ in range(4):
                time.sleep(0.01)
                b.update(1)
    lines = s.getvalue().splitlines()
    assert "\r" not in s.getvalue()
    assert len(lines) == 5 and lines[-1].endswith(" done")
    assert re.fullmatch(r"second moments: 2/4 batch \[00:00<00:00, [\d.]+batch/s\]", lines[1]), lines[1]


def test_lines_mode_is_periodic_and_short_loops_print_nothing():
    s = io.StringIO()
    with P.settings("lines", interval=3600, stream=s):
        for _ in P.track(range(50), desc="values L4", unit="step"):
            pass
    assert s.getvalue() == ""


def test_quiet_silences_everything_and_bar_mode_redraws():
    s = io.StringIO()
    with P.settings("lines", interval=0, stream=s), P.settings(quiet=True):
        assert not P.enabled()
        for _ in P.track(range(3), desc="x"):
            pass
        P.echo("hello")
    assert s.getvalue() == ""
    # contrast (so that the tests' "no \r" is not vacuous): on a terminal tqdm redraws in place
    t = _Tty()
    with P.settings("auto", stream=t):
        assert P.current_mode() == "bar"
        with P.bar(total=3, desc="evaluate", unit="call", mininterval=0) as b:
            b.update(3)
    assert "\r" in t.getvalue() and "evaluate" in t.getvalue()
    with P.settings("auto", stream=io.StringIO()):
        assert P.current_mode() == "lines"
    with pytest.raises(ValueError, match="progress mode"):
        P.configure("loud")


def test_eta_by_hand():
    t0 = time.monotonic() - 30
    assert P.eta(3, 9, t0) in ("elapsed 00:30, ~01:00 left", "elapsed 00:31, ~01:02 left")
    assert P.eta(0, 9, t0).startswith("elapsed 00:3")


def _cli(args, monkeypatch):
    monkeypatch.setenv("EDITLENS_PROGRESS_INTERVAL", "0")   # a line per update: the run is short
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output + r.stderr
    return r


def test_cli_edit_progress_lines_and_quiet(monkeypatch):
    args = ["edit", "--model", "tiny-llama", "--data", str(sample_data_path()), "--limit", "1", "--method", "rome",
            "--metrics", "kl", "--set", "v_num_grad_steps=3"]
    r = _cli(args, monkeypatch)
    assert "\r" not in r.stderr and "\r" not in r.stdout
    shown = [ln for ln in r.stderr.splitlines() if PROGRESS_LINE.search(ln)]
    assert any(ln.startswith("values L") for ln in shown), r.stderr      # value optimisation steps
    assert any(ln.startswith("evaluate: ") for ln in shown), r.stderr    # evaluation calls
    q = _cli(args + ["--quiet"], monkeypatch)
    assert not PROGRESS_LINE.search(q.stderr) and "values L" not in q.stderr and "evaluate:" not in q.stderr
    assert "rewrite" in q.stdout                                        # results still printed
    assert P._state["mode"] != "off"                                     # the command restored the mode it found


def test_cli_eval_and_trace_quiet(monkeypatch, tmp_path):
    data = str(sample_data_path())
    r = _cli(["eval", "--model", "tiny-llama", "--data", data, "--limit", "2", "--metrics", "kl"], monkeypatch)
    assert "\r" not in r.stderr and any(ln.startswith("evaluate: ") for ln in r.stderr.splitlines())
    q = _cli(["eval", "--model", "tiny-llama", "--data", data, "--limit", "2", "--metrics", "kl", "-q"], monkeypatch)
    assert not PROGRESS_LINE.search(q.stderr)
    targs = ["trace", "--model", "tiny-llama", "--data", data, "--limit", "2", "--samples", "2", "--out",
             str(tmp_path / "t")]
    r = _cli(targs, monkeypatch)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("[")]
    assert len(lines) == 2 and all(PROGRESS_LINE.search(ln) for ln in lines) and "\r" not in r.stderr
    q = _cli(targs + ["--quiet"], monkeypatch)
    assert not PROGRESS_LINE.search(q.stderr) and "[1/2]" not in q.stderr


def test_cli_bench_quiet_and_plain(monkeypatch, tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(textwrap.dedent("""
        name = "p"
        model = "tiny-llama"
        metrics = ["kl"]
        [[datasets]]
        path = "synthetic:2"
        [[methods]]
        name = "rome"
        hparams = { v_num_grad_steps = 2 }
        [regime]
        kind = "batch"
        sizes = [1]
    """))
    r = _cli(["bench", str(spec), "--no-report"], monkeypatch)
    assert "\r" not in r.stderr and "[1/1]" in r.stderr
    q = _cli(["bench", str(spec), "--no-report", "--quiet", "--store", str(tmp_path / "q.sqlite")], monkeypatch)
    assert q.stderr.strip() == "" and "complete" in q.stdout
