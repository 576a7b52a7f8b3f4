"""KnowEdit-style records (Zhang et al. 2024, EasyEdit): WikiData_counterfact, WikiData_recent, ZsRE-KnowEdit.

Record schema::

    {"subject": "Mount Everest", "prompt": "Which mountain range is Mount Everest part of?",
     "target_new": "Andes", "ground_truth": "Himalayas" | ["Himalayas", ...],
     "rephrase_prompt": "...",
     "portability": {"Subject_Aliasing": [{"prompt": "...", "ground_truth": "..."}], "Reasoning": [...],
                     "Logical_Generalization": [...]},
     "locality": {"Relation_Specificity": [{"prompt": "...", "ground_truth": "..."}], "Forgetfulness": [...]}}

In the probe lists ``prompt`` may be a string or a list of strings and ``ground_truth`` a string, a list of
accepted strings or a list of such lists (one per prompt); the first accepted string is the target and the
rest are its aliases. ``ground_truth`` of the edit may be a string or a list (first = ``target_true``, the
rest in ``meta["true_aliases"]``), or absent (knowledge insertion: ``target_true`` is ``None``).

Mapping:

* rewrite: template = ``prompt`` with the subject replaced by ``{}`` (error naming ``prompt`` when absent).
* ``rephrase_prompt`` (or ``rephrase``) -> ``paraphrase`` probes.
* every ``portability`` subset -> ``portability`` probes, ``meta["subtype"]`` = the subset name in snake_case
  (``subject_aliasing``, ``reasoning``, ``logical_generalization``); a probe whose target is ``target_new``
  gets ``target_true`` as foil.
* every ``locality`` subset -> ``locality`` probes (``meta["subtype"]``, e.g. ``relation_specificity``,
  ``forgetfulness``), except subsets named ``Other_Attribution`` / ``Distracting_Neighbor`` which become those
  kinds.
* EasyEdit's flat fields ``locality_prompt``/``locality_ground_truth`` and
  ``portability_prompt``/``portability_ground_truth`` are accepted too.
"""
from __future__ import annotations

from typing import Any

from editlens.data.formats._util import (Fields, as_str, find_subject, locality_kind, make_rewrite,
                                         qa_probes, subset_probes, subtype_name)
from editlens.data.schema import EditCase, Probe, ProbeKind, make_case

NAME = "knowedit"
DESCRIPTION = "KnowEdit / EasyEdit JSON: prompt, subject, target_new, ground_truth, rephrase_prompt, portability, locality"


def matches(record: dict) -> bool:
    """A KnowEdit record has ``prompt`` and ``target_new`` (a string) and no CounterFact/zsRE markers."""
    return "prompt" in record and "target_new" in record and "requested_rewrite" not in record


def parse(record: Any, *, index: int, path: Any = None) -> EditCase:
    """Normalise one KnowEdit record into an :class:`EditCase`."""
    f = Fields(record, path=path, record=index)
    subject = f.str("subject")
    prompt = f.str("prompt")
    target_new = f.str("target_new")
    gt = f.raw("ground_truth", required=False)
    truths: list[str] = []
    if isinstance(gt, list):
        flat: list[Any] = []
        for g in gt:
            flat.extend(g if isinstance(g, list) else [g])
        truths = [as_str(g, f, None, field=f"ground_truth[{i}]") for i, g in enumerate(flat)]
    elif gt is not None:
        truths = [as_str(gt, f, "ground_truth")]
    truths = [t for t in truths if t != "<|endoftext|>"]  # EasyEdit's placeholder for "no old fact"
    if "{}" in prompt:
        template = prompt
    else:
        template, subject = find_subject(prompt, subject, f, "prompt")  # type: ignore[arg-type]
    rw = make_rewrite(template, subject, target_new, truths[0] if truths else None, f, "rewrite")  # type: ignore[arg-type]

    probes: dict[ProbeKind, list[Probe]] = {}
    for key in ("rephrase_prompt", "rephrase", "rephrase_prompts"):
        value = f.raw(key, required=False)
        if value is not None:
            items = value if isinstance(value, list) else [value]
            probes[ProbeKind.PARAPHRASE] = [
                Probe(as_str(p, f, None, field=key if not isinstance(value, list) else f"{key}[{i}]"),
                      rw.target_new, rw.target_true) for i, p in enumerate(items)]
            break

    for group, is_port in (("portability", True), ("locality", False)):
        value = f.raw(group, required=False)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise f.error("expected an object mapping subset names to probe lists", group)
        gf = f.sub(group)
        for key, items in value.items():
            st = subtype_name(key)
            kind = ProbeKind.PORTABILITY if is_port else locality_kind(key)
            probes.setdefault(kind, []).extend(
                subset_probes(items, gf, key, meta_of=lambda i, st=st: {"subtype": st},  # type: ignore[arg-type]
                              rewrite=rw if is_port else None))
    for group, kind in (("locality", ProbeKind.LOCALITY), ("portability", ProbeKind.PORTABILITY)):
        if f.has(f"{group}_prompt"):
            entry = {"prompt": record[f"{group}_prompt"], "ground_truth": f.raw(f"{group}_ground_truth")}
            probes.setdefault(kind, []).extend(
                qa_probes(entry, Fields({}, path=path, record=index), f"{group}_prompt", meta={"subtype": group},
                          rewrite=rw if kind is ProbeKind.PORTABILITY else None))

    meta: dict[str, Any] = {"source": NAME, "record": index}
    if len(truths) > 1:
        meta["true_aliases"] = truths[1:]
    return make_case(str(record.get("case_id", index)), rw, probes, meta=meta)
