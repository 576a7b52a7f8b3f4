"""Reasoning reflection check: does a thinking model's reasoning fall back to the old fact?

He et al. (arXiv 2505.18690, §4.2) observe that reasoning-oriented models (e.g. DeepSeek-R1 distills) often
accept an edit and then, in their reasoning trace, *reflect* on the outdated knowledge and overturn the edit.
:func:`reflection_check` detects this in one generation:

* the **reasoning** is the text inside ``<think> ... </think>`` (an unclosed ``<think>`` — a truncated
  generation — runs to the end); the **answer** is the text after ``</think>`` (the whole text when there is no
  reasoning block);
* targets are matched case-insensitively as whole words (``"Rome"`` does not match ``"Romeo"``), including
  aliases;
* ``reflects`` is ``True`` when the reasoning mentions the old target *after* its first mention of the new
  target (the model considered the new fact, then went back to the old one);
* ``reverted`` is ``True`` when, in addition, the final answer mentions the old target and not the new one.

The metric ``reflection`` (registered with :mod:`editlens.evaluate.core` when available) generates
``max_new_tokens`` tokens for every rewrite / paraphrase probe that has a target and a foil (the old target),
and reports the share of generations with ``reflects`` (lower is better); probes whose generation holds no
reasoning block are skipped. Note that :meth:`System.generate` of the plain systems cuts generations at the first
newline, so multi-line reasoning traces need a system whose ``generate`` does not.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class ReflectionResult:
    """What :func:`reflection_check` found in one generation (positions are character offsets in the reasoning)."""

    has_reasoning: bool
    new_in_reasoning: int | None
    old_after_new: int | None
    answer_new: bool
    answer_old: bool

    @property
    def reflects(self) -> bool:
        """The reasoning mentions the old target after the new one."""
        return self.old_after_new is not None

    @property
    def reverted(self) -> bool:
        """The model reflected and its final answer gives the old target, not the new one."""
        return self.reflects and self.answer_old and not self.answer_new


def split_reasoning(text: str, open_tag: str = THINK_OPEN, close_tag: str = THINK_CLOSE) -> tuple[str | None, str]:
    """``(reasoning or None, answer)`` of a generation (see the module docstring)."""
    i = text.find(open_tag)
    if i < 0:
        j = text.find(close_tag)  # some chat templates put the opening tag in the prompt
        if j < 0:
            return None, text
        return text[:j], text[j + len(close_tag):]
    start = i + len(open_tag)
    j = text.find(close_tag, start)
    if j < 0:
        return text[start:], ""
    return text[start:j], text[j + len(close_tag):]


def _pattern(names: Sequence[str]) -> re.Pattern[str] | None:
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        return None
    alts = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.IGNORECASE)


def _positions(pat: re.Pattern[str] | None, text: str) -> list[int]:
    return [] if pat is None else [m.start() for m in pat.finditer(text)]


def reflection_check(generation: str, new_target: str | Sequence[str], old_target: str | Sequence[str],
                     open_tag: str = THINK_OPEN, close_tag: str = THINK_CLOSE) -> ReflectionResult:
    """Check one generation for reflection back to the old target.

    Args:
        generation: the generated text (reasoning and answer).
        new_target: the edited answer, or several accepted spellings.
        old_target: the answer before the edit, or several spellings.
    """
    news = [new_target] if isinstance(new_target, str) else list(new_target)
    olds = [old_target] if isinstance(old_target, str) else list(old_target)
    p_new, p_old = _pattern(news), _pattern(olds)
    reasoning, answer = split_reasoning(generation, open_tag, close_tag)
    a_new, a_old = bool(_positions(p_new, answer)), bool(_positions(p_old, answer))
    if reasoning is None:
        return ReflectionResult(False, None, None, a_new, a_old)
    pos_new = _positions(p_new, reasoning)
    first_new = pos_new[0] if pos_new else None
    later_old = [p for p in _positions(p_old, reasoning) if first_new is not None and p > first_new]
    return ReflectionResult(True, first_new, later_old[0] if later_old else None, a_new, a_old)


def reflection_rate(generations: Iterable[str], new_targets: Iterable[str], old_targets: Iterable[str]) -> float | None:
    """Share of generations *with a reasoning block* that reflect (``None`` when none has one)."""
    flags = [r.reflects for r in (reflection_check(g, n, o) for g, n, o in zip(generations, new_targets, old_targets))
             if r.has_reasoning]
    return sum(flags) / len(flags) if flags else None


# --------------------------------------------------------------------------------------------- metric
try:  # register with the evaluation core when it is present
    from editlens.evaluate.core import EDITED, Answers, Generate, Metric, Request, Row, register_metric
except ImportError:  # pragma: no cover - core not available
    Metric = None  # type: ignore[assignment,misc]

if Metric is not None:

    @register_metric("reflection")
    class ReflectionMetric(Metric):
        """Share of reasoning traces that mention the old target after the new one (thinking models).

        In no group (so not in ``all``): it needs a reasoning model (``<think>`` blocks) and 256-token
        generations; ask for it by name."""

        value_range = (0.0, 1.0)
        needs = "a reasoning model whose generations hold <think> blocks"

        direction = "lower"
        kinds = ("rewrite", "paraphrase")

        @classmethod
        def check_instances(cls) -> list[Metric]:
            """Short generations: a model without ``<think>`` blocks gives no rows either way."""
            return [cls(max_new_tokens=16)]

        def __init__(self, name: str | None = None, max_new_tokens: int = 256):
            super().__init__(name, max_new_tokens=max_new_tokens)
            self.max_new_tokens = int(max_new_tokens)

        def _probes(self, case: "EditCase"):
            for kind in self.kinds:
                for p in case.probes_of(kind):
                    if p.target and p.foil:
                        yield kind, p

        def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
            for _, p in self._probes(case):
                yield EDITED, Generate(p.prompt, self.max_new_tokens)

        def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
            by_kind: dict[str, list[float]] = {}
            for kind, p in self._probes(case):
                r = reflection_check(answers.generate(p.prompt, self.max_new_tokens), p.answers, p.foil)
                if r.has_reasoning:
                    by_kind.setdefault(kind, []).append(float(r.reflects))
            for kind, vals in by_kind.items():
                yield from self.mean_row(case, kind, vals)
