"""Progress with an estimate of the time left, for every long loop of editlens, and one switch for all of them.

Long loops (second-moment statistics batches, value-optimisation steps, evaluation calls, sequential edits,
causal traces, training steps) open a bar with :func:`bar` (or wrap an iterable with :func:`track`). What the
bar writes depends on the process-wide mode (:func:`configure`, the :func:`settings` context manager, or the
environment variable ``EDITLENS_PROGRESS``):

* ``auto`` (default): ``bar`` when the stream (stderr) is a terminal or the process is a Jupyter kernel (tqdm
  then draws a notebook widget), else ``lines``;
* ``bar``: a tqdm bar redrawn in place (elapsed, rate and the estimated time left, ``<`` remaining);
* ``lines``: for logs, files and pipes — no carriage returns, no redraws: one plain line at most every
  ``interval`` seconds (``EDITLENS_PROGRESS_INTERVAL``, default 30) with the same figures, and a last line when a
  bar that printed finishes. A loop shorter than the interval prints nothing;
* ``off``: nothing (``--quiet`` on the command line, ``configure(quiet=True)``).

A call site's own ``progress=False`` still turns its bar off; ``off`` wins over any ``progress=True``. The lines
use tqdm's own formatting (:meth:`tqdm.tqdm.format_meter`), so both modes give the same numbers::

    second moments L4: 12/40 batch [00:31<01:12, 0.39 batch/s]

This module sits at the bottom of the layers (it imports nothing of editlens), so any part may use it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Iterable, Iterator, TextIO

MODES = ("auto", "bar", "lines", "off")
DEFAULT_INTERVAL = 30.0
#: the plain-line format (tqdm's ``bar_format`` fields; no bar graphic)
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]{postfix}"
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}]{postfix}"

_lock = threading.Lock()


def _env_mode() -> str:
    m = os.environ.get("EDITLENS_PROGRESS", "auto").strip().lower() or "auto"
    return m if m in MODES else "auto"


def _env_interval() -> float:
    try:
        v = float(os.environ.get("EDITLENS_PROGRESS_INTERVAL", DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return v if v >= 0 else DEFAULT_INTERVAL


_state: dict[str, Any] = {"mode": None, "interval": None, "stream": None}


def configure(mode: str | None = None, *, quiet: bool | None = None, interval: float | None = None,
              stream: TextIO | None = None) -> dict[str, Any]:
    """Set the process-wide progress mode; returns the previous settings (for :func:`restore`).

    Args:
        mode: ``auto`` / ``bar`` / ``lines`` / ``off`` (``None``: unchanged).
        quiet: ``True`` is ``mode="off"``; ``False`` leaves the mode as given.
        interval: seconds between two plain lines in ``lines`` mode (``0``: a line per update).
        stream: where bars write (default: ``sys.stderr`` at the time of writing).

    Raises:
        ValueError: an unknown mode or a negative interval.
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}; got {mode!r}")
    if interval is not None and (isinstance(interval, bool) or not interval >= 0):
        raise ValueError(f"progress interval must be a number of seconds >= 0; got {interval!r}")
    with _lock:
        prev = dict(_state)
        if quiet:
            mode = "off"
        if mode is not None:
            _state["mode"] = mode
        if interval is not None:
            _state["interval"] = float(interval)
        if stream is not None:
            _state["stream"] = stream
    return prev


def restore(previous: dict[str, Any]) -> None:
    """Put back settings returned by :func:`configure`."""
    with _lock:
        _state.update(previous)


@contextlib.contextmanager
def settings(mode: str | None = None, *, quiet: bool | None = None, interval: float | None = None,
             stream: TextIO | None = None) -> Iterator[None]:
    """:func:`configure` for the duration of a ``with`` block."""
    prev = configure(mode, quiet=quiet, interval=interval, stream=stream)
    try:
        yield
    finally:
        restore(prev)


def _stream() -> TextIO:
    return _state["stream"] or sys.stderr


def current_mode() -> str:
    """The mode a bar opened now would use: ``bar``, ``lines`` or ``off`` (``auto`` resolved on the stream)."""
    mode = _state["mode"] or _env_mode()
    if mode != "auto":
        return mode
    s = _stream()
    if _state["stream"] is None and "ipykernel" in sys.modules:  # a notebook: tqdm.auto draws a widget
        return "bar"
    try:
        return "bar" if s.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or unusual stream
        return "lines"


def enabled() -> bool:
    """Whether bars print anything (the mode is not ``off``)."""
    return current_mode() != "off"


def interval() -> float:
    """Seconds between two plain lines in ``lines`` mode."""
    v = _state["interval"]
    return _env_interval() if v is None else float(v)


class LineProgress:
    """A progress counter for logs: the tqdm interface that editlens uses (``update``, ``set_postfix_str``,
    ``set_postfix``, ``set_description``, ``write``, ``close``, context manager, iteration), printing a plain line
    at most every ``interval`` seconds and never a carriage return."""

    def __init__(self, iterable: Iterable | None = None, total: int | float | None = None, desc: str = "",
                 unit: str = "it", *, file: TextIO | None = None, interval: float | None = None, **_: Any):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable = iterable
        self.total = total
        self.desc = desc or "progress"
        self.unit = unit
        self.n = 0
        self.postfix = ""
        self.fp = file or _stream()
        self.interval = globals()["interval"]() if interval is None else float(interval)
        self.start_t = time.monotonic()
        self._last = self.start_t
        self.printed = 0
        self.closed = False

    # -------------------------------------------------------------- text
    def format(self) -> str:
        from tqdm import tqdm

        fmt = LINE_FORMAT if self.total else LINE_FORMAT_NO_TOTAL
        text = tqdm.format_meter(self.n, self.total, time.monotonic() - self.start_t, prefix=self.desc,
                                 unit=self.unit, bar_format=fmt, postfix=self.postfix or None)
        return text.replace("\r", " ").replace("\n", " ")

    def _print(self, text: str) -> None:
        try:
            self.fp.write(text + "\n")
            self.fp.flush()
        except (OSError, ValueError):  # a closed pipe must not stop the computation
            pass
        self.printed += 1

    def _maybe_print(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            self._print(self.format())

    # -------------------------------------------------------------- tqdm interface
    def update(self, n: int | float = 1) -> None:
        self.n += n
        self._maybe_print()

    def refresh(self) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def write(self, s: str) -> None:
        try:
            self.fp.write(str(s).replace("\r", " ") + "\n")
            self.fp.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.printed:  # a bar that said something says when it is done
            self._last = 0.0
            self._print(self.format() + " done")

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress counter wraps no iterable")
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)


def bar(total: int | float | None = None, desc: str = "", unit: str = "it", *, iterable: Iterable | None = None,
        leave: bool = False, disable: bool = False, **tqdm_kwargs: Any) -> Any:
    """A progress bar in the current mode (see the module docstring); use it as a context manager or close it.

    ``disable=True`` (a call site's ``progress=False``) or mode ``off`` gives a silent bar with the same interface.
    Extra keyword arguments go to :class:`tqdm.tqdm` in ``bar`` mode.
    """
    from tqdm.auto import tqdm

    mode = current_mode()
    if disable or mode == "off":
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=True)
    if mode == "lines":
        return LineProgress(iterable, total=total, desc=desc, unit=unit)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=_stream(), dynamic_ncols=True,
                **tqdm_kwargs)


def track(iterable: Iterable, desc: str = "", unit: str = "it", *, total: int | None = None,
          disable: bool = False) -> Iterator[Any]:
    """Iterate over ``iterable`` with a progress bar (see :func:`bar`)."""
    return iter(bar(total, desc, unit, iterable=iterable, disable=disable))


def eta(done: int, total: int, started: float) -> str:
    """``"elapsed 00:12, ~00:28 left"`` after ``done`` of ``total`` items begun at ``started``
    (:func:`time.monotonic`), the remaining time extrapolated from the mean time per item so far."""
    from tqdm import tqdm

    elapsed = max(0.0, time.monotonic() - started)
    if done <= 0 or total is None:
        return f"elapsed {tqdm.format_interval(elapsed)}"
    left = elapsed / done * max(0, total - done)
    return f"elapsed {tqdm.format_interval(elapsed)}, ~{tqdm.format_interval(left)} left"


def echo(message: str) -> None:
    """Print a progress message line on the progress stream (nothing in mode ``off``); in ``bar`` mode above the
    bars (:meth:`tqdm.tqdm.write`), so that they are not broken."""
    mode = current_mode()
    if mode == "off":
        return
    if mode == "bar":
        from tqdm.auto import tqdm

        tqdm.write(message, file=_stream())
        return
    try:
        s = _stream()
        s.write(message.replace("\r", " ") + "\n")
        s.flush()
    except (OSError, ValueError):
        pass
