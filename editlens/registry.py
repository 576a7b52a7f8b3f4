"""Discovery of the modules that register editing methods and metrics: built-in packages and entry points.

There is no hand-kept list of modules. A :class:`Discovery` finds registering modules in two places:

* **Built-in modules**: every module of the package (``editlens.edit`` for methods, ``editlens.evaluate`` for
  metrics) with a line that starts with the package's register decorator (``@register_method(`` /
  ``@register_metric(``) is imported. The rule is textual so that helper modules that register nothing (and may be slow to import, such as
  ``editlens.evaluate.meta``) are not imported; a module whose source cannot be read is imported anyway.
* **Third-party packages** through entry points: group ``editlens.methods`` / ``editlens.metrics``. The value of an
  entry point is a module that registers on import (``rome-plugin = "mypkg"``) or the class itself
  (``rome-plugin = "mypkg:RomePlugin"``), which is then registered under the entry point's name unless it
  registered itself. Either way, after loading, a method/metric of the entry point's name must exist.

A module or entry point that fails to import is not skipped silently: the failure (module name and error) is
kept, warned about once (:class:`PluginImportWarning`), listed by ``editlens methods`` / ``editlens eval
--list-metrics`` and appended to the "unknown method/metric" error (:meth:`Discovery.notes`); the other modules
keep working. So an optional dependency missing for one method only disables that method, visibly.

Trust: discovery imports (runs) the code of every installed distribution that declares one of these entry-point
groups, the first time the registry is used in a process (not at ``import editlens``). Discovery is guarded by a
lock; it runs once per process and again when ``sys.path`` changed or an unknown name is asked for.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
import sys
import threading
import traceback
import warnings
from typing import Any, Callable

#: entry-point group of third-party editing methods
METHODS_GROUP = "editlens.methods"
#: entry-point group of third-party metrics
METRICS_GROUP = "editlens.metrics"


class PluginImportWarning(RuntimeWarning):
    """A method/metric module or entry point failed to import (its methods/metrics are unavailable)."""


def _describe(e: BaseException) -> str:
    last = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ is not None else []
    where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(e).__name__}: {e}{where}"


class Discovery:
    """Finds and imports the modules that register one kind of plugin (see the module docstring).

    Args:
        kind: ``"method"`` or ``"metric"`` (used in messages).
        package: the built-in package scanned (``"editlens.edit"``).
        marker: the text that starts a line of a registering module (``"@register_method("``, indentation allowed).
        group: the entry-point group.
        registered: returns the names registered so far.
        adopt: ``adopt(name, obj)`` registers a class given by an entry point under ``name``; raises on a wrong type.
    """

    def __init__(self, kind: str, package: str, marker: str, group: str, registered: Callable[[], Any],
                 adopt: Callable[[str, Any], None]):
        self.kind, self.package, self.marker, self.group = kind, package, marker, group
        self._registered = registered
        self._adopt = adopt
        self._lock = threading.RLock()
        self._builtins_done = False
        self._path_seen: tuple[str, ...] | None = None
        self._entry_points_done: set[tuple[str, str]] = set()
        #: ``{module or "entry point NAME (VALUE)": "ErrorType: message (file:line)"}``
        self.errors: dict[str, str] = {}
        #: entry-point name -> distribution name, for the entry points loaded
        self.sources: dict[str, str] = {}

    # ------------------------------------------------------------------ discovery
    def ensure(self, *, refresh: bool = False) -> None:
        """Import the built-in registering modules (once) and any entry point not loaded yet.

        Entry points are looked up again when ``refresh`` is true or ``sys.path`` changed since the last look."""
        with self._lock:
            if not self._builtins_done:
                self._builtins_done = True
                self._scan_package()
            path = tuple(sys.path)
            if refresh or path != self._path_seen:
                self._path_seen = path
                self._scan_entry_points()

    def builtin_modules(self) -> list[str]:
        """Modules of the package whose source registers something (what :meth:`ensure` imports)."""
        pkg = importlib.import_module(self.package)
        out = []
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if info.ispkg or info.name.startswith("__"):
                continue
            name = f"{self.package}.{info.name}"
            spec = importlib.util.find_spec(name)
            origin = getattr(spec, "origin", None)
            try:
                with open(str(origin), encoding="utf-8") as f:
                    registers = re.search(rf"^\s*{re.escape(self.marker)}", f.read(), re.M) is not None
            except (OSError, TypeError, ValueError):
                registers = True  # no readable source (e.g. compiled only): import it to find out
            if registers:
                out.append(name)
        return out

    def _scan_package(self) -> None:
        for name in self.builtin_modules():
            try:
                importlib.import_module(name)
            except Exception as e:  # noqa: BLE001 - reported, not fatal for the other modules
                self._fail(name, e)

    def _entry_points(self) -> list[Any]:
        from importlib.metadata import entry_points

        try:
            eps = entry_points(group=self.group)
        except TypeError:  # pragma: no cover - Python < 3.10 API
            eps = entry_points().get(self.group, [])  # type: ignore[attr-defined]
        seen, out = set(), []
        for ep in eps:  # the same distribution found twice on sys.path yields duplicates
            if (ep.name, ep.value) not in seen:
                seen.add((ep.name, ep.value))
                out.append(ep)
        return sorted(out, key=lambda ep: (ep.name, ep.value))

    def _scan_entry_points(self) -> None:
        for ep in self._entry_points():
            key = (ep.name, ep.value)
            if key in self._entry_points_done:
                continue
            self._entry_points_done.add(key)
            label = f"entry point {ep.name!r} = {ep.value!r} (group {self.group})"
            try:
                obj = ep.load()
                name = ep.name.lower()
                if not isinstance(obj, type(sys)) and name not in self._registered():
                    self._adopt(name, obj)
                if name not in self._registered():
                    raise LookupError(f"it loaded but registered no {self.kind} named {name!r} "
                                      f"(registered: {', '.join(sorted(self._registered()))})")
                dist = getattr(getattr(ep, "dist", None), "name", None)
                self.sources[name] = str(dist or ep.value)
            except Exception as e:  # noqa: BLE001 - reported, not fatal for the other plugins
                self._fail(label, e)

    def _fail(self, what: str, e: BaseException) -> None:
        msg = _describe(e)
        if self.errors.get(what) != msg:
            self.errors[what] = msg
            warnings.warn(f"editlens: {self.kind} module {what} failed to import: {msg}", PluginImportWarning,
                          stacklevel=3)

    # ------------------------------------------------------------------ reporting
    def notes(self) -> str:
        """``"; note: module M failed to import: Error..."`` for every failure (empty when none)."""
        return "".join(f"; note: {self.kind} module {what} failed to import: {msg}" for what, msg in
                       sorted(self.errors.items()))

    def describe_errors(self) -> list[str]:
        """One line per failed module or entry point."""
        return [f"{what}: {msg}" for what, msg in sorted(self.errors.items())]
