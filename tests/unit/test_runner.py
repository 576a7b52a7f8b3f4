"""Runner mechanics on tiny-llama with a toy weight-editing method (fast; no real method needed).

The toy method adds a seeded random delta (``torch.randn`` from the global generator, so it also checks that
the runner seeds each unit) to one MLP output matrix through :meth:`Editor.weight_edit`, so edits are real
weight edits with snapshots, fingerprints and undo.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from editlens.edit.base import Editor, HParams, register_method
from editlens.errors import EditlensError, HParamsError, SpecError
from editlens.runs.runner import (BaseAnswers, RunOptions, check_methods, load_unit_cases, load_validated_spec,
                                  run_spec)
from editlens.runs.spec import load_spec
from editlens.runs.store import Store


@dataclass
class ToyHParams(HParams):
    scale: float = 0.05
    layer: int = 0

    def validate(self) -> None:
        if self.scale < 0:
            raise HParamsError(f"hyperparameter 'scale' of method 'toyedit' must be >= 0, got {self.scale}")


class _Crash(Exception):
    pass


@register_method("toyedit")
class ToyEditor(Editor):
    hparams_class = ToyHParams
    calls = 0
    crash_at: int | None = None  # raise at this call number (simulates a killed process mid-unit)

    def apply(self, lm, cases, hparams, *, evk_align=None, progress=True, sequence=None):
        type(self).calls += 1
        if type(self).crash_at is not None and type(self).calls >= type(self).crash_at:
            raise _Crash("simulated crash")
        name = lm.arch.mlp_out_at(hparams.layer)
        W = lm.module(name).weight
        d = torch.randn(W.shape, dtype=W.dtype) * hparams.scale * len(cases)
        return self.weight_edit(lm, cases, hparams, {name: d},
                                {f"delta_norm/{hparams.layer}": float(d.norm()),
                                 f"dk_norm/{hparams.layer}": float(d.norm()) / 10}, sequence=sequence)


@pytest.fixture(autouse=True)
def _reset_toy():
    ToyEditor.calls = 0
    ToyEditor.crash_at = None
    yield
    ToyEditor.crash_at = None


@pytest.fixture(scope="module")
def lm():
    import editlens

    return editlens.load_model("tiny-llama")


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(textwrap.dedent(text).lstrip())
    return p


BATCH = """
    name = "batch"
    model = "tiny-llama"
    metrics = ["kl", "topk@5", "t_acc"]
    seeds = [0, 1]

    [[datasets]]
    path = "synthetic:5"

    [[methods]]
    name = "toyedit"

    [[methods]]
    name = "none"

    [regime]
    kind = "batch"
    sizes = [3]

    [sweep]
    "toyedit.scale" = [0.01, 0.2]
"""

SEQ = """
    name = "seq"
    model = "tiny-llama"
    metrics = ["kl", "t_acc"]

    [[datasets]]
    path = "synthetic:6"

    [[methods]]
    name = "toyedit"
    hparams = { scale = 0.02 }

    [regime]
    kind = "sequential"
    checkpoints = [2, 4, 6]
    batch_size = 2
"""


def sorted_rows(store: Path, run_id: str) -> list[tuple]:
    with Store(store, readonly=True) as st:
        df = st.rows(run_id)
    return sorted(tuple(None if v is None or (isinstance(v, float) and v != v) else v for v in r)
                  for r in df.astype(object).where(df.notna(), None).itertuples(index=False, name=None))


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory, lm):
    tmp = tmp_path_factory.mktemp("batch")
    spec = write(tmp, "b.toml", BATCH)
    fp = lm.fingerprint
    w = lm.module(lm.arch.mlp_out_at(0)).weight.clone()
    ToyEditor.calls = 0
    rid = run_spec(spec, store=tmp / "b.sqlite", lm=lm, progress=False)
    restored = lm.fingerprint == fp and torch.equal(w, lm.module(lm.arch.mlp_out_at(0)).weight)
    return spec, tmp / "b.sqlite", rid, ToyEditor.calls, restored


def test_batch_run_rows_meta_and_weights_restored(batch_run):
    _, store, rid, calls, restored = batch_run
    assert restored and calls == 4
    with Store(store, readonly=True) as st:
        units = st.units(rid)
        df = st.rows_with_meta(rid)
        diags = st.diagnostics(rid)
    assert len(units) == 2 * 2 + 2 and (units["status"] == "done").all()
    toy = df[df["method"] == "toyedit"]
    assert set(toy["step"]) == {1} and set(toy["n_edits"]) == {3}
    assert set(toy["sweep.toyedit.scale"]) == {0.01, 0.2}
    assert {"hparams.scale", "dataset", "seed", "regime", "meta.n_edits"} <= set(df.columns)
    # every edited case is evaluated, once per metric and probe kind
    one = toy[(toy["seed"] == 0) & (toy["sweep.toyedit.scale"] == 0.01)]
    assert one["case_id"].nunique() == 3
    # none = the unedited model: KL exactly 0, top-k overlap exactly 1
    base = df[df["method"] == "none"]
    assert set(base["n_edits"]) == {0}
    assert (base[base["metric"] == "kl"]["value"].abs() < 1e-6).all()
    assert (base[base["metric"] == "topk@5"]["value"] == 1.0).all()
    # a larger delta moves the edited model further from the base
    kl = toy[toy["metric"] == "kl"].groupby("sweep.toyedit.scale")["value"].mean()
    assert kl[0.2] > 10 * kl[0.01] > 0
    # diagnostics: method's, eval time, mean ||Δk_j||
    keys = set(diags["key"])
    assert {"delta_norm/0", "dk_norm/0", "delta_k_mean", "wall_time_s", "eval_time_s"} <= keys


def test_rerun_skips_finished_units_and_is_deterministic(batch_run, lm, tmp_path):
    spec, store, rid, _, _ = batch_run
    ToyEditor.calls = 0
    assert run_spec(spec, store=store, lm=lm, progress=False) == rid
    assert ToyEditor.calls == 0  # nothing re-ran
    # a fresh store with only part of the plan done (seed 1 units removed) ends identical
    import shutil
    import sqlite3

    shutil.copy(store, tmp_path / "c.sqlite")
    con = sqlite3.connect(tmp_path / "c.sqlite")
    units = [u for (u, m) in con.execute("SELECT unit, meta_json FROM units") if '"seed": 1' in m]
    for t in ("rows", "units", "diagnostics"):
        con.executemany(f"DELETE FROM {t} WHERE unit=?", [(u,) for u in units])
    con.commit()
    con.close()
    run_spec(spec, store=tmp_path / "c.sqlite", lm=lm, progress=False)
    assert ToyEditor.calls == 2
    assert sorted_rows(tmp_path / "c.sqlite", rid) == sorted_rows(store, rid)


def test_seed_changes_cases_and_delta(lm):
    from editlens.data import synthetic_cases

    spec = load_validated_spec_text(BATCH)
    units = [u for u in spec.plan() if u.method == "toyedit"]
    cases = synthetic_cases(5, seed=0)
    ids = {u.seed: [c.case_id for c in load_unit_cases(u, cases)] for u in units}
    assert ids[0] == [c.case_id for c in cases[:3]]
    assert ids[1] != ids[0] and len(set(ids[1])) == 3


def load_validated_spec_text(text: str, tmp: Path | None = None):
    import tempfile

    d = Path(tmp or tempfile.mkdtemp())
    return load_validated_spec(write(d, "s.toml", text))


def test_sequential_checkpoints_and_fixed_sample(tmp_path, lm):
    spec = write(tmp_path, "s.toml", SEQ)
    rid = run_spec(spec, store=tmp_path / "s.sqlite", lm=lm, progress=False)
    assert ToyEditor.calls == 3  # 6 cases, batch_size 2
    assert lm.fingerprint == lm.base_fingerprint
    with Store(tmp_path / "s.sqlite", readonly=True) as st:
        df = st.rows(rid)
        (unit,) = st.units(rid)["unit"]
        cps = st.checkpoints(rid, unit)
        meta = st.unit_meta(rid, unit)
    assert sorted(set(zip(df["step"], df["n_edits"]))) == [(0, 0), (1, 2), (2, 4), (3, 6)]
    # fixed evaluation sample: the first K = 2 cases (the first checkpoint) at every step
    for s in (0, 1, 2, 3):
        assert sorted(df[df["step"] == s]["case_id"].unique()) == ["syn-0000", "syn-0001"] or \
            df[df["step"] == s]["case_id"].nunique() == 2
    assert meta["eval_cases"] == 2 and meta["regime"] == "sequential"
    assert [c.step for c in cps] == [0, 1, 2]  # the final step is committed with the unit
    kl = df[(df["metric"] == "kl") & (df["probe_kind"] == "neighborhood")].groupby("n_edits")["value"].mean()
    assert kl[0] == pytest.approx(0, abs=1e-6) and kl[2] < kl[4] < kl[6]  # more edits, more drift


def test_sequential_resume_after_crash_gives_identical_rows(tmp_path, lm):
    spec = write(tmp_path, "s.toml", SEQ)
    ref = run_spec(spec, store=tmp_path / "ref.sqlite", lm=lm, progress=False)
    ToyEditor.calls = 0
    ToyEditor.crash_at = 3  # the third batch (after checkpoints 0, 2 and 4 edits are committed)
    with pytest.raises(_Crash):
        run_spec(spec, store=tmp_path / "r.sqlite", lm=lm, progress=False)
    assert lm.fingerprint == lm.base_fingerprint  # edit_sequential restored the weights
    with Store(tmp_path / "r.sqlite", readonly=True) as st:
        (unit,) = st.units(ref)["unit"]
        assert not st.is_done(ref, unit)
        assert st.last_checkpoint(ref, unit).n_edits == 4
    ToyEditor.crash_at = None
    # the unit's state was saved at its last committed checkpoint (4 edits), beside the store
    from editlens.runs.runner import unit_state_dir

    saved = unit_state_dir(tmp_path / "r.sqlite", ref) / f"{unit}.pt"
    assert saved.is_file()
    ToyEditor.calls = 0
    run_spec(spec, store=tmp_path / "r.sqlite", lm=lm, progress=False)
    assert ToyEditor.calls == 1  # resumed at 4 edits: only the last batch is edited again
    assert sorted_rows(tmp_path / "r.sqlite", ref) == sorted_rows(tmp_path / "ref.sqlite", ref)
    assert not saved.exists() and not saved.parent.parent.exists()  # removed with the finished unit


@pytest.mark.parametrize("damage", ["garbage", "stale step", "other unit"])
def test_sequential_resume_with_an_unusable_state_file_reapplies_the_edits(tmp_path, lm, damage, capsys):
    """A state file that cannot be read, holds another step than the last committed one, or belongs to another
    unit is reported and ignored: the edits are re-applied and the rows are those of an uninterrupted run."""
    from editlens.edit.base import load_sequence
    from editlens.runs.runner import unit_state_dir

    spec = write(tmp_path, "s.toml", SEQ)
    ref = run_spec(spec, store=tmp_path / "ref.sqlite", lm=lm, progress=False)
    ToyEditor.calls = 0
    ToyEditor.crash_at = 3
    with pytest.raises(_Crash):
        run_spec(spec, store=tmp_path / "r.sqlite", lm=lm, progress=False)
    ToyEditor.crash_at = None
    with Store(tmp_path / "r.sqlite", readonly=True) as st:
        (unit,) = st.units(ref)["unit"]
    path = unit_state_dir(tmp_path / "r.sqlite", ref) / f"{unit}.pt"
    if damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:
        got = load_sequence(path)
        got["extra"] = {"unit": unit, "step": 1} if damage == "stale step" else {"unit": "other-unit", "step": 2}
        torch.save(got, path)
    ToyEditor.calls = 0
    run_spec(spec, store=tmp_path / "r.sqlite", lm=lm, progress=True)
    assert ToyEditor.calls == 3  # edits re-applied from the start
    assert "not resuming from" in capsys.readouterr().err
    assert sorted_rows(tmp_path / "r.sqlite", ref) == sorted_rows(tmp_path / "ref.sqlite", ref)
    assert not path.exists()


def test_eval_cases_option_and_changed_options_refused(tmp_path, lm):
    spec = write(tmp_path, "s.toml", SEQ)
    rid = run_spec(spec, store=tmp_path / "s.sqlite", lm=lm, progress=False, options=RunOptions(eval_cases=4))
    with Store(tmp_path / "s.sqlite", readonly=True) as st:
        df = st.rows(rid)
    assert df[df["step"] == 3]["case_id"].nunique() == 4
    with pytest.raises(EditlensError, match="different spec"):
        run_spec(spec, store=tmp_path / "s.sqlite", lm=lm, progress=False, options=RunOptions(eval_cases=2))


def test_eval_cases_from_the_spec_and_the_command_line_overrides_it(tmp_path, lm):
    from editlens.runs.spec import load_spec

    spec = write(tmp_path, "s.toml", SEQ.replace("batch_size = 2", "batch_size = 2\n    eval_cases = 4"))
    assert load_spec(spec).regime.eval_cases == 4
    rid = run_spec(spec, store=tmp_path / "s.sqlite", lm=lm, progress=False)
    with Store(tmp_path / "s.sqlite", readonly=True) as st:
        df = st.rows(rid)
    assert df[df["step"] == 3]["case_id"].nunique() == 4  # not 2, the first checkpoint
    # an explicit option (editlens bench --eval-cases) wins over the spec's value
    assert RunOptions(eval_cases=3).for_spec(load_spec(spec)).eval_cases == 3
    assert RunOptions().for_spec(load_spec(spec)).eval_cases == 4
    # a spec without the key keeps its fingerprint (default run ids of existing specs do not change)
    plain = load_spec(write(tmp_path, "p.toml", SEQ))
    assert "eval_cases" not in plain.to_dict()["regime"]


def test_frozen_base_answers_do_not_follow_edits(lm):
    from editlens.edit import edit
    from editlens.evaluate.core import NextToken, freeze_base
    from editlens.system import ModelSystem

    fb = freeze_base(ModelSystem(lm), [NextToken("The capital of France is")])
    before = fb.next_token_logprobs(["The capital of France is"]).clone()
    e = edit(lm, [_case()], "toyedit", scale=0.5)
    try:
        assert torch.equal(fb.next_token_logprobs(["The capital of France is"]), before)
        live = ModelSystem(lm).next_token_logprobs(["The capital of France is"])
        assert not torch.allclose(live, before)
        with pytest.raises(EditlensError, match="no precomputed answer"):
            fb.next_token_logprobs(["another prompt"])
        with pytest.raises(EditlensError, match="unedited"):  # the runner freezes the unedited model only
            BaseAnswers().get(lm, [_case()], ["kl"], with_edited=False)
    finally:
        e.undo()


def test_run_base_answers_use_the_evaluators_key_and_batches(lm):
    """The runner's base answers are the evaluator's: frozen under the one cache_key, computed once per request
    set, equal bit for bit to what evaluate() computes for the base."""
    from editlens.evaluate.core import BASE, cache_key, evaluate, request_set
    from editlens.system import ModelSystem

    cases = [_case()]
    ba = BaseAnswers()
    fb = ba.get(lm, cases, ["kl"], with_edited=False)
    assert ba.get(lm, cases, ["kl"], with_edited=False).answers is fb.answers and len(ba) == 1
    reqs = request_set(["kl"], cases, (BASE,))
    live = ModelSystem(lm)
    assert ba._cache.get(cache_key(live.fingerprint, "raw", reqs)) is fb.answers
    res = evaluate(live, cases, base=fb, metrics=["kl"], cache=False, progress=False)
    assert {r.value for r in res.rows} == {0.0}  # the live unedited model against its frozen answers: KL exactly 0
    # kl asks the same prompts of both roles: with the evaluated role's requests the set (and the answers) is the same
    assert ba.get(lm, cases, ["kl"], with_edited=True).answers is fb.answers and len(ba) == 1
    more = ba.get(lm, cases, ["kl", "s_acc"], with_edited=True)  # s_acc asks only the evaluated role
    assert len(ba) == 2 and set(fb.answers) < set(more.answers)


def _case():
    from editlens.data import synthetic_cases

    return synthetic_cases(1, seed=3)[0]


# ------------------------------------------------------------------------------------------ spec validation
def _err(tmp_path: Path, text: str) -> SpecError:
    p = write(tmp_path, "bad.toml", text)
    with pytest.raises(SpecError) as ei:
        load_validated_spec(p)
    return ei.value


def test_unknown_method_names_key_and_line(tmp_path):
    e = _err(tmp_path, SEQ.replace('name = "toyedit"', 'name = "toyedt"'))
    assert "bad.toml:9: methods[0].name" in str(e) and "toyedt" in str(e) and "registered methods" in str(e)


def test_unknown_hparam_names_key_and_line(tmp_path):
    e = _err(tmp_path, SEQ.replace("scale = 0.02", "scale = 0.02, sclae = 1"))
    assert "bad.toml:10: methods[0].hparams.sclae" in str(e) and "unknown hyperparameter 'sclae'" in str(e)
    e = _err(tmp_path, BATCH.replace('"toyedit.scale"', '"toyedit.scael"'))
    assert 'bad.toml:20: sweep."toyedit.scael"' in str(e)


def test_bad_values_name_key_and_line(tmp_path):
    e = _err(tmp_path, BATCH.replace("[0.01, 0.2]", "[0.01, -1.0]"))
    assert 'bad.toml:20: sweep."toyedit.scale"' in str(e) and "must be >= 0" in str(e)
    e = _err(tmp_path, SEQ.replace("scale = 0.02", 'scale = "big"'))
    assert "bad.toml:10: methods[0].hparams.scale" in str(e) and "'big'" in str(e)
    e = _err(tmp_path, BATCH.replace("[0.01, 0.2]", "[0.01, true]"))  # caught by the spec loader itself
    assert 'sweep."toyedit.scale"[1]' in str(e)


def test_missing_dataset_and_unknown_metric(tmp_path):
    e = _err(tmp_path, BATCH.replace('"synthetic:5"', '"nope.json"'))
    assert "bad.toml:7: datasets[0].path" in str(e) and "not found" in str(e)
    e = _err(tmp_path, BATCH.replace('"t_acc"', '"t_acc", "klx"'))
    assert "bad.toml:3: metrics[3]" in str(e) and "unknown metric 'klx'" in str(e)


def test_none_method_takes_no_hparams(tmp_path):
    e = _err(tmp_path, SEQ.replace('name = "toyedit"', 'name = "none"'))
    assert "methods[0]" in str(e) and "edits nothing" in str(e)


def test_model_dependent_check(tmp_path, lm):
    spec = load_spec(write(tmp_path, "s.toml", SEQ.replace("scale = 0.02", "scale = 0.02, layer = 1")))
    check_methods(spec, lm)  # fine without and with the model


def test_unknown_executor(tmp_path, lm):
    with pytest.raises(EditlensError, match="unknown executor"):
        run_spec(write(tmp_path, "s.toml", SEQ), store=tmp_path / "x.sqlite", executor="dask", progress=False)


# ------------------------------------------------------------------------------------------ Ray executor
# The Ray executor against a real local cluster: tests/unit/test_ray_executor.py


def test_ray_missing_gives_install_hint(monkeypatch):
    import builtins

    from editlens.runs import executors

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "ray":
            raise ImportError("no ray")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(EditlensError, match=r"pip install editlens\[ray\]"):
        executors.get_executor("ray")


# ------------------------------------------------------------------ reusing the units of an earlier run
GROWN = BATCH.replace('''    [[methods]]
    name = "none"
''', '''    [[methods]]
    name = "none"

    [[methods]]
    name = "toyedit"
    label = "toy_big"
    hparams = { scale = 0.5 }
''')


def test_a_grown_spec_reuses_the_finished_units_and_equals_a_fresh_run(batch_run, lm, tmp_path):
    """The spec gains a method: a new run id, whose old units are copied (not recomputed) with
    ``reuse_units=True``; only the new method's units run, and every row equals a run of the grown spec from
    scratch (so the copied rows are what the computation gives)."""
    import shutil

    from editlens.runs.store import REUSED_KEY

    spec, store, rid, _, _ = batch_run
    shutil.copy(store, tmp_path / "s.sqlite")
    grown = write(tmp_path, "g.toml", GROWN)
    ToyEditor.calls = 0
    rid2 = run_spec(grown, store=tmp_path / "s.sqlite", lm=lm, progress=False, reuse_units=True)
    assert rid2 != rid
    assert ToyEditor.calls == 2  # toy_big on seeds 0 and 1; the 4 toyedit and 2 none units were copied
    with Store(tmp_path / "s.sqlite", readonly=True) as st:
        old_units, new_units = st.units(rid), st.units(rid2)
        reused = st.diagnostics(rid2, key=REUSED_KEY)
        assert set(st.finished_units(rid)) < set(st.finished_units(rid2))
    assert sorted(reused["unit"]) == sorted(old_units["unit"]) and set(reused["value"]) == {rid}
    assert reused["step"].isna().all()
    assert len(new_units) == len(old_units) + 2 and (new_units["status"] == "done").all()
    # the copied rows are the first run's, and a fresh run of the grown spec computes the same rows
    copied = [r for r in sorted_rows(tmp_path / "s.sqlite", rid2) if not r[1].startswith("toy_big")]
    assert [r[1:] for r in copied] == [r[1:] for r in sorted_rows(store, rid)]
    ToyEditor.calls = 0
    assert run_spec(grown, store=tmp_path / "fresh.sqlite", lm=lm, progress=False) == rid2
    assert ToyEditor.calls == 6
    assert sorted_rows(tmp_path / "fresh.sqlite", rid2) == sorted_rows(tmp_path / "s.sqlite", rid2)
    from editlens.report import build_report

    build_report(tmp_path / "s.sqlite", run_id=rid2).to_html()  # the provenance rows do not upset the report
    # a second call finds everything done and copies nothing again
    ToyEditor.calls = 0
    run_spec(grown, store=tmp_path / "s.sqlite", lm=lm, progress=False, reuse_units=True)
    with Store(tmp_path / "s.sqlite", readonly=True) as st:
        assert ToyEditor.calls == 0 and len(st.diagnostics(rid2, key=REUSED_KEY)) == len(old_units)


@pytest.mark.parametrize("change", [None, "versions", "fingerprint", "runner", "dataset", "meta"])
def test_units_of_a_run_that_differs_are_not_reused(batch_run, tmp_path, change):
    """Other versions (e.g. torch thread count), another model, other runner options, another dataset file or
    other unit metadata: nothing is copied (``None``: the unchanged run, everything is)."""
    import json
    import shutil
    import sqlite3

    from editlens.runs.runner import unit_meta

    spec, store, rid, _, _ = batch_run
    shutil.copy(store, tmp_path / "s.sqlite")
    grown = load_spec(write(tmp_path, "g.toml", GROWN))
    rid2 = grown.default_run_id()
    metas = {u.id: unit_meta(u, grown, RunOptions().for_spec(grown)) for u in grown.plan()}
    con = sqlite3.connect(tmp_path / "s.sqlite")
    # the new run: the grown spec, recorded like the first run (same versions, model and runner options)
    sj, vj, fp = con.execute("SELECT spec_json, versions_json, model_fingerprint FROM runs WHERE run_id=?",
                             (rid,)).fetchone()
    sj, vj = json.loads(sj), json.loads(vj)
    con.execute("INSERT INTO runs VALUES(?,?,?,?,?,?)",
                (rid2, json.dumps({**grown.to_dict(), "runner": sj["runner"]}), json.dumps(vj), fp, "[0, 1]", 0.0))
    if change == "versions":
        vj["torch_threads"] = vj["torch_threads"] + 1
    elif change == "fingerprint":
        con.execute("UPDATE runs SET model_fingerprint='another-model' WHERE run_id=?", (rid,))
    elif change == "runner":
        sj["runner"]["batch_tokens"] = sj["runner"]["batch_tokens"] + 1
    elif change == "dataset":
        sj["datasets"][0]["path"] = "/elsewhere/synthetic"
    elif change == "meta":
        con.execute("UPDATE units SET meta_json=replace(meta_json, '\"seed\": 1', '\"seed\": 7') WHERE run_id=?",
                    (rid,))
    con.execute("UPDATE runs SET spec_json=?, versions_json=? WHERE run_id=?", (json.dumps(sj), json.dumps(vj), rid))
    con.commit()
    con.close()
    with Store(tmp_path / "s.sqlite") as st:
        old = st.units(rid)
        got = st.reuse_units(rid2, metas)
    expect = {"meta": set(old[old["meta"].map(lambda m: m["seed"] == 0)]["unit"]), None: set(old["unit"])}
    assert set(got) == expect.get(change, set()) and set(got.values()) <= {rid}
    assert change != "meta" or 0 < len(got) < len(old)


def test_reuse_replaces_a_partial_attempt(batch_run, lm, tmp_path):
    import shutil

    from editlens.runs.spec import load_spec as _load
    from editlens.runs.runner import unit_meta

    spec, store, rid, _, _ = batch_run
    shutil.copy(store, tmp_path / "s.sqlite")
    grown = _load(write(tmp_path, "g.toml", GROWN))
    rid2 = grown.default_run_id()
    unit = next(u for u in grown.plan() if u.label == "toyedit")
    with Store(tmp_path / "s.sqlite") as st:
        st.start_run(rid2, grown.to_dict())  # another run id's record, to hold a partial attempt
        st.append_rows(rid2, unit.id, [(1, 3, "x", "rewrite", "kl", 99.0)])
        meta = unit_meta(unit, grown, RunOptions().for_spec(grown))
        assert st.reuse_units(rid2, {unit.id: meta}) == {}  # versions and runner options differ from the run's
        st._conn().execute("UPDATE runs SET spec_json=(SELECT spec_json FROM runs WHERE run_id=?), "
                           "versions_json=(SELECT versions_json FROM runs WHERE run_id=?), "
                           "model_fingerprint=(SELECT model_fingerprint FROM runs WHERE run_id=?) WHERE run_id=?",
                           (rid, rid, rid, rid2))
        st._conn().commit()
        assert st.reuse_units(rid2, {unit.id: meta}) == {unit.id: rid}
        assert 99.0 not in set(st.rows(rid2, unit.id)["value"])
        assert sorted(map(tuple, st.rows(rid2, unit.id).drop(columns="run_id").astype(str).values)) == \
            sorted(map(tuple, st.rows(rid, unit.id).drop(columns="run_id").astype(str).values))
