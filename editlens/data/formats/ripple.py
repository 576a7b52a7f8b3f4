"""RippleEdits (Cohen et al. 2024): an edit plus tests of its "ripple effects".

Record schema (``popular.json``, ``random.json``, ``recent.json``)::

    {"example_type": "popular",
     "edit": {"prompt": "The name of the country of citizenship of Leonardo DiCaprio is Syria.",
              "subject_id": "Q38111", "relation": "COUNTRY_OF_CITIZENSHIP", "target_id": "Q858",
              "original_fact": {"prompt": "... is United States of America.", "subject_id": ..., ...}},
     "Logical_Generalization": [test, ...], "Compositionality_I": [...], "Compositionality_II": [...],
     "Subject_Aliasing": [...], "Relation_Specificity": [...], "Forgetfulness": [...], "Preservation": [...]}

    test = {"test_queries": [query, ...], "test_condition": "OR" | "AND", "condition_queries": [query, ...]}
    query = {"prompt": "...", "answers": [{"value": "...", "aliases": [...]}], "query_type": ..., ...}

The edit carries no subject or target strings: its ``prompt`` is the relation's phrase with the subject filled
in, then ``" <target>."``. The loader recovers the template, subject and targets from a table of the
benchmark's relation phrases (``RELATION_TEMPLATES``), checking the split against ``original_fact.prompt``
(the same phrase followed by the old target); for an unknown relation it falls back to the generic
``"The name of the <relation words> of {} is"`` / ``"The <relation words> of {} is"`` shapes, else raises an
error naming ``edit.relation``.

Probe mapping (every test query becomes one probe; its first answer's ``value`` is the target, the rest of the
values and all aliases are ``aliases``):

* ``Logical_Generalization``, ``Compositionality_I``, ``Compositionality_II``, ``Subject_Aliasing`` (and any
  other criterion not listed below) -> ``portability`` probes, ``meta["subtype"]`` = the criterion name in
  snake_case (``meta["criterion"]`` keeps the original spelling). A probe whose target is the new object
  gets the old object as foil.
* ``Relation_Specificity``, ``Forgetfulness``, ``Preservation`` (facts that must survive the edit) ->
  ``other_attribution`` probes when the query mentions the edited subject, else ``locality`` probes.
* ``meta["test"]`` numbers the test within its criterion, ``meta["test_condition"]`` and
  ``meta["condition_queries"]`` (list of ``{prompt, target, aliases}``) keep the conditions under which the
  benchmark counts the test (the model must know the condition facts first).
"""
from __future__ import annotations

import re
from typing import Any

from editlens.data.formats._util import Fields, as_str, foil_for, make_rewrite, norm_key
from editlens.data.schema import EditCase, Probe, ProbeKind, Rewrite, make_case
from editlens.errors import DataFormatError

NAME = "ripple"
DESCRIPTION = "RippleEdits: edit (prompt, relation, original_fact) + ripple criteria with test/condition queries"

#: The RippleEdits relation phrases, with ``{}`` for the subject (the fact prompt is ``phrase + " " + target + "."``).
RELATION_TEMPLATES: dict[str, str] = {
    "MOTHER": "The name of the mother of {} is",
    "FATHER": "The name of the father of {} is",
    "BROTHER": "The name of the brother of {} is",
    "SISTER": "The name of the sister of {} is",
    "SIBLING": "The names of the siblings of {} are",
    "SPOUSE": "The name of the spouse of {} is",
    "UNCLE": "The name of the uncle of {} is",
    "AUNT": "The name of the aunt of {} is",
    "CHILD": "The name of the child of {} is",
    "NUMBER_OF_CHILDREN": "The number of children {} has is",
    "SEX_OR_GENDER": "The gender of {} is",
    "PLACE_OF_BIRTH": "The place of birth of {} is",
    "PLACE_OF_DEATH": "The place of death of {} is",
    "PLACE_OF_BURIAL": "The place of burial of {} is",
    "COUNTRY": "The name of the country which {} is associated with is",
    "COUNTRY_OF_CITIZENSHIP": "The name of the country of citizenship of {} is",
    "POSITION_HELD": "The name of the position held by {} is",
    "STEPFATHER": "The name of the stepfather of {} is",
    "STEPMOTHER": "The name of the stepmother of {} is",
    "MEMBER_OF_SPORTS_TEAM": "The name of the sports team which {} is a member of is",
    "ALMA_MATER": "The name of the alma mater of {} is",
    "SEXUAL_ORIENTATION": "The sexual orientation of {} is",
    "OCCUPATION": "The occupation of {} is",
    "EMPLOYER": "The name of the employer of {} is",
    "LEAGUE": "The name of the league which {} plays in is",
    "FIELD_OF_WORK": "The name of the field of work of {} is",
    "NATIVE_LANGUAGE": "The mother tongue of {} is",
    "AWARD_RECEIVED": "The name of the award {} won is",
    "FOLLOWS": "{} follows",
    "FOLLOWED_BY": "{} is followed by",
    "ETHNIC_GROUP": "The name of the ethnic group which {} is associated with is",
    "RELIGION": "The name of the religion which {} is associated with is",
    "EYE_COLOR": "The eye color of {} is",
    "DATE_OF_BIRTH": "The date of birth of {} is",
    "DATE_OF_DEATH": "The date of death of {} is",
    "HEAD_OF_GOVERNMENT": "The name of the head of government of {} is",
    "HEAD_OF_STATE": "The name of the head of state of {} is",
    "CONTINENT": "The name of the continent which {} is part of is",
    "CAPITAL": "The name of the capital city of {} is",
    "CURRENCY": "The name of the currency in {} is",
    "OFFICIAL_LANGUAGE": "The official language of {} is",
    "ANTHEM": "The name of the anthem of {} is",
    "CAPITAL_OF": "The name of the country which {} is the capital of is",
    "AUTHOR": "The name of the author of {} is",
    "EDITOR": "The name of the editor of {} is",
    "DIRECTOR": "The name of the director of {} is",
    "SCREENWRITER": "The name of the screenwriter of {} is",
    "CAST_MEMBER": "The names of the cast members of {} are",
    "ARCHITECT": "The name of the architect of {} is",
    "COMPOSER": "The name of the composer of {} is",
    "FOUNDER": "The name of the founder of {} is",
}

GENERALIZATION = ("Logical_Generalization", "Compositionality_I", "Compositionality_II", "Subject_Aliasing")
PRESERVATION = ("Relation_Specificity", "Forgetfulness", "Preservation")
_NOT_CRITERIA = {"edit", "example_type", "case_id"}


def matches(record: dict) -> bool:
    """A RippleEdits record has an ``edit`` object and at least one ripple criterion list."""
    return isinstance(record.get("edit"), dict) and any(k in record for k in GENERALIZATION + PRESERVATION)


def _templates(relation: str) -> list[str]:
    out = []
    if relation in RELATION_TEMPLATES:
        out.append(RELATION_TEMPLATES[relation])
    words = relation.lower().replace("_", " ").strip()
    if words:
        out += [f"The name of the {words} of {{}} is", f"The names of the {words} of {{}} are",
                f"The {words} of {{}} is"]
    return out


def _split(prompt: str, template: str, other: str | None) -> tuple[str, str, str | None] | None:
    """Split ``"<lead><subject><tail> <target>."`` by ``template``; check against the original fact prompt."""
    lead, tail = template.split("{}")
    text = prompt.rstrip().rstrip(".").rstrip()
    if not text.startswith(lead):
        return None
    other_text = other.rstrip().rstrip(".").rstrip() if other else None
    for m in re.finditer(re.escape(tail + " "), text):
        start = m.start()
        if start <= len(lead):
            continue
        subject = text[len(lead):start]
        target = text[m.end():].strip()
        if not target or not subject.strip():
            continue
        head = lead + subject + tail + " "
        old = None
        if other_text is not None:
            if not other_text.startswith(head):
                continue
            old = other_text[len(head):].strip() or None
        return subject, target, old
    return None


def parse_edit(f: Fields) -> tuple[Rewrite, dict[str, Any]]:
    """Recover the :class:`Rewrite` of a RippleEdits ``edit`` object (see the module docstring)."""
    e = f.sub("edit")
    assert e is not None
    prompt = e.str("prompt")
    relation = e.str("relation")
    orig = e.sub("original_fact", required=False)
    orig_prompt = orig.str("prompt") if orig is not None else None
    found = None
    for template in _templates(relation):  # type: ignore[arg-type]
        parts = _split(prompt, template, orig_prompt)  # type: ignore[arg-type]
        if parts is None and orig_prompt is not None:
            parts = _split(prompt, template, None)  # original fact phrased differently: trust the edit
        if parts is not None:
            found = template, parts
            break
    if found is None:
        raise DataFormatError(f"cannot locate the subject and target in edit.prompt {prompt!r}: unknown relation "
                              f"{relation!r} (known: {', '.join(sorted(RELATION_TEMPLATES))})",
                              path=f.path, record=f.record, field="edit.relation")
    template, (subject, target, old) = found
    rw = make_rewrite(template, subject, target, old, f, "edit")
    info = {k: e.obj[k] for k in ("relation", "subject_id", "target_id") if e.obj.get(k) is not None}
    if orig is not None and orig.obj.get("target_id") is not None:
        info["target_true_id"] = orig.obj["target_id"]
    return rw, info


def _query(q: Any, f: Fields, field: str) -> tuple[str, str | None, tuple[str, ...], Fields]:
    qf = Fields(q, path=f.path, record=f.record, prefix=field)
    prompt = qf.str("prompt")
    values: list[str] = []
    for i, a in enumerate(qf.list("answers")):
        af = Fields(a, path=f.path, record=f.record, prefix=f"{field}.answers[{i}]")
        v = af.raw("value", required=True)
        if isinstance(v, str) and not v.strip():
            continue
        values.append(as_str(v, af, "value"))
        for j, al in enumerate(af.list("aliases")):
            if isinstance(al, str) and not al.strip():
                continue
            values.append(as_str(al, af, None, field=f"{af.prefix}.aliases[{j}]"))
    values = list(dict.fromkeys(values))
    target = values[0] if values else None
    return prompt, target, tuple(values[1:]), qf  # type: ignore[return-value]


def parse(record: Any, *, index: int, path: Any = None) -> EditCase:
    """Normalise one RippleEdits record into an :class:`EditCase`."""
    f = Fields(record, path=path, record=index)
    rw, info = parse_edit(f)
    probes: dict[ProbeKind, list[Probe]] = {}
    for crit, tests in record.items():
        if crit in _NOT_CRITERIA or not isinstance(tests, list):
            continue
        if tests and not all(isinstance(t, dict) and "test_queries" in t for t in tests):
            continue  # not a criterion list (tolerated extra field)
        generalization = crit not in PRESERVATION
        for ti, test in enumerate(tests):
            tf = Fields(test, path=path, record=index, prefix=f"{crit}[{ti}]")
            conditions = []
            for ci, cq in enumerate(tf.list("condition_queries")):
                cp, ct, ca, _ = _query(cq, tf, f"{crit}[{ti}].condition_queries[{ci}]")
                conditions.append({"prompt": cp, "target": ct, "aliases": list(ca)})
            for qi, q in enumerate(tf.list("test_queries", required=True)):
                prompt, target, aliases, _ = _query(q, tf, f"{crit}[{ti}].test_queries[{qi}]")
                meta: dict[str, Any] = {"subtype": norm_key(crit), "criterion": crit, "test": ti}
                if test.get("test_condition") is not None:
                    meta["test_condition"] = test["test_condition"]
                if conditions:
                    meta["condition_queries"] = conditions
                if generalization:
                    kind = ProbeKind.PORTABILITY
                    foil = foil_for(target, rw)
                else:
                    kind = ProbeKind.OTHER_ATTRIBUTION if rw.subject in prompt else ProbeKind.LOCALITY
                    foil = None
                probes.setdefault(kind, []).append(Probe(prompt, target, foil, aliases, meta))
    meta = {"source": NAME, "record": index, **info}
    if record.get("example_type") is not None:
        meta["example_type"] = record["example_type"]
    return make_case(str(record.get("case_id", index)), rw, probes, meta=meta)
