"""scripts/rome_vs_rrome.py (issue 16's sequential rome vs r-rome comparison): a killed run resumed with the same
command ends with the rows of an uninterrupted one, and the README table is generated from the CSV files."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _mod():
    spec = importlib.util.spec_from_file_location("rome_vs_rrome", ROOT / "scripts" / "rome_vs_rrome.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in csv.DictReader(f)]


ARGS = ["--model", "tiny-llama", "--n", "3", "--methods", "rome", "--checkpoints", "1,2,3", "--early", "2"]


def test_killed_and_resumed_run_has_the_rows_of_an_uninterrupted_one(tmp_path, monkeypatch):
    mod = _mod()
    full, part = tmp_path / "full", tmp_path / "part"
    assert mod.main([*ARGS, "--out", str(full)]) == 0
    ref_edits, ref_marks = _rows(full / "per_edit.csv"), _rows(full / "summary.csv")
    assert [r["edit"] for r in ref_edits] == ["1", "2", "3"] and [r["n_edits"] for r in ref_marks] == ["1", "2", "3"]

    real = mod._append
    calls = []

    def dying(path, fields, row):  # killed after edit 2's row, before its checkpoint row
        if path.name == "summary.csv" and row.get("n_edits") == 2:
            raise KeyboardInterrupt
        calls.append(path.name)
        real(path, fields, row)

    monkeypatch.setattr(mod, "_append", dying)
    with pytest.raises(KeyboardInterrupt):
        mod.main([*ARGS, "--out", str(part)])
    assert [r["edit"] for r in _rows(part / "per_edit.csv")] == ["1", "2"]
    assert [r["n_edits"] for r in _rows(part / "summary.csv")] == ["1"]
    monkeypatch.setattr(mod, "_append", real)
    assert mod.main([*ARGS, "--out", str(part)]) == 0
    assert _rows(part / "per_edit.csv") == ref_edits
    assert _rows(part / "summary.csv") == ref_marks
    # a complete run is not redone
    assert mod.main([*ARGS, "--out", str(part)]) == 0
    assert _rows(part / "per_edit.csv") == ref_edits


def test_render_writes_the_table_between_the_markers_only(tmp_path):
    mod = _mod()
    out = tmp_path / "out"
    out.mkdir()
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=mod.SUMMARY_FIELDS)
        w.writeheader()
        w.writerow(dict(method="rome", layer=4, n_edits=2, early_n=2, early_s_acc="0.5", early_c_acc="1.0",
                        hidden_rank="0.99", delta_fro="30", delta_s1="20", delta_s2="10", delta_s3="1", delta_s4="1",
                        ppl="35", ppl_ratio="1.01", n_disabling=1, max_step_norm="25", median_step_norm="20", wall_s=1))
    with (out / "per_edit.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=mod.PER_EDIT_FIELDS)
        w.writeheader()
        for i in (1, 2):
            w.writerow(dict(method="rome", edit=i, case_id=f"c{i}", step_delta_norm="20", took=i - 1, ppl="35",
                            ppl_jump="1", disabling=0, wall_s=1))
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{mod.README_BEGIN}\nold\n{mod.README_END}\nafter\n")
    assert mod.main(["--render", "--readme", str(readme), "--n", "2", "--out", str(out)]) == 0
    text = readme.read_text()
    assert text.startswith(f"before\n{mod.README_BEGIN}\n") and text.endswith(f"{mod.README_END}\nafter\n")
    assert "old" not in text
    assert "| `rome` | 2 (first 2) | 0.50 | 1.00 | 0.9900 | 30 | 2 | 1.010 | 1 | 25 | 20 |" in text
    assert "**PARTIAL** (of 2 edits per method): `rome` 2 edits, `r-rome` 0 edits" in text
    assert "`rome` 1/2" in text
    assert "| `rome` |" in (out / "README.md").read_text()
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        mod.main(["--render", "--readme", str(readme), "--out", str(out)])
