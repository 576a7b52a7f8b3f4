"""Shared benchmark utilities: timers, device matmul rate, FLOP bound, peak memory."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def print_figures(figures: dict[str, float]) -> None:
    """One line per figure, ``name  value`` (what a suite prints before returning its figures)."""
    for k, v in figures.items():
        print(f"{k:<42} {v:10.4f}")


@contextlib.contextmanager
def timer(device: str | torch.device = "cpu") -> Iterator[dict]:
    """``with timer(dev) as t: ...`` then ``t["s"]`` holds the elapsed seconds (device-synchronised)."""
    out: dict = {}
    sync(device)
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        sync(device)
        out["s"] = time.perf_counter() - t0


def matmul_flops_per_s(device: str | torch.device = "cpu", dtype: torch.dtype | None = None, n: int | None = None,
                       repeats: int = 3) -> float:
    """Measured dense matmul rate of the device (FLOP/s): best of ``repeats`` n×n products."""
    dev = torch.device(device)
    dtype = dtype or (torch.float32 if dev.type == "cpu" else torch.bfloat16)
    n = n or (1024 if dev.type == "cpu" else 8192)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    (a @ b).sum()
    best = float("inf")
    for _ in range(repeats):
        with timer(dev) as t:
            for _ in range(4 if dev.type == "cpu" else 20):
                c = a @ b
            c.sum()
        best = min(best, t["s"] / (4 if dev.type == "cpu" else 20))
    return 2 * n**3 / best


def forward_flops(n_params: int, n_tokens: int) -> float:
    """Forward-pass FLOP estimate: 2 × parameters × tokens (attention quadratic term ignored, short prompts)."""
    return 2.0 * n_params * n_tokens


@contextlib.contextmanager
def peak_memory(device: str | torch.device = "cpu") -> Iterator[dict]:
    """Peak memory during the block, in MiB: CUDA max allocated, or the process RSS high-water mark on CPU
    (reset through ``/proc/self/clear_refs`` on Linux; otherwise the process-lifetime peak)."""
    dev = torch.device(device)
    out: dict = {}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
    try:
        yield out
    finally:
        if dev.type == "cuda":
            out["mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        else:
            out["mib"] = _rss_hwm_mib()


def _rss_hwm_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Figures:
    """Flat benchmark figures with a printable table."""

    values: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def add(self, key: str, value: float, note: str = "") -> None:
        self.values[key] = float(value)
        if note:
            self.notes[key] = note

    def update(self, other: dict) -> None:
        for k, v in other.items():
            if isinstance(v, (int, float)):
                self.values[k] = float(v)

    def table(self) -> str:
        width = max((len(k) for k in self.values), default=10)
        lines = [f"{'figure':<{width}}  {'value':>14}  note", "-" * (width + 30)]
        for k, v in self.values.items():
            lines.append(f"{k:<{width}}  {v:>14.4g}  {self.notes.get(k, '')}")
        return "\n".join(lines)


def threads() -> int:
    return int(os.environ.get("EDITLENS_BENCH_THREADS", torch.get_num_threads()))


# --------------------------------------------------------------------------------------------- paper-size configs
#: Randomly initialised models with the shapes of the papers' models, for speed and memory figures (weights are
#: random, so only timings and memory mean anything). Shapes from the public model configs.
CONFIG_MODELS: dict[str, dict] = {
    "gpt2-xl": dict(model_type="gpt2", n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257),
    "gpt-j-6b": dict(model_type="gptj", n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, n_positions=2048,
                     vocab_size=50400),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, vocab_size=128256),
    # SmolLM2-135M's shape: the device-consistency check falls back to it when the GGUF is not on the machine
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, vocab_size=49152, tie_word_embeddings=True),
}


def config_model_names() -> list[str]:
    return [f"config:{k}" for k in CONFIG_MODELS]


def model_config(name: str):
    """The transformers config of ``config:<shape>`` (no weights)."""
    import transformers as tf

    key = name.split(":", 1)[1] if name.startswith("config:") else name
    if key not in CONFIG_MODELS:
        raise ValueError(f"unknown benchmark config {name!r}; known: {', '.join(config_model_names())}")
    kw = dict(CONFIG_MODELS[key])
    return tf.AutoConfig.for_model(kw.pop("model_type"), **kw)


def config_n_params(name: str) -> int:
    """Parameter count of ``config:<shape>``, counted on the meta device (no memory is allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(name))
    return sum(p.numel() for p in model.parameters())


def load_bench_model(name: str, device: str = "cpu", dtype: str | None = None, seed: int = 0):
    """``editlens.load_model`` plus ``config:<shape>`` names: a model of that shape, randomly initialised (seeded)
    directly on ``device`` (an 8B model is never materialised on the CPU), with the shipped tiny BPE tokenizer
    (its ids lie inside every config's vocabulary)."""
    import editlens

    if not name.startswith("config:"):
        return editlens.load_model(name, device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM

    from editlens.lm.load import _finish, _resolve_device, _resolve_dtype, _tiny_tokenizer

    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    cfg = model_config(name)
    tok = _tiny_tokenizer()
    if len(tok) > cfg.vocab_size:  # pragma: no cover - every shipped config is far larger
        raise ValueError(f"{name}: vocabulary {cfg.vocab_size} < tokenizer size {len(tok)}")
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dt)
        with dev:
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(default)
    return _finish(model, tok, name, dev, dt)
