"""Heatmaps of causal traces, drawn as the paper draws them (matplotlib ``Figure`` objects, no global state)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from editlens.localize.average import AverageTrace
    from editlens.localize.trace import Trace

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
STATE = {"hidden": "single restored layer", "mlp": "MLP", "attn": "Attn"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _xlabel(kind: str, window: int) -> str:
    if kind == "hidden":
        return "single restored layer (block output)"
    return f"center of interval of {window} restored {STATE[kind]} layers"


def _save(fig: Any, path: str | Path | None) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")


def plot_trace(trace: "Trace", path: str | Path | None = None, ax: Any = None, title: str | None = None):
    """Heatmap of ``trace.scores``: tokens down, layers across, subject tokens marked ``*``; colour scale from
    ``p_corrupt`` (no effect) upward. Returns the figure (``ax.figure`` when ``ax`` is given)."""
    T, L = trace.scores.shape
    if ax is None:
        fig = _figure(max(4.0, 0.2 * L + 2.0), max(2.2, 0.3 * T + 1.2))
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    vmax = max(float(trace.scores.max()), trace.p_corrupt + 1e-6)
    im = ax.imshow(trace.scores, cmap=CMAPS[trace.kind], vmin=trace.p_corrupt, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    a, b = trace.subject_range
    labels = [repr(t.replace("\n", "\\n"))[1:-1] + ("*" if a <= i < b else "") for i, t in enumerate(trace.tokens)]
    ax.set_yticks(range(T))
    ax.set_yticklabels(labels, fontsize=8)
    step = max(1, L // 10)
    ax.set_xticks(range(0, L, step))
    ax.set_xlabel(_xlabel(trace.kind, trace.window), fontsize=8)
    name = {"hidden": "state", "mlp": "MLP", "attn": "Attn"}[trace.kind]
    ax.set_title(title or f"Impact of restoring {name} after corrupted input", fontsize=9)
    cb = fig.colorbar(im, ax=ax)
    cb.ax.tick_params(labelsize=7)
    cb.set_label(f"p({trace.answer.strip()})  [clean {trace.p_clean:.3f}, corrupt {trace.p_corrupt:.3f}]",
                 fontsize=7)
    _save(fig, path)
    return fig


def plot_average(avg: "AverageTrace", path: str | Path | None = None, title: str | None = None):
    """The paper's average-indirect-effect heatmap: token categories down, layers across; beside it the average
    indirect effect at the last subject token and at the last token per layer (lines)."""
    import numpy as np

    fig = _figure(11.0, 3.4)
    ax = fig.add_subplot(1, 2, 1)
    eff = np.where(np.isnan(avg.effects), 0.0, avg.effects)
    im = ax.imshow(eff, cmap=CMAPS[avg.kind], vmin=min(0.0, float(eff.min())), aspect="auto",
                   interpolation="nearest")
    ax.set_yticks(range(len(avg.categories)))
    ax.set_yticklabels([f"{c} (n={n})" for c, n in zip(avg.categories, avg.counts)], fontsize=8)
    ax.set_xlabel(_xlabel(avg.kind, avg.window), fontsize=8)
    name = {"hidden": "h_i^(l)", "mlp": "MLP", "attn": "Attn"}[avg.kind]
    ax.set_title(title or f"Average indirect effect of {name} over {avg.n_cases} prompts", fontsize=9)
    fig.colorbar(im, ax=ax).ax.tick_params(labelsize=7)
    ax2 = fig.add_subplot(1, 2, 2)
    layers = np.arange(avg.effects.shape[1])
    for cat in ("last subject token", "last token"):
        k = avg.categories.index(cat)
        m, s = avg.effects[k], avg.sem[k]
        ax2.plot(layers, m, label=cat)
        ax2.fill_between(layers, m - s, m + s, alpha=0.25)
    ax2.axhline(0.0, color="grey", lw=0.5)
    ax2.set_xlabel("layer" if avg.kind == "hidden" else f"center of {avg.window} restored layers", fontsize=8)
    ax2.set_ylabel("average indirect effect (± s.e.m.)", fontsize=8)
    ax2.set_title(f"total effect {avg.total_effect:.3f} (p_clean {avg.p_clean:.3f}, "
                  f"p_corrupt {avg.p_corrupt:.3f})", fontsize=8)
    ax2.legend(fontsize=7)
    _save(fig, path)
    return fig
