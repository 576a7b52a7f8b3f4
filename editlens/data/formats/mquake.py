"""MQuAKE (Zhong et al. 2023): multi-hop questions whose answer changes through one or more edits.

Record schema (``MQuAKE-CF-3k.json``, ``MQuAKE-CF.json``, ``MQuAKE-T.json``)::

    {"case_id": 1,
     "requested_rewrite": [{"prompt": "{} is a citizen of", "relation_id": "P27", "subject": "...",
                            "target_new": {"str": "...", "id": "..."}, "target_true": {...},
                            "question": "What is the country of citizenship of ...?"}, ...],
     "questions": [3 phrasings of one multi-hop question], "answer": "...", "answer_alias": [...],
     "new_answer": "...", "new_answer_alias": [...],
     "single_hops": [{"question", "cloze", "answer", "answer_alias"}], "new_single_hops": [...],
     "orig": {"triples", "triples_labeled", "new_triples", "new_triples_labeled", "edit_triples"}}

Mapping:

* ``requested_rewrite[0]`` is the primary rewrite, the others ``extra_rewrites`` (all must be applied
  together); a ``rewrite`` probe is made for each. Their ``question`` texts are kept in
  ``case.meta["rewrite_questions"]``.
* each of ``questions`` -> a ``multihop`` probe: target ``new_answer``, aliases ``new_answer_alias``, foil
  ``answer`` (old aliases in ``meta["foil_aliases"]``), ``meta["group"]`` = the case id (the phrasings of one
  question share it; MQuAKE counts a case as solved when any phrasing is) and ``meta["phrasing"]`` = 0, 1, 2.
* each of ``new_single_hops`` -> a ``portability`` probe with ``meta["subtype"] = "single_hop"``: prompt = the
  ``cloze`` form (the ``question`` form when there is no cloze; the question is kept in ``meta``), target its
  ``answer``, aliases ``answer_alias``, foil the old hop's answer when it differs (``meta["hop"]`` = position).
* ``single_hops`` and ``orig`` are kept in ``case.meta``.
"""
from __future__ import annotations

from typing import Any

from editlens.data.formats._util import Fields, as_str
from editlens.data.formats.counterfact import parse_rewrite
from editlens.data.schema import EditCase, Probe, ProbeKind, make_case

NAME = "mquake"
DESCRIPTION = "MQuAKE (CF, T): requested_rewrite list + multi-hop questions, new_answer, new_single_hops"


def matches(record: dict) -> bool:
    """An MQuAKE record has ``requested_rewrite`` plus ``questions`` / ``new_answer``."""
    return "requested_rewrite" in record and ("new_answer" in record or "questions" in record)


def _aliases(f: Fields, key: str) -> tuple[str, ...]:
    """Alias strings (blank entries, which occur in the public files, are skipped)."""
    out = []
    for i, a in enumerate(f.list(key)):
        if isinstance(a, str) and not a.strip():
            continue
        out.append(as_str(a, f, None, field=f"{f.name(key)}[{i}]"))
    return tuple(dict.fromkeys(out))


def parse(record: Any, *, index: int, path: Any = None) -> EditCase:
    """Normalise one MQuAKE record into an :class:`EditCase`."""
    f = Fields(record, path=path, record=index)
    raw = f.raw("requested_rewrite")
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise f.error("must not be empty", "requested_rewrite")
    rewrites, questions = [], []
    for i, r in enumerate(items):
        rf = Fields(r, path=path, record=index,
                    prefix=f"requested_rewrite[{i}]" if isinstance(raw, list) else "requested_rewrite")
        rewrites.append(parse_rewrite(rf)[0])
        q = r.get("question")
        questions.append(q if isinstance(q, str) else None)
    case_id = str(record.get("case_id", index))

    new_answer = f.str("new_answer")
    new_aliases = tuple(a for a in _aliases(f, "new_answer_alias") if a != new_answer)
    answer = f.str("answer", required=False)
    qs = f.str_list("questions", required=True)
    if not qs:
        raise f.error("must not be empty", "questions")
    old_aliases = list(_aliases(f, "answer_alias"))
    multihop = [Probe(q, new_answer, answer, new_aliases,
                      {"group": case_id, "phrasing": i, **({"foil_aliases": old_aliases} if old_aliases else {})})
                for i, q in enumerate(qs)]

    old_hops = f.list("single_hops")
    portability = []
    for i, hop in enumerate(f.list("new_single_hops")):
        hf = Fields(hop, path=path, record=index, prefix=f"new_single_hops[{i}]")
        question = hf.str("question", required=False)
        cloze = hf.str("cloze", required=False)
        if cloze is None and question is None:
            raise hf.error("missing required field", "cloze")
        target = hf.str("answer")
        foil = None
        if i < len(old_hops) and isinstance(old_hops[i], dict) and isinstance(old_hops[i].get("answer"), str):
            old = old_hops[i]["answer"].strip()
            foil = old if old and old != target else None
        meta: dict[str, Any] = {"subtype": "single_hop", "hop": i}
        if question is not None and cloze is not None:
            meta["question"] = question
        portability.append(Probe(cloze or question, target, foil,  # type: ignore[arg-type]
                                 tuple(a for a in _aliases(hf, "answer_alias") if a != target), meta))

    meta = {"source": NAME, "record": index}
    if any(q is not None for q in questions):
        meta["rewrite_questions"] = questions
    for key in ("single_hops", "orig"):
        if record.get(key) is not None:
            meta[key] = record[key]
    return make_case(case_id, rewrites[0], {ProbeKind.MULTIHOP: multihop, ProbeKind.PORTABILITY: portability},
                     extra_rewrites=rewrites[1:], meta=meta)
