"""Line numbers of the keys of a TOML or YAML run spec, so that every validation error names its line.

:func:`toml_lines` reads the TOML text itself (tables, arrays of tables, dotted and quoted keys, inline tables,
multi-line arrays); :func:`yaml_lines` walks ``yaml.compose`` nodes and also reports duplicate keys (which
``yaml.safe_load`` silently collapses). Both give a :class:`Lines` table from key paths
(``("methods", 0, "hparams", "layers")``) to 1-based lines; :func:`key_str` writes a path as a user reads it
(``methods[0].hparams.layers``). The spec schema and validation are :mod:`editlens.runs.spec`.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

KeyPath = tuple[Any, ...]

__all__ = ["KeyPath", "Lines", "key_str", "toml_lines", "yaml_lines"]


# ============================================================================ line lookup
def key_str(path: Sequence[Any]) -> str:
    """``("methods", 0, "hparams", "layers")`` -> ``methods[0].hparams.layers`` (dotted keys quoted)."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            s = f'"{p}"' if ("." in p or " " in p or not p) else p
            out += ("." if out else "") + s
    return out


class Lines:
    """Maps key paths of a parsed spec to 1-based line numbers of the source file.

    ``lookup(path)`` returns the line of the deepest known ancestor when the exact path is unknown
    (e.g. an element of a one-line array gets the line of its key).
    """

    def __init__(self, table: Mapping[KeyPath, int] | None = None) -> None:
        self.table: dict[KeyPath, int] = dict(table or {})

    def lookup(self, path: Sequence[Any]) -> int | None:
        path = tuple(path)
        while path:
            if path in self.table:
                return self.table[path]
            path = path[:-1]
        return None

    def exact(self, path: Sequence[Any]) -> int | None:
        return self.table.get(tuple(path))


_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _split_toml_key(s: str) -> list[str] | None:
    """Split a (dotted, possibly quoted) TOML key into its parts; None when it is not a key."""
    parts: list[str] = []
    i, n = 0, len(s)
    while True:
        while i < n and s[i] in " \t":
            i += 1
        if i >= n:
            return None
        if s[i] in "\"'":
            q = s[i]
            j = i + 1
            buf = ""
            while j < n and s[j] != q:
                if q == '"' and s[j] == "\\" and j + 1 < n:
                    buf += s[j + 1]
                    j += 2
                    continue
                buf += s[j]
                j += 1
            if j >= n:
                return None
            parts.append(buf)
            i = j + 1
        else:
            m = _BARE.match(s, i)
            if not m:
                return None
            parts.append(m.group(0))
            i = m.end()
        while i < n and s[i] in " \t":
            i += 1
        if i >= n:
            return parts
        if s[i] != ".":
            return None
        i += 1


def _strip_toml_comment(line: str) -> tuple[str, int]:
    """Remove a trailing comment; return (code, bracket balance of the code outside strings)."""
    out, depth, q = [], 0, None
    i = 0
    while i < len(line):
        c = line[i]
        if q:
            if q == '"' and c == "\\":
                out.append(line[i:i + 2])
                i += 2
                continue
            if c == q:
                q = None
        elif c in "\"'":
            q = c
        elif c == "#":
            break
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        out.append(c)
        i += 1
    return "".join(out), depth


def toml_lines(text: str) -> Lines:
    """Find the line of every key and table header of a TOML document by scanning its text.

    Handles ``[table]``, ``[[array.of.tables]]`` (element indices counted), dotted and quoted keys,
    keys of one-line inline tables, multi-line arrays and multi-line strings (skipped).
    """
    table: dict[KeyPath, int] = {}
    aot: dict[KeyPath, int] = {}
    prefix: KeyPath = ()
    depth = 0
    ml_delim: str | None = None

    def resolve(parts: Sequence[str]) -> KeyPath:
        out: list[Any] = []
        for p in parts:
            out.append(p)
            if tuple(out) in aot:
                out.append(aot[tuple(out)])
        return tuple(out)

    for lineno, raw in enumerate(text.splitlines(), 1):
        if ml_delim is not None:
            if raw.count(ml_delim) % 2 == 1:
                ml_delim = None
            continue
        if depth > 0:
            _, d = _strip_toml_comment(raw)
            depth += d
            continue
        code, _ = _strip_toml_comment(raw)
        line = code.strip()
        if not line:
            continue
        if line.startswith("[["):
            end = line.rfind("]]")
            parts = _split_toml_key(line[2:end]) if end > 1 else None
            if not parts:
                continue
            arr = resolve(parts[:-1]) + (parts[-1],)
            aot[arr] = aot.get(arr, -1) + 1
            prefix = arr + (aot[arr],)
            table.setdefault(arr, lineno)
            table[prefix] = lineno
            continue
        if line.startswith("["):
            end = line.rfind("]")
            parts = _split_toml_key(line[1:end]) if end > 0 else None
            if not parts:
                continue
            prefix = resolve(parts)
            table.setdefault(prefix, lineno)
            continue
        eq = _find_eq(line)
        if eq < 0:
            continue
        parts = _split_toml_key(line[:eq])
        if not parts:
            continue
        full = prefix + tuple(parts)
        for k in range(len(prefix) + 1, len(full)):
            table.setdefault(full[:k], lineno)
        table[full] = lineno
        value = line[eq + 1:].strip()
        for delim in ('"""', "'''"):
            if value.startswith(delim) and value.count(delim) == 1:
                ml_delim = delim
        if ml_delim is None:
            _, depth = _strip_toml_comment(value)
            depth = max(depth, 0)
            if value.startswith("{"):
                for m in re.finditer(r"[{,]\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
                                     r"(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=", value):
                    sub = _split_toml_key(m.group(1))
                    if sub:
                        table.setdefault(full + tuple(sub), lineno)
    return Lines(table)


def _find_eq(line: str) -> int:
    q = None
    for i, c in enumerate(line):
        if q:
            if c == q:
                q = None
        elif c in "\"'":
            q = c
        elif c == "=":
            return i
    return -1


def yaml_lines(text: str) -> tuple[Lines, list[tuple[KeyPath, int]]]:
    """Lines of every key / sequence item of a YAML document (via ``yaml.compose``), and duplicate keys."""
    import yaml

    table: dict[KeyPath, int] = {}
    dups: list[tuple[KeyPath, int]] = []
    root = yaml.compose(text, Loader=yaml.SafeLoader)

    def walk(node: Any, path: KeyPath) -> None:
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for k, v in node.value:
                key = k.value
                if key in seen:
                    dups.append((path + (key,), k.start_mark.line + 1))
                seen.add(key)
                table[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                table[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    if root is not None:
        walk(root, ())
    return Lines(table), dups
