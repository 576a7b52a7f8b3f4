"""The one data model of editlens: :class:`EditCase`, :class:`Rewrite`, :class:`Probe`, :class:`ProbeKind`.

Every dataset format is normalised into these classes (see :mod:`editlens.data.formats`).

* A :class:`Rewrite` is the fact to write: ``prompt`` is a template with ``{}`` where the subject goes
  (``"The Eiffel Tower is located in {}"`` is wrong, ``"{} is located in the city of"`` is right: the
  template is the prompt *before* the target), ``subject``, ``target_new`` and the current
  ``target_true`` (``None`` when the dataset does not give it).
* A :class:`Probe` is a question asked of a system after the edit: a full ``prompt`` (subject filled in),
  the ``target`` it should answer after a successful edit (``None`` for ground-truth-free probes), an
  optional ``foil`` (the competing answer that must *lose*; for rewrite/paraphrase probes the old fact,
  for neighbourhood probes the new target — this is what CounterFact's contrastive scores compare),
  ``aliases`` (other accepted spellings of the target) and free-form ``meta``.
* An :class:`EditCase` has a ``case_id``, its primary ``rewrite``, optional ``extra_rewrites`` (MQuAKE
  and RippleEdits cases may request several rewrites at once) and ``probes`` grouped by kind.

Targets are stored without a leading space; :mod:`editlens.lm.ops` inserts the separator.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from editlens.errors import DataFormatError


class ProbeKind(str, enum.Enum):
    """Kinds of probes. The string values are the canonical names used in results tables."""

    REWRITE = "rewrite"  #: the edit prompt itself (reliability / efficacy)
    PARAPHRASE = "paraphrase"  #: rephrasings of the edit prompt (generalization)
    NEIGHBORHOOD = "neighborhood"  #: other subjects, same relation, must not change (locality)
    ATTRIBUTE = "attribute"  #: other subjects that already have the new target (CounterFact)
    PORTABILITY = "portability"  #: consequences of the edit (meta["subtype"]: one_hop, subject_replace, reverse_relation, ...)
    MULTIHOP = "multihop"  #: MQuAKE multi-hop questions (meta["group"] ties phrasings of one question)
    OTHER_ATTRIBUTION = "other_attribution"  #: other attributes of the edited subject must not change
    DISTRACT_NEIGHBOR = "distract_neighbor"  #: neighbourhood prompt prefixed with the edit statement
    LOCALITY = "locality"  #: unrelated prompts (ZsRE 'loc', KnowEdit locality) that must not change
    GENERATION = "generation"  #: free-generation prompts (CounterFact fluency / consistency)

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.value


def probe_kind(value: str | ProbeKind) -> ProbeKind:
    """Parse a probe kind name, with an error listing the valid names."""
    if isinstance(value, ProbeKind):
        return value
    try:
        return ProbeKind(str(value))
    except ValueError:
        valid = ", ".join(k.value for k in ProbeKind)
        raise DataFormatError(f"unknown probe kind {value!r}; valid kinds: {valid}") from None


@dataclass(frozen=True)
class Probe:
    """One question asked of a system.

    Attributes:
        prompt: the full prompt text (subject already filled in).
        target: the answer expected after a successful edit (``None``: only ground-truth-free metrics apply).
        foil: the competing answer that should lose (C-acc compares P(target) > P(foil)).
        aliases: other accepted answers (used by string-match metrics).
        meta: free-form annotations, e.g. ``{"subtype": "one_hop"}`` or ``{"group": 0}``.
    """

    prompt: str
    target: str | None = None
    foil: str | None = None
    aliases: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def answers(self) -> tuple[str, ...]:
        """The target followed by its aliases (empty when there is no target)."""
        if self.target is None:
            return ()
        return (self.target, *[a for a in self.aliases if a != self.target])


@dataclass(frozen=True)
class Rewrite:
    """A fact to write into the model: ``prompt.format(subject)`` followed by ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    @property
    def text(self) -> str:
        """The prompt with the subject filled in (what the model completes)."""
        return fill_template(self.prompt, self.subject)

    @property
    def statement(self) -> str:
        """The new fact as a sentence: ``"<prompt with subject> <target_new>."``."""
        return f"{self.text} {self.target_new}."

    @property
    def old_statement(self) -> str | None:
        """The old fact as a sentence, when ``target_true`` is known."""
        if self.target_true is None:
            return None
        return f"{self.text} {self.target_true}."

    def validate(self, *, path: Any = None, record: int | None = None, field_prefix: str = "rewrite") -> "Rewrite":
        """Check the rewrite and raise :class:`DataFormatError` naming the field when it is malformed."""
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise DataFormatError(f"expected a string, got {type(value).__name__}", path=path, record=record,
                                      field=f"{field_prefix}.{name}")
            if not value.strip():
                raise DataFormatError("must not be empty", path=path, record=record, field=f"{field_prefix}.{name}")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise DataFormatError(f"expected a string, got {type(self.target_true).__name__}", path=path,
                                  record=record, field=f"{field_prefix}.target_true")
        if self.prompt.count("{}") != 1:
            raise DataFormatError(f"prompt template must contain exactly one '{{}}' for the subject, got {self.prompt!r}",
                                  path=path, record=record, field=f"{field_prefix}.prompt")
        self.check_changes(path=path, record=record, field_prefix=field_prefix)
        return self

    def check_changes(self, *, path: Any = None, record: int | None = None, field_prefix: str = "rewrite") -> None:
        """Raise :class:`DataFormatError` when ``target_new`` equals ``target_true`` (an edit that changes nothing,
        whose efficacy and contrastive scores would be meaningless)."""
        if (self.target_true is not None and isinstance(self.target_new, str) and isinstance(self.target_true, str)
                and self.target_new.strip() == self.target_true.strip()):
            raise DataFormatError(
                f"target_new {self.target_new!r} equals target_true: this edit would not change the fact; give "
                f"another new target or drop the record (load_cases(..., skip_invalid=True) skips such records "
                f"with one warning)", path=path, record=record, field=f"{field_prefix}.target_new")


def fill_template(template: str, subject: str) -> str:
    """Fill the single ``{}`` of ``template`` with ``subject`` (no other brace is interpreted)."""
    return template.replace("{}", subject, 1)


@dataclass(frozen=True)
class EditCase:
    """One edit request with everything needed to evaluate it.

    Attributes:
        case_id: unique id within its dataset (string).
        rewrite: the primary rewrite.
        probes: probes grouped by kind (keys are :class:`ProbeKind` values as strings).
        extra_rewrites: further rewrites requested together with ``rewrite`` (MQuAKE, RippleEdits).
        meta: dataset-specific extras (``source`` format name, CounterFact ``reference_texts`` for
            consistency, etc.).
    """

    case_id: str
    rewrite: Rewrite
    probes: Mapping[str, tuple[Probe, ...]] = field(default_factory=dict)
    extra_rewrites: tuple[Rewrite, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rewrites(self) -> tuple[Rewrite, ...]:
        """All rewrites of the case, primary first."""
        return (self.rewrite, *self.extra_rewrites)

    def probes_of(self, kind: str | ProbeKind) -> tuple[Probe, ...]:
        """The probes of one kind (empty tuple when the case has none)."""
        return tuple(self.probes.get(probe_kind(kind).value, ()))

    @property
    def kinds(self) -> tuple[str, ...]:
        """Probe kinds present in this case, in canonical order."""
        return tuple(k.value for k in ProbeKind if self.probes.get(k.value))

    def with_probes(self, kind: str | ProbeKind, probes: Iterable[Probe]) -> "EditCase":
        """A copy with the probes of ``kind`` replaced."""
        new = dict(self.probes)
        new[probe_kind(kind).value] = tuple(probes)
        return replace(self, probes=new)


def make_case(case_id: str, rewrite: Rewrite, probes: Mapping[str | ProbeKind, Iterable[Probe]] | None = None,
              extra_rewrites: Iterable[Rewrite] = (), meta: Mapping[str, Any] | None = None, *,
              add_rewrite_probe: bool = True) -> EditCase:
    """Build an :class:`EditCase`, normalising probe-kind keys.

    With ``add_rewrite_probe`` (default) a ``rewrite`` probe for each rewrite is added when the caller gave
    none: prompt = the filled template, target = ``target_new``, foil = ``target_true``.

    Raises:
        DataFormatError: a rewrite whose ``target_new`` equals its ``target_true`` (see :meth:`Rewrite.check_changes`).
    """
    grouped: dict[str, tuple[Probe, ...]] = {}
    for kind, items in (probes or {}).items():
        items = tuple(items)
        if items:
            key = probe_kind(kind).value
            grouped[key] = grouped.get(key, ()) + items
    rewrites = (rewrite, *tuple(extra_rewrites))
    for i, r in enumerate(rewrites):
        if isinstance(r, Rewrite):
            r.check_changes(field_prefix="rewrite" if i == 0 else f"extra_rewrites[{i - 1}]")
    if add_rewrite_probe and not grouped.get(ProbeKind.REWRITE.value):
        grouped[ProbeKind.REWRITE.value] = tuple(
            Probe(prompt=r.text, target=r.target_new, foil=r.target_true) for r in rewrites)
    return EditCase(case_id=str(case_id), rewrite=rewrite, probes=grouped, extra_rewrites=rewrites[1:],
                    meta=dict(meta or {}))
