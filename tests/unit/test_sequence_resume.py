"""A sequential run saved at a checkpoint (``save_sequence``) and resumed from the file (``edit_sequential(...,
resume=load_sequence(path))``) ends bit for bit where the uninterrupted run ends, for every shipped method that
edits weights; methods that keep their edits outside the weights (memories, side modules) are not saved, and
the resumed run refuses another method, other cases, another seed, other hyperparameters or an edited model."""
from __future__ import annotations

import pytest
import torch

import editlens
from editlens.data.schema import Rewrite, make_case
from editlens.edit import edit, edit_sequential, get_method, load_sequence, save_sequence
from editlens.errors import MethodError
from tests.conftest import shipped_methods, trained_for


@pytest.fixture(autouse=True)
def _stats_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDITLENS_STATS_DIR", str(tmp_path_factory.getbasetemp() / "stats"))


@pytest.fixture(scope="module")
def lm():
    return editlens.load_model("tiny-gpt2")


def _cases(n=4):
    subjects = ["Alice Smith", "Bob Jones", "Carol White", "Dan Brown", "Eve Black"]
    return [make_case(str(i), Rewrite("{} lives in the city of", subjects[i], "Paris")) for i in range(n)]


#: the shipped methods that keep their edits outside the weights: their runs are not saved (the runner replays them)
OUTSIDE_WEIGHTS = {"grace", "wise", "melo", "serac", "ike", "scr"}


def _weights(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


@pytest.mark.parametrize("method", shipped_methods())
def test_resumed_run_ends_where_the_uninterrupted_run_ends(lm, tmp_path, method):
    before = _weights(lm)
    kw = trained_for(method, lm)
    path = tmp_path / "run.pt"
    saved, called = [], []

    class _NotSaved(Exception):
        pass

    def save_at_1(step, n, so_far):
        if n == 1:
            saved.append(save_sequence(so_far, path, unit="u1"))
            if not saved[-1]:  # a memory / side-module method: nothing written (the runner replays its edits)
                assert so_far.state.on_undo is not None or not get_method(method).edits_weights
                raise _NotSaved

    torch.manual_seed(0)
    try:
        run = edit_sequential(lm, _cases(2), method, batch_size=1, checkpoints=[1, 2], callback=save_at_1, **kw)
    except _NotSaved:
        assert method in OUTSIDE_WEIGHTS and not path.exists()
        assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())  # the run was undone
        return
    full = _weights(lm)
    run.undo()
    assert saved == [True] and method not in OUTSIDE_WEIGHTS and lm.fingerprint == lm.base_fingerprint
    got = load_sequence(path)
    assert (got["n_edits"], got["step"], got["method"], got["extra"]) == (1, 1, method, {"unit": "u1"})
    torch.manual_seed(123)  # the saved random state, not this one, drives the rest of the run
    resumed = edit_sequential(lm, _cases(2), method, batch_size=1, checkpoints=[1, 2], resume=got,
                              callback=lambda step, n, so_far: called.append(n), **kw)
    assert called == [2]  # checkpoint 1 is behind the resumed point
    after = _weights(lm)
    changed = [k for k in full if not torch.equal(full[k], before[k])]
    assert changed, "the method changed no weight"
    bad = [k for k in full if not torch.equal(after[k], full[k])]
    assert not bad, f"{method}: resumed weights differ from the uninterrupted run's: {bad[:3]}"
    assert resumed.diagnostics["n_edits"] == 2
    resumed.undo()
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    assert lm.fingerprint == lm.base_fingerprint


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_resume_refuses_another_run_and_leaves_the_model_alone(lm, tmp_path):
    path = tmp_path / "run.pt"
    before = _weights(lm)
    run = edit_sequential(lm, _cases(2), "memit", batch_size=1, checkpoints=[2],
                          callback=lambda s, n, so_far: save_sequence(so_far, path))
    run.undo()
    got = load_sequence(path)
    bad = [(dict(method="rome"), "method 'memit', not 'rome'"),
           (dict(cases=_cases(5)[1:]), "other cases"),
           (dict(seed=1), "seed 0, not 1"),
           (dict(v_num_grad_steps=3), "hyperparameters differ"),
           (dict(batch_size=2), "not a point of a run")]
    for change, msg in bad:
        kw = dict(method="memit", cases=_cases(2), seed=0, batch_size=1) | change
        with pytest.raises(MethodError, match=msg):
            edit_sequential(lm, kw.pop("cases"), kw.pop("method"), resume=got, **kw)
        assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    e = edit(lm, _cases(1), "rome")
    try:
        with pytest.raises(MethodError, match="the model is edited"):
            edit_sequential(lm, _cases(2), "memit", resume=got)
    finally:
        e.undo()
    # damaged or foreign files are refused by name; a pickle that would run code is never executed
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MethodError, match="junk.pt: unreadable"):
        load_sequence(tmp_path / "junk.pt")
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"format": "editlens sequence checkpoint v1", "x": Boom()}))
    with pytest.raises(MethodError, match="evil.pt: unreadable"):
        load_sequence(tmp_path / "evil.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(MethodError, match="not an editlens sequence checkpoint"):
        load_sequence(tmp_path / "other.pt")
