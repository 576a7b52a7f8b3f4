"""editlens.drivers: the edit-then-evaluate procedures above editlens.edit and editlens.evaluate."""
from __future__ import annotations

import pytest

from editlens import drivers as D
from editlens.data.schema import Rewrite, make_case
from editlens.evaluate import portability as P


class _Boom(Exception):
    pass


class _RaisingSystem:
    prompt_format = "raw"
    fingerprint = "boom"

    def teacher_forced(self, prompts, targets):
        raise _Boom("measurement failed")


def test_driver_undoes_the_edit_when_measuring_fails():
    log = []

    def edit_fn(lm, cases):
        key = tuple(c.case_id for c in cases)
        log.append(("apply", key))

        class H:
            system = _RaisingSystem()

            def undo(self):
                log.append(("undo", key))

        return H()

    rc = P.make_round_case("t", Rewrite("{} speaks", "Ann", "French", "English"), ["English", "German"])

    class Base:
        prompt_format = "raw"

        def teacher_forced(self, prompts, targets):
            from editlens.lm.ops import TeacherForced
            import torch

            return [TeacherForced(torch.tensor([1]), torch.tensor([-1.0]), torch.tensor([1])) for _ in prompts]

    with pytest.raises(_Boom):
        D.round_edit_scores(None, edit_fn, [rc], base_system=Base())
    assert log == [("apply", ("t/e1",)), ("undo", ("t/e1",))]


def test_sequential_edit_fn_applies_one_case_per_step(monkeypatch):
    import editlens.edit as E

    seen = {}

    def fake_edit_sequential(lm, cases, method, batch_size, **kw):
        seen.update(lm=lm, ids=[c.case_id for c in cases], method=method, batch_size=batch_size, kw=kw)
        return "handle"

    monkeypatch.setattr(E, "edit_sequential", fake_edit_sequential)
    cases = [make_case(f"c{i}", Rewrite("{} is", "a", "b", "c")) for i in range(2)]
    fn = D.sequential_edit_fn("memit", hparams={"layers": [1]})
    assert fn("LM", cases) == "handle"
    assert seen == {"lm": "LM", "ids": ["c0", "c1"], "method": "memit", "batch_size": 1,
                    "kw": {"hparams": {"layers": [1]}}}
