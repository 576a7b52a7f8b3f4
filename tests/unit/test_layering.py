"""The package layering, enforced: every ``import`` in every module of editlens (top-level, inside functions and
under ``TYPE_CHECKING`` alike, read with :mod:`ast`, nothing is imported) points down the layers

    cli → report → runs → drivers → edit | evaluate | localize → data / lm / system → errors

``edit`` and ``evaluate`` are siblings: a method never knows which metrics run and a metric never knows which
method made a system, so neither imports the other; what needs both (editing, then evaluating the edited
system) is a driver above them (:mod:`editlens.drivers`, :mod:`editlens.runs`). A new part of editlens (a
subpackage or a top-level module) fails the test until it is placed in :data:`ALLOWED`. See docs/architecture.md.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "editlens"

#: what each part of editlens may import (besides itself). A part is a subpackage or a top-level module.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "registry": {"errors"},
    "data": {"errors"},
    "lm": {"errors", "data"},
    "system": {"errors", "data", "lm"},
    "evaluate": {"errors", "registry", "data", "lm", "system"},
    "edit": {"errors", "registry", "data", "lm", "system"},
    "drivers": {"errors", "registry", "data", "lm", "system", "edit", "evaluate"},
    "audit": {"errors", "registry", "data", "lm", "system", "edit", "evaluate"},  # a driver: audits of any model
    "runs": {"errors", "registry", "data", "lm", "system", "edit", "evaluate", "drivers"},
    "report": {"errors", "registry", "data", "lm", "system", "edit", "evaluate", "drivers", "runs"},
    "testing": {"errors", "registry", "data", "lm", "system", "edit", "evaluate", "drivers", "runs"},
    "cli": {"errors", "registry", "data", "lm", "system", "edit", "evaluate", "drivers", "runs", "report",
            "testing", "audit"},
    # causal tracing: an analysis of the unedited model, beside methods and metrics
    "localize": {"errors", "registry", "data", "lm", "system"},
}
for _upper in ("drivers", "audit", "runs", "report", "testing", "cli"):
    ALLOWED[_upper].add("localize")
# layer="trace" / layers="trace" of the locate-then-edit methods: edit layers chosen by causal tracing
ALLOWED["edit"].add("localize")
# progress bars (editlens/progress.py) sit beside errors at the bottom: every part may show progress
ALLOWED["progress"] = set()
for _name in ALLOWED:
    if _name != "progress":
        ALLOWED[_name].add("progress")
#: the package facade (``editlens/__init__.py``) re-exports the public API of every part
FACADE = "__init__"
ALLOWED["testing"].add(FACADE)
ALLOWED["cli"].add(FACADE)


def _part(module: str, root: Path = PKG) -> str | None:
    """``editlens.edit.rome`` → ``edit``; ``editlens`` itself, or a name the facade exports
    (``editlens.load_model``) → the facade; not editlens → None."""
    parts = module.split(".")
    if parts[0] != "editlens":
        return None
    if len(parts) > 1 and ((root / parts[1]).is_dir() or (root / f"{parts[1]}.py").is_file()):
        return parts[1]
    return FACADE


def _module_name(path: Path, root: Path = PKG) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path = PKG) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every import statement in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = _module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from editlens import evaluate`` imports the subpackage: count the names too
            if mod == "editlens":
                out += [(node.lineno, f"editlens.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return out


def layering_violations(root: Path = PKG) -> list[str]:
    """``"file:line: <part> imports <module>"`` for every import that goes against :data:`ALLOWED`."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        own = _part(_module_name(path, root), root)
        if own == FACADE:
            continue
        assert own in ALLOWED, f"{path}: part {own!r} of editlens has no place in the layering (tests/unit/" \
                               f"test_layering.py ALLOWED): say what it may import"
        for line, mod in imports_of(path, root):
            target = _part(mod, root)
            if target is None or target == own:
                continue
            if target not in ALLOWED[own]:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {own} imports {mod}")
    return bad


def test_package_layering():
    bad = layering_violations()
    assert not bad, "imports against the layering (cli → report → runs → drivers → edit | evaluate → " \
                    "data/lm/system → errors):\n  " + "\n  ".join(bad)


def test_edit_and_evaluate_are_siblings():
    """The two rules the layering exists for, stated on their own."""
    assert "evaluate" not in ALLOWED["edit"] and "edit" not in ALLOWED["evaluate"]
    assert "runs" not in ALLOWED["evaluate"] and "drivers" not in ALLOWED["evaluate"]


def test_checker_sees_every_kind_of_import(tmp_path):
    """The checker is not vacuous: a module-level, a function-local, a TYPE_CHECKING, a relative and a
    ``from editlens import X`` import of a forbidden part are each reported with their line."""
    pkg = tmp_path / "editlens"
    (pkg / "edit").mkdir(parents=True)
    (pkg / "evaluate").mkdir()
    (pkg / "lm").mkdir()
    (pkg / "errors.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "edit" / "__init__.py").write_text("")
    (pkg / "evaluate" / "__init__.py").write_text("")
    (pkg / "evaluate" / "core.py").write_text("")
    (pkg / "edit" / "bad.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import editlens.evaluate.core\n"                      # 2
        "from editlens.lm import ops\n"                        # 3: allowed
        "if TYPE_CHECKING:\n"
        "    from editlens.evaluate.core import Metric\n"      # 5
        "def f():\n"
        "    from ..evaluate import core\n"                    # 7
        "    from editlens import evaluate, errors\n"          # 8 (evaluate only)
        "    from . import base\n")                            # 9: own part
    (pkg / "evaluate" / "also_bad.py").write_text("from editlens.runs.runner import run_spec\n"
                                                  "import editlens\n")                 # 2: the facade
    bad = layering_violations(pkg)
    assert bad == ["editlens/edit/bad.py:2: edit imports editlens.evaluate.core",
                   "editlens/edit/bad.py:5: edit imports editlens.evaluate.core",
                   "editlens/edit/bad.py:7: edit imports editlens.evaluate",
                   "editlens/edit/bad.py:8: edit imports editlens.evaluate",
                   "editlens/evaluate/also_bad.py:1: evaluate imports editlens.runs.runner",
                   "editlens/evaluate/also_bad.py:2: evaluate imports editlens"]


def test_unknown_part_must_be_placed(tmp_path):
    pkg = tmp_path / "editlens"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "newthing.py").write_text("import editlens.errors\n")
    with pytest.raises(AssertionError, match="newthing"):
        layering_violations(pkg)


def private_imports_of(root: Path, module: str) -> list[str]:
    """``"file:line: name"`` for every ``from <module> import _name`` outside ``module`` itself."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        if _module_name(path, root) == module:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == module:
                bad += [f"{path.relative_to(root.parent)}:{node.lineno}: {a.name}" for a in node.names
                        if a.name.startswith("_")]
    return bad


def test_nobody_reaches_into_the_evaluators_private_functions():
    """The runner once re-implemented the evaluator with its private helpers (issue 14 item 4); what others need
    is public (``freeze_base``, ``answer_requests``, ``request_set``, ``cache_key``)."""
    assert private_imports_of(PKG, "editlens.evaluate.core") == []


def test_private_import_checker_is_not_vacuous(tmp_path):
    pkg = tmp_path / "editlens"
    (pkg / "runs").mkdir(parents=True)
    (pkg / "runs" / "runner.py").write_text("def f():\n    from editlens.evaluate.core import _answer, evaluate\n")
    assert private_imports_of(pkg, "editlens.evaluate.core") == ["editlens/runs/runner.py:2: _answer"]


def test_old_system_path_is_a_thin_reexport():
    """``editlens.evaluate.system`` stays importable for users and is the same objects as ``editlens.system``;
    nothing inside editlens imports the old path."""
    import editlens.evaluate.system as old
    import editlens.system as new

    assert (old.System, old.ModelSystem, old.WrappedSystem) == (new.System, new.ModelSystem, new.WrappedSystem)
    users = [f"{p.relative_to(PKG.parent)}:{line}" for p in sorted(PKG.rglob("*.py"))
             if p != PKG / "evaluate" / "system.py"
             for line, mod in imports_of(p) if mod == "editlens.evaluate.system"]
    assert users == []
