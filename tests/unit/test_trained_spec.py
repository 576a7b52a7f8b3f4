"""Trained methods in specs: ``trained = "DIR"`` and ``[methods.train]`` (trained once, cached, not retrained on
resume), and the checks of both (toy trainable method of test_trained_joint on tiny-llama)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import editlens
from editlens.edit import base as edit_base
from editlens.edit.base import register_method
from editlens.errors import SpecError
from editlens.runs import editors as run_editors
from editlens.runs.runner import load_validated_spec, run_spec
from editlens.runs.store import Store
from tests.unit.test_trained_joint import _ToyTrained


class _Counting(_ToyTrained):
    fits = 0

    def fit(self, lm, cases, val_cases, hp, *, progress, seed):
        type(self).fits += 1
        return super().fit(lm, cases, val_cases, hp, progress=progress, seed=seed)


@pytest.fixture()
def toy(monkeypatch, tmp_path):
    register_method("_toy_spec_trained")(_Counting)
    _Counting.fits = 0
    monkeypatch.setenv("EDITLENS_EDITORS_DIR", str(tmp_path / "editors"))
    run_editors._MEMO.clear()
    yield "_toy_spec_trained"
    edit_base._METHODS.pop("_toy_spec_trained", None)
    run_editors._MEMO.clear()


@pytest.fixture(scope="module")
def lm():
    return editlens.load_model("tiny-llama")


def _spec(tmp: Path, method_table: str, name: str = "s.toml") -> Path:
    text = textwrap.dedent("""
        name = "trained"
        model = "tiny-llama"
        metrics = ["kl", "t_acc"]

        [[datasets]]
        path = "synthetic:3"

        [regime]
        kind = "batch"
        sizes = [2]

    """).lstrip() + textwrap.dedent(method_table).lstrip()
    p = tmp / name
    p.write_text(text)
    return p


TRAIN = """
    [[methods]]
    name = "_toy_spec_trained"
    [methods.train]
    synthetic = 4
    hparams = { steps = 2 }
"""


def test_train_table_trains_once_and_a_rerun_uses_the_cache(toy, lm, tmp_path):
    spec = _spec(tmp_path, TRAIN)
    rid = run_spec(spec, store=tmp_path / "a.sqlite", lm=lm, progress=False)
    assert _Counting.fits == 1
    cached = list((tmp_path / "editors").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("_toy_spec_trained-")
    with Store(tmp_path / "a.sqlite", readonly=True) as st:
        assert len(st.rows(rid)) > 0
    # a new process would start with an empty memo: the editor comes from the disk cache, not from training
    run_editors._MEMO.clear()
    run_spec(spec, store=tmp_path / "b.sqlite", lm=lm, progress=False)
    assert _Counting.fits == 1
    # other training settings -> another editor (and another unit id)
    spec2 = _spec(tmp_path, TRAIN.replace("steps = 2", "steps = 3"), "s2.toml")
    u1 = load_validated_spec(spec).plan()[0]
    u2 = load_validated_spec(spec2).plan()[0]
    assert u1.id != u2.id and u1.meta()["trained"]["train"]["hparams"] == {"steps": 2}
    run_spec(spec2, store=tmp_path / "c.sqlite", lm=lm, progress=False)
    assert _Counting.fits == 2 and len(list((tmp_path / "editors").iterdir())) == 2


def test_trained_dir_in_a_spec(toy, lm, tmp_path):
    te = editlens.train(toy, lm, editlens.synthetic_cases(3), progress=False)
    te.save(tmp_path / "ed")
    spec = _spec(tmp_path, f"""
        [[methods]]
        name = "{toy}"
        trained = "ed"
    """)
    units = load_validated_spec(spec).plan()
    assert units[0].trained["source"] == "ed"
    assert units[0].meta()["trained"]["sha256"]  # the editor's content identifies the unit
    rid = run_spec(spec, store=tmp_path / "d.sqlite", lm=lm, progress=False)
    with Store(tmp_path / "d.sqlite", readonly=True) as st:
        assert len(st.rows(rid)) > 0


@pytest.mark.parametrize("table, key, message", [
    (f"""
        [[methods]]
        name = "_toy_spec_trained"
     """, "methods[0]", "edits with a trained editor: give trained"),
    ("""
        [[methods]]
        name = "_toy_spec_trained"
        trained = "nowhere"
     """, "methods[0].trained", "trained editor 'nowhere' not found"),
    ("""
        [[methods]]
        name = "_toy_spec_trained"
        trained = "x"
        [methods.train]
        synthetic = 3
     """, "methods[0].train", "not both"),
    ("""
        [[methods]]
        name = "_toy_spec_trained"
        [methods.train]
        synthetic = 3
        epochs = 4
     """, "methods[0].train.epochs", "unknown key"),
    ("""
        [[methods]]
        name = "_toy_spec_trained"
        [methods.train]
        hparams = { steps = 2 }
     """, "methods[0].train", 'data = "FILE" or synthetic = N'),
    ("""
        [[methods]]
        name = "_toy_spec_trained"
        [methods.train]
        data = "missing.json"
     """, "methods[0].train.data", "training data 'missing.json' not found"),
    ("""
        [[methods]]
        name = "_toy_spec_trained"
        [methods.train]
        synthetic = 3
        hparams = { stepz = 2 }
     """, "methods[0].train.hparams.stepz", "unknown training hyperparameter 'stepz'"),
    ("""
        [[methods]]
        name = "_toy_spec_trained"
        [methods.train]
        synthetic = 3
        hparams = { lr = -1.0 }
     """, "methods[0].train.hparams.lr", "lr"),
    ("""
        [[methods]]
        name = "rome"
        [methods.train]
        synthetic = 3
     """, "methods[0].train", "not a trained method"),
])
def test_spec_errors_name_the_key(toy, tmp_path, table, key, message):
    spec = _spec(tmp_path, table)
    with pytest.raises(SpecError) as err:
        load_validated_spec(spec)
    assert key in str(err.value) and message in str(err.value), str(err.value)


def test_an_editor_of_another_method_is_refused_at_validation(toy, lm, tmp_path):
    from editlens.edit.trained import TrainedEditor

    TrainedEditor("mend", {}, lm.base_fingerprint, lm.name, {"x": __import__("torch").zeros(1)}, {}).save(
        tmp_path / "ed")
    spec = _spec(tmp_path, f"""
        [[methods]]
        name = "{toy}"
        trained = "ed"
    """)
    with pytest.raises(SpecError, match=r"methods\[0\]\.trained.*trained for method 'mend'"):
        load_validated_spec(spec)
