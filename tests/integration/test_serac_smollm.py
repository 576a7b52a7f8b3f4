"""SERAC on SmolLM2-135M: trained on synthetic facts, it edits held-out facts (another world: seed 1, none of its
subjects in training), leaves out-of-scope prompts bit for bit to the base model (KL exactly 0), and a saved editor
loads in a new process and edits the same way.

Training cost is kept modest and stated: one training per module on ``synthetic_cases(80)`` (the issue's setting is
300 cases; its measured figures are in docs/methods-trained.md) with the SmolLM2 defaults except ``clf_epochs=40``
(default 60). The counterfactual model gets its default single epoch over the in-scope examples.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import editlens
from editlens.edit.trained import TrainedEditor, train
from editlens.system import ModelSystem

pytestmark = pytest.mark.integration

N_TRAIN = 80
HELD = editlens.synthetic_cases(12, seed=1)


@pytest.fixture(scope="module")
def trained(smollm):
    te = train("serac", smollm, editlens.synthetic_cases(N_TRAIN), progress=False, clf_epochs=40)
    return te


def test_held_out_edits_and_bit_identical_locality(smollm, trained):
    lm = smollm
    subjects = {c.rewrite.subject for c in editlens.synthetic_cases(N_TRAIN)}
    assert not subjects & {c.rewrite.subject for c in HELD}  # held-out facts: not in training
    base = ModelSystem(lm)
    e = editlens.edit(lm, HELD, method="serac", trained=trained)
    try:
        res = editlens.evaluate(e.system, HELD, base=base, metrics=["t_acc", "kl"], progress=False, cache=False)
        df = res.to_pandas()
        t_acc = df[(df.probe_kind == "rewrite") & (df.metric == "t_acc")].value
        assert len(t_acc) == len(HELD)
        assert t_acc.mean() >= 0.75, f"rewrite t_acc {t_acc.mean():.3f} < 0.75"
        # out of scope: every neighbourhood prompt the classifier routes to the base model has KL exactly 0
        nb = [p.prompt for c in HELD for p in c.probes_of("neighborhood")]
        routed, _ = e.system.scope(nb)
        out = [p for p, r in zip(nb, routed.tolist()) if r < 0]
        assert len(out) >= 0.9 * len(nb), f"only {len(out)} of {len(nb)} neighbourhood prompts out of scope"
        lp_s, lp_b = e.system.next_token_logprobs(nb), base.next_token_logprobs(nb)
        for i, r in enumerate(routed.tolist()):
            if r < 0:
                assert torch.equal(lp_s[i], lp_b[i]), nb[i]
        # through the evaluator: the neighbourhood KL rows are exactly 0 for cases whose neighbours are all out
        kl = df[(df.probe_kind == "neighborhood") & (df.metric == "kl")].set_index("case_id").value
        for c in HELD:
            if all(r < 0 for r in e.system.scope([p.prompt for p in c.probes_of("neighborhood")])[0].tolist()):
                assert kl[c.case_id] == 0.0, c.case_id
    finally:
        e.undo()
    assert len(e.system) == 0


def test_saved_editor_edits_the_same_in_a_new_process(smollm, trained, tmp_path):
    # a freshly loaded model on both sides: in the full suite the session's shared model gave other low bits than a
    # fresh load (2026-11-30; an earlier test leaves some state on it, under investigation), which is not what this
    # test is about
    lm = editlens.load_model("smollm2-135m")
    d = trained.save(tmp_path / "serac-smollm")
    prompts = [HELD[0].rewrite.text, HELD[0].probes_of("paraphrase")[0].prompt,
               HELD[0].probes_of("neighborhood")[0].prompt]
    e = editlens.edit(lm, HELD[:3], method="serac", trained=trained)
    here = e.system.next_token_logprobs(prompts)
    e.undo()
    code = textwrap.dedent(f"""
        import torch, editlens
        torch.set_num_threads({torch.get_num_threads()})
        lm = editlens.load_model("smollm2-135m")
        held = editlens.synthetic_cases(12, seed=1)[:3]
        e = editlens.edit(lm, held, method="serac", trained={str(d)!r})
        lp = e.system.next_token_logprobs({prompts!r})
        torch.save(lp, {str(tmp_path / "lp.pt")!r})
    """)
    env = dict(os.environ)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=600)
    there = torch.load(tmp_path / "lp.pt", weights_only=True)
    assert torch.equal(here, there)
    assert TrainedEditor.load(d).meta["lora_paths"] == trained.meta["lora_paths"]
