"""benchmarks/render_results.py: RESULTS.md embeds the committed benchmark outputs verbatim (no hand-typed copy)."""
from __future__ import annotations

import pytest

from benchmarks import render_results as rr


def test_results_md_embeds_its_files_verbatim():
    assert rr.main(["--check"]) == 0


def test_render_replaces_only_the_blocks(tmp_path):
    (tmp_path / "a.txt").write_text("figure  1.5\n")
    md = tmp_path / "R.md"
    md.write_text("intro 7\n<!-- file:a.txt -->\nstale 9\n<!-- /file:a.txt -->\noutro\n")
    assert rr.main(["--check", "--path", str(md), "--results-dir", str(tmp_path)]) == 1
    assert rr.main(["--path", str(md), "--results-dir", str(tmp_path)]) == 0
    assert md.read_text() == "intro 7\n<!-- file:a.txt -->\n```text\nfigure  1.5\n```\n<!-- /file:a.txt -->\noutro\n"
    assert rr.main(["--check", "--path", str(md), "--results-dir", str(tmp_path)]) == 0
    md.write_text("<!-- file:gone.txt -->\n<!-- /file:gone.txt -->\n")
    with pytest.raises(SystemExit, match="gone.txt"):
        rr.main(["--path", str(md), "--results-dir", str(tmp_path)])
