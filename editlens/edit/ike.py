"""IKE — in-context knowledge editing (Zheng et al., EMNLP 2023, "Can We Edit Factual Knowledge by In-Context
Learning?").

No weight changes: each query is posed after ``k`` demonstrations and the new fact::

    New Fact: <statement of a demonstration case>
    Prompt: <demonstration prompt> <its answer>

    ... (k demonstrations, least similar first)

    New Fact: <the edited fact>
    Prompt: <query>

Demonstrations come in the paper's three kinds, built from the edit cases' own probes
(:func:`build_demonstrations`):

* **copy** — the case's rewrite prompt answered with ``target_new``;
* **update** — a paraphrase probe answered with ``target_new``;
* **retain** — a neighbourhood probe answered with its own (unchanged) target.

They are chosen by cosine similarity (sentence embeddings, :mod:`editlens.edit.retrieval`) between
``"<demo fact> <demo prompt>"`` and ``"<query fact> <query>"``; a query never gets demonstrations built from
its own case (the paper excludes the test fact from the demonstration pool).

Which fact goes with a query: IKE conditions every probe of a case on that case's fact. The system keeps a
map from every probe prompt of the edited cases to its case; a prompt that belongs to no case gets the most
similar edited fact (cosine similarity of statement and prompt) — IKE has no "no fact" route, so unrelated
prompts are changed too (that is IKE's known locality cost, measured like any other method's).

Prompt formats: in ``raw`` format (the paper's) the model reads the text above with the query last. In ``chat``
format (``editlens.edit(..., prompt_format="chat")``) the demonstrations, the new fact and ``chat_instruction`` form
the user turn of the chat template and the query is pre-filled as the start of the assistant's reply
(``<user turn: demonstrations + "New Fact: <fact>" + instruction><assistant>: <query>``), so the target is still
scored right after the query. A query is never re-posed in another format than the system's.

Deviations: the paper uses k = 32 demonstrations from a separate training split and GPT-J's 2,048-token
context; we default to k = 8 (4 on the tiny test models) drawn from the edited cases themselves (plus any
``demo_cases`` given to :class:`IKESystem`), keep the similarity order without a fixed copy/update/retain
ratio, and record the number of each kind used in :attr:`IKESystem.demo_counts`.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from editlens.edit.base import Edit, Editor, HParams, SequenceState, register_method
from editlens.edit.retrieval import EmbeddingIndex, Encoder, shared_encoder
from editlens.errors import HParamsError
from editlens.system import ModelSystem, WrappedSystem

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM


@dataclass
class IKEHParams(HParams):
    """Hyperparameters of IKE.

    Attributes:
        retriever: encoder used to rank demonstrations (see :func:`editlens.edit.retrieval.make_encoder`).
        k: number of demonstrations per query.
        fact_prefix: text before a fact (``"New Fact: "``).
        prompt_prefix: text before a prompt (``"Prompt: "``).
        separator: between demonstrations.
        encoder_device: device of the sentence encoder.
        chat_instruction: in ``chat`` prompt format, the instruction after the new fact in the user turn (the query
            is the start of the assistant's reply).
        demo_pool: where demonstrations come from: ``"edited"`` (the other edited cases, editlens's default) or
            ``"synthetic:N"`` (a separate pool of N fictional cases from :func:`editlens.data.synthetic_cases`, seed
            ``demo_seed``; the edited cases then give none), as the paper draws them from a training split. See
            "IKE on unseen facts" in docs/methods-preserving-incontext.md for what each achieves on SmolLM2.
        demo_seed: seed of the ``synthetic:N`` pool.
    """

    retriever: str = "default"
    k: int = 8
    fact_prefix: str = "New Fact: "
    prompt_prefix: str = "Prompt: "
    separator: str = "\n\n"
    encoder_device: str = "cpu"
    chat_instruction: str = "Using the new fact, complete the following statement with a short factual answer."
    demo_pool: str = "edited"
    demo_seed: int = 11

    ARCH_DEFAULTS = {"tiny": {"retriever": "hashing", "k": 4}}

    def validate(self) -> None:
        if self.k < 0:
            raise HParamsError(f"hyperparameter 'k' of method 'ike' must be >= 0, got {self.k}")
        self.pool_size()

    def pool_size(self) -> int | None:
        """``None`` for ``demo_pool="edited"``, else N of ``"synthetic:N"`` (an :class:`HParamsError` otherwise)."""
        pool = str(self.demo_pool).strip()
        if pool == "edited":
            return None
        kind, _, n = pool.partition(":")
        if kind == "synthetic" and n.isdigit() and int(n) >= 1:
            return int(n)
        raise HParamsError(f"hyperparameter 'demo_pool' of method 'ike' must be \"edited\" or \"synthetic:N\" "
                           f"(N >= 1 fictional demonstration cases), got {self.demo_pool!r}")


@dataclass(frozen=True)
class Demonstration:
    """One IKE demonstration: ``kind`` is ``copy``, ``update`` or ``retain``."""

    case_id: str
    kind: str
    fact: str
    prompt: str
    answer: str


def build_demonstrations(cases: Sequence["EditCase"]) -> list[Demonstration]:
    """Copy / update / retain demonstrations from the cases' rewrite, paraphrase and neighbourhood probes."""
    out: list[Demonstration] = []
    for c in cases:
        fact = c.rewrite.statement
        out.append(Demonstration(c.case_id, "copy", fact, c.rewrite.text, c.rewrite.target_new))
        for p in c.probes_of("paraphrase"):
            if p.target:
                out.append(Demonstration(c.case_id, "update", fact, p.prompt, p.target))
        for p in c.probes_of("neighborhood"):
            if p.target:
                out.append(Demonstration(c.case_id, "retain", fact, p.prompt, p.target))
    return out


class IKESystem(WrappedSystem):
    """A system that prepends IKE demonstrations and the new fact to every query.

    Args:
        base: the system queries go to.
        hparams: :class:`IKEHParams`.
        encoder: a ready encoder (default: from ``hparams.retriever``).
        demo_cases: extra cases used only as demonstrations.
    """

    def __init__(self, base: ModelSystem, hparams: IKEHParams, encoder: Encoder | None = None,
                 demo_cases: Sequence["EditCase"] = ()):
        self.hparams = hparams
        enc = encoder or shared_encoder(hparams.retriever, device=hparams.encoder_device)
        self.facts = EmbeddingIndex(enc)  # one statement per edited case
        self.demos = EmbeddingIndex(enc)
        self.demo_list: list[Demonstration] = []
        self._prompt_case: dict[str, int] = {}  # probe prompt -> row in self.facts
        self._case_ids: list[str] = []
        #: how many demonstrations of each kind were put in prompts so far
        self.demo_counts: dict[str, int] = {"copy": 0, "update": 0, "retain": 0}
        super().__init__(base, state_fingerprint=self._state_key())
        n_pool = hparams.pool_size()
        #: whether the edited cases give demonstrations (``demo_pool="edited"``)
        self.demos_from_edits = n_pool is None
        if n_pool is not None:
            from editlens.data.synthetic import synthetic_cases

            pool = [dataclasses.replace(d, case_id=f"pool:{d.case_id}")  # never taken for an edited case's own
                    for d in build_demonstrations(synthetic_cases(n_pool, seed=hparams.demo_seed))]
        else:
            pool = []
        if demo_cases or pool:
            self._add_demos([*build_demonstrations(demo_cases), *pool])

    def _state_key(self) -> str:
        h = hashlib.sha256(repr(sorted(self.hparams.to_dict().items())).encode())
        h.update(self.facts.content_hash().encode())
        h.update(self.demos.content_hash().encode())
        return h.hexdigest()[:16]

    def _add_demos(self, demos: Sequence[Demonstration]) -> None:
        self.demos.add([f"{d.fact} {d.prompt}" for d in demos], [d.case_id for d in demos])
        self.demo_list.extend(demos)
        self.state_fingerprint = self._state_key()

    def add_cases(self, cases: Sequence["EditCase"]) -> None:
        """Add the cases' facts and demonstrations (only new texts are encoded)."""
        start = len(self.facts)
        self.facts.add([c.rewrite.statement for c in cases], [c.case_id for c in cases])
        for i, c in enumerate(cases):
            self._case_ids.append(c.case_id)
            for probes in c.probes.values():
                for p in probes:
                    self._prompt_case.setdefault(p.prompt, start + i)
            self._prompt_case.setdefault(c.rewrite.text, start + i)
        if self.demos_from_edits:
            self._add_demos(build_demonstrations(cases))

    def clear(self) -> None:
        """Forget every fact and demonstration: prompts then reach the model unchanged."""
        self.facts.clear()
        self.demos.clear()
        self.demo_list.clear()
        self._prompt_case.clear()
        self._case_ids.clear()
        self.state_fingerprint = self._state_key()

    def fact_for(self, prompts: Sequence[str]) -> list[int]:
        """Row of the fact each prompt is conditioned on (its case's, else the most similar)."""
        rows = [self._prompt_case.get(p, -1) for p in prompts]
        unknown = [i for i, r in enumerate(rows) if r < 0]
        if unknown and len(self.facts):
            _, idx = self.facts.search([prompts[i] for i in unknown], 1)
            for i, j in zip(unknown, idx[:, 0].tolist()):
                rows[i] = int(j)
        return rows

    def transform_prompts(self, prompts: Sequence[str]) -> list[str]:
        """The raw-format IKE prompts (demonstrations, the new fact, ``Prompt: <query>``); without facts, unchanged."""
        prompts = list(prompts)
        if not len(self.facts):
            return prompts
        return [context + f"{self.hparams.prompt_prefix}{p}" for context, p in zip(self._contexts(prompts), prompts)]

    def _inputs(self, prompts: Sequence[str]) -> list[str]:  # type: ignore[override]
        """The model inputs: raw format as :meth:`transform_prompts`; chat format with the demonstrations, the new fact
        and ``chat_instruction`` in the user turn and the query as the start of the reply (see the module
        docstring)."""
        prompts = list(prompts)
        if self.format.name != "chat" or not len(self.facts):
            return super()._inputs(prompts)
        from editlens.lm.prompting import chat_prefix

        tok, instr = self.lm.tokenizer, self.hparams.chat_instruction
        return [chat_prefix(tok, f"{context.rstrip()}\n\n{instr}") + p
                for context, p in zip(self._contexts(prompts), prompts)]

    def _contexts(self, prompts: list[str]) -> list[str]:
        """Per prompt: its ``k`` demonstrations (least similar first), then ``fact_prefix`` + its fact + a newline."""
        hp = self.hparams
        rows = self.fact_for(prompts)
        keys = [f"{self.facts.texts[r]} {p}" for p, r in zip(prompts, rows)]
        demo_rows: list[list[int]] = [[] for _ in prompts]
        if hp.k > 0 and len(self.demos):
            # over-fetch so that demonstrations of the query's own case can be dropped
            per_case = max(1, len(self.demos) // max(1, len(self.facts)))
            _, idx = self.demos.search(keys, hp.k + 4 * per_case + 4)
            for qi, r in enumerate(rows):
                own = self.facts.ids[r]
                chosen = [int(j) for j in idx[qi].tolist() if self.demo_list[j].case_id != own][: hp.k]
                demo_rows[qi] = chosen[::-1]  # least similar first, most similar next to the query
        out = []
        for r, dr in zip(rows, demo_rows):
            parts = []
            for j in dr:
                d = self.demo_list[j]
                self.demo_counts[d.kind] += 1
                parts.append(f"{hp.fact_prefix}{d.fact}\n{hp.prompt_prefix}{d.prompt} {d.answer}{hp.separator}")
            parts.append(f"{hp.fact_prefix}{self.facts.texts[r]}\n")
            out.append("".join(parts))
        return out

    def __repr__(self) -> str:
        return f"IKESystem(model={self.lm.name!r}, facts={len(self.facts)}, demos={len(self.demos)}, k={self.hparams.k})"


@register_method("ike")
class IKEEditor(Editor):
    """IKE as an editing method: the Edit's system is an :class:`IKESystem`; ``undo()`` forgets the facts."""

    hparams_class = IKEHParams
    edits_weights = False  # the edit lives outside the weights (Edit.save_pretrained refuses it)

    def apply(self, lm: "LM", cases: Sequence["EditCase"], hparams: HParams, *, evk_align: Any = None,
              progress: bool = True, sequence: SequenceState | None = None) -> Edit:
        assert isinstance(hparams, IKEHParams)
        def make() -> IKESystem:
            return IKESystem(self.base_system(lm), hparams)

        system = make() if sequence is None else sequence.kept("ike_system", make, lambda s: s.clear)
        system.add_cases(cases)
        diag = {"facts": len(system.facts), "demonstrations": len(system.demos)}
        if sequence is not None:
            return Edit(system, self.name, cases, hparams, diag, lm=lm, undoable=False)
        return Edit(system, self.name, cases, hparams, diag, lm=lm, on_undo=system.clear)
