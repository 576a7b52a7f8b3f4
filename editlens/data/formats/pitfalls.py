"""ConflictEdit and RoundEdit (Li et al., ICLR 2024, "Unveiling the Pitfalls of Knowledge Editing").

Two formats, detected from the record's keys; the public files (``reverse_edit.json``, ``composite_edit.json``,
``coverage_edit.json``, ``easy.json``, ``hard.json``) load unchanged. A Wikidata entity is ``{"id", "label"}``
and a relation ``{"id", "prompt", "query", "label"}`` (``prompt`` is the cloze template with one ``{}``).

``conflictedit`` — ``{"type": "reverse"|"composite"|"coverage", "rule"?, "triples": [...], "prerequisites": [...],
"edits": [e1, e2]}``, each edit ``{"relation", "subject", "object", "new_object", "true_object"?}``. The record
becomes one :class:`EditCase` whose ``rewrite`` is ``e1`` and whose ``extra_rewrites`` is ``(e2,)`` (to be applied
*after* ``e1``; :func:`stage_cases` splits them for the two-stage protocol). ``target_true`` of ``e2`` is its
``true_object`` when given (composite: the object the rule implies after ``e1``), else its ``object``. The facts
the conflict metrics compare (survey App. A.1, Li et al.'s code) are in ``case.meta["facts"]``, each
``{"subject", "relation", "object", "prompts"}``:

==========  ==========================================  ==========================================
kind        ``k_o`` (old fact: e1's new triple)         ``k_n`` (new fact the edits imply)
==========  ==========================================  ==========================================
reverse     ``(s1, r1, o2)`` — e1's subject → new obj    ``(s2, r1, o2)`` — e2's new object is the
                                                         subject, e1's relation and new object
composite   ``(s1, r1, o2)`` — e1's subject → new obj    ``(s1, r1, o3)`` — e1's subject and relation,
                                                         e2's new object; tied fact ``k_t`` =
                                                         ``triples[prerequisites[0]]``
coverage    ``(s, r, o1)`` — e1's triple                 ``(s, r, o2)`` — e2's triple (same prompts)
==========  ==========================================  ==========================================

``rule`` ``Pa&Pb>Pc`` (composite) or ``Pa>Pb`` (reverse) is kept in ``meta["rule"]``. The prompts of a fact are
the relation's cloze prompt followed by its paraphrase templates from ``conflict_prompts.json`` (ten per
relation), each filled with the fact's subject: ``p(o | s, r)`` is averaged over them as in Li et al.'s code.

``roundedit`` — ``{"type": "1-N@Pid", "edit": {"relation", "subject", "object", "new_object"},
"true_objects": [...]}``: ``e1 = (s, r, o → o*)``, ``e2 = (s, r, o* → o)`` (``rewrite`` and ``extra_rewrites``).
``meta["prompts"]`` are the relation's prompt and its ``round_prompts.json`` templates filled with ``s``,
``meta["true_objects"]`` the true objects' labels with the edited object ``o`` first (matched by Wikidata id;
the others in file order, duplicates of a label kept as in the file), ``meta["intermediate"]`` is ``o*``.

Probes for the ordinary metrics: ``rewrite`` probes of both edits (ConflictEdit); ``portability`` probes
(subtype ``conflict_<kind>``) for ``k_n`` of reverse/composite and ``paraphrase`` probes of ``e2`` for coverage;
``other_attribution`` probes for the tied fact. RoundEdit: one ``rewrite`` probe and ``paraphrase`` probes of the
final state (target ``o``, foil ``o*``: after the round trip the model should answer ``o`` again).

Paraphrase templates: a ``conflict_prompts.json`` / ``round_prompts.json`` next to the data file is used when
present, else the copies shipped in ``editlens/resources/data/pitfalls/`` (the public files, unchanged; the
small ``*_sample.json`` files there are the first records of the public files). A relation
without templates gets its cloze prompt only.

One record of the public ``coverage_edit.json`` (index 2356) has an ``e1`` whose ``new_object`` is its
``object`` (the same Wikidata id): it loads, with that rewrite's ``target_true`` left unset and
``meta["degenerate"]`` saying why, so that all 2,500 records load as the authors evaluated them.
"""
from __future__ import annotations

import json
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from editlens.data.formats._util import Fields
from editlens.data.schema import EditCase, Probe, ProbeKind, Rewrite, fill_template, make_case
from editlens.errors import DataFormatError

CONFLICT_NAME = "conflictedit"
CONFLICT_DESCRIPTION = ("ConflictEdit (Li et al. ICLR 2024): reverse / composite / coverage edit pairs "
                        "(triples, rule, edits e1, e2)")
ROUND_NAME = "roundedit"
ROUND_DESCRIPTION = "RoundEdit (Li et al. ICLR 2024): an edit o -> o* and its round trip back, with true_objects"

CONFLICT_KINDS = ("reverse", "composite", "coverage")
_RESOURCES = Path(__file__).resolve().parents[2] / "resources" / "data" / "pitfalls"
#: the shipped samples (``reverse_edit_sample.json``, ``composite_edit_sample.json``, ``coverage_edit_sample.json``,
#: ``easy_sample.json``, ``hard_sample.json``: the first records of the public files) and the template files
SAMPLES = _RESOURCES
CONFLICT_PROMPTS = "conflict_prompts.json"
ROUND_PROMPTS = "round_prompts.json"


# ------------------------------------------------------------------------------------------------ detection
def conflict_matches(record: dict) -> bool:
    """A ConflictEdit record has ``edits``, ``triples`` and ``prerequisites``."""
    return "edits" in record and "triples" in record and "prerequisites" in record


def round_matches(record: dict) -> bool:
    """A RoundEdit record has one ``edit`` and ``true_objects``."""
    return "true_objects" in record and isinstance(record.get("edit"), dict)


# ------------------------------------------------------------------------------------------------ templates
@lru_cache(maxsize=16)
def _load_templates(path: str) -> dict[str, tuple[str, ...]]:
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataFormatError(f"cannot read the paraphrase templates: {e}", path=p) from None
    if not isinstance(raw, dict):
        raise DataFormatError("expected an object {relation id: [templates]}", path=p)
    out: dict[str, tuple[str, ...]] = {}
    for rel, items in raw.items():
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise DataFormatError("expected an array of template strings", path=p, field=str(rel))
        for i, t in enumerate(items):
            if t.count("{}") != 1:
                raise DataFormatError(f"template must contain exactly one '{{}}' for the subject, got {t!r}",
                                      path=p, field=f"{rel}[{i}]")
        out[str(rel)] = tuple(items)
    return out


def templates_file(name: str, data_path: Any = None) -> Path:
    """The template file ``name`` next to ``data_path`` when there is one, else the shipped copy."""
    if data_path is not None:
        try:
            sibling = Path(str(data_path)).resolve().parent / name
        except (OSError, ValueError):  # pragma: no cover - odd path
            sibling = None
        if sibling is not None and sibling.is_file():
            return sibling
    return _RESOURCES / name


def templates(name: str, data_path: Any = None) -> dict[str, tuple[str, ...]]:
    """Paraphrase templates per relation id (see :func:`templates_file`)."""
    return _load_templates(str(templates_file(name, data_path)))


# ------------------------------------------------------------------------------------------------ fields
def _entity(f: Fields, key: str) -> tuple[str, str]:
    e = f.sub(key)
    label = e.str("label")  # type: ignore[union-attr]
    eid = e.raw("id", required=False)  # type: ignore[union-attr]
    return (str(eid) if eid is not None else label), label  # type: ignore[return-value]


def _relation(f: Fields, key: str = "relation") -> tuple[str, str]:
    r = f.sub(key)
    prompt = r.str("prompt")  # type: ignore[union-attr]
    if prompt.count("{}") != 1:  # type: ignore[union-attr]
        raise r.error(f"prompt template must contain exactly one '{{}}' for the subject, got {prompt!r}",  # type: ignore[union-attr]
                      "prompt")
    return r.str("id"), prompt  # type: ignore[return-value]


def _prompts(rel_id: str, prompt: str, subject: str, tmpl: dict[str, tuple[str, ...]]) -> list[str]:
    return [fill_template(t, subject) for t in (prompt, *tmpl.get(rel_id, ()))]


def _fact(subject: str, rel_id: str, prompt: str, obj: str, tmpl: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    return {"subject": subject, "relation": rel_id, "object": obj, "prompts": _prompts(rel_id, prompt, subject, tmpl)}


# ------------------------------------------------------------------------------------------------ ConflictEdit
def parse_conflict(record: Any, *, index: int, path: Any = None) -> EditCase:
    """One ConflictEdit record as an :class:`EditCase` (see the module docstring)."""
    f = Fields(record, path=path, record=index)
    kind = f.str("type")
    if kind not in CONFLICT_KINDS:
        raise f.error(f"unknown conflict type {kind!r}; expected one of {', '.join(CONFLICT_KINDS)}", "type")
    edits = f.list("edits", required=True)
    if len(edits) != 2:
        raise f.error(f"expected two edits (e1, e2), got {len(edits)}", "edits")
    triples = f.list("triples", required=True)
    prereq = f.list("prerequisites", required=True)
    tmpl = templates(CONFLICT_PROMPTS, path)
    parsed = []
    for j, e in enumerate(edits):
        ef = Fields(e, path=path, record=index, prefix=f"edits[{j}]")
        rel_id, prompt = _relation(ef)
        (sid, subj), (oid, obj), (nid, new) = _entity(ef, "subject"), _entity(ef, "object"), _entity(ef, "new_object")
        true = _entity(ef, "true_object") if ef.has("true_object") else None
        parsed.append({"rel": rel_id, "prompt": prompt, "sid": sid, "subject": subj, "oid": oid, "object": obj,
                       "nid": nid, "new": new, "true": true})
    e1, e2 = parsed
    meta: dict[str, Any] = {"source": CONFLICT_NAME, "conflict_kind": kind}
    if f.has("rule"):
        meta["rule"] = f.str("rule")
    rewrites = []
    for j, e in enumerate(parsed):
        old_id, old = e["true"] if e["true"] is not None else (e["oid"], e["object"])
        target_true: str | None = old
        if old_id == e["nid"] or old.strip() == e["new"].strip():
            target_true = None
            meta["degenerate"] = f"edits[{j}]: new_object {e['new']!r} equals the old object (the edit changes nothing)"
        rw = Rewrite(e["prompt"], e["subject"], e["new"], target_true)
        rewrites.append(rw.validate(path=path, record=index, field_prefix=f"edits[{j}]"))
    k_o = _fact(e1["subject"], e1["rel"], e1["prompt"], e1["new"], tmpl)
    if kind == "reverse":
        if e2["sid"] != e1["nid"]:
            raise f.error(f"reverse conflict: e2's subject {e2['subject']!r} must be e1's new object {e1['new']!r}",
                          "edits[1].subject")
        k_n = _fact(e2["new"], e1["rel"], e1["prompt"], e1["new"], tmpl)
    elif kind == "composite":
        k_n = _fact(e1["subject"], e1["rel"], e1["prompt"], e2["new"], tmpl)
    else:
        if (e2["sid"], e2["rel"]) != (e1["sid"], e1["rel"]):
            raise f.error("coverage conflict: both edits must have the same subject and relation", "edits[1]")
        k_n = _fact(e1["subject"], e1["rel"], e1["prompt"], e2["new"], tmpl)
    facts: dict[str, Any] = {"k_o": k_o, "k_n": k_n}
    if kind == "composite":
        if not prereq:
            raise f.error("a composite conflict needs the index of its tied fact", "prerequisites")
        t = prereq[0]
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < len(triples):
            raise f.error(f"expected an index into triples (0..{len(triples) - 1}), got {t!r}", "prerequisites[0]")
        tf = Fields(triples[t], path=path, record=index, prefix=f"triples[{t}]")
        t_rel, t_prompt = _relation(tf)
        facts["k_t"] = _fact(_entity(tf, "subject")[1], t_rel, t_prompt, _entity(tf, "object")[1], tmpl)
    meta["facts"] = facts
    probes: dict[str, list[Probe]] = {ProbeKind.REWRITE.value: [
        Probe(r.text, r.target_new, r.target_true, meta={"edit": j}) for j, r in enumerate(rewrites)]}
    if kind == "coverage":
        probes[ProbeKind.PARAPHRASE.value] = [Probe(p, e2["new"], e1["new"], meta={"edit": 1})
                                              for p in k_n["prompts"][1:]]
    else:
        probes[ProbeKind.PORTABILITY.value] = [Probe(p, k_n["object"], meta={"subtype": f"conflict_{kind}"})
                                               for p in k_n["prompts"]]
    if "k_t" in facts:
        probes[ProbeKind.OTHER_ATTRIBUTION.value] = [Probe(p, facts["k_t"]["object"], meta={"fact": "k_t"})
                                                     for p in facts["k_t"]["prompts"]]
    try:
        return make_case(str(index), rewrites[0], probes, extra_rewrites=rewrites[1:], meta=meta)
    except DataFormatError as e:  # pragma: no cover - validated above
        raise DataFormatError(str(e), path=path, record=index) from None


# ------------------------------------------------------------------------------------------------ RoundEdit
def parse_round(record: Any, *, index: int, path: Any = None) -> EditCase:
    """One RoundEdit record as an :class:`EditCase` (see the module docstring)."""
    f = Fields(record, path=path, record=index)
    ef = f.sub("edit")
    rel_id, prompt = _relation(ef)  # type: ignore[arg-type]
    (_, subj), (oid, obj), (nid, new) = (_entity(ef, "subject"), _entity(ef, "object"),  # type: ignore[arg-type]
                                         _entity(ef, "new_object"))  # type: ignore[arg-type]
    if nid == oid or new.strip() == obj.strip():
        raise ef.error(f"new_object {new!r} equals object: the round trip would change nothing", "new_object")  # type: ignore[union-attr]
    objs = f.list("true_objects", required=True)
    if len(objs) < 2:
        raise f.error(f"expected at least two true objects (the edited one and another), got {len(objs)}",
                      "true_objects")
    labels: list[tuple[str, str]] = []
    for i, o in enumerate(objs):
        of = Fields(o, path=path, record=index, prefix=f"true_objects[{i}]")
        eid = of.raw("id", required=False)
        lab = of.str("label")
        labels.append((str(eid) if eid is not None else lab, lab))  # type: ignore[arg-type]
    first = [i for i, (eid, lab) in enumerate(labels) if eid == oid]
    if not first:
        first = [i for i, (_, lab) in enumerate(labels) if lab == obj]
    if not first:
        raise f.error(f"the edited object {obj!r} is not among the true objects", "true_objects")
    order = [labels[first[0]][1]] + [lab for i, (_, lab) in enumerate(labels) if i != first[0]]
    tmpl = templates(ROUND_PROMPTS, path)
    e1 = Rewrite(prompt, subj, new, obj).validate(path=path, record=index, field_prefix="edit")
    e2 = Rewrite(prompt, subj, obj, new)
    prompts = _prompts(rel_id, prompt, subj, tmpl)
    meta = {"source": ROUND_NAME, "round_type": f.str("type", required=False) or "", "relation": rel_id,
            "prompts": prompts, "true_objects": order, "intermediate": new}
    probes = {ProbeKind.REWRITE.value: [Probe(e2.text, obj, new, meta={"edit": 1})],
              ProbeKind.PARAPHRASE.value: [Probe(p, obj, new, meta={"edit": 1}) for p in prompts[1:]]}
    return make_case(str(index), e1, probes, extra_rewrites=[e2], meta=meta)


# ------------------------------------------------------------------------------------------------ stages
def is_staged(case: EditCase) -> bool:
    """True for a ConflictEdit / RoundEdit case (two edits meant to be applied one after the other)."""
    return case.meta.get("source") in (CONFLICT_NAME, ROUND_NAME) and len(case.rewrites) == 2


def stage_cases(case: EditCase) -> list[EditCase]:
    """The two edits of a ConflictEdit / RoundEdit case as two one-rewrite cases ``[<id>/e1, <id>/e2]``, to be
    applied in order (``e1`` alone gives θ′, then ``e2`` on top gives θ″ / θ*)."""
    if not is_staged(case):
        raise DataFormatError(f"case {case.case_id!r} is not a ConflictEdit/RoundEdit case with two edits")
    return [replace(make_case(f"{case.case_id}/e{j + 1}", r), meta={"stage_of": case.case_id, "stage": j + 1})
            for j, r in enumerate(case.rewrites)]


def summary(cases: Sequence[EditCase]) -> dict[str, Any]:
    """Counts of a loaded ConflictEdit / RoundEdit dataset (what ``editlens data inspect`` prints)."""
    out: dict[str, Any] = {}
    for c in cases:
        src = c.meta.get("source")
        if src == CONFLICT_NAME:
            k = c.meta["conflict_kind"]
            out.setdefault("conflict kinds", {}).setdefault(k, 0)
            out["conflict kinds"][k] += 1
            if "rule" in c.meta:
                out.setdefault("rules", {}).setdefault(c.meta["rule"], 0)
                out["rules"][c.meta["rule"]] += 1
            if "k_t" in c.meta.get("facts", {}):
                out["tied facts"] = out.get("tied facts", 0) + 1
        elif src == ROUND_NAME:
            n = len(c.meta["true_objects"])
            out.setdefault("true objects per case", {}).setdefault(n, 0)
            out["true objects per case"][n] += 1
        else:
            continue
        if "degenerate" in c.meta:
            out["degenerate edits"] = out.get("degenerate edits", 0) + 1
        out["fact prompts"] = out.get("fact prompts", 0) + (
            sum(len(v["prompts"]) for v in c.meta["facts"].values()) if src == CONFLICT_NAME
            else len(c.meta["prompts"]) * len(c.meta["true_objects"]))
    return out
