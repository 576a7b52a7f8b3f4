"""MELO — neuron-indexed dynamic LoRA (Yu et al., AAAI 2024, "MELO: Enhancing Model Editing with Neuron-Indexed
Dynamic LoRA").

MELO keeps the base weights untouched. Every edit batch gets its own **LoRA block** (a set of low-rank
``ΔW_b = (α / r) · B_b A_b`` on the chosen modules, trained on that batch only); a **vector database** of keys
(hidden states of the edit prompts, grouped in clusters with a radius) decides, per input, which block (if any) is
active. Inputs whose key falls in no cluster run the base weights, bit for bit.

The key (router)
----------------
The key of an input is the hidden state the MLP of layer ``key_layer`` reads — the input of its in-projection
(``up_proj`` / ``c_fc`` / ``dense_h_to_4h``: the layer's normalised residual stream) — at the prompt's last
token. Every LoRA site lies after it in the forward pass (layers ``> key_layer``, or the MLP output projection of
``key_layer`` itself; checked), so the key never depends on a block, and a block chosen from the key acts on
every position of that row in the same forward pass. The decision is taken on the prompt and kept for the target
tokens (teacher forcing) and for every generated token (:class:`~editlens.edit.grace.LayerAdaptor` machinery shared
with GRACE and WISE).

The vector database (the paper's neuron index, as its reference code builds it)
-------------------------------------------------------------------------------
Clusters ``(centre c_j, radius ρ_j, label y_j, points [(key, block)])``. Each rewrite ``(x, y)`` of a batch whose
block is ``b``, with key ``h``, nearest centre ``c_j`` at distance ``d``:

* empty database or ``d > ρ_j + radius``: a **new cluster** ``(h, radius, y, [(h, b)])``;
* ``y == y_j`` (same target): the rewrite **joins** cluster ``j``: the point ``(h, b)`` is added, the centre
  becomes the mean of the points' keys and ``ρ_j = max(radius, max distance of a point to the centre)``;
* different target: a new cluster for ``h`` and a **split**: ``ρ_j ← d/2 − 1e-5``, the new cluster's radius
  ``d/2 + 1e-5``; points of cluster ``j`` now outside its radius are forgotten (if none is left the cluster keeps
  its centre with "no block", so inputs near it run the base model).

Lookup for a query key ``q``: the nearest centre ``c_j``; if ``||q − c_j|| ≤ ρ_j`` the block of the point of
cluster ``j`` nearest to ``q`` is active for that row, otherwise none.

Training
--------
A batch's block is a new ``peft`` LoRA adapter (``rank`` ranks, ``alpha``, ``dropout``; ``A`` peft's
Kaiming-uniform init under ``seed + block``, ``B = 0``) on every LoRA site. It is trained with Adam (``lr``, at most
``steps`` epochs over the batch's rewrites in batches of ``batch_size``, stopping when an epoch's mean loss is below
``stop_loss``) on FT-M's loss (teacher-forced NLL of ``target_new`` after the rewrite prompt,
:func:`editlens.edit.ft.masked_target_nll`), with every training row routed to the new block (as the reference
does: the whole batch uses the batch's block). Only that block's ``A, B`` are optimised; every earlier block is
left exactly as it was (tested).

How the LoRA runs (peft) and how the edit is undone
---------------------------------------------------
The LoRA layers are ``peft`` LoRA layers (made by :func:`peft.inject_adapter_in_model`, one adapter per block) and
their forward is peft's mixed-adapter batch forward (``adapter_names``, one name per row, ``"__base__"`` for a row
no block serves: its output is the base module's output, untouched). The wrapper layers are put into the model
only for the duration of each System call (and of training), then the original module objects go back, so the
model the user holds never keeps a peft wrapper, hook, ``peft_config`` or changed ``requires_grad`` between calls.
``Edit.undo()`` (and the sequential run's undo) empties the database and drops the blocks: the model is the
original bit for bit, hooks and module types included (tested).

Batch and sequential: one block per ``edit()`` call (all its cases) and one per step of ``edit_sequential``; the
database and the blocks of a run accumulate in the run's :class:`MeloSystem`. At most ``max_blocks`` blocks
(a :class:`MethodError` before any work beyond it).

Deviations from the paper and its reference code, and why
---------------------------------------------------------
* **Blocks are separate peft adapters** (rank ``rank`` each, scale ``alpha / rank``) rather than slices of one
  DyLoRA matrix of rank ``max_blocks × rank`` masked per row. Each row uses exactly one block in both, so the
  function is the same; separate adapters let peft's own mixed-batch forward do the routing and need no
  pre-allocated rank. The reference's effective per-block scale is ``lora_alpha / r_total × (r_total / r_block)``;
  here it is the plain ``alpha / rank``.
* **The key** is the *input* of the key layer's MLP in-projection (the normalised hidden state); the reference
  reads the *output* of a chosen module (e.g. GPT-2's ``c_fc``) at the last position. The input is the hidden
  state itself (``d_model`` wide, normalised, so one radius fits every prompt), and it is read at the last *prompt*
  token of every row (left padding, teacher forcing and generation included), where the reference reads a fixed
  position.
* **Labels** are compared as target strings (the reference compares the sums of the label token ids).
* **Radius and layers** are this project's: SmolLM2-135M reads the key at layer 9 and adapts the MLP output
  projections of layers 10, 14, 18 and 22 (:func:`editlens.edit.lora.default_layers`, the same sites as ``lora``);
  the reference adapts late MLP in-projections of GPT-2 XL / T5 with the router a few layers below. The radius
  was chosen so that edit prompts are hit and unrelated prompts missed on SmolLM2 (see docs/methods-lora-kn.md).
* **Optimiser**: Adam with early stopping on the epoch loss; the reference runs a fixed number of Adam steps with
  a step-decayed learning rate.
* EVK-Align is refused (no value optimisation).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

import torch

from editlens.edit.base import Edit, Editor, HParams, SequenceState, register_method
from editlens.edit.base import NON_NEGATIVE, POSITIVE, Range
from editlens.edit.grace import AdaptorSystem, LayerAdaptor, adaptor_hooks
from editlens.edit.lora import _peft_layers, check_sites, default_layers
from editlens.errors import HParamsError, MethodError
from editlens.lm import ops
from editlens.lm.arch import in_out_features, is_conv1d

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM

#: peft's name for "no adapter" in a mixed-adapter batch
BASE = "__base__"
#: margin of a split (the reference's): the old cluster shrinks to d/2 - SPLIT_MARGIN, the new one gets d/2 + it
SPLIT_MARGIN = 1e-5


def block_name(i: int) -> str:
    """The peft adapter name of block ``i``."""
    return f"melo_{i}"


def _melo_defaults(lm: "LM") -> dict[str, Any]:
    layers = default_layers(lm.n_layers)
    return {"layers": layers, "key_layer": max(0, layers[0] - 1)}


@dataclass
class MeloHParams(HParams):
    """Hyperparameters of MELO (see the module docstring).

    Attributes:
        layers: layers whose modules get a LoRA block (default: :func:`editlens.edit.lora.default_layers`).
        modules: module kinds per layer (``mlp_out``, ``mlp_in``, ``mlp_gate``, ``attn_out``).
        key_layer: the layer whose MLP input (last prompt token) is the key of the vector database; every LoRA
            site must come after it (layers ``> key_layer``, or ``mlp_out`` of ``key_layer``).
        radius: initial radius of a cluster (Euclidean distance in the key space).
        rank: ranks of one block (the paper's ``num_rank_per_block``).
        alpha: LoRA ``α`` of a block (its update is scaled by ``α / rank``).
        dropout: peft's ``lora_dropout`` during training (seeded).
        max_blocks: most blocks one system may hold (one per edit batch).
        lr: Adam learning rate.
        steps: maximum epochs over the batch's rewrites.
        batch_size: rewrites per optimiser step.
        stop_loss: stop when an epoch's mean loss is below it (and no step for a batch below it).
        seed: seed of the blocks' initialisation (block ``i`` uses ``seed + i``) and dropout masks.
    """

    method: ClassVar[str] = "melo"
    layers: list[int] = field(default_factory=lambda: [10, 14, 18, 22])
    modules: list[str] = field(default_factory=lambda: ["mlp_out"])
    key_layer: int = 9
    radius: float = 0.1
    rank: int = 4
    alpha: float = 16.0
    dropout: float = 0.0
    max_blocks: int = 256
    lr: float = 5e-3
    steps: int = 40
    batch_size: int = 8
    stop_loss: float = 1e-2
    seed: int = 0
    RANGES: ClassVar[dict[str, Range]] = {"radius": POSITIVE, "alpha": POSITIVE,
                                         "dropout": Range(0.0, 1.0, hi_open=True), "lr": POSITIVE,
                                         "stop_loss": NON_NEGATIVE}
    ARCH_DEFAULTS: ClassVar[dict[str, Any]] = {
        "tiny": lambda lm: {**_melo_defaults(lm), "radius": 0.5, "lr": 3e-2, "steps": 20},
        "default": _melo_defaults,
    }

    def validate(self) -> None:
        m = self.method
        check_sites(m, self.layers, self.modules)
        for key in ("rank", "steps", "batch_size", "max_blocks"):
            if int(getattr(self, key)) < 1:
                raise HParamsError(f"hyperparameter {key!r} of method {m!r} must be >= 1, got {getattr(self, key)}")
        if int(self.key_layer) < 0:
            raise HParamsError(f"hyperparameter 'key_layer' of method {m!r} must be >= 0, got {self.key_layer}")
        first = min(int(l) for l in self.layers)
        if first < int(self.key_layer) or (first == int(self.key_layer) and list(self.modules) != ["mlp_out"]):
            raise HParamsError(
                f"hyperparameter 'key_layer' of method {m!r} is {self.key_layer} but a LoRA site comes before the key "
                f"is read (layers {list(self.layers)}, modules {list(self.modules)}): the key must not depend on a "
                f"block, so every layer must be > key_layer, or = key_layer with modules ['mlp_out'] only")

    def module_paths(self, lm: "LM") -> list[str]:
        """The LoRA sites; :class:`HParamsError` naming the field for a layer outside the model or a module kind the
        architecture lacks."""
        from editlens.edit.lora import LoRAHParams

        return LoRAHParams.module_paths(self, lm)  # type: ignore[arg-type]  # same fields, same rules

    def key_module(self, lm: "LM") -> str:
        if not 0 <= int(self.key_layer) < lm.n_layers:
            raise HParamsError(f"hyperparameter 'key_layer' of method {self.method!r}: layer {self.key_layer} is "
                               f"outside the model's 0..{lm.n_layers - 1}")
        return lm.arch.mlp_in_at(int(self.key_layer))


# ============================================================================================ the vector database
class VectorDB:
    """MELO's vector database: clusters of edit keys with a radius, each key pointing at a LoRA block."""

    def __init__(self, d_key: int):
        self.d_key = int(d_key)
        self.centres = torch.zeros((0, self.d_key))
        self.radii = torch.zeros((0,))
        self.labels: list[str] = []
        #: per cluster: (keys [n, d], blocks [n] with -1 = no block)
        self.points: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.counts = {"new": 0, "join": 0, "split": 0, "forgotten": 0}

    def __len__(self) -> int:
        return len(self.labels)

    def clear(self) -> None:
        self.__init__(self.d_key)  # type: ignore[misc]

    def _add(self, key: torch.Tensor, radius: float, label: str, block: int) -> None:
        self.centres = torch.cat([self.centres, key[None]])
        self.radii = torch.cat([self.radii, torch.tensor([float(radius)])])
        self.labels.append(label)
        self.points.append((key[None].clone(), torch.tensor([int(block)])))

    def insert(self, key: torch.Tensor, label: str, block: int, radius: float) -> str:
        """Put an edit's key in the database (the rules of the module docstring); returns ``"new"``, ``"join"`` or
        ``"split"``."""
        key = key.detach().float().cpu().reshape(-1)
        if key.numel() != self.d_key:
            raise MethodError(f"melo: a key of {key.numel()} values for a database of {self.d_key}")
        if len(self) == 0:
            self._add(key, radius, label, block)
            self.counts["new"] += 1
            return "new"
        d = torch.linalg.vector_norm(self.centres - key[None], dim=-1)
        j = int(d.argmin())
        dist = float(d[j])
        if dist > float(self.radii[j]) + radius:
            self._add(key, radius, label, block)
            self.counts["new"] += 1
            return "new"
        if self.labels[j] == label:
            keys, blocks = self.points[j]
            keys = torch.cat([keys, key[None]])
            self.points[j] = (keys, torch.cat([blocks, torch.tensor([int(block)])]))
            centre = keys.mean(0)
            self.centres[j] = centre
            spread = float(torch.linalg.vector_norm(keys - centre[None], dim=-1).max())
            self.radii[j] = max(float(radius), spread)
            self.counts["join"] += 1
            return "join"
        self._add(key, dist / 2 + SPLIT_MARGIN, label, block)
        self.radii[j] = dist / 2 - SPLIT_MARGIN
        keys, blocks = self.points[j]
        keep = torch.linalg.vector_norm(keys - self.centres[j][None], dim=-1) <= self.radii[j]
        self.counts["forgotten"] += int((~keep).sum())
        if bool(keep.any()):
            self.points[j] = (keys[keep], blocks[keep])
        else:
            self.points[j] = (self.centres[j][None].clone(), torch.tensor([-1]))
        self.counts["split"] += 1
        return "split"

    def lookup(self, queries: torch.Tensor) -> torch.Tensor:
        """The block serving each query key ``[n, d]`` (-1: none; the base model answers)."""
        n = queries.shape[0]
        if len(self) == 0:
            return torch.full((n,), -1, dtype=torch.long)
        q = queries.detach().float().cpu()
        d = torch.cdist(q, self.centres)
        best_d, best = d.min(dim=1)
        out = torch.full((n,), -1, dtype=torch.long)
        for r in range(n):
            j = int(best[r])
            if float(best_d[r]) <= float(self.radii[j]):
                keys, blocks = self.points[j]
                out[r] = blocks[int(torch.linalg.vector_norm(keys - q[r][None], dim=-1).argmin())]
        return out

    def fingerprint_into(self, h: Any) -> None:
        for t in (self.centres, self.radii):
            h.update(t.contiguous().numpy().tobytes())
        for keys, blocks in self.points:
            h.update(keys.contiguous().numpy().tobytes())
            h.update(blocks.contiguous().numpy().tobytes())
        h.update("\x00".join(self.labels).encode())


# ============================================================================================ blocks and routing
class MeloAdaptor(LayerAdaptor):
    """The router at the key module plus the LoRA blocks (peft wrapper layers kept outside the model)."""

    def __init__(self, lm: "LM", key_module: str, paths: list[str], d_key: int):
        self.lm = lm
        self.module = key_module
        self.paths = list(paths)
        self.db = VectorDB(d_key)
        #: peft LoRA wrapper per LoRA site (its base layer is the model's own module object), made with block 0
        self.wrappers: dict[str, Any] = {}
        self.n_blocks = 0
        #: the block names of the rows of the last full forward (``BASE`` = none)
        self.route: list[str] | None = None
        #: per row of the last full forward: the block used (-1 = none)
        self.last_blocks = torch.zeros((0,), dtype=torch.long)
        #: while training: every row uses this block
        self.forced: str | None = None

    # ------------------------------------------------------------------ routing (LayerAdaptor)
    def on_full(self, inp, out, start_cols, key_cols):
        rows = torch.arange(inp.shape[0], device=inp.device)
        blocks = self.db.lookup(inp[rows, key_cols.to(inp.device)])
        self.last_blocks = blocks
        self.route = [block_name(int(b)) if int(b) >= 0 else BASE for b in blocks]
        return out, None

    def on_step(self, inp, out, state):
        return out

    # ------------------------------------------------------------------ peft wrappers in and out of the model
    def _swap(self, wrappers: bool) -> None:
        model = self.lm.model
        for p, w in self.wrappers.items():
            parent_name, _, child = p.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, w if wrappers else w.get_base_layer())

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The blocks' peft layers in the model, each given the rows' block names (``adapter_names``) by a pre-hook;
        the original modules back on exit."""
        if not self.wrappers:
            yield
            return

        def pre(_m: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            x = args[0] if args else kwargs["x"]
            names = [self.forced] * int(x.shape[0]) if self.forced is not None else self.route
            if names is None or len(names) != int(x.shape[0]):
                names = [BASE] * int(x.shape[0])
            return args, {**kwargs, "adapter_names": names}

        handles = []
        self._swap(True)
        try:
            for w in self.wrappers.values():
                handles.append(w.register_forward_pre_hook(pre, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()
            self._swap(False)
            self.route = None

    def add_block(self, hp: MeloHParams) -> str:
        """A new peft adapter (block) on every LoRA site; returns its name. The model is left as it was."""
        from peft import LoraConfig, inject_adapter_in_model

        name = block_name(self.n_blocks)
        model = self.lm.model
        originals = {p: self.lm.module(p) for p in self.paths} if not self.wrappers else {
            p: w.get_base_layer() for p, w in self.wrappers.items()}
        conv = {is_conv1d(m) for m in originals.values()}
        if len(conv) > 1:
            raise MethodError("melo: the chosen modules mix Linear and Conv1D layers; choose one module kind")
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        had_config = "peft_config" in model.__dict__
        cfg = LoraConfig(r=int(hp.rank), lora_alpha=float(hp.alpha), lora_dropout=float(hp.dropout),
                         target_modules=list(self.paths), bias="none", fan_in_fan_out=conv == {True},
                         init_lora_weights=True)
        self._swap(True)
        try:
            with torch.random.fork_rng(devices=[self.lm.device] if self.lm.device.type == "cuda" else []):
                torch.manual_seed(int(hp.seed) + self.n_blocks)
                inject_adapter_in_model(cfg, model, adapter_name=name)
            for p in self.paths:
                layer = model.get_submodule(p)
                if layer.get_base_layer() is not originals[p] or name not in layer.lora_A:  # pragma: no cover
                    raise MethodError(f"melo: peft did not wrap {p} as expected")
                self.wrappers[p] = layer
        finally:
            for p, orig in originals.items():  # originals back in place (also when peft failed half-way)
                parent_name, _, child = p.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, orig)
            if not had_config and "peft_config" in model.__dict__:
                del model.__dict__["peft_config"]
            for n, p in model.named_parameters():
                if n in flags:
                    p.requires_grad_(flags[n])
        self.n_blocks += 1
        for w in self.wrappers.values():
            w.lora_dropout[name].train(False)
        for i in range(self.n_blocks):  # peft marks the new adapter trainable; training sets it itself
            for t in self.block_params(block_name(i)):
                t.requires_grad_(False)
        return name

    def block_params(self, name: str) -> list[torch.nn.Parameter]:
        out = []
        for w in self.wrappers.values():
            out += [w.lora_A[name].weight, w.lora_B[name].weight]
        return out

    def block_state(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{site: (A, B)}`` of a block (copies)."""
        return {p: (w.lora_A[name].weight.detach().clone(), w.lora_B[name].weight.detach().clone())
                for p, w in self.wrappers.items()}

    def clear(self) -> None:
        self.db.clear()
        self.wrappers = {}
        self.n_blocks = 0
        self.route = None
        self.forced = None

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.module.encode())
        h.update("|".join(self.paths).encode())
        self.db.fingerprint_into(h)
        for i in range(self.n_blocks):
            for t in self.block_params(block_name(i)):
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


class MeloSystem(AdaptorSystem):
    """A model wrapped with MELO's router and LoRA blocks (see the module docstring)."""

    adaptor: MeloAdaptor

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with self.adaptor.installed(), adaptor_hooks(self.lm, self.adaptor):
            yield

    def teacher_forced(self, prompts: Sequence[str], targets: Sequence[str]):
        with self.exclusive(), self.adaptor.installed():  # AdaptorSystem installs the routing hooks per batch
            return self._teacher_forced(prompts, targets)

    def __repr__(self) -> str:
        return (f"MeloSystem(model={self.lm.name!r}, key={self.adaptor.module!r}, blocks={self.adaptor.n_blocks}, "
                f"clusters={len(self.adaptor.db)})")


# ============================================================================================ training
def train_block(lm: "LM", ad: MeloAdaptor, name: str, examples: list[tuple[list[int], list[int]]],
                hp: MeloHParams) -> dict[str, Any]:
    """Train block ``name`` on ``examples`` (every row routed to it); only its ``A, B`` change."""
    from editlens.edit.ft import _batch_loss

    params = ad.block_params(name)
    losses: list[float] = []
    with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
        torch.manual_seed(int(hp.seed) + ad.n_blocks)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=hp.lr)
        ad.forced = name
        for w in ad.wrappers.values():
            w.lora_dropout[name].train(True)
        try:
            with ad.installed():
                for _ in range(int(hp.steps)):
                    total, n = 0.0, 0
                    for start in range(0, len(examples), int(hp.batch_size)):
                        batch = examples[start:start + int(hp.batch_size)]
                        opt.zero_grad(set_to_none=True)
                        with torch.enable_grad():
                            loss = _batch_loss(lm, batch, "target_new")
                        value = float(loss.detach())
                        total += value * len(batch)
                        n += len(batch)
                        if value >= hp.stop_loss:
                            loss.backward()
                            opt.step()
                    epoch = total / max(1, n)
                    losses.append(epoch)
                    if not math.isfinite(epoch):
                        raise MethodError(f"melo: the training loss became {epoch} (lower 'lr')")
                    if epoch < hp.stop_loss:
                        break
        finally:
            ad.forced = None
            for w in ad.wrappers.values():
                w.lora_dropout[name].train(False)
            for p in params:
                p.requires_grad_(False)
                p.grad = None
    return {"loss/first": float(losses[0]) if losses else float("nan"),
            "loss/final": float(losses[-1]) if losses else float("nan"), "melo/epochs": len(losses)}


@register_method("melo")
class MeloEditor(Editor):
    """MELO as an editing method: the Edit's system is a :class:`MeloSystem`; ``undo()`` drops the blocks and the
    vector database (the model itself is never changed)."""

    hparams_class = MeloHParams
    edits_weights = False  # the edit lives outside the weights (Edit.save_pretrained refuses it)

    def apply(self, lm: "LM", cases: Sequence["EditCase"], hparams: HParams, *, evk_align: Any = None,
              progress: bool = True, sequence: SequenceState | None = None) -> Edit:
        if not isinstance(hparams, MeloHParams):
            raise HParamsError(f"method 'melo' expects MeloHParams, got {type(hparams).__name__}")
        paths = hparams.module_paths(lm)
        key_module = hparams.key_module(lm)
        existing = _peft_layers(lm.model)
        if existing:
            raise MethodError(f"melo: the model already holds peft adapter layers ({', '.join(existing[:3])}); "
                              "editlens edits plain models (merge or unload the adapters first)")

        def make() -> MeloSystem:
            d_key, _ = in_out_features(lm.module(key_module))
            return MeloSystem(self.base_system(lm), MeloAdaptor(lm, key_module, paths, d_key))

        system: MeloSystem = (make() if sequence is None else
                              sequence.kept("melo_system", make, lambda s: s.adaptor.clear))
        ad = system.adaptor
        if ad.paths != paths or ad.module != key_module:  # pragma: no cover - hparams are fixed for a run
            raise MethodError("melo: the LoRA sites or the key layer changed within a sequential run")
        if ad.n_blocks >= int(hparams.max_blocks):
            raise MethodError(f"melo: all max_blocks={hparams.max_blocks} LoRA blocks are in use; raise "
                              "'max_blocks' to edit further")
        rewrites = [r for c in cases for r in c.rewrites]
        prompts = [system.format.apply(r.text) for r in rewrites]
        keys = ops.capture(lm, prompts, [key_module], [-1] * len(prompts), kind="input")[key_module]
        examples = [ops.target_token_ids(lm.tokenizer, p, r.target_new) for p, r in zip(prompts, rewrites)]
        n_before = ad.n_blocks
        name = ad.add_block(hparams)
        try:
            diag = train_block(lm, ad, name, examples, hparams)
        except BaseException:
            if n_before == 0:
                ad.clear()
            else:  # drop the half-trained block again (earlier blocks untouched)
                import warnings

                with warnings.catch_warnings():  # peft notes that the deleted adapter was the active one
                    warnings.simplefilter("ignore", UserWarning)
                    for w in ad.wrappers.values():
                        w.delete_adapter(name)
                ad.n_blocks = n_before
            raise
        actions = [ad.db.insert(k, r.target_new, n_before, float(hparams.radius)) for k, r in zip(keys, rewrites)]
        system.refresh()
        diag.update({"melo/blocks": ad.n_blocks, "melo/clusters": len(ad.db),
                     "melo/points": sum(int(k.shape[0]) for k, _ in ad.db.points),
                     **{f"melo/{k}": v for k, v in ad.db.counts.items()},
                     "melo/new_here": actions.count("new"), "melo/modules": list(paths), "melo/key_module": key_module,
                     "melo/scaling": float(hparams.alpha) / int(hparams.rank)})
        if sequence is not None:
            return Edit(system, self.name, cases, hparams, diag, lm=lm, undoable=False)

        def undo() -> None:
            ad.clear()
            system.refresh()

        return Edit(system, self.name, cases, hparams, diag, lm=lm, on_undo=undo)
