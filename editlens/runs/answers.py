"""Greedy answers of the base and the edited model, per case and probe kind, for the report's per-case view.

Result rows are numbers; a reader who wants to see *which* facts flipped and what the model actually said needs
the text too. :class:`CaseAnswers` records, for every case of a unit, its rewrite (prompt, subject, new and old
target) and, for the first ``per_kind`` probes of each probe kind, the probe's prompt, target and foil with the
base model's and the edited system's greedy continuation (``max_new_tokens`` new tokens, the evaluator's
:class:`~editlens.evaluate.core.Generate` request answered in its sorted batches). The runner stores the result
as the JSON diagnostic :data:`ANSWERS_KEY` of a unit's final step; :mod:`editlens.report.cases` reads it back.

Use::

    answers = CaseAnswers(lm, cases, prompt_format=fmt)     # while lm is unedited: base answers, now
    edit = editlens.edit(lm, cases, "rome")
    record = answers.record(edit.system)                    # edited answers; a JSON-ready dict

Base answers are frozen at construction (:func:`~editlens.evaluate.core.freeze_base`, optionally in a shared
:class:`~editlens.evaluate.core.BaseCache` so that units over the same cases answer them once), so the model may be
edited afterwards. Greedy decoding draws no random numbers; the random stream of a run is not touched.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from editlens.errors import EditlensError

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM

#: the diagnostics key under which the runner stores :meth:`CaseAnswers.record`
ANSWERS_KEY = "case_answers"
#: format version of the record (the report refuses a version it does not know)
ANSWERS_VERSION = 1
DEFAULT_MAX_NEW_TOKENS = 12


def probe_prompts(cases: Sequence["EditCase"], per_kind: int = 1) -> list[tuple[str, str, int, Any]]:
    """``(case_id, probe kind, index, probe)`` of the first ``per_kind`` probes of every kind of every case."""
    out = []
    for c in cases:
        for kind in c.kinds:
            for i, p in enumerate(c.probes_of(kind)[:per_kind]):
                out.append((c.case_id, kind, i, p))
    return out


class CaseAnswers:
    """Greedy answers of the unedited model to the cases' probes, ready to be joined with an edited system's.

    Args:
        lm: the model, **unedited** now (its base answers are computed in the constructor).
        cases: the cases whose probes are answered.
        prompt_format: the prompt format of the run (``raw`` / ``chat``; ``auto`` is resolved).
        max_new_tokens: length of each greedy answer.
        per_kind: how many probes of each kind are answered (the first ones; a kind's count is recorded).
        batch_tokens: token budget of one padded batch.
        cache: a :class:`~editlens.evaluate.core.BaseCache` shared across units (``None``: no cache).
    """

    def __init__(self, lm: "LM", cases: Sequence["EditCase"], *, prompt_format: str = "raw",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, per_kind: int = 1, batch_tokens: int = 4096,
                 cache: Any = None):
        from editlens.evaluate.core import Generate, freeze_base
        from editlens.lm.prompting import resolve_prompt_format
        from editlens.system import ModelSystem

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise EditlensError(f"CaseAnswers: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if isinstance(per_kind, bool) or not isinstance(per_kind, int) or per_kind < 1:
            raise EditlensError(f"CaseAnswers: per_kind must be an integer >= 1, got {per_kind!r}")
        if lm.fingerprint != lm.base_fingerprint:
            raise EditlensError("CaseAnswers: the base answers must be computed on the unedited model; create it "
                                "before the edit")
        self.cases = list(cases)
        self.max_new_tokens = max_new_tokens
        self.per_kind = per_kind
        self.prompt_format = resolve_prompt_format(prompt_format, lm.tokenizer)
        self._probes = probe_prompts(self.cases, per_kind)
        self._requests = sorted({Generate(p.prompt, max_new_tokens) for *_, p in self._probes})
        live = ModelSystem(lm, prompt_format=self.prompt_format, batch_tokens=batch_tokens)
        self.base = freeze_base(live, self._requests, cache=cache)

    def record(self, edited: Any) -> dict[str, Any]:
        """The JSON-ready record of base and ``edited`` answers (see the module docstring for the layout)::

            {"version": 1, "max_new_tokens": 12, "per_kind": 1, "prompt_format": "raw",
             "cases": {case_id: {"prompt", "subject", "target_new", "target_true",
                                 "probes": {kind: {"n": <probes of the kind>,
                                                   "items": [{"prompt", "target", "foil", "base", "edited"}]}}}}}
        """
        from editlens.evaluate.core import Generate, answer_requests

        fmt = getattr(edited, "prompt_format", "raw")
        if fmt != self.prompt_format:
            raise EditlensError(f"CaseAnswers: the edited system poses prompts as {fmt!r}, the base answers were "
                                f"taken as {self.prompt_format!r}")
        import torch

        with torch.no_grad():
            got = answer_requests(edited, self._requests)
        out: dict[str, Any] = {}
        by_id = {c.case_id: c for c in self.cases}
        for cid, kind, _, probe in self._probes:
            c = by_id[cid]
            entry = out.get(cid)
            if entry is None:
                rw = c.rewrite
                entry = out[cid] = {"prompt": rw.text, "subject": rw.subject, "target_new": rw.target_new,
                                    "target_true": rw.target_true, "probes": {}}
            slot = entry["probes"].setdefault(kind, {"n": len(c.probes_of(kind)), "items": []})
            req = Generate(probe.prompt, self.max_new_tokens)
            slot["items"].append({"prompt": probe.prompt, "target": probe.target, "foil": probe.foil,
                                  "base": self.base.answers[req], "edited": got[req]})
        return {"version": ANSWERS_VERSION, "max_new_tokens": self.max_new_tokens, "per_kind": self.per_kind,
                "prompt_format": self.prompt_format, "cases": out}
