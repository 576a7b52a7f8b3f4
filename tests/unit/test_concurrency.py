"""An LM is safe under concurrent use: a base system evaluated from another thread while the same model is
edited and undone never corrupts the weights (issue 13, item 4).

Before the fix, the base system's temporary swap of the original weights (``LM.state_view``) interleaved with
the main thread's edit/undo: the swap's exit wrote the *edited* values back after the undo had restored the
originals, leaving MLP weights changed while the model reported no edit and its fingerprint equalled the base's.
"""
from __future__ import annotations

import threading

import torch

import editlens
from editlens.data import synthetic_cases
from editlens.edit.base import Editor, HParams, register_method
from editlens.evaluate import ModelSystem
from editlens.lm.arch import weight_view

PROMPTS = ["The capital of Japan is", "Hi there", "Seoul is the capital of", "A B C D E F G"]


@register_method("_test_concurrency_delta")
class _Delta(Editor):
    """Adds a seeded random delta to the MLP output projections of every layer (test-only method)."""

    name = "_test_concurrency_delta"
    hparams_class = HParams

    def apply(self, lm, cases, hparams, *, evk_align=None, progress=True, sequence=None):
        g = torch.Generator().manual_seed(1234 + len(lm.state))
        deltas = {}
        for i in range(lm.n_layers):
            mod = lm.arch.mlp_out_at(i)
            w = weight_view(lm.module(mod))
            deltas[mod] = torch.randn(w.shape, generator=g) * 0.3
        # a forward pass on the current weights, as every real method does while computing its deltas
        ModelSystem(lm).next_token_logprobs(PROMPTS[:1])
        return self.weight_edit(lm, cases, hparams, deltas, {}, sequence=sequence)


def _tensors(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def test_base_evaluated_from_thread_while_editing_and_undoing(tiny_llama):
    lm = tiny_llama
    cases = synthetic_cases(3, seed=0)
    before = _tensors(lm)
    base = ModelSystem(lm)
    ref = editlens.evaluate(base, cases, metrics=["t_acc", "c_mag"], cache=False, progress=False).to_pandas()

    stop = threading.Event()
    errors: list[BaseException] = []
    base_results = []
    n_calls = [0]

    def worker():
        try:
            while not stop.is_set():
                res = editlens.evaluate(base, cases, metrics=["t_acc", "c_mag"], cache=False, progress=False)
                base_results.append(res.to_pandas())
                base.next_token_logprobs(PROMPTS)
                n_calls[0] += 1
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    edited_fps = set()
    try:
        for _ in range(25):
            e = editlens.edit(lm, cases, method="_test_concurrency_delta")
            edited_fps.add(e.system.fingerprint)
            e.system.next_token_logprobs(PROMPTS)
            e.undo()
    finally:
        stop.set()
        t.join(timeout=120)
    assert not t.is_alive()
    assert not errors, errors
    assert n_calls[0] >= 1  # the race really ran
    assert len(edited_fps) == 1 and base.fingerprint not in edited_fps

    # after every edit is undone: no edit recorded, every tensor bit for bit the original, fingerprints agree
    assert lm.state == ()
    after = _tensors(lm)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"weights changed after undo: {changed}"
    assert lm.fingerprint == lm.base_fingerprint == lm.weights_fingerprint()
    # and every base answer computed during the race was the unedited model's
    for df in base_results:
        assert df["value"].tolist() == ref["value"].tolist()


def test_lock_is_reentrant_and_documented(tiny_llama):
    lm = tiny_llama
    assert "thread" in (type(lm).__doc__ or "").lower()
    base = ModelSystem(lm)
    e = editlens.edit(lm, synthetic_cases(1, seed=0), method="_test_concurrency_delta")
    try:
        with lm.lock:  # nested use (a system call inside a held lock) must not deadlock
            with base.calling():
                out = base.next_token_logprobs(PROMPTS)
        assert out.shape[0] == len(PROMPTS)
    finally:
        e.undo()
