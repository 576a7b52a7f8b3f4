"""MEND on SmolLM2-135M: a trained editor edits held-out facts, undoes bit for bit, and a saved editor edits the
same way in a new process.

Cost: the editor is trained once for this module with a reduced but honest setting — 40 synthetic training cases,
``max_steps=20`` (the defaults train 270 steps on 300 cases: ``python -m benchmarks trained``, figures in
docs/methods-trained.md), every other hyperparameter at its SmolLM2 default. The held-out facts come from another
seed of the synthetic world (people, countries and companies never seen in training).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import editlens
from editlens.lm.arch import weight_param
from editlens.lm.ops import teacher_forced

pytestmark = pytest.mark.integration

REDUCED = dict(max_steps=20, val_every=20, max_val=4)
N_HELD = 6


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread for this module (on the shared 2-core machine two threads spin against other jobs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mend(smollm, _one_thread):
    return editlens.train("mend", smollm, editlens.synthetic_cases(40), progress=False, **REDUCED)


@pytest.fixture(scope="module")
def held():
    return editlens.synthetic_cases(N_HELD, seed=1)


def _t_acc(lm, case) -> float:
    return teacher_forced(lm, [case.rewrite.text], [case.rewrite.target_new])[0].token_accuracy


def test_mend_edits_held_out_facts(smollm, mend, held):
    assert mend.meta["prefix_cache"] is True  # only the edited blocks ran in training (verified equal)
    before = [_t_acc(smollm, c) for c in held]
    after = []
    for c in held:
        e = editlens.edit(smollm, [c], method="mend", trained=mend)
        after.append(_t_acc(smollm, c))
        e.undo()
    print(f"held-out rewrite t_acc before {sum(before) / len(before):.3f} after {sum(after) / len(after):.3f}: {after}")
    assert sum(before) / len(before) < 0.3  # fictional facts: the model does not know them
    assert sum(after) / len(after) >= 0.5


def test_mend_undo_is_bit_exact_on_smollm(smollm, mend, held):
    sd = {k: v.detach().clone() for k, v in smollm.model.state_dict().items()}
    fp = smollm.fingerprint
    e = editlens.edit(smollm, held[:2], method="mend", trained=mend)
    assert smollm.fingerprint != fp
    e.undo()
    assert smollm.fingerprint == fp
    assert all(torch.equal(v, sd[k]) for k, v in smollm.model.state_dict().items())


def test_saved_editor_edits_the_same_in_a_new_process(smollm, mend, held, tmp_path):
    mend.save(tmp_path / "mend")
    modules = mend.meta["arch"]["modules"]
    e = editlens.edit(smollm, [held[0]], method="mend", trained=mend)
    here = {m: float(weight_param(smollm.module(m)).double().sum()) for m in modules}
    e.undo()
    code = textwrap.dedent(f"""
        import json, torch, editlens
        from editlens.lm.arch import weight_param
        torch.set_num_threads({torch.get_num_threads()})  # the same reductions as here
        lm = editlens.load_model("smollm2-135m")
        case = editlens.synthetic_cases({N_HELD}, seed=1)[0]
        editlens.edit(lm, [case], method="mend", trained={str(tmp_path / 'mend')!r})
        print(json.dumps({{m: float(weight_param(lm.module(m)).double().sum()) for m in {modules!r}}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, check=True)
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there == here
