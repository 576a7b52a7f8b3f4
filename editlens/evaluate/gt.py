"""Ground-truth-based metrics (need a target string per probe).

They apply to every probe kind whose probes carry a target (``rewrite`` = reliability / efficacy,
``paraphrase`` = generalization, ``neighborhood`` = locality, ``attribute``, ``portability``, ``locality``,
...); rows are per case and probe kind, the mean over that case's probes of the kind.

* ``s_acc`` — sample accuracy (edit-locality paper App. C; "generates exactly the token string"): the greedy
  continuation (:class:`Generate`, ``max_new_tokens=16``, cut at the first newline) starts with the target or
  one of its aliases, at a word boundary, case-sensitive (:func:`~editlens.evaluate.functional.string_match`).
* ``s_acc_norm`` — the same after normalisation (lowercase, punctuation → space, articles a/an/the removed,
  whitespace collapsed).
* ``t_acc`` — teacher-forced token accuracy (edit-locality paper App. C; EasyEdit's accuracy): per probe the
  mean over target tokens of ``argmax == target token``; per case the mean over probes (a macro average — the
  paper's "proportion of correct tokens in the dataset" weights long targets more).
* ``c_acc`` — contrastive accuracy (CounterFact ES / PS / NS): ``1[P(target) > P(foil)]`` with
  ``P = exp(mean token log-prob)``; needs ``probe.foil`` (for rewrite/paraphrase probes the old object, for
  neighbourhood probes the new one — so higher is always better).
* ``c_mag`` — contrastive magnitude (CounterFact EM / PM / NM): ``P(target) − P(foil)``, same P.
* ``fluency`` — ROME's generation entropy on greedy generations of ``generation`` probes
  (``max_new_tokens=100``): per text ``(⅔H₂ + ⁴⁄₃H₃)/2`` in bits over word bi/tri-grams, mean over the case's
  texts. Deviation: greedy decoding (ROME samples) and generations stop at the first newline
  (:meth:`System.generate`).
* ``consistency`` — ROME's reference score: TF-IDF cosine between the case's generations (joined) and its
  reference texts (``case.meta["reference_texts"]``, joined); the TF-IDF is fitted on all reference texts of
  the evaluated cases (ROME used a fixed Wikipedia IDF). Cases without references give no row.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from editlens.evaluate import functional as F
from editlens.evaluate.core import EDITED, Answers, Generate, Metric, Request, Row, Score, register_metric

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase, Probe

GENERATION_KIND = "generation"


def target_probes(case: "EditCase", need_foil: bool = False) -> Iterator[tuple[str, list["Probe"]]]:
    """``(kind, probes)`` of a case whose probes have a target (and a foil when ``need_foil``)."""
    for kind in case.kinds:
        if kind == GENERATION_KIND:
            continue
        probes = [p for p in case.probes_of(kind) if p.target and (p.foil or not need_foil)]
        if probes:
            yield kind, probes


class _SAcc(Metric):
    value_range = (0.0, 1.0)
    normalize = False
    groups = ("gt",)

    def __init__(self, max_new_tokens: int = 16):
        super().__init__(max_new_tokens=int(max_new_tokens), normalize=self.normalize)
        self.max_new_tokens = int(max_new_tokens)

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        for _, probes in target_probes(case):
            for p in probes:
                yield EDITED, Generate(p.prompt, self.max_new_tokens)

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        for kind, probes in target_probes(case):
            vals = [float(F.string_match(answers.generate(p.prompt, self.max_new_tokens), p.answers, self.normalize))
                    for p in probes]
            yield from self.mean_row(case, kind, vals)


@register_metric("s_acc", groups=("gt",))
class SAcc(_SAcc):
    """Greedy generation starts with the target (exact characters, word boundary)."""

    normalize = False


@register_metric("s_acc_norm", groups=("gt",))
class SAccNorm(_SAcc):
    """Greedy generation starts with the target after answer normalisation."""

    normalize = True


class _TeacherForcedMetric(Metric):
    need_foil = False

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        for _, probes in target_probes(case, self.need_foil):
            for p in probes:
                yield EDITED, Score(p.prompt, p.target)  # type: ignore[arg-type]
                if self.need_foil:
                    yield EDITED, Score(p.prompt, p.foil)  # type: ignore[arg-type]

    def value(self, probe: "Probe", answers: Answers) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        for kind, probes in target_probes(case, self.need_foil):
            yield from self.mean_row(case, kind, [self.value(p, answers) for p in probes])


@register_metric("t_acc", groups=("gt",))
class TAcc(_TeacherForcedMetric):
    """Teacher-forced top-1 token accuracy of the target."""

    value_range = (0.0, 1.0)

    def value(self, probe: "Probe", answers: Answers) -> float:
        return F.token_accuracy(answers.score(probe.prompt, probe.target))  # type: ignore[arg-type]


@register_metric("c_acc", groups=("gt",))
class CAcc(_TeacherForcedMetric):
    """P(target) > P(foil), length-normalised probabilities (CounterFact success)."""

    value_range = (0.0, 1.0)

    need_foil = True

    def value(self, probe: "Probe", answers: Answers) -> float:
        return F.contrastive(answers.score(probe.prompt, probe.target),  # type: ignore[arg-type]
                             answers.score(probe.prompt, probe.foil))[0]  # type: ignore[arg-type]


@register_metric("c_mag", groups=("gt",))
class CMag(_TeacherForcedMetric):
    """P(target) − P(foil), length-normalised probabilities (CounterFact magnitude)."""

    value_range = (-1.0, 1.0)

    need_foil = True

    def value(self, probe: "Probe", answers: Answers) -> float:
        return F.contrastive(answers.score(probe.prompt, probe.target),  # type: ignore[arg-type]
                             answers.score(probe.prompt, probe.foil))[1]  # type: ignore[arg-type]


# ================================================================================================ generation
class _GenerationMetric(Metric):
    groups = ("generation",)
    probe_kinds = (GENERATION_KIND,)  # named when the cases have none (evaluate warns)

    def __init__(self, max_new_tokens: int = 100):
        super().__init__(max_new_tokens=int(max_new_tokens))
        self.max_new_tokens = int(max_new_tokens)

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        for p in case.probes_of(GENERATION_KIND):
            yield EDITED, Generate(p.prompt, self.max_new_tokens)

    def texts(self, case: "EditCase", answers: Answers) -> list[str]:
        return [answers.generate(p.prompt, self.max_new_tokens) for p in case.probes_of(GENERATION_KIND)]


@register_metric("fluency", groups=("generation",))
class Fluency(_GenerationMetric):
    """Weighted bi/tri-gram entropy of greedy generations (ROME)."""

    value_range = (0.0, float("inf"))

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        texts = self.texts(case, answers)
        if texts:
            yield Row(case.case_id, GENERATION_KIND, self.name, F.fluency(texts))


def reference_texts(case: "EditCase") -> list[str]:
    """``case.meta["reference_texts"]`` as a list of strings (empty when absent)."""
    refs: Any = case.meta.get("reference_texts") or []
    if isinstance(refs, str):
        refs = [refs]
    return [str(r) for r in refs if str(r).strip()]


@register_metric("consistency", groups=("generation",))
class Consistency(_GenerationMetric):
    """TF-IDF cosine between generations and the case's reference texts (ROME)."""

    value_range = (0.0, 1.0)

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        if reference_texts(case):
            yield from super().case_requests(case)

    def rows(self, cases: Sequence["EditCase"], answers: Answers) -> Iterable[Row]:
        corpus = [r for c in cases for r in reference_texts(c)]
        if not corpus:
            return
        tfidf = F.TfIdf(corpus)
        for case in cases:
            refs = reference_texts(case)
            texts = self.texts(case, answers) if refs else []
            if refs and texts:
                yield Row(case.case_id, GENERATION_KIND, self.name, tfidf.cosine(" ".join(texts), " ".join(refs)))
