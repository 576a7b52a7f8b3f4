"""The editlens JSON Lines format: one normalised :class:`~editlens.data.schema.EditCase` per line.

Each line is one JSON object::

    {"case_id": "0",
     "rewrite": {"prompt": "The capital of {} is", "subject": "Japan", "target_new": "Seoul",
                 "target_true": "Tokyo"},
     "extra_rewrites": [{...same keys...}],
     "probes": {"rewrite": [{"prompt": "The capital of Japan is", "target": "Seoul", "foil": "Tokyo"}],
                "paraphrase": [{"prompt": "...", "target": "Seoul", "foil": "Tokyo", "aliases": [], "meta": {}}],
                "generation": [{"prompt": "..."}]},
     "meta": {"source": "counterfact"}}

* ``case_id`` (string or integer) and ``rewrite`` (with ``prompt`` holding exactly one ``{}``, ``subject``,
  ``target_new``; ``target_true`` optional) are required; everything else is optional.
* ``probes`` maps probe-kind names (:class:`~editlens.data.schema.ProbeKind` values) to lists of probes; a probe
  needs ``prompt``, the rest (``target``, ``foil``, ``aliases``, ``meta``) is optional.
* When ``probes`` has no ``"rewrite"`` key, one ``rewrite`` probe per rewrite is added (filled template ->
  ``target_new``, foil ``target_true``); :func:`dump_case` always writes the key (``[]`` when a case has no
  rewrite probe) so that :func:`editlens.data.save_cases` / :func:`editlens.data.load_cases` round-trip exactly.
* ``meta`` (case and probe) must be JSON; it is returned as plain dicts and lists.

The same records may also be stored as one JSON array (``[{...}, {...}]``).
"""
from __future__ import annotations

from typing import Any

from editlens.data.formats._util import Fields, as_str, make_rewrite
from editlens.data.schema import EditCase, Probe, ProbeKind, Rewrite, make_case
from editlens.errors import DataFormatError

NAME = "jsonl"
DESCRIPTION = "editlens JSON Lines: one normalised EditCase per line (case_id, rewrite, extra_rewrites, probes, meta)"

_KINDS = {k.value for k in ProbeKind}


def matches(record: dict) -> bool:
    """An editlens record has ``case_id`` and a ``rewrite`` object."""
    return "case_id" in record and isinstance(record.get("rewrite"), dict)


def _rewrite(f: Fields) -> Rewrite:
    return make_rewrite(f.str("prompt"), f.str("subject"), f.str("target_new"),  # type: ignore[arg-type]
                        f.str("target_true", required=False), f, f.prefix)


def _probe(p: Any, f: Fields) -> Probe:
    pf = Fields(p, path=f.path, record=f.record, prefix=f.prefix)
    target = pf.str("target", required=False)
    foil = pf.str("foil", required=False)
    aliases = tuple(pf.str_list("aliases"))
    meta = pf.raw("meta", required=False) or {}
    if not isinstance(meta, dict):
        raise pf.error("expected an object", "meta")
    return Probe(prompt=pf.str("prompt"), target=target, foil=foil, aliases=aliases, meta=meta)  # type: ignore[arg-type]


def parse(record: Any, *, index: int, path: Any = None) -> EditCase:
    """Parse one editlens JSON record into an :class:`EditCase`."""
    f = Fields(record, path=path, record=index)
    cid = f.raw("case_id")
    # case ids may be integers (docs/data.md); every other text field must be a JSON string
    case_id = as_str(str(cid) if isinstance(cid, int) and not isinstance(cid, bool) else cid, f, "case_id")
    rewrite = _rewrite(f.sub("rewrite"))  # type: ignore[arg-type]
    extras = [_rewrite(Fields(r, path=path, record=index, prefix=f"extra_rewrites[{i}]"))
              for i, r in enumerate(f.list("extra_rewrites"))]
    probes_obj = f.raw("probes", required=False) or {}
    if not isinstance(probes_obj, dict):
        raise f.error("expected an object mapping probe kinds to probe lists", "probes")
    probes: dict[str, list[Probe]] = {}
    for kind, items in probes_obj.items():
        if kind not in _KINDS:
            raise DataFormatError(f"unknown probe kind {kind!r}; valid kinds: {', '.join(sorted(_KINDS))}",
                                  path=path, record=index, field=f"probes.{kind}")
        if not isinstance(items, list):
            raise f.error("expected an array of probes", f"probes.{kind}")
        probes[kind] = [_probe(p, Fields({}, path=path, record=index, prefix=f"probes.{kind}[{i}]"))
                        for i, p in enumerate(items)]
    meta = f.raw("meta", required=False) or {}
    if not isinstance(meta, dict):
        raise f.error("expected an object", "meta")
    case = make_case(case_id, rewrite, probes, extra_rewrites=extras, meta=meta,
                     add_rewrite_probe="rewrite" not in probes_obj)
    return case


def _dump_rewrite(r: Rewrite) -> dict[str, Any]:
    d: dict[str, Any] = {"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new}
    if r.target_true is not None:
        d["target_true"] = r.target_true
    return d


def _dump_probe(p: Probe) -> dict[str, Any]:
    d: dict[str, Any] = {"prompt": p.prompt}
    if p.target is not None:
        d["target"] = p.target
    if p.foil is not None:
        d["foil"] = p.foil
    if p.aliases:
        d["aliases"] = list(p.aliases)
    if p.meta:
        d["meta"] = dict(p.meta)
    return d


def dump_case(case: EditCase) -> dict[str, Any]:
    """The JSON-ready dict of ``case`` in the editlens schema (inverse of :func:`parse`)."""
    probes: dict[str, list[dict[str, Any]]] = {}
    order = [k.value for k in ProbeKind] + [k for k in case.probes if k not in _KINDS]
    for kind in order:
        items = case.probes.get(kind)
        if items:
            probes[kind] = [_dump_probe(p) for p in items]
    if ProbeKind.REWRITE.value not in probes:
        probes = {ProbeKind.REWRITE.value: [], **probes}
    d: dict[str, Any] = {"case_id": case.case_id, "rewrite": _dump_rewrite(case.rewrite)}
    if case.extra_rewrites:
        d["extra_rewrites"] = [_dump_rewrite(r) for r in case.extra_rewrites]
    d["probes"] = probes
    if case.meta:
        d["meta"] = dict(case.meta)
    return d
