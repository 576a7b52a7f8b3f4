"""Streamed evaluation in the runner (``RunOptions.eval_chunk`` / ``[regime] eval_chunk`` / ``--eval-chunk``).

Checked on tiny-llama with a toy weight-editing method (a seeded random delta on one MLP output matrix):

* the rows equal those of the same spec without chunks -- the same (unit, step, n_edits, case, kind, metric) keys,
  no duplicates, the values up to float32 summation order (the evaluator batches a chunk's prompts together, not
  all prompts: 2.5e-7 at most here, and most values bit for bit) -- for a batch spec and a sequential spec, each
  with the unedited ``none`` unit, per-case metrics (``kl``, ``topk``, ``t_acc``), a generation metric
  (``ar_em``) and a whole-set metric (``ppl``);
* a run killed in the middle of a unit (an evaluation of its 2nd chunk raises) leaves that chunk's predecessors'
  rows and the unit not done; resuming deletes them and ends with exactly the rows of an uninterrupted run;
* the run's BaseAnswers holds nothing of a chunked unit, and each evaluation holds one chunk's base answers;
* bad values are SpecErrors naming the key; the Ray executor refuses the option.
"""
from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from editlens.edit.base import Editor, HParams, register_method
from editlens.errors import EditlensError, SpecError
from editlens.runs import runner
from editlens.runs.runner import BaseAnswers, RunOptions, StepResult, execute_unit, run_spec
from editlens.runs.spec import load_spec
from editlens.runs.store import Store


@dataclass
class _StreamToyHParams(HParams):
    scale: float = 0.05
    layer: int = 0


@register_method("toystream")
class _StreamToy(Editor):
    hparams_class = _StreamToyHParams

    def apply(self, lm, cases, hparams, *, evk_align=None, progress=True, sequence=None):
        name = lm.arch.mlp_out_at(hparams.layer)
        W = lm.module(name).weight
        d = torch.randn(W.shape, dtype=W.dtype) * hparams.scale * len(cases)
        return self.weight_edit(lm, cases, hparams, {name: d}, {f"delta_norm/{hparams.layer}": float(d.norm())},
                                sequence=sequence)


METRICS = '["kl", "topk@5", "t_acc", "ar_em", "ppl"]'

BATCH = f"""
    name = "stream-batch"
    model = "tiny-llama"
    metrics = {METRICS}

    [[datasets]]
    path = "synthetic:6"

    [[methods]]
    name = "toystream"

    [[methods]]
    name = "none"

    [regime]
    kind = "batch"
    sizes = [4]
"""

SEQ = f"""
    name = "stream-seq"
    model = "tiny-llama"
    metrics = {METRICS}

    [[datasets]]
    path = "synthetic:6"

    [[methods]]
    name = "toystream"
    hparams = {{ scale = 0.02 }}

    [[methods]]
    name = "none"

    [regime]
    kind = "sequential"
    checkpoints = [2, 4, 6]
    batch_size = 2
    eval_cases = 4
"""


@pytest.fixture(scope="module")
def lm():
    import editlens

    return editlens.load_model("tiny-llama")


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(textwrap.dedent(text).lstrip())
    return p


def keyed(store: Path, rid: str) -> dict[tuple, float]:
    """Rows by (unit, step, n_edits, case, kind, metric); a duplicate key fails."""
    with Store(store, readonly=True) as st:
        df = st.rows(rid)
    keys = [(r.unit, int(r.step), int(r.n_edits), r.case_id, r.probe_kind, r.metric) for r in df.itertuples()]
    dup = [k for k, n in Counter(keys).items() if n > 1]
    assert not dup, dup[:3]
    return dict(zip(keys, df["value"].tolist()))


def assert_same_rows(got: dict, want: dict, atol: float = 1e-6) -> int:
    assert got.keys() == want.keys()
    exact = 0
    for k, v in want.items():
        if got[k] == v or (v != v and got[k] != got[k]):
            exact += 1
        else:
            assert abs(got[k] - v) <= atol * max(1.0, abs(v)), (k, got[k], v)
            assert k[-1] in ("kl", "ppl"), k  # only distributions and log-likelihood sums move, in the last bits
    return exact


@pytest.fixture(scope="module")
def references(lm, tmp_path_factory):
    """Unchunked runs of the batch and the sequential spec."""
    tmp = tmp_path_factory.mktemp("ref")
    out = {}
    for name, text in (("batch", BATCH), ("seq", SEQ)):
        spec = write(tmp, f"{name}.toml", text)
        rid = run_spec(spec, store=tmp / f"{name}.sqlite", lm=lm, progress=False)
        out[name] = (spec, rid, keyed(tmp / f"{name}.sqlite", rid))
    return out


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("kind", ["batch", "seq"])
def test_chunked_rows_equal_unchunked(lm, references, tmp_path, kind, chunk):
    spec, rid, want = references[kind]
    got_rid = run_spec(spec, store=tmp_path / "c.sqlite", lm=lm, progress=False,
                       options=RunOptions(eval_chunk=chunk))
    assert got_rid == rid  # the spec is the same; the option is recorded with the run
    got = keyed(tmp_path / "c.sqlite", rid)
    n_units = len({k[0] for k in want})
    assert n_units == 2 and len(want) > 100
    metrics = {k[-1] for k in want}
    assert {"kl", "topk@5", "t_acc", "ar_em", "ppl"} <= metrics
    if kind == "seq":
        assert {(k[1], k[2]) for k in want} == {(0, 0), (1, 2), (2, 4), (3, 6)}
    exact = assert_same_rows(got, want)
    assert exact > len(want) // 2
    with Store(tmp_path / "c.sqlite", readonly=True) as st:
        assert (st.units(rid)["status"] == "done").all()
        assert st.run_spec(rid)["runner"]["eval_chunk"] == chunk
        diags = st.diagnostics(rid)
        d = diags[diags["key"] == "eval_chunk"]
        assert len(d) and set(d["value"]) == {float(chunk)}
        if kind == "seq":
            toy = [u for u in st.units(rid)["unit"] if u.startswith("toystream")][0]
            assert [c.step for c in st.checkpoints(rid, toy)] == [0, 1, 2]
    # the per-case answers record of the report is not kept by a streamed unit (it would hold every case)
    assert "case_answers" not in set(diags["key"])
    # a different eval_chunk is another run: resuming the store with it is refused
    with pytest.raises(EditlensError, match="different spec"):
        run_spec(spec, store=tmp_path / "c.sqlite", lm=lm, progress=False, options=RunOptions(eval_chunk=chunk + 1))


def test_default_is_unchanged(references):
    """Without eval_chunk nothing new is recorded (runs made before the option resume) and the answers record
    stays."""
    for kind in ("batch", "seq"):
        spec, rid, _ = references[kind]
        assert "eval_chunk" not in RunOptions().to_dict()
        assert "eval_chunk" not in load_spec(spec).to_dict()["regime"]


class _Killed(Exception):
    pass


@pytest.mark.parametrize("kind, victim, kill_at", [("batch", "toystream", 2), ("seq", "toystream", 8),
                                                    ("batch", "none", 2), ("seq", "none", 5)])
def test_killed_in_a_unit_then_resumed_gives_the_uninterrupted_rows(lm, tmp_path, monkeypatch, kind, victim,
                                                                    kill_at):
    text = BATCH if kind == "batch" else SEQ
    spec = write(tmp_path, "s.toml", text)
    opts = RunOptions(eval_chunk=2)
    rid = run_spec(spec, store=tmp_path / "ref.sqlite", lm=lm, progress=False, options=opts)
    want = keyed(tmp_path / "ref.sqlite", rid)
    units = load_spec(spec).plan()
    target = next(u.id for u in units if u.method == victim)

    real = runner._evaluate
    calls = {"n": 0}
    current = {"unit": None}
    real_exec = runner._execute_chunked

    def exec_spy(lm_, unit, *a, **k):
        current["unit"] = unit.id
        return real_exec(lm_, unit, *a, **k)

    def evaluate_spy(*a, **k):  # the kill_at-th chunk evaluation of the victim unit raises
        if current["unit"] == target:
            calls["n"] += 1
            if calls["n"] == kill_at:
                raise _Killed()
        return real(*a, **k)

    monkeypatch.setattr(runner, "_execute_chunked", exec_spy)
    monkeypatch.setattr(runner, "_evaluate", evaluate_spy)
    with pytest.raises(_Killed):
        run_spec(spec, store=tmp_path / "r.sqlite", lm=lm, progress=False, options=opts)
    assert lm.fingerprint == lm.base_fingerprint  # the edit was undone on the way out
    with Store(tmp_path / "r.sqlite", readonly=True) as st:
        assert not st.is_done(rid, target)
        cps = {c.step for c in st.checkpoints(rid, target)}
        partial = st.rows(rid, unit=target)
    left = partial[~partial["step"].isin(cps)]
    assert len(left) > 0  # rows of the chunks before the kill are in the store, at a step not committed
    monkeypatch.setattr(runner, "_evaluate", real)
    run_spec(spec, store=tmp_path / "r.sqlite", lm=lm, progress=False, options=opts)
    got = keyed(tmp_path / "r.sqlite", rid)  # no duplicate keys
    assert got == want  # exactly the rows of the uninterrupted run (same chunks, same batches: bit for bit)


def test_base_answers_hold_nothing_of_a_chunked_unit(lm, tmp_path, monkeypatch):
    import tempfile

    from editlens.data import synthetic_cases
    from editlens.evaluate.core import request_set

    spec = load_spec(write(tmp_path, "b.toml", BATCH))
    unit = next(u for u in spec.plan() if u.method == "toystream")
    cases = synthetic_cases(6)
    seen: list[int] = []
    real = runner._evaluate

    def spy(system, cs, base, metrics, options, fmt):
        seen.append(len(base.answers))  # the frozen base an evaluation holds: its own chunk's answers only
        return real(system, cs, base, metrics, options, fmt)

    monkeypatch.setattr(runner, "_evaluate", spy)
    spill = tmp_path / "tmp"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    out: list[StepResult] = []
    base = BaseAnswers()
    execute_unit(lm, unit, cases, RunOptions(eval_chunk=2), out.append, base_answers=base)
    assert len(base) == 0  # nothing kept for the run
    assert list(spill.iterdir()) == []  # the spilled chunk answers are removed with the unit
    assert [r.chunk for r in out] == [True] * (len(out) - 1) + [False] and out[-1].final and out[-1].streamed
    per_case = [m for m in unit.metrics if m != "ppl"]
    chunk_sizes = [len(request_set(per_case, cases[:4][i:i + 2])) for i in range(0, 4, 2)]
    assert seen[:2] == chunk_sizes and len(seen) == 3  # 2 chunks of per-case metrics, then ppl once
    assert max(seen[:2]) < len(request_set(per_case, cases[:4]))
    # without chunks the run keeps the unit's whole request set
    execute_unit(lm, unit, cases, RunOptions(), [].append, base_answers=base)
    assert len(base) > 0


@pytest.mark.parametrize("value", ["0", "-2", "1.5", '"3"', "true"])
def test_bad_eval_chunk_is_a_spec_error_naming_the_key(tmp_path, value):
    text = BATCH.replace("sizes = [4]", f"sizes = [4]\n    eval_chunk = {value}")
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, "s.toml", text))
    assert e.value.key == "regime.eval_chunk" and e.value.line is not None
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(SpecError, match="eval_chunk"):
            RunOptions(eval_chunk=bad)


def test_spec_key_cli_and_dry_run(tmp_path, lm):
    from click.testing import CliRunner

    from editlens.cli.main import cli

    p = write(tmp_path, "s.toml", SEQ.replace("eval_cases = 4", "eval_cases = 4\n    eval_chunk = 2"))
    s = load_spec(p)
    assert s.regime.eval_chunk == 2 and s.to_dict()["regime"]["eval_chunk"] == 2
    assert RunOptions().for_spec(s).eval_chunk == 2 and RunOptions(eval_chunk=4).for_spec(s).eval_chunk == 4
    r = CliRunner().invoke(cli, ["bench", str(p), "--dry-run"])
    assert r.exit_code == 0 and "streamed in chunks of 2 case(s)" in r.output, r.output
    r = CliRunner().invoke(cli, ["bench", str(p), "--dry-run", "--eval-chunk", "7"])
    assert r.exit_code == 0 and "chunks of 7 case(s)" in r.output
    r = CliRunner().invoke(cli, ["bench", str(p), "--dry-run", "--eval-chunk", "0"])
    assert r.exit_code != 0 and "--eval-chunk" in r.output


def test_ray_executor_refuses_eval_chunk(tmp_path):
    pytest.importorskip("ray")
    from editlens.runs.executors import RayExecutor

    spec = load_spec(write(tmp_path, "s.toml", BATCH))
    ex = RayExecutor()
    with pytest.raises(EditlensError, match="eval_chunk = 3: a streamed evaluation .* local executor"):
        ex.prepare(spec, RunOptions(eval_chunk=3))
    assert not ex._started  # refused before Ray was started
