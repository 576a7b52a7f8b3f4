"""CounterFact and Multi-CounterFact (ROME, Meng et al. 2022; MEMIT, Meng et al. 2023).

Record schema (``counterfact.json`` / ``multi_counterfact.json``)::

    {"case_id": 0, "pararel_idx": 2796,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                           "target_new": {"str": "English", "id": "Q1860"},
                           "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
     "paraphrase_prompts": [...], "neighborhood_prompts": [...], "attribute_prompts": [...],
     "generation_prompts": [...]}

``requested_rewrite`` may also be a list (Multi-CounterFact style batches): the first is the primary rewrite,
the others become ``extra_rewrites``.

Probe mapping (as in ROME's ``compute_rewrite_quality_counterfact``):

==================  ==========================  ==============  ===============
CounterFact field   probe kind                  target          foil
==================  ==========================  ==============  ===============
requested_rewrite   ``rewrite``                 target_new      target_true
paraphrase_prompts  ``paraphrase``              target_new      target_true
neighborhood_...    ``neighborhood``            target_true     target_new
attribute_prompts   ``attribute``               target_new      target_true
generation_prompts  ``generation``              ``None``        ``None``
==================  ==========================  ==============  ===============

Attribute prompts are about *other* subjects whose true object already is ``target_new`` (ROME uses them for
the reference texts of the consistency score). Optional extensions that some derived files carry are kept:
``dist_neighborhood_prompts`` / ``distracting_neighborhood_prompts`` become ``distract_neighbor`` probes
(target_true vs target_new, CounterFact+ style), and any of ``reference_texts`` / ``attribute_snippets`` /
``essence_texts`` / ``generation_references`` is copied into ``case.meta`` for the consistency and essence
metrics. ``case.meta`` also holds ``relation_id``, the Wikidata ids of the targets and ``pararel_idx``.
Extra fields are ignored.
"""
from __future__ import annotations

from typing import Any

from editlens.data.formats._util import Fields, make_rewrite
from editlens.data.schema import EditCase, Probe, ProbeKind, Rewrite, make_case

NAME = "counterfact"
DESCRIPTION = "CounterFact / Multi-CounterFact (ROME, MEMIT): requested_rewrite + paraphrase/neighborhood/attribute prompts"

_REFERENCE_KEYS = ("reference_texts", "attribute_snippets", "essence_texts", "generation_references")
_DIST_KEYS = ("dist_neighborhood_prompts", "distracting_neighborhood_prompts", "distract_neighborhood_prompts")


def matches(record: dict) -> bool:
    """A CounterFact record has ``requested_rewrite`` and CounterFact's prompt lists (and no MQuAKE answer)."""
    return "requested_rewrite" in record and "new_answer" not in record and "questions" not in record and (
        "paraphrase_prompts" in record or "neighborhood_prompts" in record or "case_id" in record)


def _target(rw: Fields, key: str, *, required: bool) -> tuple[str | None, Any]:
    value = rw.raw(key, required=required)
    if value is None:
        return None, None
    if isinstance(value, dict):
        t = rw.sub(key)
        return t.str("str"), t.obj.get("id")  # type: ignore[union-attr]
    return rw.str(key), None  # plain string targets (some derived files)


def parse_rewrite(rw: Fields) -> tuple[Rewrite, dict[str, Any]]:
    """Parse one ``requested_rewrite`` object; returns the rewrite and its ids for ``meta``."""
    prompt = rw.str("prompt")
    subject = rw.str("subject")
    new, new_id = _target(rw, "target_new", required=True)
    true, true_id = _target(rw, "target_true", required=False)
    rewrite = make_rewrite(prompt, subject, new, true, rw, rw.prefix)  # type: ignore[arg-type]
    info = {k: v for k, v in (("relation_id", rw.obj.get("relation_id")), ("target_new_id", new_id),
                              ("target_true_id", true_id)) if v is not None}
    return rewrite, info


def parse(record: Any, *, index: int, path: Any = None) -> EditCase:
    """Normalise one CounterFact record into an :class:`EditCase`."""
    f = Fields(record, path=path, record=index)
    raw_rw = f.raw("requested_rewrite")
    if isinstance(raw_rw, list):
        if not raw_rw:
            raise f.error("must not be empty", "requested_rewrite")
        parsed = [parse_rewrite(Fields(r, path=path, record=index, prefix=f"requested_rewrite[{i}]"))
                  for i, r in enumerate(raw_rw)]
    else:
        parsed = [parse_rewrite(f.sub("requested_rewrite"))]  # type: ignore[arg-type]
    rewrites = [p[0] for p in parsed]
    rw = rewrites[0]
    new, true = rw.target_new, rw.target_true

    probes: dict[ProbeKind, list[Probe]] = {
        ProbeKind.PARAPHRASE: [Probe(p, new, true) for p in f.str_list("paraphrase_prompts")],
        ProbeKind.NEIGHBORHOOD: [Probe(p, true, new) for p in f.str_list("neighborhood_prompts")] if true else
        [Probe(p) for p in f.str_list("neighborhood_prompts")],
        ProbeKind.ATTRIBUTE: [Probe(p, new, true) for p in f.str_list("attribute_prompts")],
        ProbeKind.GENERATION: [Probe(p) for p in f.str_list("generation_prompts")],
    }
    for key in _DIST_KEYS:
        if f.has(key):
            probes[ProbeKind.DISTRACT_NEIGHBOR] = [Probe(p, true, new) for p in f.str_list(key)]
            break

    case_id = record.get("case_id", index)
    meta: dict[str, Any] = {"source": NAME, "record": index}
    meta.update(parsed[0][1])
    if len(parsed) > 1:
        meta["extra_rewrite_ids"] = [p[1] for p in parsed[1:]]
    if "pararel_idx" in record:
        meta["pararel_idx"] = record["pararel_idx"]
    for key in _REFERENCE_KEYS:
        if record.get(key) is not None:
            meta[key] = record[key]
    return make_case(str(case_id), rw, probes, extra_rewrites=rewrites[1:], meta=meta)
