"""Keys and values of locate-then-edit methods (ROME, MEMIT, AlphaEdit, EMMET, PMET...).

A fact ``(subject, relation template, target)`` is written into the MLP output projection ``W`` of a layer
(``arch.mlp_out_at(layer)``): the *key* ``k`` is the projection's input at the last subject token, the *value*
its output. This module computes both:

* :func:`context_prefixes` — the context prefixes ``x_j`` of ROME §3.1 / MEMIT §4.3: the empty prefix plus a few
  short texts sampled from the model itself (seeded), each followed by ``". "``. Keys are averaged and the
  target loss is summed over the prefixed prompts so the edit generalises over contexts.
* :func:`compute_keys` — ``k* = mean_j k(x_j + prompt)`` at the last subject token (ROME eq. 3; MEMIT's ``k_i^l``).
* :func:`optimise_values` — the one value optimisation of every locate-then-edit method: the change ``δ`` added,
  for each :class:`Place`, to a module's output at the last subject token (ROME/MEMIT: the MLP output; PMET: the
  MLP and the attention outputs, jointly), optimised with Adam to minimise (ROME eq. 4, MEMIT eq. 16)::

      L(δ) = mean_j −log P(target | x_j + prompt; h += δ) / |target tokens|        (target NLL)
             + kl_factor · KL(P_edited(· | "{subject}") ‖ P_orig(· | "{subject}"))  (essence drift, "{} is a" prompt
                                                                                     read at the last subject token)
             + weight_decay · Σ_places ‖δ‖ / ‖v₀‖²                                   (decay, as the reference code)
             + extra_loss(ctx)                                                      (optional, e.g. EVK-Align)

  with ``‖δ‖ ≤ clamp_norm_factor · ‖v₀‖`` after each step, where ``v₀`` is the place's reference output at the last
  subject token of the unprefixed prompt: the original MLP output (:meth:`Place.mlp`, ROME) or the original
  residual stream after the layer (:meth:`Place.residual`, MEMIT's ``h^L``). Adding ``δ`` to the MLP output at
  the last subject token is the same as adding it to the residual stream after that layer, so ROME's
  ``v* = v₀ + δ`` and MEMIT's ``z = h^L + δ`` both come from here. The settings are one frozen
  :class:`ValueSettings`, which is also the memo key (every field); :func:`compute_values` is a one-place
  shorthand.

By default the objective is the one the public ROME/MEMIT code computes (issue 16): the decay is
``‖δ‖/‖v₀‖²`` (not squared) and a request stops once its *total* loss (NLL + KL term + decay) is below
``early_stop_loss`` (0.05). editlens's earlier choices stay available as named options of
:class:`ValueSettings`: ``decay="squared"`` (``‖δ‖²/‖v₀‖²``) and ``early_stop_on="nll"`` (stop on the target NLL
alone); with both, the result is bit for bit that of the pre-issue-16 loop (``tests/unit/frozen_values_v1.py``).

Deviations from the papers (documented): the essence KL reads the next-token distribution at the last subject
token of ``"{subject} is a"``, which by causality equals the distribution after ``"{subject}"``, so the prompt is
cut after the subject (fewer logits); requests of a batch are optimised jointly (their losses are independent,
so this equals separate optimisation, early stopping per request); forward passes are chunked by a token budget
with gradient accumulation (exact).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from editlens.errors import EditlensError, HParamsError, MethodError
from editlens.lm import ops
from editlens.lm.hooks import add_to_output, record_io

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM

#: seed texts of the sampled context prefixes (as in MEMIT)
PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You")
#: what sampled context prefixes start from (``LocateHParams.prefix_start``): MEMIT's seed words, or the
#: end-of-document token (the reference ROME's ``<|endoftext|>``)
PREFIX_STARTS = ("words", "document")
#: the reference ROME's start text
DOCUMENT_START = "<|endoftext|>"


@dataclass(frozen=True)
class Request:
    """One fact to write: ``template`` (with ``{}``), ``subject``, ``target`` (no leading space)."""

    template: str
    subject: str
    target: str

    @property
    def prompt(self) -> str:
        return self.template.replace("{}", self.subject, 1)


def requests_from_cases(cases: Sequence["EditCase"]) -> list[Request]:
    """All rewrites of ``cases`` (primary and extra) as :class:`Request` s, in order."""
    out = []
    for c in cases:
        for r in c.rewrites:
            if "{}" not in r.prompt:
                raise MethodError(f"case {c.case_id!r}: rewrite prompt {r.prompt!r} has no '{{}}' for the subject")
            if r.subject not in r.prompt.replace("{}", r.subject, 1):
                raise MethodError(f"case {c.case_id!r}: subject {r.subject!r} not found in the filled prompt")
            out.append(Request(r.prompt, r.subject, r.target_new))
    return out


@torch.no_grad()
def sample_texts(lm: "LM", seeds: Sequence[str], max_new_tokens: int, *, seed: int = 0, temperature: float = 1.0,
                 top_k: int = 0, batch_size: int = 64) -> list[str]:
    """Texts sampled from the model after each seed text (seed text included), deterministic for a seed.

    ``temperature=0`` is greedy decoding. Sampling uses a forked RNG (the global RNG is left untouched).
    """
    out: list[str] = []
    devices = [lm.device] if lm.device.type == "cuda" else []
    eos = lm.tokenizer.eos_token_id
    for start in range(0, len(seeds), batch_size):
        chunk = list(seeds[start:start + batch_size])
        ids = [ops.encode(lm.tokenizer, s) for s in chunk]
        batch = ops.pad_left(ids, ops._pad_id(lm), lm.device)
        batch.pop("position_ids")
        kw: dict[str, Any] = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        if temperature > 0:
            kw = dict(do_sample=True, temperature=float(temperature), top_p=None, top_k=int(top_k) if top_k else 0)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + start)
            gen = lm.model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                    pad_token_id=ops._pad_id(lm), eos_token_id=eos, num_beams=1, **kw)
        new = gen[:, batch["input_ids"].shape[1]:].cpu()
        for r, s in enumerate(chunk):
            out.append(s + lm.tokenizer.decode(new[r].tolist(), skip_special_tokens=True))
    return out


def document_start(tokenizer: Any) -> str:
    """The text the ``"document"`` prefixes are sampled after: :data:`DOCUMENT_START` when it is one token of the
    vocabulary (GPT-2, SmolLM2, Qwen, ...), else the tokenizer's EOS token (the document boundary of most
    pretraining corpora), else its BOS token. Raises :class:`~editlens.errors.MethodError` when it has none."""
    ids = tokenizer(DOCUMENT_START, add_special_tokens=False).input_ids
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) == 1 and ids[0] != unk:
        return DOCUMENT_START
    for name in ("eos_token", "bos_token"):
        tok = getattr(tokenizer, name, None)
        if isinstance(tok, str) and tok:
            return tok
    raise MethodError(f"hyperparameter prefix_start='document': the tokenizer has no {DOCUMENT_START!r}, EOS or BOS "
                      "token to sample the context prefixes after; use prefix_start='words'")


def context_prefixes(lm: "LM", n: int = 5, length: int = 10, *, seed: int = 0, start: str = "words") -> list[str]:
    """``[""]`` plus ``n`` sampled texts (seeded, top-k 5 sampling), each + ``". "``: ROME's/MEMIT's context
    templates ``x_j`` (``"{generated}. {}"``).

    ``start="words"`` (MEMIT's reference): each text is one of :data:`PREFIX_SEEDS` and ``length`` tokens sampled
    after it; braces and newlines are removed, runs of whitespace collapsed and a final ``"."`` dropped before
    ``". "`` is added. ``start="document"`` (ROME's reference, ``get_context_templates``): ``length − 1`` tokens
    (at least 1) sampled after :func:`document_start`, which is not kept (the reference counts it in the length
    and removes it from the text); the text is cleaned as the reference cleans it (NFKD normalisation, ``"\n\n"``
    → ``" "``) and its braces removed (editlens's only change: a brace cannot reach a template).
    """
    if start not in PREFIX_STARTS:
        raise MethodError(f"context prefixes: start must be one of {', '.join(map(repr, PREFIX_STARTS))}, got "
                          f"{start!r}")
    if n <= 0:
        return [""]
    if start == "document":
        import unicodedata

        head = document_start(lm.tokenizer)
        texts = sample_texts(lm, [head] * n, max(int(length) - 1, 1), seed=seed, temperature=1.0, top_k=5)
        clean = []
        for t in texts:
            t = unicodedata.normalize("NFKD", t[len(head):]).replace("\n\n", " ")
            clean.append(t.replace("{", "").replace("}", "") + ". ")
        return ["", *clean]
    seeds = [PREFIX_SEEDS[i % len(PREFIX_SEEDS)] for i in range(n)]
    texts = sample_texts(lm, seeds, length, seed=seed, temperature=1.0, top_k=5)
    clean = []
    for t in texts:
        t = " ".join(t.replace("{", " ").replace("}", " ").split())
        clean.append(t.rstrip(".") + ". ")
    return ["", *clean]


def _prefixed(prefix: str, template: str) -> str:
    return prefix + template


def compute_keys(lm: "LM", layer: int, requests: Sequence[Request], prefixes: Sequence[str] = ("",),
                 batch_tokens: int = ops.DEFAULT_BATCH_TOKENS) -> torch.Tensor:
    """``k*`` per request: the input of ``arch.mlp_out_at(layer)`` at the last subject token, averaged over prefixes.

    Returns ``[n_requests, d_in]`` float32 on ``lm.device``.
    """
    module = lm.arch.mlp_out_at(layer)
    prompts, positions = [], []
    for r in requests:
        for p in prefixes:
            prompts.append(p + r.prompt)
            positions.append(ops.subject_last_token(lm.tokenizer, r.template, r.subject, prefix=p))
    keys = ops.capture(lm, prompts, [module], positions, kind="input", batch_tokens=batch_tokens)[module]
    keys = keys.view(len(requests), len(prefixes), -1).mean(1)
    return keys.to(lm.device)


def capture_at_subject(lm: "LM", requests: Sequence[Request], module: str, kind: str = "output",
                       batch_tokens: int = ops.DEFAULT_BATCH_TOKENS) -> torch.Tensor:
    """Input or output of ``module`` at the last subject token of each unprefixed prompt ``[n, d]`` (device, fp32)."""
    prompts = [r.prompt for r in requests]
    positions = [ops.subject_last_token(lm.tokenizer, r.template, r.subject) for r in requests]
    return ops.capture(lm, prompts, [module], positions, kind=kind, batch_tokens=batch_tokens)[module].to(lm.device)


# --------------------------------------------------------------------------------------------- values
@dataclass(frozen=True)
class Place:
    """Where one optimised ``δ`` acts (one entry of the ``places`` of :func:`optimise_values`).

    Attributes:
        layer: the layer (for messages and :attr:`ValueLossContext.layer`).
        module: module path whose output receives ``δ`` at the last subject token of every optimised prompt.
        reference: module path whose output at the last subject token of the unprefixed prompt is ``v₀``: the
            clamp radius (``clamp_norm_factor · ‖v₀‖``), the decay scale (``‖δ‖/‖v₀‖²``) and
            :attr:`ValueResult.init` of this place.

    The usual places: :meth:`mlp` (ROME's ``v*``), :meth:`residual` (MEMIT/AlphaEdit/EMMET's ``z``: ``δ`` added to the
    MLP output is added to the residual stream after the layer, ``v₀ = h^L``), :meth:`attention` (PMET's MHSA part,
    optimised jointly with :meth:`mlp`).
    """

    layer: int
    module: str
    reference: str

    @classmethod
    def mlp(cls, lm: "LM", layer: int) -> "Place":
        """``δ`` on the MLP output projection's output, ``v₀`` = that output (ROME)."""
        m = lm.arch.mlp_out_at(layer)
        return cls(int(layer), m, m)

    @classmethod
    def residual(cls, lm: "LM", layer: int) -> "Place":
        """``δ`` on the MLP output (= on the residual stream after the layer), ``v₀`` = that residual (MEMIT's ``h^L``)."""
        return cls(int(layer), lm.arch.mlp_out_at(layer), lm.arch.block(layer))

    @classmethod
    def attention(cls, lm: "LM", layer: int) -> "Place":
        """``δ`` on the attention output projection's output, ``v₀`` = that output (PMET's MHSA component)."""
        m = lm.arch.attn_out_at(layer)
        return cls(int(layer), m, m)


def _hparam(name: str | None) -> dict[str, Any]:
    return {"hparam": name}


#: values of :attr:`ValueSettings.decay` (the first is the default: the reference code's form)
DECAY_FORMS = ("reference", "squared")
#: values of :attr:`ValueSettings.early_stop_on` (the first is the default: the reference code's rule)
EARLY_STOP_ON = ("total", "nll")


def decay_term(delta: torch.Tensor, init_norm: torch.Tensor, form: str) -> torch.Tensor:
    """The decay of one place per request (before ``weight_decay``): ``‖δ‖/‖v₀‖²`` (``form="reference"``, the
    public ROME/MEMIT code) or ``‖δ‖²/‖v₀‖²`` (``"squared"``). ``delta [n, d]``, ``init_norm [n]`` → ``[n]``.

    At ``δ = 0`` the reference form's gradient is taken as 0 (PyTorch's subgradient of the norm, as in the
    reference code, whose first step starts at ``δ = 0``)."""
    den = init_norm.pow(2).clamp(min=1e-12)
    if form == "reference":
        return delta.norm(dim=-1) / den
    if form == "squared":
        return delta.pow(2).sum(-1) / den
    raise MethodError(f"value settings: 'decay' must be one of {', '.join(map(repr, DECAY_FORMS))}, got {form!r}")


@dataclass(frozen=True)
class ValueSettings:
    """Everything besides the requests and the places that the value optimisation's result depends on.

    Frozen, and its memo key is built from :func:`dataclasses.fields` (:meth:`key`), so a field added here is part
    of the memo key without any other edit. Each field's ``metadata["hparam"]`` names the
    :class:`~editlens.edit.hparams.LocateHParams` field it is read from (:meth:`from_hparams`; ``None``: given by
    the caller). Adding an option of the objective (e.g. a choice of the decay form or of the early-stopping
    quantity) is one field here with the current behaviour as its default, read in :func:`_compute_values`.

    Attributes:
        prefixes: context prefixes (:func:`context_prefixes`); the first should be ``""``.
        steps: maximal number of forward passes (``steps − 1`` Adam updates at most).
        lr: Adam learning rate.
        kl_factor: weight of the essence KL term (0 disables it; ``kl_template=None`` too).
        weight_decay: weight of the decay ``Σ_places ‖δ‖/‖v₀‖²`` (form: ``decay``).
        clamp_norm_factor: each ``‖δ‖`` is clamped to ``clamp_norm_factor · ‖v₀‖`` of its place after each update.
        early_stop_loss: a request stops updating once its stopping quantity (``early_stop_on``) is below this.
        kl_template: essence prompt (with ``{}``) read at the last subject token; ``None`` or ``""``: no KL term.
        batch_tokens: token budget of one forward chunk (gradients are accumulated over chunks).
        decay: form of the decay term of each place: ``"reference"`` (default) ``weight_decay · ‖δ‖ / ‖v₀‖²``, as
            the public ROME/MEMIT code computes it (``compute_v`` / ``compute_z``); ``"squared"``
            ``weight_decay · ‖δ‖² / ‖v₀‖²`` (editlens's objective before issue 16: a smooth penalty, stronger
            than the reference's once ``‖δ‖ > 1/2``, weaker below).
        early_stop_on: what is compared with ``early_stop_loss``: ``"total"`` (default, the reference code's
            rule) a request's whole loss ``NLL + kl_factor · KL + decay``; ``"nll"`` its target NLL alone
            (editlens's rule before issue 16, which stops earlier: the total is never below the NLL). An
            ``extra_loss`` (one scalar for the whole batch) is not part of either.
    """

    prefixes: tuple[str, ...] = field(default=("",), metadata=_hparam(None))
    steps: int = field(default=20, metadata=_hparam("v_num_grad_steps"))
    lr: float = field(default=0.5, metadata=_hparam("v_lr"))
    kl_factor: float = field(default=0.0625, metadata=_hparam("kl_factor"))
    weight_decay: float = field(default=0.5, metadata=_hparam("v_weight_decay"))
    clamp_norm_factor: float = field(default=4.0, metadata=_hparam("clamp_norm_factor"))
    early_stop_loss: float = field(default=5e-2, metadata=_hparam("early_stop_loss"))
    kl_template: str | None = field(default="{} is a", metadata=_hparam("kl_template"))
    batch_tokens: int = field(default=2048, metadata=_hparam("batch_tokens"))
    decay: str = field(default="reference", metadata=_hparam("v_decay"))
    early_stop_on: str = field(default="total", metadata=_hparam("early_stop_on"))

    def __post_init__(self) -> None:
        if isinstance(self.prefixes, str) or not all(isinstance(p, str) for p in self.prefixes):
            raise MethodError(f"value settings: 'prefixes' must be a sequence of strings, got {self.prefixes!r}")
        object.__setattr__(self, "prefixes", tuple(self.prefixes))
        if not self.prefixes:
            raise MethodError("value settings: 'prefixes' must hold at least one prefix (the first is usually '')")
        object.__setattr__(self, "kl_template", self.kl_template or None)
        if self.kl_template is not None and "{}" not in self.kl_template:
            raise MethodError(f"value settings: 'kl_template' needs a '{{}}' for the subject, got {self.kl_template!r}")
        for name, allowed in (("decay", DECAY_FORMS), ("early_stop_on", EARLY_STOP_ON)):
            if getattr(self, name) not in allowed:
                raise MethodError(f"value settings: {name!r} must be one of {', '.join(map(repr, allowed))}, "
                                  f"got {getattr(self, name)!r}")
        for name in ("steps", "batch_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MethodError(f"value settings: {name!r} must be an integer >= 1, got {v!r}")
        for name, strict in (("lr", True), ("clamp_norm_factor", True), ("kl_factor", False),
                             ("weight_decay", False), ("early_stop_loss", False)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or (v <= 0 if strict else v < 0):
                raise MethodError(f"value settings: {name!r} must be a finite number {'>' if strict else '>='} 0, "
                                  f"got {v!r}")

    def key(self) -> tuple[tuple[str, Any], ...]:
        """``((field name, value), ...)`` over every field: this settings' part of the memo key."""
        return tuple((f.name, getattr(self, f.name)) for f in fields(self))

    @classmethod
    def from_hparams(cls, hparams: Any, prefixes: Sequence[str]) -> "ValueSettings":
        """The settings of a method's :class:`~editlens.edit.hparams.LocateHParams` (each field from the
        hyperparameter its ``metadata["hparam"]`` names) with the given context ``prefixes``."""
        kw: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata.get("hparam")
            if name is not None:
                kw[f.name] = getattr(hparams, name)
        return cls(prefixes=tuple(prefixes), **kw)


@dataclass
class ValueLossContext:
    """What an ``extra_loss`` hook of :func:`optimise_values` receives at each optimisation step.

    Attributes:
        lm: the model (weights frozen).
        layer: the layer of the first place.
        module: the module path whose output receives ``delta`` (the first place's).
        requests: the facts being written.
        delta: ``[n_requests, d]`` float32 leaf tensor being optimised at the first place (``requires_grad``); the
            loss returned must be differentiable w.r.t. the optimised leaves (:meth:`leaves`, through :meth:`run`).
        init: ``[n_requests, d]`` original value ``v₀`` of the first place at the unprefixed prompt.
        prefixes: the context prefixes.
        step: optimisation step (0-based).
        places: every place of the optimisation (empty: ``delta`` at ``module`` only, as for FT's adapter).
        deltas: the optimised leaf of each place (``deltas[0] is delta``).
    """

    lm: "LM"
    layer: int
    module: str
    requests: Sequence[Request]
    delta: torch.Tensor
    init: torch.Tensor
    prefixes: Sequence[str]
    step: int = 0
    places: Sequence[Place] = ()
    deltas: Sequence[torch.Tensor] = ()

    def applied(self) -> list[tuple[str, torch.Tensor]]:
        """``(module path, δ)`` of every place whose ``δ`` the forward passes of :meth:`with_delta` add."""
        if self.deltas:
            return [(p.module, d) for p, d in zip(self.places, self.deltas)]
        return [(self.module, self.delta)]

    def leaves(self) -> list[torch.Tensor]:
        """The optimised tensors (those of :meth:`applied` that require a gradient)."""
        return [d for _, d in self.applied() if torch.is_tensor(d) and d.requires_grad]

    def subject_positions(self, prompts_templates: Sequence[tuple[str, str]], prefix: str = "") -> list[int]:
        """Last-subject-token index of each ``(template, subject)`` (in ``prefix + filled template`` tokens)."""
        return [ops.subject_last_token(self.lm.tokenizer, t, s, prefix=prefix) for t, s in prompts_templates]

    @contextlib.contextmanager
    def with_delta(self, rows: torch.Tensor, positions: torch.Tensor, request_index: torch.Tensor) -> Iterator[None]:
        """Within the context, forward passes add each place's ``δ[request_index[i]]`` at
        ``output[rows[i], positions[i]]`` of its module."""
        with contextlib.ExitStack() as stack:
            for module, d in self.applied():
                stack.enter_context(add_to_output(self.lm.model, module, d[request_index], rows=rows,
                                                  positions=positions))
            yield

    def run(self, request_index: torch.Tensor, positions: torch.Tensor, *, input_ids: torch.Tensor | None = None,
            inputs_embeds: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, logits_to_keep: int = 1, use_delta: bool = True) -> torch.Tensor:
        """Forward a left-padded batch (token ids or embeddings) with ``δ[request_index[r]]`` added at
        ``positions[r]`` of row ``r``; returns float32 logits of the last ``logits_to_keep`` positions
        ``[rows, logits_to_keep, vocab]``. ``use_delta=False`` gives the unedited model (for reference outputs)."""
        kw: dict[str, Any] = dict(attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                                  logits_to_keep=logits_to_keep)
        if inputs_embeds is not None:
            kw["inputs_embeds"] = inputs_embeds
        else:
            kw["input_ids"] = input_ids
        n = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
        rows = torch.arange(n, device=self.lm.device)
        cm = self.with_delta(rows, positions.to(self.lm.device), request_index.to(self.lm.device)) if use_delta \
            else contextlib.nullcontext()
        with cm:
            out = self.lm.model(**kw)
        return out.logits[:, -logits_to_keep:, :].float()


#: signature of the optional extra loss of :func:`optimise_values`
ExtraLoss = Callable[[ValueLossContext], torch.Tensor]


@dataclass
class ValueResult:
    """Result of :func:`optimise_values`, one entry per place.

    Attributes:
        places: the places, in the order given.
        deltas: ``[n, d]`` optimised change of each place (float32, device).
        inits: ``[n, d]`` original value ``v₀`` of each place at the unprefixed prompt.
        losses: ``loss/nll_init``, ``loss/nll``, ``loss/kl``, ``loss/wd``, ``loss/extra``, ``loss/steps`` (plain
            floats, means over requests).

    ``delta``, ``init`` and ``target`` (``init + delta``) are the first place's: ROME's ``v*`` up to ``W k*`` for
    :meth:`Place.mlp`, MEMIT's ``z`` for :meth:`Place.residual`.
    """

    places: tuple[Place, ...]
    deltas: tuple[torch.Tensor, ...]
    inits: tuple[torch.Tensor, ...]
    losses: dict[str, float] = field(default_factory=dict)

    @property
    def delta(self) -> torch.Tensor:
        return self.deltas[0]

    @property
    def init(self) -> torch.Tensor:
        return self.inits[0]

    @property
    def target(self) -> torch.Tensor:
        return self.init + self.delta

    def copy(self) -> "ValueResult":
        return ValueResult(self.places, tuple(d.clone() for d in self.deltas), tuple(i.clone() for i in self.inits),
                           dict(self.losses))


@dataclass
class _Row:
    req: int
    kind: str  # "nll" or "kl"
    ids: list[int]
    pos: int  # subject-last index within ids
    target: list[int]


def _build_rows(lm: "LM", requests: Sequence[Request], prefixes: Sequence[str], kl_template: str | None) -> list[_Row]:
    rows: list[_Row] = []
    for i, r in enumerate(requests):
        for p in prefixes:
            text = p + r.prompt
            p_ids, t_ids = ops.target_token_ids(lm.tokenizer, text, r.target)
            pos = ops.subject_last_token(lm.tokenizer, r.template, r.subject, prefix=p)
            if pos >= len(p_ids):
                raise MethodError(f"subject {r.subject!r} not found in the tokens of prompt {text!r}")
            rows.append(_Row(i, "nll", p_ids + t_ids[:-1], pos, t_ids))
        if kl_template:
            ids = ops.encode(lm.tokenizer, kl_template.replace("{}", r.subject, 1))
            pos = ops.subject_last_token(lm.tokenizer, kl_template, r.subject)
            rows.append(_Row(i, "kl", ids[: pos + 1], pos, []))
    return rows


def _build_batches(lm: "LM", rows: Sequence[_Row], batch_tokens: int) -> list[dict[str, Any]]:
    """The rows as left-padded chunks of at most ``batch_tokens`` tokens, with the subject position, request index,
    target gather indices (``-1``: ignored), KL-row mask and target length of each row."""
    dev = lm.device
    pad = ops._pad_id(lm)
    batches = []
    for g in ops.plan_batches([len(r.ids) for r in rows], batch_tokens):
        b = ops.pad_left([rows[i].ids for i in g], pad, dev)
        width = b["input_ids"].shape[1]
        keep = max([len(rows[i].target) for i in g if rows[i].kind == "nll"] + [1])
        tgt = torch.full((len(g), keep), -1, dtype=torch.long)
        for r, i in enumerate(g):
            if rows[i].kind == "nll":
                tgt[r, keep - len(rows[i].target):] = torch.tensor(rows[i].target)
        batches.append(dict(
            batch=b, keep=keep, tgt=tgt.to(dev),
            pos=torch.tensor([width - len(rows[i].ids) + rows[i].pos for i in g], device=dev),
            req=torch.tensor([rows[i].req for i in g], device=dev),
            is_kl=torch.tensor([rows[i].kind == "kl" for i in g], device=dev),
            n_tok=torch.tensor([max(1, len(rows[i].target)) for i in g], device=dev, dtype=torch.float32)))
    return batches


#: entries kept by the in-memory value memo (see :func:`optimise_values`)
VALUE_MEMO_SIZE = 4


def weights_checksum(lm: "LM") -> str:
    """A cheap checksum of every parameter (float32 norms, no copies): guards caches keyed by ``lm.fingerprint``
    against weights changed outside editlens (e.g. a user's own training step). Parameters offloaded by accelerate
    (``meta`` between forwards) are skipped; editlens's own edits of them change ``lm.fingerprint``."""
    with torch.no_grad():
        norms = [torch.linalg.vector_norm(p, dtype=torch.float32) for p in lm.model.parameters()
                 if p.device.type != "meta"]
        dev = norms[0].device if norms else torch.device("cpu")
        stacked = torch.stack([n.to(dev) for n in norms]) if norms else torch.zeros(0)
    return stacked.cpu().numpy().tobytes().hex()


def value_memo_key(lm: "LM", requests: Sequence[Request], places: Sequence[Place], settings: ValueSettings
                   ) -> tuple:
    """The memo key of :func:`optimise_values`: the weights (fingerprint and :func:`weights_checksum`), the
    requests, the places and every field of ``settings`` (:meth:`ValueSettings.key`)."""
    return (lm.fingerprint, weights_checksum(lm), tuple(requests), tuple(places), settings.key())


def _check_value_args(lm: "LM", requests: Sequence[Request], places: Sequence[Place], settings: Any) -> None:
    if not isinstance(settings, ValueSettings):
        raise MethodError(f"value optimisation: settings must be a ValueSettings, got {type(settings).__name__}")
    if not requests:
        raise MethodError("value optimisation: no requests")
    bad = [r for r in requests if not isinstance(r, Request)]
    if bad:
        raise MethodError(f"value optimisation: requests must be locate.Request objects, got {bad[0]!r}")
    if not places or any(not isinstance(p, Place) for p in places):
        raise MethodError(f"value optimisation: places must be a non-empty list of locate.Place, got {places!r}")
    if len(set(p.module for p in places)) != len(places):
        raise MethodError(f"value optimisation: two places add their δ to the same module: {list(places)!r}")
    for p in places:
        for path in (p.module, p.reference):
            try:
                lm.module(path)
            except EditlensError as e:
                raise MethodError(f"value optimisation: place {p!r}: {e}") from None


def optimise_values(lm: "LM", requests: Sequence[Request], places: Sequence[Place], settings: ValueSettings, *,
                    extra_loss: ExtraLoss | None = None, progress: bool = False, memo: bool = True,
                    chunk_size: int | None = None) -> ValueResult:
    """Optimise, for each request and each place, the change ``δ`` that makes the model answer the request's
    target: the one value optimisation of the locate-then-edit methods (ROME's ``v*``, MEMIT/AlphaEdit/EMMET/
    RECT/PRUNE's ``z``, PMET's joint MHSA+FFN values; EVK-Align plugs in as ``extra_loss``). See the module
    docstring for the objective; all places' ``δ`` are applied together and optimised jointly by one Adam.

    The result depends only on the weights, the requests, the places and ``settings``, not on the closed-form
    solve that follows, so a sweep of a solve-only hyperparameter (MEMIT's λ, AlphaEdit's null-space threshold)
    reuses it: the last :data:`VALUE_MEMO_SIZE` results are kept on ``lm``, keyed by :func:`value_memo_key`
    (every field of the frozen ``settings``). ``memo=False`` or an ``extra_loss`` (a stateful hook) bypasses it.

    Args:
        requests: facts to write (each gets its own ``δ`` per place).
        places: where ``δ`` acts and what ``v₀`` is (:class:`Place`); the first place is :attr:`ValueResult.delta`
            and :attr:`ValueLossContext.delta`.
        settings: :class:`ValueSettings`.
        extra_loss: optional hook ``extra_loss(ctx: ValueLossContext) -> Tensor`` (a scalar, differentiable in
            ``ctx.leaves()``) added to the loss at every step (the EVK-Align regulariser plugs in here). It is
            called once per step after the chunked forward passes; use ``ctx.run(...)`` to forward any batch (token
            ids or perturbed ``inputs_embeds``) with every ``δ`` applied at chosen positions, ``use_delta=False``
            for reference outputs (wrap those in ``torch.no_grad()``).
        progress: show a tqdm bar over steps.
        memo: use the in-memory memo.
        chunk_size: optimise at most this many requests at a time (``None``: all at once). Everything the loop
            holds per request (rows, token batches, the KL rows' original next-token distributions ``[n, vocab]``,
            Adam's state) then scales with the chunk, not the batch; only the ``[n, d]`` results are kept whole.
            Each request's objective, early stop and Adam step are its own (the total loss is a sum of per-request
            terms, Adam is element-wise and every chunk starts at step 0), so chunks are independent and the
            result is the unchunked one up to floating-point summation order of the batched forward passes (rows
            padded with other rows); see :func:`_compute_chunked`. Ignored with an ``extra_loss``, which is one
            scalar over the whole batch. Part of the memo key.

    Returns:
        :class:`ValueResult` (``deltas``, ``inits`` per place and mean losses).
    """
    places = tuple(places)
    _check_value_args(lm, requests, places, settings)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise MethodError(f"value optimisation: chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
    if extra_loss is not None or (chunk_size is not None and chunk_size >= len(requests)):
        chunk_size = None
    if not memo or extra_loss is not None:
        return _compute_chunked(lm, requests, places, settings, chunk_size, extra_loss=extra_loss, progress=progress)
    key = value_memo_key(lm, requests, places, settings) + (("chunk_size", chunk_size),)
    cache = lm.__dict__.setdefault("_value_memo", {})
    hit = cache.pop(key, None)
    if hit is None:
        hit = _compute_chunked(lm, requests, places, settings, chunk_size, progress=progress)
    cache[key] = hit  # most recently used last
    while len(cache) > VALUE_MEMO_SIZE:
        cache.pop(next(iter(cache)))
    return hit.copy()


def compute_values(lm: "LM", requests: Sequence[Request], layer: int, *, space: str = "mlp",
                   prefixes: Sequence[str] = ("",), extra_loss: ExtraLoss | None = None, progress: bool = False,
                   memo: bool = True, **settings: Any) -> ValueResult:
    """Shorthand of :func:`optimise_values` for one place at ``layer``: ``space="mlp"`` is :meth:`Place.mlp`
    (ROME), ``"residual"`` :meth:`Place.residual` (MEMIT); ``settings`` are the other :class:`ValueSettings` fields."""
    if space not in ("mlp", "residual"):
        raise MethodError(f"space must be 'mlp' or 'residual', got {space!r}")
    place = Place.mlp(lm, layer) if space == "mlp" else Place.residual(lm, layer)
    return optimise_values(lm, requests, [place], ValueSettings(prefixes=tuple(prefixes), **settings),
                           extra_loss=extra_loss, progress=progress, memo=memo)


def _compute_chunked(lm: "LM", requests: Sequence[Request], places: Sequence[Place], settings: ValueSettings,
                     chunk_size: int | None, *, extra_loss: ExtraLoss | None = None, progress: bool = False
                     ) -> ValueResult:
    """:func:`_compute_values` over consecutive chunks of at most ``chunk_size`` requests (``None``: one call).

    The chunks' ``[n_c, d]`` deltas and inits are concatenated in request order; the loss figures, means over
    requests, are the chunk means weighted by chunk size (``loss/steps``: the largest), so they equal the
    unchunked figures up to rounding. Only one chunk's optimisation state is alive at a time."""
    n = len(requests)
    if chunk_size is None or chunk_size >= n:
        return _compute_values(lm, requests, places, settings, extra_loss=extra_loss, progress=progress)
    parts: list[ValueResult] = []
    sizes: list[int] = []
    for start in range(0, n, chunk_size):
        chunk = requests[start:start + chunk_size]
        parts.append(_compute_values(lm, chunk, places, settings, progress=progress))
        sizes.append(len(chunk))
    losses: dict[str, float] = {}
    for k in parts[0].losses:
        vals = [p.losses[k] for p in parts]
        losses[k] = max(vals) if k == "loss/steps" else sum(v * m for v, m in zip(vals, sizes)) / n
    return ValueResult(places=tuple(places),
                       deltas=tuple(torch.cat([p.deltas[i] for p in parts]) for i in range(len(places))),
                       inits=tuple(torch.cat([p.inits[i] for p in parts]) for i in range(len(places))),
                       losses=losses)


def _compute_values(lm: "LM", requests: Sequence[Request], places: Sequence[Place], settings: ValueSettings, *,
                    extra_loss: ExtraLoss | None = None, progress: bool = False) -> ValueResult:
    """The optimisation of :func:`optimise_values` (not memoised, arguments already checked)."""
    s = settings
    dev = lm.device
    n = len(requests)
    n_pref = len(s.prefixes)
    # v0 of each place at the unprefixed prompt
    inits = [capture_at_subject(lm, requests, p.reference, kind="output") for p in places]
    init_norms = [i.norm(dim=-1) for i in inits]
    rows = _build_rows(lm, requests, s.prefixes, s.kl_template if s.kl_factor > 0 else None)
    batches = _build_batches(lm, rows, s.batch_tokens)
    # original next-token log-probs of the KL rows
    kl_init: list[torch.Tensor | None] = []
    with torch.no_grad():
        for bt in batches:
            if bool(bt["is_kl"].any()):
                lg = lm.model(**bt["batch"], logits_to_keep=1, use_cache=False).logits[:, -1, :].float()
                kl_init.append(torch.log_softmax(lg, -1)[bt["is_kl"]])
            else:
                kl_init.append(None)

    deltas = [torch.zeros((n, i.shape[1]), device=dev, dtype=torch.float32, requires_grad=True) for i in inits]
    opt = torch.optim.Adam(deltas, lr=s.lr)
    max_norms = [(s.clamp_norm_factor * nrm).unsqueeze(1) for nrm in init_norms]
    active = torch.ones(n, dtype=torch.bool, device=dev)
    ctx = ValueLossContext(lm=lm, layer=places[0].layer, module=places[0].module, requests=requests,
                           delta=deltas[0], init=inits[0], prefixes=list(s.prefixes), places=tuple(places),
                           deltas=tuple(deltas))
    losses: dict[str, float] = {}
    nll_first: torch.Tensor | None = None
    it_bar: Any = range(max(1, s.steps))
    if progress:  # editlens.progress: a tqdm bar on a terminal, plain periodic lines in logs, nothing with --quiet
        from editlens.progress import track

        it_bar = track(it_bar, desc=f"values L{places[0].layer}", unit="step")
    last_step = 0
    nll_prev = torch.zeros(n, device=dev)
    kl_prev = torch.zeros(n, device=dev)
    for it in it_bar:
        last_step = it
        update = it < s.steps - 1
        opt.zero_grad(set_to_none=True)
        # rows of requests that stopped (early stop) are not forwarded again: their δ is frozen and each row sees
        # only its own request's δ, so their losses are exactly the last ones computed (kept in nll_prev/kl_prev)
        nll = torch.where(active, torch.zeros_like(nll_prev), nll_prev)
        kl = torch.where(active, torch.zeros_like(kl_prev), kl_prev)
        for bt0, kli0 in zip(batches, kl_init):
            bt, kli = _active_rows(bt0, kli0, active)
            if bt is None:
                continue
            with torch.set_grad_enabled(update or extra_loss is not None):
                with ctx.with_delta(torch.arange(len(bt["req"]), device=dev), bt["pos"], bt["req"]):
                    logits = lm.model(**bt["batch"], logits_to_keep=bt["keep"], use_cache=False).logits
                chunk_loss, chunk_nll, chunk_kl = _chunk_losses(logits, bt, kli, n, n_pref, s.kl_factor)
                if chunk_kl is not None:
                    kl = kl + chunk_kl.detach()
                nll = nll + chunk_nll.detach()
                if update:
                    chunk_loss.backward()
        if nll_first is None:
            nll_first = nll.clone()
        nll_prev, kl_prev = nll.clone(), kl.clone()
        decay: torch.Tensor | None = None
        for d, nrm in zip(deltas, init_norms):
            term = decay_term(d, nrm, s.decay)
            decay = term if decay is None else decay + term
        wd = s.weight_decay * decay
        stop_on = None if s.early_stop_on == "nll" else nll + s.kl_factor * kl + wd.detach()
        active, losses = _finish_step(ctx, it, extra_loss, nll, kl, wd, active, s.early_stop_loss, update,
                                      stop_on=stop_on)
        if not update or not bool(active.any()):
            break
        olds = [d.detach().clone() for d in deltas]
        opt.step()
        with torch.no_grad():
            for d, max_norm, old in zip(deltas, max_norms, olds):
                norms = d.norm(dim=-1, keepdim=True)
                scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
                d.mul_(scale)
                d.copy_(torch.where(active.unsqueeze(1), d, old))
    assert nll_first is not None
    losses["loss/nll_init"] = float(nll_first.mean())
    losses["loss/steps"] = float(last_step + 1)
    return ValueResult(places=tuple(places), deltas=tuple(d.detach() for d in deltas), inits=tuple(inits),
                       losses=losses)


def _finish_step(ctx: ValueLossContext, it: int, extra_loss: ExtraLoss | None, nll: torch.Tensor,
                 kl: torch.Tensor, wd: torch.Tensor, active: torch.Tensor, early_stop_loss: float,
                 update: bool, stop_on: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The end of one value-optimisation step: evaluate the optional ``extra_loss(ctx)`` (a scalar, e.g.
    EVK-Align), mark requests whose stopping quantity ``stop_on`` (per request; default: the NLL) fell below
    ``early_stop_loss`` as done, backpropagate weight decay + extra loss (the chunk losses were backpropagated
    already) and return the new ``active`` mask with the step's loss figures."""
    extra = None
    if extra_loss is not None:
        ctx.step = it
        with torch.set_grad_enabled(True):
            extra = extra_loss(ctx)
        if not (torch.is_tensor(extra) and extra.dim() == 0):
            raise EditlensError("extra_loss must return a scalar tensor")
    # "nll" (editlens's old rule) goes on while NLL > threshold; "total" (the reference) while not total < threshold
    active = active & (nll > early_stop_loss if stop_on is None else stop_on >= early_stop_loss)
    if update:
        total = wd.sum() + (extra if extra is not None else 0.0)
        if torch.is_tensor(total) and total.requires_grad:
            total.backward()
    losses = {"loss/nll": float(nll.mean()), "loss/kl": float(kl.mean()), "loss/wd": float(wd.detach().mean())}
    if extra is not None:
        losses["loss/extra"] = float(extra.detach())
    return active, losses


def _chunk_losses(logits: torch.Tensor, bt: dict, kli: torch.Tensor | None, n: int, n_pref: int, kl_factor: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loss of one prepared chunk of the value optimisation: ``(loss, per-request NLL [n], per-request KL [n])``.

    The NLL of each ``nll`` row is the mean over its target tokens, divided by the number of prefixes (so a
    request's NLL is the mean over its prefixed prompts); ``kl`` rows add ``kl_factor · KL(now ‖ original)`` of
    their next-token distribution (ROME's essence term; ``kli`` = the original log-probs of those rows)."""
    dev = logits.device
    lp = torch.log_softmax(logits[:, -bt["keep"]:, :].float(), -1)
    tgt = bt["tgt"]
    tok_lp = lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (tgt >= 0)
    row_nll = -tok_lp.sum(-1) / bt["n_tok"] / n_pref
    row_nll = torch.where(bt["is_kl"], torch.zeros_like(row_nll), row_nll)
    chunk_nll = torch.zeros(n, device=dev).index_add(0, bt["req"], row_nll)
    loss = chunk_nll.sum()
    chunk_kl = None
    if kli is not None:
        lp_kl = lp[bt["is_kl"], -1, :]
        row_kl = (lp_kl.exp() * (lp_kl - kli)).sum(-1)
        chunk_kl = torch.zeros(n, device=dev).index_add(0, bt["req"][bt["is_kl"]], row_kl)
        loss = loss + kl_factor * chunk_kl.sum()
    return loss, chunk_nll, chunk_kl


def _active_rows(bt: dict, kli: torch.Tensor | None, active: torch.Tensor) -> tuple[dict | None, Any]:
    """The rows of a prepared chunk whose request is still optimised (``None`` when there is none)."""
    keep = active[bt["req"]]
    if bool(keep.all()):
        return bt, kli
    if not bool(keep.any()):
        return None, None
    idx = keep.nonzero().squeeze(1)
    out = dict(bt)
    out["batch"] = {k: (v.index_select(0, idx) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == keep.shape[0]
                        else v) for k, v in bt["batch"].items()}
    for k in ("pos", "req", "tgt", "is_kl", "n_tok"):
        out[k] = bt[k].index_select(0, idx)
    if kli is not None:
        kli = kli[keep[bt["is_kl"]]]
    return out, kli


def spread_layers(layers: Sequence[int]) -> list[int]:
    """Validate a layer list (sorted, unique)."""
    out = sorted({int(x) for x in layers})
    if not out:
        raise MethodError("no layers to edit")
    return out


def check_layers(lm: "LM", layers: Sequence[int], method: str, key: str = "layers") -> None:
    """Raise :class:`~editlens.errors.HParamsError` naming the hyperparameter ``key`` when a layer index is outside
    the model."""
    for l in layers:
        if not 0 <= int(l) < lm.n_layers:
            raise HParamsError(f"hyperparameter {key!r} of method {method!r}: layer {l} is outside the model "
                               f"({lm.n_layers} layers, 0..{lm.n_layers - 1})")


def fro(t: torch.Tensor) -> float:
    """Frobenius norm as a float (float64 accumulation)."""
    return float(t.double().norm())


def sqrt_or_nan(x: float) -> float:
    return math.sqrt(x) if x >= 0 else float("nan")


def prepare(lm: "LM", hparams: Any, layers: Sequence[int], sequence: Any = None,
            progress: bool = False) -> tuple[dict[int, torch.Tensor], list[str]]:
    """Second moments ``{layer: C}`` (float64 on ``lm.device``) and context prefixes for an edit.

    In a sequential run (``sequence`` given) both are computed once, before the first edit, and kept in
    ``sequence.data`` so later steps neither reload them nor compute them on edited weights.
    ``hparams`` is a :class:`~editlens.edit.hparams.LocateHParams`.
    """
    from editlens.edit.stats import second_moment

    data = sequence.data if sequence is not None else {}
    cov: dict[int, torch.Tensor] = data.setdefault("mom2", {})
    missing = [l for l in layers if l not in cov]
    if missing:
        # statistics are a one-off computation of minutes: always reported (editlens.progress; nothing in mode off)
        got = second_moment(lm, missing, progress=True, **hparams.stats_kwargs())
        for l, c in got.items():
            cov[l] = c.to(device=lm.device, dtype=torch.float64)
    plan = hparams.prefix_plan()
    start = getattr(hparams, "prefix_start", "words")
    pkey = ("prefixes", tuple(plan), hparams.seed, start)
    if pkey not in data:
        data[pkey] = planned_prefixes(lm, plan, seed=hparams.seed, cache_dir=hparams.stats_dir or None, start=start)
    return {l: cov[l] for l in layers}, data[pkey]


@dataclass
class EditSetup:
    """What every locate-then-edit method starts from (:func:`setup_edit`)."""

    layers: list[int]
    requests: list[Request]
    cov: dict[int, torch.Tensor]
    prefixes: list[str]
    values: ValueSettings
    #: what the edit's diagnostics record of the setup (``trace/*`` when the layers were ``"trace"``)
    diagnostics: dict[str, Any] = field(default_factory=dict)


def setup_edit(lm: "LM", cases: Sequence["EditCase"], hparams: Any, layers: Sequence[int], method: str,
               sequence: Any = None, progress: bool = False) -> EditSetup:
    """The common start of a locate-then-edit method: ``layers`` validated (:func:`spread_layers`,
    :func:`check_layers`) — or, when they are ``"trace"``, chosen by causal tracing of ``cases``
    (:func:`trace_layers_for`) —, the requests of ``cases``, second moments and context prefixes (:func:`prepare`)
    and the :class:`ValueSettings` of ``hparams``."""
    from editlens.edit.hparams import is_trace

    key = "layer" if hasattr(hparams, "layer") and not hasattr(hparams, "layers") else "layers"
    diagnostics: dict[str, Any] = {}
    if is_trace(layers) or (not isinstance(layers, str) and len(layers) == 1 and is_trace(list(layers)[0])):
        layers, diagnostics = trace_layers_for(lm, cases, hparams, method, key, sequence)
    layers = spread_layers(layers)
    check_layers(lm, layers, method, key)
    requests = requests_from_cases(cases)
    cov, prefixes = prepare(lm, hparams, layers, sequence, progress)
    return EditSetup(layers, requests, cov, list(prefixes), ValueSettings.from_hparams(hparams, prefixes),
                     diagnostics)


def trace_layers_for(lm: "LM", cases: Sequence["EditCase"], hparams: Any, method: str, key: str,
                     sequence: Any = None) -> tuple[list[int], dict[str, Any]]:
    """The layers ``"trace"`` stands for (:func:`editlens.localize.trace_layers` on ``cases`` with the
    ``trace_*`` hyperparameters and ``seed``) and the diagnostics recording them: ``trace/layers``,
    ``trace/scores`` (the average MLP indirect effect at the last subject token, per layer of the model),
    ``trace/candidates``, ``trace/n_cases``, ``trace/p_clean``, ``trace/p_corrupt`` and the settings.

    ``key = "layer"`` (ROME): one layer; ``"layers"``: as many layers as the method's default for the model. In a
    sequential run the choice is made once, at the first step (on the unedited model, before any edit, as the
    second moments are), and kept in ``sequence.data``: per-layer state of a run (AlphaEdit's accumulated keys,
    PRUNE's σ_max, the collapse diagnostics of each edited matrix) needs fixed layers, and a trace of the edited
    model would measure the earlier edits. Raises :class:`~editlens.errors.HParamsError` naming ``trace_range``
    when it lies outside the model."""
    from editlens.localize import TraceError, trace_layers

    L = lm.n_layers
    rng = list(getattr(hparams, "trace_range", []) or [])
    if rng and not 0 <= rng[0] <= rng[1] < L:
        raise HParamsError(f"hyperparameter 'trace_range' of method {method!r}: {rng} is outside the model "
                           f"({L} layers, 0..{L - 1})")
    if key == "layer":
        n = 1
    else:
        default = type(hparams).for_model(lm).layers
        n = len(default) if not isinstance(default, str) else 1
    settings = (method, key, n, tuple(rng), hparams.trace_samples, hparams.trace_window, hparams.trace_cases,
                hparams.seed, hparams.batch_tokens)
    store = sequence.data.setdefault("trace_layers", {}) if sequence is not None else {}
    if settings not in store:
        try:
            choice = trace_layers(lm, cases, n, candidates=tuple(rng) if rng else None,
                                  samples=hparams.trace_samples, window=hparams.trace_window, seed=hparams.seed,
                                  max_cases=hparams.trace_cases, batch_tokens=hparams.batch_tokens)
        except TraceError as e:
            raise MethodError(f"{method}: {key}='trace': causal tracing of the cases failed: {e}") from None
        store[settings] = (list(choice.layers), choice.diagnostics())
    layers, diag = store[settings]
    return list(layers), dict(diag)


def resolved_hparams(hparams: Any, setup: EditSetup) -> Any:
    """``hparams`` with ``layer`` / ``layers`` set to the layers of ``setup`` when they were ``"trace"`` (so that
    a method can read its layers from its hyperparameters); unchanged otherwise."""
    from dataclasses import replace as dc_replace

    from editlens.edit.hparams import is_trace

    if hasattr(hparams, "layer") and is_trace(hparams.layer):
        return dc_replace(hparams, layer=setup.layers[0])
    if hasattr(hparams, "layers") and is_trace(hparams.layers):
        return dc_replace(hparams, layers=list(setup.layers))
    return hparams


def planned_prefixes(lm: "LM", plan: Sequence[tuple[int, int]], *, seed: int = 0, cache_dir: Any = None,
                     start: str = "words") -> list[str]:
    """``[""]`` plus, for each group ``(length, count)`` of ``plan`` (:meth:`LocateHParams.prefix_plan`), ``count``
    prefixes of ``length`` sampled tokens (:func:`cached_prefixes`; group ``g`` samples with seed ``seed + g``, so
    a longer group does not start with the texts of a shorter one), generated after ``start``
    (:func:`context_prefixes`). One group gives :func:`cached_prefixes`'s list unchanged."""
    out = [""]
    for g, (length, count) in enumerate(plan):
        out += cached_prefixes(lm, int(count), int(length), seed=seed + g, cache_dir=cache_dir, start=start)[1:]
    return out


def cached_prefixes(lm: "LM", n: int, length: int, *, seed: int = 0, cache_dir: Any = None,
                    start: str = "words") -> list[str]:
    """:func:`context_prefixes`, cached as JSON beside the statistics (keyed by ``lm.fingerprint`` and the settings)."""
    import json

    from editlens.edit.stats import stats_dir

    tag = "" if start == "words" else f"-{start}"  # the words' files keep their name of before prefix_start
    path = stats_dir(cache_dir) / f"prefixes-{lm.fingerprint}-n{n}-t{length}-s{seed}{tag}.json"
    if path.is_file():
        try:
            got = json.loads(path.read_text())
            if isinstance(got, list) and len(got) == n + 1 and all(isinstance(x, str) for x in got):
                return got
        except (OSError, json.JSONDecodeError):
            pass
    out = context_prefixes(lm, n, length, seed=seed, start=start)
    try:
        from editlens.edit.stats import _atomic_write_text

        _atomic_write_text(path, json.dumps(out))
    except OSError:
        pass
    return out
