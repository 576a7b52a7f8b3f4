"""Hyperparameters shared by the locate-then-edit methods (ROME, MEMIT, AlphaEdit, EMMET, and PMET/RECT/PRUNE).

:class:`LocateHParams` holds what :mod:`editlens.edit.locate` and :mod:`editlens.edit.stats` need: the context
prefixes, the value optimisation (ROME eq. 4 / MEMIT eq. 16; read by
:meth:`editlens.edit.locate.ValueSettings.from_hparams`) and the second-moment statistics. Defaults are the
papers' GPT-2-XL / GPT-J values (20 Adam steps at lr 0.5, KL factor 0.0625, weight decay 0.5, in the reference
code's form ``‖δ‖/‖v₀‖²``, stopping once the total loss is below 0.05); methods set the clamp factor and layers per
architecture.

**Layers from the trace.** ``layer`` (ROME, R-ROME) and ``layers`` (MEMIT and its relatives) also accept the string
``"trace"`` (:data:`TRACE`): the layer(s) are then chosen at edit time by causal tracing of the cases being edited
(:func:`editlens.localize.trace_layers`, settings ``trace_samples``, ``trace_window``, ``trace_cases``,
``trace_range`` and ``seed``), in :func:`editlens.edit.locate.setup_edit`; the chosen layers and the trace scores
are recorded in the edit's diagnostics (``trace/layers``, ``trace/scores``...). See docs/localize.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace as dc_replace
from typing import Any, ClassVar, Mapping

from editlens.edit.base import HParams, NON_NEGATIVE, POSITIVE, Range
from editlens.errors import HParamsError


@dataclass
class LocateHParams(HParams):
    """Shared hyperparameters of locate-then-edit methods.

    Attributes:
        n_prefixes: number of sampled context prefixes (plus the empty one).
        prefix_length: tokens per sampled prefix.
        prefix_groups: ``[[length, count], ...]``: several groups of sampled prefixes, ``count`` prefixes of
            ``length`` tokens each (plus the empty one), in place of the single group ``n_prefixes`` ×
            ``prefix_length``; ``[]`` (the shared default): that single group. The form of the reference code's
            ``context_template_length_params``: ROME's default is its ``[[5, 10], [10, 10]]`` (21 prefixes), MEMIT
            and its relatives keep one group of 5 × 10 (their reference's ``[[10, 5]]``). Setting ``n_prefixes`` or
            ``prefix_length`` (without ``prefix_groups`` in the same call) clears the groups, so that
            ``n_prefixes=2`` means two prefixes for every method.
        prefix_start: what the sampled prefixes are generated after (:data:`editlens.edit.locate.PREFIX_STARTS`):
            ``"words"`` (MEMIT's reference: the seed words "The", "Therefore", "Because", "I", "You", kept in the
            prefix; ``prefix_length`` new tokens) or ``"document"`` (ROME's reference: the end-of-document token
            ``<|endoftext|>``, or the tokenizer's EOS token when its vocabulary has no such token; ``length − 1``
            new tokens, as the reference counts the start token in the length; the start token is not kept).
            ROME and R-ROME default to ``"document"``, every other method to ``"words"``.
        v_num_grad_steps: forward passes of the value optimisation (``−1`` updates at most).
        v_lr: Adam learning rate of the value optimisation.
        v_weight_decay: weight of the decay ``‖δ‖/‖v₀‖²`` (form: ``v_decay``).
        clamp_norm_factor: ``‖δ‖ ≤ clamp_norm_factor · ‖v₀‖``.
        kl_factor: weight of the essence KL term.
        kl_template: prompt whose last-subject-token distribution must not drift (``""`` disables).
        early_stop_loss: a request's optimisation stops once its ``early_stop_on`` loss is below this.
        v_decay: decay form, ``"reference"`` (``‖δ‖/‖v₀‖²``, the public ROME/MEMIT code) or ``"squared"``
            (``‖δ‖²/‖v₀‖²``, editlens before issue 16); see :class:`editlens.edit.locate.ValueSettings`.
        early_stop_on: ``"total"`` (NLL + KL term + decay, the reference code) or ``"nll"`` (target NLL alone).
        stats_corpus: corpus of the second moments (``""``: text sampled from the model; or a .txt/.jsonl path).
        stats_n_samples: documents of the statistics corpus.
        stats_max_length: tokens per document.
        stats_dir: statistics cache directory (``""``: ``$EDITLENS_STATS_DIR`` or the editlens cache).
        batch_tokens: token budget of one forward chunk in the value optimisation.
        seed: seed of the prefixes, of the sampled corpus and of the trace's noise draws.
        trace_samples: noise draws per traced case when the layers are ``"trace"``.
        trace_window: MLP layers restored together around each traced layer (the paper's 10).
        trace_cases: at most this many of the cases being edited are traced (spread evenly; 0: all).
        trace_range: ``[first, last]`` layers the traced choice is made among (``[]``: layer 1 to ``⌈2L/3⌉ − 1``,
            :func:`editlens.localize.default_range`).
    """

    n_prefixes: int = 5
    prefix_length: int = 10
    prefix_groups: list[list[int]] = field(default_factory=list)
    prefix_start: str = "words"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    kl_template: str = "{} is a"
    early_stop_loss: float = 0.05
    v_decay: str = "reference"
    early_stop_on: str = "total"
    stats_corpus: str = ""
    stats_n_samples: int = 128  # editlens.edit.stats.DEFAULT_N_SAMPLES (256 before issue 19)
    stats_max_length: int = 128
    stats_dir: str = ""
    batch_tokens: int = 2048
    seed: int = 0
    trace_samples: int = 3
    trace_window: int = 10
    trace_cases: int = 8
    trace_range: list[int] = field(default_factory=list)

    ARCH_DEFAULTS: ClassVar[Mapping[str, Any]] = {}
    RANGES: ClassVar[Mapping[str, Range]] = {
        "v_lr": POSITIVE, "v_weight_decay": NON_NEGATIVE, "clamp_norm_factor": POSITIVE, "kl_factor": NON_NEGATIVE,
        "early_stop_loss": NON_NEGATIVE,
    }

    def replace(self, **overrides: Any) -> "LocateHParams":
        """:meth:`HParams.replace`, where ``layer`` / ``layers`` may also be (or stop being) ``"trace"``."""
        from editlens.edit.base import _coerce

        if ("n_prefixes" in overrides or "prefix_length" in overrides) and "prefix_groups" not in overrides:
            overrides = {**overrides, "prefix_groups": []}  # the single group they describe (see prefix_groups)
        layer_values: dict[str, Any] = {}
        for key in LAYER_KEYS:
            if key not in overrides or not hasattr(self, key):
                continue
            v = overrides[key]
            if isinstance(v, str) or is_trace(getattr(self, key)):
                overrides = dict(overrides)
                del overrides[key]
                if not is_trace(v):  # "5" or "4,5,6" from a command line; a list replacing "trace"
                    try:
                        v = _coerce(self.method, key, 0 if key == "layer" else [0], v)
                    except HParamsError:
                        check_layer_value(self.method, key, v)  # raises, naming the key and "trace"
                        raise
                check_layer_value(self.method, key, v)
                layer_values[key] = v
        new = HParams.replace(self, **overrides)
        if layer_values:
            new = dc_replace(new, **layer_values)
            new.validate()
        return new

    def validate(self) -> None:
        for key in LAYER_KEYS:
            if hasattr(self, key):
                check_layer_value(self.method, key, getattr(self, key))
        for key in ("trace_samples", "trace_window"):
            if getattr(self, key) < 1:
                raise HParamsError(f"hyperparameter {key!r} of method {self.method!r} must be >= 1, got "
                                   f"{getattr(self, key)}")
        if self.trace_cases < 0:
            raise HParamsError(f"hyperparameter 'trace_cases' of method {self.method!r} must be >= 0 (0: all the "
                               f"cases being edited), got {self.trace_cases}")
        r = list(self.trace_range)
        if r and (len(r) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                  or not 0 <= r[0] <= r[1]):
            raise HParamsError(f"hyperparameter 'trace_range' of method {self.method!r} must be [] or [first, last] "
                               f"layers with 0 <= first <= last, got {r!r}")
        for key in ("n_prefixes", "prefix_length", "v_num_grad_steps", "stats_n_samples", "stats_max_length",
                    "batch_tokens"):
            v = getattr(self, key)
            if v < (0 if key == "n_prefixes" else 1):
                raise HParamsError(f"hyperparameter {key!r} of method {self.method!r} must be positive, got {v}")
        groups = self.prefix_groups
        if not isinstance(groups, (list, tuple)) or not all(
                isinstance(g, (list, tuple)) and len(g) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in g) for g in groups):
            raise HParamsError(f"hyperparameter 'prefix_groups' of method {self.method!r} must be a list of "
                               f"[length, count] pairs of integers >= 1 (e.g. [[5, 10], [10, 10]]) or [], got "
                               f"{groups!r}")
        for key in ("v_lr", "clamp_norm_factor"):
            if getattr(self, key) <= 0:
                raise HParamsError(f"hyperparameter {key!r} of method {self.method!r} must be > 0")
        for key in ("v_weight_decay", "kl_factor", "early_stop_loss"):
            if getattr(self, key) < 0:
                raise HParamsError(f"hyperparameter {key!r} of method {self.method!r} must be >= 0")
        from editlens.edit.locate import PREFIX_STARTS  # the one list of starts (locate samples from it)

        for key, allowed in (("v_decay", ("reference", "squared")), ("early_stop_on", ("total", "nll")),
                             ("prefix_start", PREFIX_STARTS)):
            if getattr(self, key) not in allowed:
                raise HParamsError(f"hyperparameter {key!r} of method {self.method!r} must be one of "
                                   f"{', '.join(map(repr, allowed))}, got {getattr(self, key)!r}")
        if self.kl_template and "{}" not in self.kl_template:
            raise HParamsError(f"hyperparameter 'kl_template' of method {self.method!r} needs a '{{}}'")

    def prefix_plan(self) -> list[tuple[int, int]]:
        """The groups of sampled context prefixes as ``(length, count)`` pairs: ``prefix_groups``, or the single
        group ``(prefix_length, n_prefixes)`` (none when ``n_prefixes`` is 0)."""
        if self.prefix_groups:
            return [(int(g[0]), int(g[1])) for g in self.prefix_groups]
        return [(int(self.prefix_length), int(self.n_prefixes))] if self.n_prefixes > 0 else []

    def stats_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`editlens.edit.stats.second_moment`."""
        return dict(corpus=self.stats_corpus or None, n_samples=self.stats_n_samples,
                    max_length=self.stats_max_length, cache_dir=self.stats_dir or None, seed=self.seed)


#: the value of ``layer`` / ``layers`` that asks for the layers to be chosen by causal tracing at edit time
TRACE = "trace"
#: the hyperparameters that name edit layers
LAYER_KEYS = ("layer", "layers")


def is_trace(value: Any) -> bool:
    """Whether a ``layer`` / ``layers`` value is :data:`TRACE`."""
    return isinstance(value, str) and value == TRACE


def check_layer_value(method: str, key: str, value: Any) -> None:
    """Raise :class:`HParamsError` naming ``key`` unless ``value`` is :data:`TRACE`, a layer index >= 0
    (``layer``) or a non-empty list of them (``layers``). Whether the layers exist in the model is checked at edit
    time (:func:`editlens.edit.locate.check_layers`)."""
    if is_trace(value):
        return
    what = "a layer index >= 0" if key == "layer" else "a non-empty list of layer indices >= 0"
    if isinstance(value, str):
        raise HParamsError(f"hyperparameter {key!r} of method {method!r} must be {what} or {TRACE!r} (layers chosen "
                           f"by causal tracing), got the string {value!r}")
    vals = [value] if key == "layer" else value
    if key == "layers" and (not isinstance(value, (list, tuple)) or not value):
        raise HParamsError(f"hyperparameter {key!r} of method {method!r} must be {what} or {TRACE!r}, got {value!r}")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise HParamsError(f"hyperparameter {key!r} of method {method!r} must be {what} or {TRACE!r}, got "
                               f"{value!r}")


def no_duplicate_layers(method: str, layers: Any) -> None:
    """Raise :class:`HParamsError` when a layer list names a layer twice (the update would be applied once, not
    twice, while the recorded hyperparameters say otherwise). ``"trace"`` passes (chosen at edit time)."""
    if is_trace(layers):
        return
    seen: set[int] = set()
    for l in layers:
        if int(l) in seen:
            raise HParamsError(f"hyperparameter 'layers' of method {method!r} names layer {int(l)} twice: "
                               f"{list(layers)}")
        seen.add(int(l))


#: small settings for the built-in random tiny models (tests)
TINY = dict(n_prefixes=2, prefix_length=4, v_num_grad_steps=8, stats_n_samples=16, stats_max_length=32,
            trace_window=1)
