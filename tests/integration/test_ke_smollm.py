"""KE on SmolLM2-135M, kept cheap: a small hyper-network trained for a few steps on 8 synthetic facts.

It must (1) train without NaN and leave the model's weights as they were, (2) lower the target NLL of its training
facts when it edits them, (3) do better than the untrained hyper-network on what it is trained for -- edit NLL plus
the KL beyond the margin, and the KL itself, on the same facts (training did something) -- and (4) undo bit for
bit. What a default-trained KE does on held-out facts is measured in docs/methods-trained.md.
"""
from __future__ import annotations

import pytest
import torch

import editlens
from editlens.edit import edit, ke
from editlens.edit.trained import train

pytestmark = pytest.mark.integration

SMALL = dict(steps=12, batch_size=2, val_every=6, lstm_dim=32, cond_dim=64, ffn_dim=32, val_fraction=0.25)


def test_ke_trains_and_edits_training_facts(smollm):
    cases = editlens.synthetic_cases(8, seed=11)
    saved = {k: v.detach().clone() for k, v in smollm.model.state_dict().items()}
    te = train("ke", smollm, cases, progress=False, seed=0, **SMALL)
    assert te.meta["steps_run"] >= 6 and all(map(lambda x: x == x, te.meta["loss_curve"]))
    hp = ke.KETrainHParams.for_model(smollm).replace(**SMALL)
    facts = ke.training_facts(smollm, cases[:4], "t")
    zero = torch.tensor(0.0)
    torch.manual_seed(0)
    untrained = ke.build_net(smollm, hp).eval()
    trained = ke.KE()
    trained.trained = te
    net = trained.network(smollm)
    with torch.no_grad():
        after_untrained = ke.ke_step(smollm, untrained, facts, zero, 0.0)
        after_trained = ke.ke_step(smollm, net, facts, zero, 0.0)
    # KE's objective (edit NLL over rewrite + paraphrases, plus the neighbourhood KL beyond the margin) and the KL
    # itself are lower after training than with the untrained hyper-network (a plain gradient step)
    def objective(r):
        return float(r.edit_nll) + max(0.0, float(r.kl) - hp.margin)

    figures = (objective(after_trained), objective(after_untrained), float(after_trained.kl), float(after_untrained.kl))
    assert objective(after_trained) < objective(after_untrained) - 0.1, figures
    assert float(after_trained.kl) < float(after_untrained.kl), figures
    # editing each training fact through editlens.edit lowers its rewrite NLL a lot
    from editlens.system import ModelSystem

    base = ModelSystem(smollm)
    prompts = [c.rewrite.text for c in cases[:4]]
    targets = [c.rewrite.target_new for c in cases[:4]]
    before = [-s.mean_logprob for s in base.teacher_forced(prompts, targets)]
    after = []
    for c, p, t in zip(cases[:4], prompts, targets):
        e = edit(smollm, [c], method="ke", trained=te)
        after.append(-e.system.teacher_forced([p], [t])[0].mean_logprob)
        e.undo()
    assert sum(after) / len(after) < sum(before) / len(before) - 3.0, (before, after)
    assert all(torch.equal(v, saved[k]) for k, v in smollm.model.state_dict().items())
    assert smollm.fingerprint == smollm.base_fingerprint
