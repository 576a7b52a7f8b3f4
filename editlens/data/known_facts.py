"""Six facts SmolLM2-135M-Instruct answers correctly (greedy), each with a counterfactual new object.

Shipped as ``editlens/resources/known_facts.json`` (one place for the integration tests, the GPU check and the
scripts that need facts the model knows): records ``{"template" (with "{}"), "subject", "true", "new"}``.
"""
from __future__ import annotations

import json
from pathlib import Path

from editlens.data.schema import EditCase, Rewrite, make_case
from editlens.errors import DataFormatError

#: the shipped file
KNOWN_FACTS_PATH = Path(__file__).resolve().parents[1] / "resources" / "known_facts.json"
_FIELDS = ("template", "subject", "true", "new")


def known_facts(path: str | Path = KNOWN_FACTS_PATH) -> list[tuple[str, str, str, str]]:
    """``[(template, subject, true object, new object), ...]`` from ``path`` (default: the shipped file).

    Raises:
        DataFormatError: the file is not a JSON list of records with the four string fields (naming the record
            and the field), or a template has no ``{}``.
    """
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataFormatError(f"{path}: cannot read the known facts: {e}") from None
    if not isinstance(records, list) or not records:
        raise DataFormatError(f"{path}: expected a non-empty JSON list of fact records")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataFormatError(f"{path}: record {i} is not an object")
        for f in _FIELDS:
            if not isinstance(r.get(f), str) or not r[f].strip():
                raise DataFormatError(f"{path}: record {i}: field {f!r} must be a non-empty string")
        if "{}" not in r["template"]:
            raise DataFormatError(f"{path}: record {i}: field 'template' has no '{{}}' for the subject")
        out.append(tuple(r[f] for f in _FIELDS))
    return out


def known_fact_cases(prefix: str = "lk", path: str | Path = KNOWN_FACTS_PATH) -> list[EditCase]:
    """The known facts as edit cases (rewrite to the new object; the true object is the foil), ids ``{prefix}{i}``."""
    return [make_case(f"{prefix}{i}", Rewrite(t, s, new, old)) for i, (t, s, old, new) in enumerate(known_facts(path))]
