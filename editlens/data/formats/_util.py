"""Field access with precise errors, shared by the format parsers.

Every helper raises :class:`~editlens.errors.DataFormatError` naming the file, the record index and the dotted
field path (``requested_rewrite.target_new.str``, ``paraphrase_prompts[3]``) when a value is missing, of the
wrong type or empty.
"""
from __future__ import annotations

import json
from typing import Any

from editlens.data.schema import Probe, ProbeKind, Rewrite
from editlens.errors import DataFormatError


def _tname(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


class Fields:
    """Typed, error-reporting access to one JSON object of a record.

    Args:
        obj: the JSON value (must be a dict, else an error naming ``prefix``).
        path: the file (for messages).
        record: the record index (0-based position in the file).
        prefix: dotted path of ``obj`` inside the record (``""`` for the record itself).
    """

    __slots__ = ("obj", "path", "record", "prefix")

    def __init__(self, obj: Any, *, path: Any, record: int | None, prefix: str = ""):
        self.path, self.record, self.prefix = path, record, prefix
        if not isinstance(obj, dict):
            raise DataFormatError(f"expected a JSON object, got {_tname(obj)}", path=path, record=record,
                                  field=prefix or None)
        self.obj = obj

    def name(self, key: str | int) -> str:
        """The dotted field path of ``key``."""
        if isinstance(key, int):
            return f"{self.prefix}[{key}]"
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, message: str, key: str | int | None = None) -> DataFormatError:
        """A :class:`DataFormatError` for ``key`` (or for this object when ``key`` is None)."""
        return DataFormatError(message, path=self.path, record=self.record,
                               field=self.name(key) if key is not None else (self.prefix or None))

    def has(self, key: str) -> bool:
        """True when ``key`` is present and not null."""
        return self.obj.get(key) is not None

    def raw(self, key: str, *, required: bool = True) -> Any:
        """The value of ``key`` (``None`` when absent and not required)."""
        if key not in self.obj or self.obj[key] is None:
            if required:
                raise self.error("missing required field", key)
            return None
        return self.obj[key]

    def str(self, key: str, *, required: bool = True, allow_empty: bool = False) -> str | None:
        """A string field, stripped; empty strings are an error unless ``allow_empty``."""
        value = self.raw(key, required=required)
        if value is None:
            return None
        return as_str(value, self, key, allow_empty=allow_empty)

    def sub(self, key: str, *, required: bool = True) -> "Fields | None":
        """The nested object ``key`` as :class:`Fields`."""
        value = self.raw(key, required=required)
        if value is None:
            return None
        return Fields(value, path=self.path, record=self.record, prefix=self.name(key))

    def list(self, key: str, *, required: bool = False) -> list[Any]:
        """An array field (``[]`` when absent and not required)."""
        value = self.raw(key, required=required)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(f"expected an array, got {_tname(value)}", key)
        return value

    def str_list(self, key: str, *, required: bool = False) -> list[str]:
        """An array of non-empty strings (``[]`` when absent and not required)."""
        items = self.list(key, required=required)
        if all(type(v) is str for v in items):  # fast path (full public files have ~10^6 prompts)
            out = [v.strip() for v in items]
            if all(out):
                return out
        name = self.name(key)
        return [as_str(v, self, None, field=f"{name}[{i}]") for i, v in enumerate(items)]

    def at(self, key: str | int, value: Any) -> "Fields":
        """Wrap a nested value found under ``key`` (string key or array index) as :class:`Fields`."""
        return Fields(value, path=self.path, record=self.record, prefix=self.name(key))


def as_str(value: Any, where: Fields, key: str | int | None, *, field: str | None = None,
           allow_empty: bool = False) -> str:
    """Check that ``value`` is a (non-empty) string and return it stripped."""
    fname = field if field is not None else (where.name(key) if key is not None else where.prefix)
    if type(value) is not str:
        if isinstance(value, str):  # a str subclass
            value = str(value)
        else:
            # numbers are not converted (a JSON number is not the text the model must produce: 1.0, 1e3, 007...)
            hint = f" (write it as the string {json.dumps(str(value))})" if isinstance(value, (int, float)) and \
                not isinstance(value, bool) else ""
            raise DataFormatError(f"expected a string, got {_tname(value)} {json.dumps(value, default=str)[:80]}"
                                  f"{hint}", path=where.path, record=where.record, field=fname)
    value = value.strip()
    if not value and not allow_empty:
        raise DataFormatError("must not be empty", path=where.path, record=where.record, field=fname)
    return value


def find_subject(text: str, subject: str, where: Fields, field: str) -> tuple[str, str]:
    """Turn ``text`` into a template by replacing the first occurrence of ``subject`` with ``{}``.

    Matching is exact first, then case-insensitive (the spelling found in ``text`` then becomes the subject).
    Returns ``(template, subject_as_found)``; raises naming ``field`` when the subject does not occur.
    """
    i = text.find(subject)
    if i < 0:
        i = text.lower().find(subject.lower())
        if i < 0:
            raise DataFormatError(f"subject {subject!r} does not occur in {text!r}; cannot build the rewrite "
                                  f"template", path=where.path, record=where.record, field=field)
        subject = text[i:i + len(subject)]
    return text[:i] + "{}" + text[i + len(subject):], subject


def make_rewrite(prompt: str, subject: str, target_new: str, target_true: str | None, where: Fields,
                 prefix: str) -> Rewrite:
    """Build and validate a :class:`Rewrite` (errors name ``<prefix>.<field>`` in the record)."""
    rw = Rewrite(prompt=prompt, subject=subject, target_new=target_new, target_true=target_true)
    return rw.validate(path=where.path, record=where.record, field_prefix=prefix)


def foil_for(target: str | None, rewrite: Rewrite) -> str | None:
    """The competing answer for a probe whose target is the new object: the old object (else ``None``)."""
    if target is not None and rewrite.target_true and target == rewrite.target_new:
        return rewrite.target_true
    return None


def norm_key(name: str) -> str:
    """Normalise a subset name (``"Subject Replace"``, ``"Logical_Generalization"``) to snake_case."""
    return "_".join(str(name).strip().lower().replace("-", " ").replace("_", " ").split())


_SUBTYPE_ALIASES = {
    "inverse_relation": "reverse_relation",
    "new_question": "one_hop",
    "one_hop_reasoning": "one_hop",
}

_LOCALITY_KINDS = {
    "other_attribution": ProbeKind.OTHER_ATTRIBUTION,
    "distract_neighbor": ProbeKind.DISTRACT_NEIGHBOR,
    "distracting_neighbor": ProbeKind.DISTRACT_NEIGHBOR,
    "distract_neighbour": ProbeKind.DISTRACT_NEIGHBOR,
    "distracting_neighbour": ProbeKind.DISTRACT_NEIGHBOR,
}


def subtype_name(key: str) -> str:
    """Canonical ``meta["subtype"]`` for a portability subset name."""
    k = norm_key(key)
    return _SUBTYPE_ALIASES.get(k, k)


def locality_kind(key: str) -> ProbeKind:
    """Probe kind of a locality subset: other attribution / distracting neighbour, else plain locality."""
    return _LOCALITY_KINDS.get(norm_key(key), ProbeKind.LOCALITY)


def _flatten_answers(value: Any, where: Fields, field: str) -> list[str]:
    out: list[str] = []
    if isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_flatten_answers(v, where, f"{field}[{i}]"))
        return out
    out.append(as_str(value, where, None, field=field))
    return out


_ANSWER_KEYS = ("ground_truth", "answer", "target", "target_new", "New Answer", "answers")
_PROMPT_KEYS = ("prompt", "question", "New Question", "cloze")


def qa_probes(entry: Any, where: Fields, field: str | int, *, meta: dict[str, Any], rewrite: Rewrite | None = None,
              foil: bool = True) -> list[Probe]:
    """Probes from one EasyEdit/KnowEdit-style ``{prompt, ground_truth}`` entry.

    ``prompt`` may be a string or a list of strings; the answer (``ground_truth`` / ``answer`` / ``target``) a
    string, a list of accepted strings, or a list with one list of accepted strings per prompt. The first
    accepted string is the target, the others its aliases. With ``foil`` and a ``rewrite``, a probe whose
    target is the new object gets the old object as foil.
    """
    f = where.at(field, entry)
    pkey = next((k for k in _PROMPT_KEYS if f.has(k)), None)
    if pkey is None:
        raise f.error("missing required field", "prompt")
    prompts_raw = f.raw(pkey)
    if isinstance(prompts_raw, list):
        prompts = [as_str(p, f, None, field=f"{f.name(pkey)}[{i}]") for i, p in enumerate(prompts_raw)]
    else:
        prompts = [as_str(prompts_raw, f, pkey)]
    akey = next((k for k in _ANSWER_KEYS if f.has(k)), None)
    if akey is None:
        raise f.error("missing required field", "ground_truth")
    ans = f.raw(akey)
    aname = f.name(akey)
    if isinstance(ans, list):
        if not ans:
            raise f.error("must not be empty", akey)
        if any(isinstance(a, list) for a in ans):
            groups = [_flatten_answers(a, f, f"{aname}[{i}]") for i, a in enumerate(ans)]
        elif len(prompts) > 1 and len(ans) == len(prompts):
            groups = [[as_str(a, f, None, field=f"{aname}[{i}]")] for i, a in enumerate(ans)]
        else:
            groups = [_flatten_answers(ans, f, aname)]
    else:
        groups = [[as_str(ans, f, akey)]]
    if len(groups) == 1 and len(prompts) > 1:
        groups = groups * len(prompts)
    if len(groups) != len(prompts):
        raise f.error(f"{len(prompts)} prompts but {len(groups)} answer lists", akey)
    probes = []
    for prompt, answers in zip(prompts, groups, strict=True):
        if not answers:
            raise f.error("must not be empty", akey)
        target = answers[0]
        probes.append(Probe(prompt=prompt, target=target,
                            foil=foil_for(target, rewrite) if (foil and rewrite is not None) else None,
                            aliases=tuple(dict.fromkeys(a for a in answers[1:] if a != target)),
                            meta=dict(meta)))
    return probes


def subset_probes(value: Any, where: Fields, key: str, *, meta_of: Any, rewrite: Rewrite | None) -> list[Probe]:
    """Probes of one subset (``portability["Reasoning"]``): a list of entries, or a single entry.

    ``meta_of(i)`` gives the meta dict of entry ``i`` (``None`` for a single entry).
    """
    if isinstance(value, dict):
        return qa_probes(value, where, key, meta=meta_of(None), rewrite=rewrite)
    if not isinstance(value, list):
        raise where.error(f"expected an array of {{prompt, ground_truth}} objects, got {_tname(value)}", key)
    holder = Fields({}, path=where.path, record=where.record, prefix=where.name(key))
    out: list[Probe] = []
    for i, entry in enumerate(value):
        out.extend(qa_probes(entry, holder, i, meta=meta_of(i), rewrite=rewrite))
    return out
