"""The trained-editor joint (editlens.edit.trained): train() checks, TrainedEditor save/load, trained= in edit().

A throw-away trainable method ``_toy_trained`` learns, by a few steps of real gradient descent, a bias of the
last MLP output projection that raises the target's log-probability; it exercises the joint without depending on
MEND/SERAC internals.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import editlens
from editlens.data.schema import EditCase, Probe, Rewrite
from editlens.edit import base as edit_base
from editlens.edit.base import HParams, POSITIVE, register_method
from editlens.edit.trained import (EDITOR_JSON, EDITOR_TENSORS, EarlyStopping, TrainableEditor, TrainedEditor,
                                   check_finite, data_hash, train)
from editlens.errors import EditlensError, HParamsError, MethodError, TrainingError


@dataclass
class _ToyTrainHP(HParams):
    steps: int = 3
    lr: float = 0.1
    RANGES = {"lr": POSITIVE}


@dataclass
class _ToyHP(HParams):
    scale: float = 1.0
    RANGES = {"scale": POSITIVE}


class _ToyTrained(TrainableEditor):
    hparams_class = _ToyHP
    TrainHParams = _ToyTrainHP
    edits_weights = True

    def fit(self, lm, cases, val_cases, hp, *, progress, seed):
        from editlens.lm.arch import weight_param

        name = lm.arch.mlp_out_at(lm.n_layers - 1)
        w = weight_param(lm.module(name))  # nn.Linear on the llama layout: [out, in]
        direction = torch.zeros(w.shape[0], requires_grad=True)
        opt = torch.optim.SGD([direction], lr=hp.lr)
        curve = []
        for step in range(hp.steps):
            loss = (direction - 1.0).pow(2).sum()  # a real optimisation with a known optimum (all ones)
            check_finite(loss.item(), step=step, what="toy loss")
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        return TrainedEditor(self.name, hp.to_dict(), lm.base_fingerprint, lm.name,
                             {"direction": direction.detach().clone()}, {"loss_curve": curve, "layer": name})

    def contract_train_overrides(self):
        return {"steps": 2}

    def apply(self, lm, cases, hparams, *, evk_align=None, progress=False, sequence=None):
        from editlens.lm.arch import weight_param

        name = self.trained.meta["layer"]
        w = weight_param(lm.module(name))
        d = self.trained.tensor("direction").to(w.dtype)
        delta = hparams.scale * 1e-3 * torch.outer(d, torch.ones(w.shape[1], dtype=w.dtype))
        return self.weight_edit(lm, cases, hparams, {name: delta}, {}, sequence=sequence)


@pytest.fixture()
def toy():
    register_method("_toy_trained")(_ToyTrained)
    yield "_toy_trained"
    edit_base._METHODS.pop("_toy_trained", None)


@pytest.fixture(scope="module")
def lm():
    return editlens.load_model("tiny-llama")


def _case(i: int, *, para=True, neigh=True) -> EditCase:
    probes = {"rewrite": (Probe("The capital of X is", "Paris"),)}
    if para:
        probes["paraphrase"] = (Probe("X's capital city is", "Paris"),)
    if neigh:
        probes["neighborhood"] = (Probe("The capital of Y is", "Rome"),)
    return EditCase(f"c{i}", Rewrite("The capital of {} is", "X", "Paris", "Berlin"), probes)


def test_train_checks_the_data_before_any_work(toy, lm):
    with pytest.raises(TrainingError, match=r"case 1 \(case_id 'c1'\) has no 'neighborhood' probe"):
        train(toy, lm, [_case(0), _case(1, neigh=False)], progress=False)
    with pytest.raises(TrainingError, match=r"validation case 0 \(case_id 'c0'\) has no 'paraphrase'"):
        train(toy, lm, [_case(0)], val_cases=[_case(0, para=False)], progress=False)
    with pytest.raises(TrainingError, match="no training cases"):
        train(toy, lm, [], progress=False)
    with pytest.raises(HParamsError, match="lr"):
        train(toy, lm, [_case(0)], progress=False, lr=-1.0)
    with pytest.raises(HParamsError):
        train(toy, lm, [_case(0)], progress=False, no_such_knob=1)
    with pytest.raises(MethodError, match="not trained before editing"):
        train("rome", lm, [_case(0)], progress=False)


def test_trained_editor_round_trips_bit_for_bit(toy, lm, tmp_path):
    te = train(toy, lm, [_case(0), _case(1)], progress=False, steps=4)
    assert te.meta["n_train"] == 2 and te.meta["data_hash"] == data_hash([_case(0), _case(1)])
    assert len(te.meta["loss_curve"]) == 4 and te.meta["loss_curve"][-1] < te.meta["loss_curve"][0]
    d = te.save(tmp_path / "ed")
    assert sorted(p.name for p in d.iterdir()) == sorted([EDITOR_TENSORS, EDITOR_JSON])
    back = TrainedEditor.load(d)
    assert back.method == te.method and back.hparams == te.hparams and back.base_fingerprint == te.base_fingerprint
    assert set(back.tensors) == set(te.tensors)
    for k in te.tensors:
        assert torch.equal(back.tensors[k].view(torch.uint8), te.tensors[k].contiguous().view(torch.uint8))
    # saving again over a saved editor is allowed; over a foreign directory it is not
    te.save(d)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(EditlensError, match="not empty"):
        te.save(tmp_path / "other")


def test_load_refuses_tampered_or_incomplete_files(toy, lm, tmp_path):
    te = train(toy, lm, [_case(0)], progress=False)
    d = te.save(tmp_path / "ed")
    raw = bytearray((d / EDITOR_TENSORS).read_bytes())
    raw[-1] ^= 0xFF
    (d / EDITOR_TENSORS).write_bytes(bytes(raw))
    with pytest.raises(EditlensError, match="does not match the sha256"):
        TrainedEditor.load(d)
    d = te.save(tmp_path / "ed2")
    doc = json.loads((d / EDITOR_JSON).read_text())
    del doc["base_fingerprint"]
    (d / EDITOR_JSON).write_text(json.dumps(doc))
    with pytest.raises(EditlensError, match="missing field.*base_fingerprint"):
        TrainedEditor.load(d)
    (d / EDITOR_JSON).write_text("{not json")
    with pytest.raises(EditlensError, match="not valid JSON"):
        TrainedEditor.load(d)
    with pytest.raises(EditlensError, match="editor.safetensors is missing"):
        (tmp_path / "ed3").mkdir()
        (tmp_path / "ed3" / EDITOR_JSON).write_text("{}")
        TrainedEditor.load(tmp_path / "ed3")


def test_edit_needs_a_trained_editor_for_this_model(toy, lm, tmp_path):
    with pytest.raises(MethodError, match=r"edits with a trained editor.*editlens.train\('_toy_trained'"):
        editlens.edit(lm, [_case(0)], method=toy)
    te = train(toy, lm, [_case(0)], progress=False)
    other = editlens.load_model("tiny-gpt2")
    with pytest.raises(EditlensError, match="was trained for model 'tiny-llama'.*cannot edit 'tiny-gpt2'"):
        editlens.edit(other, [_case(0)], method=toy, trained=te)
    wrong = TrainedEditor("mend", {}, lm.base_fingerprint, lm.name, {}, {})
    with pytest.raises(MethodError, match="trained for method 'mend'"):
        editlens.edit(lm, [_case(0)], method=toy, trained=wrong)


def test_edit_with_a_saved_editor_and_undo(toy, lm, tmp_path):
    te = train(toy, lm, [_case(0)], progress=False)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    d = te.save(tmp_path / "ed")
    e1 = editlens.edit(lm, [_case(0)], method=toy, trained=d)
    after1 = {k: v.clone() for k, v in lm.model.state_dict().items()}
    assert any(not torch.equal(before[k], after1[k]) for k in before)
    e1.undo()
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    run = editlens.edit.edit_sequential(lm, [_case(0), _case(1), _case(2)], toy, trained=str(d))
    run.undo()
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_training_must_leave_the_weights_alone(toy, lm):
    class _Leaky(_ToyTrained):
        def fit(self, lm, cases, val_cases, hp, *, progress, seed):
            te = super().fit(lm, cases, val_cases, hp, progress=progress, seed=seed)
            p = next(lm.model.parameters())
            self._saved = p.data.clone()
            p.data.add_(1.0)
            return te

    register_method("_toy_leaky")(_Leaky)
    try:
        ed = _Leaky()
        with pytest.raises(TrainingError, match="changed the model's weights"):
            train("_toy_leaky", lm, [_case(0)], progress=False)
    finally:
        edit_base._METHODS.pop("_toy_leaky", None)
        next(lm.model.parameters()).data.sub_(1.0)
        del ed


def test_check_finite_and_early_stopping():
    check_finite(1.5, step=0, what="edit loss")
    with pytest.raises(TrainingError, match="step 7: edit loss is nan"):
        check_finite(float("nan"), step=7, what="edit loss")
    with pytest.raises(TrainingError, match="inf"):
        check_finite(float("inf"), step=1, what="x")
    es = EarlyStopping(patience=2, min_delta=0.01)
    assert [es.update(v) for v in (1.0, 0.5, 0.495, 0.499, 0.3)] == [False, False, False, True, False]
    assert es.best == 0.3
    with pytest.raises(HParamsError):
        EarlyStopping(patience=0)


def test_saved_editor_loads_in_a_new_process(toy, lm, tmp_path):
    te = train(toy, lm, [_case(0)], progress=False)
    d = te.save(tmp_path / "ed")
    code = ("import sys, torch; from editlens.edit.trained import TrainedEditor; "
            "te = TrainedEditor.load(sys.argv[1]); print(te.method, te.model_name, "
            "float(te.tensors['direction'].double().sum()))")
    out = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, check=True).stdout
    method, model, total = out.split()
    assert (method, model) == (toy, "tiny-llama")
    assert float(total) == float(te.tensors["direction"].double().sum())


def test_contract_check_covers_trained_methods(toy):
    from editlens.testing import check_method

    report = check_method(toy)
    assert any(c.startswith("trained:") for c in report["checks"])
    assert report["evk_align"] == "refused"


def test_contract_check_catches_an_editor_that_does_not_round_trip(toy, monkeypatch):
    from editlens.testing import ContractError, check_method

    real_load = TrainedEditor.load.__func__

    def lossy(cls, directory):
        te = real_load(cls, directory)
        te.tensors = {k: v + 1 for k, v in te.tensors.items()}
        return te

    monkeypatch.setattr(TrainedEditor, "load", classmethod(lossy))
    with pytest.raises(ContractError, match="loaded back differs"):
        check_method(toy)


def test_cli_train_then_edit_with_the_saved_editor(toy, tmp_path):
    from click.testing import CliRunner

    from editlens.cli.main import cli

    runner = CliRunner()
    out = tmp_path / "editor"
    res = runner.invoke(cli, ["train", "--method", toy, "--model", "tiny-llama", "--synthetic", "4", "--out",
                              str(out), "--set", "steps=3", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "saved to" in res.output and "loss curve: step 0:" in res.output
    te = TrainedEditor.load(out)
    assert te.hparams["steps"] == 3 and te.meta["n_train"] == 4
    # a second train into the same directory needs --force
    res = runner.invoke(cli, ["train", "--method", toy, "--model", "tiny-llama", "--synthetic", "4", "--out", str(out)])
    assert res.exit_code == 2 and "not empty" in res.output
    # an untrained method and a missing data source are refused before the model is loaded
    res = runner.invoke(cli, ["train", "--method", "rome", "--synthetic", "4", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "not trained before editing" in res.output
    res = runner.invoke(cli, ["train", "--method", toy, "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--data FILE or --synthetic N" in res.output
    data = tmp_path / "cases.json"
    editlens.save_cases(editlens.synthetic_cases(2, seed=5), data)
    res = runner.invoke(cli, ["edit", "--method", toy, "--model", "tiny-llama", "--data", str(data), "--trained",
                              str(out), "--metrics", "gtfree"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["edit", "--method", toy, "--model", "tiny-llama", "--data", str(data),
                              "--metrics", "gtfree"])
    assert res.exit_code == 2 and "edits with a trained editor" in res.output


def test_saved_editor_directory_is_not_private(toy, lm, tmp_path):
    import stat

    d = train(toy, lm, [_case(0)], progress=False).save(tmp_path / "ed")
    assert stat.S_IMODE(d.stat().st_mode) & 0o055 == 0o055  # group/others may read and enter it


def test_bits_of_a_scalar_tensor():
    from editlens.testing import _bits

    assert torch.equal(_bits(torch.tensor(1.5, dtype=torch.float64)), _bits(torch.tensor([1.5], dtype=torch.float64)))
