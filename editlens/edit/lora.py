"""LoRA editing through ``peft`` (Hu et al., ICLR 2022, "LoRA: Low-Rank Adaptation of Large Language Models"; the
LoRA editing baseline of EasyEdit and of the sequential-editing studies).

What is computed
----------------
Low-rank adapters ``ΔW = (α / r) · B A`` (``A [r, in]``, ``B [out, r]``, ``B = 0`` at the start, ``A`` peft's
Kaiming-uniform initialisation under the ``seed``) are put by :func:`peft.inject_adapter_in_model` on the chosen
modules (``modules`` × ``layers``, default: the MLP output projection ``down_proj`` / ``c_proj`` / ``fc_out`` of
four layers spread over the second and third quarters of the depth, see :func:`default_layers`) and trained with
AdamW (``lr``, ``weight_decay``) for at most ``steps`` epochs over the rewrite prompts of the cases (batches of
``batch_size``; an epoch whose mean loss is below ``stop_loss`` ends training, and a batch already below it takes
no step, as FT does). The loss is FT-M's: teacher-forced cross-entropy on ``prompt + target_new`` masked to the
target tokens (:func:`editlens.edit.ft.masked_target_nll`). Only the rewrite prompts are trained on: paraphrase
and neighbourhood probes stay held out for the evaluation, as in the papers.

Optional locality term (``locality_weight > 0``): the mean over ``n_locality`` unrelated prompts (WISE's built-in
irrelevant prompts: generic cloze prompts and held-out prose, :func:`editlens.edit.wise.irrelevant_prompts`, minus
any that equal an edit prompt) of ``KL(p_base ‖ p_edited)`` of the next-token distributions after the prompt,
``p_base`` computed once before training.

How the edit is applied and undone
----------------------------------
After training each adapter's ``ΔW`` is read with peft's ``get_delta_weight`` (which handles GPT-2's transposed
``Conv1D`` through ``fan_in_fan_out``), the adapter layers are removed again (every ``peft`` wrapper is replaced by
its original ``base_layer`` module object, the ``peft_config`` attribute peft adds to the model is deleted and
every parameter's ``requires_grad`` is put back), and the weights are written as ``W₀ + ΔW`` through the
method's :class:`~editlens.edit.base.WeightSnapshot`. So the model object users hold never keeps a peft wrapper,
hook or changed module type, the edited model is an ordinary merged model (``Edit.save_pretrained`` works), and
``undo()`` restores every tensor bit for bit. An input of the model that already holds peft adapter layers is
refused (:class:`~editlens.errors.MethodError`) before any work.

Batch edits train one set of adapters on all the cases' rewrites together. **Sequential editing keeps training
the same adapters**: the run keeps each adapter's ``A`` and ``B`` (``sequence.data["lora"]``); at each step the
edited weights are put back to ``W₀`` (the run's snapshot), the adapters are re-injected with the kept ``A, B``,
trained on the new batch's rewrites only (earlier edits are not replayed, so they can be forgotten: that is
the phenomenon sequential studies measure), and ``W₀ + (α / r) B A`` is written. The AdamW state starts afresh
at every step (its moments are not kept between steps).

Deviations: the adapters are merged into the weights after training rather than kept as a separate module
(mathematically the same function; peft's unmerged forward adds ``x Aᵀ Bᵀ`` in another order of floating-point
operations, so merged outputs differ from peft's unmerged ones by rounding only). EasyEdit's LoRA puts adapters on
the attention ``q_proj``/``v_proj`` of every layer; editlens defaults to MLP output projections of a few middle
and late layers, where locate-then-edit methods find facts (ROME/MEMIT) and where FT edits, so that LoRA is
compared on the same sites; any module kind and layer list can be chosen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from editlens.edit.base import Edit, Editor, HParams, SequenceState, register_method
from editlens.edit.base import FRACTION, NON_NEGATIVE, POSITIVE, Range
from editlens.errors import HParamsError, MethodError
from editlens.lm import ops
from editlens.lm.arch import is_conv1d, weight_param

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM

#: module kinds an adapter can be put on (per layer)
MODULE_KINDS = ("mlp_out", "mlp_in", "mlp_gate", "attn_out")
#: the adapter's name inside peft
ADAPTER = "editlens_edit"


def default_layers(n_layers: int, k: int = 4) -> list[int]:
    """``k`` layers evenly spread over ``[n/3, 3n/4]`` (deduplicated): middle to late-middle layers, where causal
    tracing puts factual recall (ROME/MEMIT edit the early-middle ones, FT and EasyEdit's LLaMA defaults a
    late-middle one). SmolLM2-135M (30 layers): ``[10, 14, 18, 22]``; a 4-layer tiny model: ``[1, 2, 3]``."""
    lo, hi = n_layers / 3, 3 * n_layers / 4
    if k <= 1:
        return [min(n_layers - 1, int(round((lo + hi) / 2)))]
    out = [min(n_layers - 1, max(0, int(round(lo + i * (hi - lo) / (k - 1))))) for i in range(k)]
    return sorted(set(out))


def check_sites(method: str, layers: Sequence[int], modules: Sequence[str]) -> None:
    """:class:`HParamsError` unless ``layers`` are distinct indices >= 0 and ``modules`` distinct kinds of
    :data:`MODULE_KINDS` (both non-empty): the adapter sites of LoRA and MELO."""
    if not layers:
        raise HParamsError(f"hyperparameter 'layers' of method {method!r} must name at least one layer")
    if any(int(l) < 0 for l in layers):
        raise HParamsError(f"hyperparameter 'layers' of method {method!r} must hold layer indices >= 0, got "
                           f"{list(layers)}")
    if len(set(int(l) for l in layers)) != len(layers):
        raise HParamsError(f"hyperparameter 'layers' of method {method!r} names a layer twice: {list(layers)}")
    if not modules:
        raise HParamsError(f"hyperparameter 'modules' of method {method!r} must name at least one module kind "
                           f"of {MODULE_KINDS}")
    for kind in modules:
        if kind not in MODULE_KINDS:
            raise HParamsError(f"hyperparameter 'modules' of method {method!r}: {kind!r} is not one of {MODULE_KINDS}")
    if len(set(modules)) != len(modules):
        raise HParamsError(f"hyperparameter 'modules' of method {method!r} names a module kind twice: "
                           f"{list(modules)}")


@dataclass
class LoRAHParams(HParams):
    """Hyperparameters of LoRA editing.

    Attributes:
        layers: layers whose modules get an adapter (default: :func:`default_layers` of the model).
        modules: module kinds per layer: ``"mlp_out"`` (default), ``"mlp_in"``, ``"mlp_gate"``, ``"attn_out"``.
        rank: LoRA rank ``r``.
        alpha: LoRA ``α`` (the update is scaled by ``α / r``).
        dropout: LoRA dropout on the adapter's input during training (peft's ``lora_dropout``; seeded).
        lr: AdamW learning rate.
        steps: maximum epochs over the rewrite prompts.
        batch_size: rewrites per optimiser step.
        weight_decay: AdamW weight decay on ``A`` and ``B``.
        stop_loss: early stop when an epoch's mean loss is below it (and no step for a batch below it).
        locality_weight: weight of the KL-to-base term on unrelated prompts (0 = off).
        n_locality: number of unrelated prompts of the locality term.
        seed: seed of ``A``'s initialisation and of the dropout masks.
    """

    method: ClassVar[str] = "lora"
    layers: list[int] = field(default_factory=lambda: [10, 14, 18, 22])
    modules: list[str] = field(default_factory=lambda: ["mlp_out"])
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    lr: float = 5e-3
    steps: int = 40
    batch_size: int = 8
    weight_decay: float = 0.0
    stop_loss: float = 1e-2
    locality_weight: float = 0.0
    n_locality: int = 8
    seed: int = 0
    RANGES: ClassVar[dict[str, Range]] = {"alpha": POSITIVE, "dropout": Range(0.0, 1.0, hi_open=True),
                                         "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "stop_loss": NON_NEGATIVE,
                                         "locality_weight": NON_NEGATIVE}
    ARCH_DEFAULTS: ClassVar[dict[str, Any]] = {
        "tiny": lambda lm: {"layers": default_layers(lm.n_layers), "lr": 3e-2, "steps": 20},
        "default": lambda lm: {"layers": default_layers(lm.n_layers)},
    }

    def validate(self) -> None:
        m = self.method
        check_sites(m, self.layers, self.modules)
        for key in ("rank", "steps", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise HParamsError(f"hyperparameter {key!r} of method {m!r} must be >= 1, got {getattr(self, key)}")
        if int(self.n_locality) < 0:
            raise HParamsError(f"hyperparameter 'n_locality' of method {m!r} must be >= 0, got {self.n_locality}")
        if self.locality_weight > 0 and int(self.n_locality) < 1:
            raise HParamsError(f"hyperparameter 'n_locality' of method {m!r} must be >= 1 when 'locality_weight' "
                               f"is > 0 (got locality_weight={self.locality_weight}, n_locality={self.n_locality})")

    def module_paths(self, lm: "LM") -> list[str]:
        """The module paths that get an adapter; :class:`HParamsError` naming the field for a layer outside the
        model or a module kind the architecture lacks."""
        paths = []
        for layer in self.layers:
            if not 0 <= int(layer) < lm.n_layers:
                raise HParamsError(f"hyperparameter 'layers' of method {self.method!r}: layer {layer} is outside the "
                                   f"model's 0..{lm.n_layers - 1}")
            for kind in self.modules:
                if kind == "mlp_out":
                    paths.append(lm.arch.mlp_out_at(int(layer)))
                elif kind == "mlp_in":
                    paths.append(lm.arch.mlp_in_at(int(layer)))
                elif kind == "attn_out":
                    paths.append(lm.arch.attn_out_at(int(layer)))
                else:
                    if lm.arch.mlp_gate is None:
                        raise HParamsError(f"hyperparameter 'modules' of method {self.method!r}: the "
                                           f"{lm.arch.family} architecture has no gated MLP ('mlp_gate')")
                    paths.append(lm.arch.mlp_gate.format(int(layer)))
        return paths


# ------------------------------------------------------------------------------------------------ peft plumbing
def _peft_layers(model: torch.nn.Module) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


class _Adapters:
    """peft LoRA layers injected into ``lm.model`` for the duration of a ``with`` block, then removed without a
    trace (original module objects back in place, ``peft_config`` deleted, ``requires_grad`` restored)."""

    def __init__(self, lm: "LM", paths: list[str], hp: LoRAHParams):
        self.lm, self.paths, self.hp = lm, paths, hp
        self.layers: dict[str, Any] = {}

    def __enter__(self) -> "_Adapters":
        from peft import LoraConfig, inject_adapter_in_model

        model = self.lm.model
        self._had_config = "peft_config" in model.__dict__
        self._flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self._originals = {p: self.lm.module(p) for p in self.paths}
        conv = {is_conv1d(m) for m in self._originals.values()}
        if len(conv) > 1:
            raise MethodError("lora: the chosen modules mix Linear and Conv1D layers; choose one module kind")
        cfg = LoraConfig(r=int(self.hp.rank), lora_alpha=float(self.hp.alpha), lora_dropout=float(self.hp.dropout),
                         target_modules=list(self.paths), bias="none", fan_in_fan_out=conv == {True},
                         init_lora_weights=True)
        try:
            inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
            for p in self.paths:
                layer = model.get_submodule(p)
                if layer.get_base_layer() is not self._originals[p]:  # pragma: no cover - peft contract
                    raise MethodError(f"lora: peft did not wrap {p} as expected")
                self.layers[p] = layer
        except BaseException:
            self._remove()
            raise
        return self

    def params(self) -> list[torch.nn.Parameter]:
        out = []
        for layer in self.layers.values():
            out += [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
        return out

    def load(self, state: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        with torch.no_grad():
            for p, layer in self.layers.items():
                A, B = state[p]
                layer.lora_A[ADAPTER].weight.copy_(A)
                layer.lora_B[ADAPTER].weight.copy_(B)

    def state(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {p: (l.lora_A[ADAPTER].weight.detach().clone(), l.lora_B[ADAPTER].weight.detach().clone())
                for p, l in self.layers.items()}

    def deltas(self) -> dict[str, torch.Tensor]:
        """``ΔW`` of each adapter in its base weight's own layout (peft's ``get_delta_weight``)."""
        with torch.no_grad():
            return {p: l.get_delta_weight(ADAPTER).detach().clone() for p, l in self.layers.items()}

    def train_mode(self, on: bool) -> None:
        for layer in self.layers.values():
            layer.lora_dropout.train(on)

    def _remove(self) -> None:
        model = self.lm.model
        for p, orig in self._originals.items():
            parent_name, _, child = p.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if getattr(parent, child) is not orig:
                setattr(parent, child, orig)
        if not self._had_config and "peft_config" in model.__dict__:
            del model.__dict__["peft_config"]
        for n, p in model.named_parameters():
            if n in self._flags:
                p.requires_grad_(self._flags[n])
            p.grad = None
        self.layers.clear()

    def __exit__(self, *exc: Any) -> None:
        self._remove()


def _locality_setup(lm: "LM", cases: Sequence["EditCase"], hp: LoRAHParams) -> tuple[dict, torch.Tensor] | None:
    if hp.locality_weight <= 0:
        return None
    from editlens.edit.wise import irrelevant_prompts

    prompts = irrelevant_prompts(int(hp.n_locality), exclude=[r.text for c in cases for r in c.rewrites])
    if not prompts:
        raise HParamsError("hyperparameter 'n_locality' of method 'lora': no unrelated prompt is left once the edit "
                           "prompts are excluded")
    enc = ops.pad_left([ops.encode(lm.tokenizer, p) for p in prompts], ops._pad_id(lm), lm.device)
    with torch.no_grad():
        base = torch.log_softmax(lm.model(**enc, logits_to_keep=1, use_cache=False).logits[:, -1, :].float(), -1)
    return enc, base


def lora_kl(base_logprobs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``KL(p_base ‖ p)`` of next-token distributions (``base_logprobs`` are log-probs)."""
    lp = torch.log_softmax(logits.float(), -1)
    return (base_logprobs.exp() * (base_logprobs - lp)).sum(-1).mean()


def train_adapters(lm: "LM", cases: Sequence["EditCase"], hp: LoRAHParams, paths: list[str],
                   init: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Inject adapters on ``paths`` (starting from ``init``'s ``A, B`` when given), train them on the rewrites of
    ``cases`` and remove them again. Returns ``({path: ΔW in the weight's layout}, {path: (A, B)}, diagnostics)``.
    The model's weights are not changed."""
    from editlens.edit.ft import _batch_loss, _examples

    examples = _examples(lm, cases)
    loc = _locality_setup(lm, cases, hp)
    losses: list[float] = []
    kl_last: float | None = None
    with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
        torch.manual_seed(int(hp.seed))
        with _Adapters(lm, paths, hp) as ad:
            if init is not None:
                ad.load(init)
            params = ad.params()
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
            ad.train_mode(True)
            try:
                for _ in range(int(hp.steps)):
                    total, n = 0.0, 0
                    for start in range(0, len(examples), int(hp.batch_size)):
                        batch = examples[start:start + int(hp.batch_size)]
                        opt.zero_grad(set_to_none=True)
                        with torch.enable_grad():
                            loss = _batch_loss(lm, batch, "target_new")
                            edit_loss = float(loss.detach())
                            if loc is not None:
                                enc, base = loc
                                out = lm.model(**enc, logits_to_keep=1, use_cache=False)
                                kl = lora_kl(base, out.logits[:, -1, :])
                                kl_last = float(kl.detach())
                                loss = loss + hp.locality_weight * kl
                        total += edit_loss * len(batch)
                        n += len(batch)
                        if edit_loss >= hp.stop_loss:
                            loss.backward()
                            opt.step()
                    epoch = total / max(1, n)
                    losses.append(epoch)
                    if not math.isfinite(epoch):
                        raise MethodError(f"lora: the training loss became {epoch} (lower 'lr')")
                    if epoch < hp.stop_loss:
                        break
            finally:
                ad.train_mode(False)
            deltas = ad.deltas()
            state = ad.state()
    diag: dict[str, Any] = {"loss/first": float(losses[0]) if losses else float("nan"),
                            "loss/final": float(losses[-1]) if losses else float("nan"), "lora/epochs": len(losses),
                            "lora/modules": list(paths), "lora/scaling": float(hp.alpha) / int(hp.rank)}
    if kl_last is not None:
        diag["loss/locality_kl"] = kl_last
    return deltas, state, diag


@register_method("lora")
class LoRAEditor(Editor):
    """LoRA adapters (peft) trained on the rewrites, merged into the weights; undo restores them bit for bit."""

    hparams_class = LoRAHParams
    edits_weights = True

    def apply(self, lm: "LM", cases: Sequence["EditCase"], hparams: HParams, *, evk_align: Any = None,
              progress: bool = True, sequence: SequenceState | None = None) -> Edit:
        if not isinstance(hparams, LoRAHParams):
            raise HParamsError(f"method 'lora' expects LoRAHParams, got {type(hparams).__name__}")
        paths = hparams.module_paths(lm)
        existing = _peft_layers(lm.model)
        if existing:
            raise MethodError(f"lora: the model already holds peft adapter layers ({', '.join(existing[:3])}); "
                              "editlens edits plain models (merge or unload the adapters first)")
        snap = self.snapshot_for(sequence)
        init = sequence.data.get("lora") if sequence is not None else None
        if init is not None and set(init) != set(paths):  # pragma: no cover - hparams are fixed for a run
            raise MethodError("lora: the adapted modules changed within a sequential run")
        params = {p: weight_param(lm.module(p)) for p in paths}
        before = {p: w.detach().clone() for p, w in params.items()}
        for p, w in params.items():
            snap.save(p, w)
        try:
            if sequence is not None:  # the adapters see W0: the kept A, B already hold the earlier steps
                with torch.no_grad():
                    for p, w in params.items():
                        w.copy_(snap.original(p))
            deltas, state, diag = train_adapters(lm, cases, hparams, paths, init)
            step: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                for p, w in params.items():
                    d = deltas[p].to(dtype=w.dtype, device=w.device)
                    w.copy_(snap.original(p) + d)
                    step[p] = w.detach() - before[p]
        except BaseException:
            with torch.no_grad():
                for p, w in params.items():
                    w.copy_(before[p])
            raise
        if sequence is not None:
            sequence.data["lora"] = state
        for p in paths:
            d = deltas[p]
            diag[f"delta_norm/{p}"] = float(d.double().norm())
        return self.weight_edit(lm, cases, hparams, step, diag, sequence, snapshot=snap, applied=True)
