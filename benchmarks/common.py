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
