"""scripts/known_fact_flips.py: one row per known fact and method, undo checked, methods already recorded kept,
README generated from the CSV."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _mod():
    spec = importlib.util.spec_from_file_location("known_fact_flips", ROOT / "scripts" / "known_fact_flips.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_undo_and_resume_on_the_tiny_model(tmp_path, monkeypatch):
    mod = _mod()
    out = tmp_path / "flips"
    assert mod.main(["--model", "tiny-llama", "--methods", "rome", "--out", str(out)]) == 0
    with (out / "flips.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == [f"lk{i}" for i in range(6)]
    assert all(r["method"] == "rome" and r["undo_exact"] == "1" for r in rows)
    n = sum(int(r["flipped"]) for r in rows)
    assert all(int(r["flipped"]) == int(r["continuation"].strip().startswith(r["target_new"])) for r in rows)
    readme = (out / "README.md").read_text()
    assert f"| `rome` | {n} / 6 | yes |" in readme

    def boom(*a, **k):
        raise AssertionError("a recorded method was run again")

    monkeypatch.setattr(mod, "run_method", boom)
    assert mod.main(["--model", "tiny-llama", "--methods", "rome", "--out", str(out)]) == 0
