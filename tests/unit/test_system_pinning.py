"""A system created before an edit keeps answering with its own weights (base systems stay the base)."""
from __future__ import annotations

import pytest
import torch

import editlens
from editlens.data.schema import Rewrite, make_case
from editlens.edit.base import Editor, HParams, edit_sequential, register_method
from editlens.errors import EditlensError
from editlens.evaluate.system import ModelSystem
from editlens.lm.arch import weight_view

PROMPTS = ["The capital of Japan is", "Hi there", "Seoul is the capital of"]


@register_method("_test_random_delta")
class _RandomDelta(Editor):
    """Adds a seeded random delta to one MLP output projection per case (test-only method)."""

    name = "_test_random_delta"
    hparams_class = HParams

    def apply(self, lm, cases, hparams, *, evk_align=None, progress=True, sequence=None):
        g = torch.Generator().manual_seed(len(lm.state) + (sequence.step if sequence else 0))
        mod = lm.arch.mlp_out_at(1)
        w = weight_view(lm.module(mod))
        return self.weight_edit(lm, cases, hparams, {mod: torch.randn(w.shape, generator=g) * 0.5}, {},
                                sequence=sequence)


def _cases(n=3):
    return [make_case(str(i), Rewrite("The capital of {} is", f"Country{i}", "Rome", "Paris")) for i in range(n)]


def test_base_system_sees_original_weights_after_edit(tiny_llama):
    lm = tiny_llama
    base = ModelSystem(lm)
    before = base.next_token_logprobs(PROMPTS)
    w_before = weight_view(lm.module(lm.arch.mlp_out_at(1))).clone()
    e = editlens.edit.base.edit(lm, _cases(), method="_test_random_delta")
    edited = e.system
    assert edited.fingerprint != base.fingerprint
    after_edit = edited.next_token_logprobs(PROMPTS)
    assert not torch.allclose(after_edit, before)
    # the base system still answers with the unedited weights, bit for bit, and leaves the edit in place
    assert torch.equal(base.next_token_logprobs(PROMPTS), before)
    assert torch.equal(edited.next_token_logprobs(PROMPTS), after_edit)
    gen_base_during_edit = base.generate(PROMPTS, 4)
    e.undo()
    assert base.generate(PROMPTS, 4) == gen_base_during_edit
    assert torch.equal(weight_view(lm.module(lm.arch.mlp_out_at(1))), w_before)
    assert torch.equal(base.next_token_logprobs(PROMPTS), before)
    with pytest.raises(EditlensError, match="no longer exists"):
        edited.next_token_logprobs(PROMPTS)


def test_base_system_during_sequential_run(tiny_llama):
    lm = tiny_llama
    base = ModelSystem(lm)
    before = base.next_token_logprobs(PROMPTS)
    seen = []

    def cb(step, n_edits, run):
        seen.append((n_edits, run.system.fingerprint))
        assert torch.equal(base.next_token_logprobs(PROMPTS), before)
        assert not torch.allclose(run.system.next_token_logprobs(PROMPTS), before)

    run = edit_sequential(lm, _cases(4), "_test_random_delta", checkpoints=[1, 2, 4], callback=cb)
    assert [n for n, _ in seen] == [1, 2, 4]
    assert len({fp for _, fp in seen}) == 3 and base.fingerprint not in {fp for _, fp in seen}
    run.undo()
    assert torch.equal(ModelSystem(lm).next_token_logprobs(PROMPTS), before)


def test_model_level_paths_respect_pinning(tiny_llama):
    """EVK's embedding-level forwards and with_format() bypass the System calls: they must still see the
    weights the system is pinned to (a base system must not silently read the edited weights)."""
    from editlens.evaluate import evk

    lm = tiny_llama
    base = ModelSystem(lm)
    before = evk.perturbed_next_token_logprobs(base, PROMPTS, span="full", sigma=0.0, n_samples=1)
    noisy_before = evk.perturbed_next_token_logprobs(base, PROMPTS, span="full", sigma=0.3, n_samples=2)
    e = editlens.edit.base.edit(lm, _cases(), method="_test_random_delta")
    try:
        assert torch.equal(evk.perturbed_next_token_logprobs(base, PROMPTS, span="full", sigma=0.0, n_samples=1),
                           before)
        assert torch.equal(evk.perturbed_next_token_logprobs(base, PROMPTS, span="full", sigma=0.3, n_samples=2),
                           noisy_before)
        edited = evk.perturbed_next_token_logprobs(e.system, PROMPTS, span="full", sigma=0.0, n_samples=1)
        assert not torch.allclose(edited, before)
        assert torch.allclose(edited[:, 0], e.system.next_token_logprobs(PROMPTS), atol=1e-5)
        again = base.with_format("raw")  # a new system object created *after* the edit, pinned like base
        assert again.model_state == base.model_state
        assert torch.equal(again.next_token_logprobs(PROMPTS), base.next_token_logprobs(PROMPTS))
    finally:
        e.undo()
