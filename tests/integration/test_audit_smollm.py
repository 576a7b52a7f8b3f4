"""Save → load → audit of a ROME edit of SmolLM2 (issue 18, part 1).

One CounterFact fact is edited with ROME (the shared fast settings of the SmolLM2 tests), the edited model is
saved with ``Edit.save_pretrained``, read back by ``load_model`` and by ``transformers`` (bit-identical to the
in-memory edit), and ``editlens.audit.audit`` compares it with the base (SmolLM2 dequantised from its GGUF file):

* the weight report names exactly the edited matrix (``model.layers.<layer>.mlp.down_proj.weight``) with rank 1;
* KL(base ‖ edited) on the fact's rewrite probe is large (the edit moved it: > 1 nat);
* on the 30 shipped neutral prompts the drift is ≈ 0: mean KL < 5e-3 nats, max KL < 3e-2 nats (and < 1/100 of
  the rewrite probe's KL), top-5 overlap ≥ 0.95 (measured: mean 8.6e-4, max 6.1e-3, rewrite 3.35; the report
  is printed by ``pytest -s``);
* of the 20 factual-QA prompts the one about the edited subject ("What is the capital of Japan?" for the edit
  "The capital of Japan is" -> Seoul) moved most, more than 3x the next one (measured 0.075 vs 0.010); the 19
  others stay within the neutral bounds.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import editlens
from editlens.audit import audit, weight_diff
from editlens.cli.basic import sample_data_path

pytestmark = pytest.mark.integration

FAST = dict(stats_n_samples=64, stats_max_length=64, n_prefixes=2, v_num_grad_steps=8)
#: ≈ 0: bounds on KL(base ‖ edited) in nats, about 5x the measured values (neutral mean 8.6e-4, max 6.1e-3; the 19
#: factual-QA prompts not about the edited subject mean 2.3e-3, max 1.04e-2), and 1/100 of the rewrite probe's KL
#: (3.35 measured)
NEUTRAL_KL_MEAN, NEUTRAL_KL_MAX = 5e-3, 3e-2


@pytest.fixture(scope="module")
def saved_edit(smollm, tmp_path_factory):
    case = editlens.load_cases(sample_data_path(), limit=1)[0]
    e = editlens.edit(smollm, [case], "rome", **FAST)
    try:
        layer = e.hparams.layer
        edited = {n: p.detach().clone() for n, p in smollm.model.named_parameters()
                  if n == f"model.layers.{layer}.mlp.down_proj.weight"}
        d = e.save_pretrained(tmp_path_factory.mktemp("audit") / "rome-smollm")
    finally:
        e.undo()
    return case, d, layer, edited


def test_saved_edit_reads_back_bit_identical(smollm, saved_edit):
    case, d, layer, edited = saved_edit
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    got = dict(hf.named_parameters())
    base = dict(smollm.model.named_parameters())
    (name,) = edited
    assert torch.equal(got[name], edited[name]) and not torch.equal(got[name], base[name])
    assert all(torch.equal(got[n], p) for n, p in base.items() if n != name)  # the rest is the base, bit for bit
    names = {p.name for p in Path(d).iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "editlens.json"} <= names


def test_audit_of_rome_edit(smollm, saved_edit):
    case, d, layer, _ = saved_edit
    lm2 = editlens.load_model(str(d))
    # general=False: perplexity and the MC suites are not what this test is about (and cost minutes on a busy CPU)
    rep = audit(smollm, lm2, [case], metrics="kl,topk@5,c_acc", data_label="counterfact_sample.json[0]",
                general=False)
    print("\n" + rep.to_markdown())
    # the weight report names exactly the edited matrix, rank one
    changed = rep.changed()
    assert [t.name for t in changed] == [f"model.layers.{layer}.mlp.down_proj.weight"]
    assert changed[0].rank == 1 and changed[0].singular_values[1] <= changed[0].tol
    assert [t for t in rep.weights if t.status != "changed"] == []
    # KL on the rewrite probe: the edit moved it
    tab = rep.table.set_index(["probe_kind", "metric"])
    assert tab.loc[("rewrite", "kl"), "edited"] > 1.0
    assert tab.loc[("rewrite", "kl"), "base"] == 0.0
    assert tab.loc[("rewrite", "c_acc"), "edited"] == 1.0
    # ≈ 0 where no edit should reach: the neutral prompts
    s = rep.drift["prompts"]["neutral"]
    assert s["kl_mean"] < NEUTRAL_KL_MEAN and s["kl_max"] < NEUTRAL_KL_MAX, s
    assert s["topk@5_mean"] >= 0.95 and s["kl_max"] < tab.loc[("rewrite", "kl"), "edited"] / 100, s
    # the factual-QA probes: the one about the edited subject moved most (the fact is "The capital of Japan is"
    # -> Seoul, and qa-02 asks for the capital of Japan); the others stay within the neutral bounds
    qa = sorted(rep.drift["per_prompt"]["factual_qa"], key=lambda t: -t[1])
    assert case.rewrite.subject in qa[0][0] and qa[0][1] > 3 * qa[1][1], qa[:3]
    others = [kl for p, kl in qa if case.rewrite.subject not in p]
    assert len(others) == 19 and max(others) < NEUTRAL_KL_MAX and sum(others) / 19 < NEUTRAL_KL_MEAN, qa[:3]
    assert f'most moved factual_qa prompt: "{qa[0][0]}' in rep.to_markdown().replace("\\n", "\n")
    # the streamed file-level report agrees with the in-memory one
    files = weight_diff(smollm, str(d))
    assert [(t.name, t.rank) for t in files] == [(changed[0].name, 1)]
