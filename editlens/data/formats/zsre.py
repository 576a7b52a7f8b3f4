"""zsRE question answering edits (Levy et al. 2017) as used by MEND, ROME and MEMIT, and EasyEdit's variant.

MEND/ROME evaluation record (``zsre_mem_eval.json``, ``zsre_mend_eval.json``)::

    {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?", "pred": "...",
     "rephrase": "What university did Watts Humphrey take part in?", "alt": "University of Michigan",
     "answers": ["Illinois Institute of Technology"], "loc": "nq question: who played desmond doss father in
     hacksaw ridge", "loc_ans": "Hugo Weaving", "cond": "... >> ... || ..."}

EasyEdit's ZsRE files add ``portability`` (a dict of subsets such as ``Subject_Replace``, ``Reverse_Relation``,
``One_Hop``, each a list of ``{prompt, ground_truth | answer}``; or a single ``{"New Question", "New Answer"}``)
and sometimes a ``locality`` dict of ``{prompt, ground_truth}`` lists.

Mapping:

* rewrite: template = ``src`` with the first occurrence of ``subject`` replaced by ``{}`` (exact match, then
  case-insensitive; an error naming ``src`` when the subject is absent); ``target_new`` = ``alt``,
  ``target_true`` = ``answers[0]`` (further answers are kept in ``meta["true_aliases"]``).
* ``rephrase`` -> a ``paraphrase`` probe (target ``alt``, foil ``answers[0]``).
* ``loc`` -> a ``locality`` probe with target ``loc_ans``. The ``"nq question: "`` prefix is stripped and a
  ``?`` appended when the question has no final punctuation (ROME also appends ``?``); the original text is in
  ``probe.meta["original_prompt"]``.
* ``portability`` subsets -> ``portability`` probes with ``meta["subtype"]`` in ``subject_replace``,
  ``reverse_relation``, ``one_hop`` (subset names are normalised to snake_case; ``Inverse_Relation`` ->
  ``reverse_relation``, ``New Question`` -> ``one_hop``).
* ``locality`` subsets -> ``locality`` probes (``other_attribution`` / ``distract_neighbor`` for subsets of
  those names) with ``meta["subtype"]``.
* ``pred`` and ``cond`` are kept in ``case.meta``. There is no case id in the files: the record index is used
  unless a ``case_id`` field exists.
"""
from __future__ import annotations

from typing import Any

from editlens.data.formats._util import (Fields, as_str, find_subject, locality_kind, make_rewrite,
                                         qa_probes, subset_probes, subtype_name)
from editlens.data.schema import EditCase, Probe, ProbeKind, make_case

NAME = "zsre"
DESCRIPTION = "zsRE (MEND/ROME eval split; EasyEdit variant with portability): subject, src, alt, answers, rephrase, loc"

NQ_PREFIX = "nq question:"


def matches(record: dict) -> bool:
    """A zsRE record has ``src`` and ``alt`` (or ``answers``) and a ``subject``."""
    return "src" in record and ("alt" in record or "answers" in record)


def locality_prompt(loc: str) -> str:
    """Strip the ``"nq question: "`` prefix and end the question with ``?``."""
    q = loc.strip()
    if q.lower().startswith(NQ_PREFIX):
        q = q[len(NQ_PREFIX):].strip()
    if q and q[-1] not in "?.!:":
        q += "?"
    return q


def parse(record: Any, *, index: int, path: Any = None) -> EditCase:
    """Normalise one zsRE record into an :class:`EditCase`."""
    f = Fields(record, path=path, record=index)
    subject = f.str("subject")
    src = f.str("src")
    alt = f.str("alt")
    answers = f.raw("answers")
    if isinstance(answers, list):
        if not answers:
            raise f.error("must not be empty (answers[0] is the original answer)", "answers")
        truths = [as_str(a, f, None, field=f"answers[{i}]") for i, a in enumerate(answers)]
    else:
        truths = [as_str(answers, f, "answers")]
    template, subject = find_subject(src, subject, f, "src")  # type: ignore[arg-type]
    rw = make_rewrite(template, subject, alt, truths[0], f, "rewrite")  # type: ignore[arg-type]

    probes: dict[ProbeKind, list[Probe]] = {}
    rephrase = f.raw("rephrase", required=False)
    if rephrase is not None:
        items = rephrase if isinstance(rephrase, list) else [rephrase]
        probes[ProbeKind.PARAPHRASE] = [
            Probe(as_str(p, f, None, field="rephrase" if not isinstance(rephrase, list) else f"rephrase[{i}]"),
                  rw.target_new, rw.target_true) for i, p in enumerate(items)]
    if f.has("loc"):
        loc = f.str("loc")
        loc_ans = f.str("loc_ans")
        probes.setdefault(ProbeKind.LOCALITY, []).append(
            Probe(locality_prompt(loc), loc_ans, meta={"original_prompt": loc}))  # type: ignore[arg-type]

    port = f.raw("portability", required=False)
    if isinstance(port, dict) and any(k in port for k in ("New Question", "New Answer")):
        probes.setdefault(ProbeKind.PORTABILITY, []).extend(
            qa_probes(port, f, "portability", meta={"subtype": "one_hop"}, rewrite=rw))
    elif isinstance(port, dict):
        pf = f.sub("portability")
        for key, value in port.items():
            st = subtype_name(key)
            probes.setdefault(ProbeKind.PORTABILITY, []).extend(
                subset_probes(value, pf, key, meta_of=lambda i, st=st: {"subtype": st}, rewrite=rw))  # type: ignore[arg-type]
    elif isinstance(port, list):
        probes.setdefault(ProbeKind.PORTABILITY, []).extend(
            subset_probes(port, f, "portability", meta_of=lambda i: {"subtype": "one_hop"}, rewrite=rw))
    elif port is not None:
        raise f.error("expected an object of portability subsets", "portability")

    loc_d = f.raw("locality", required=False)
    if isinstance(loc_d, dict):
        lf = f.sub("locality")
        for key, value in loc_d.items():
            st = subtype_name(key)
            probes.setdefault(locality_kind(key), []).extend(
                subset_probes(value, lf, key, meta_of=lambda i, st=st: {"subtype": st}, rewrite=None))  # type: ignore[arg-type]
    elif loc_d is not None:
        raise f.error("expected an object of locality subsets", "locality")

    meta: dict[str, Any] = {"source": NAME, "record": index}
    if len(truths) > 1:
        meta["true_aliases"] = truths[1:]
    for key in ("pred", "cond"):
        if record.get(key) is not None:
            meta[key] = record[key]
    return make_case(str(record.get("case_id", index)), rw, probes, meta=meta)
