"""The README's Python quickstart runs as written (on the tiny random model and the shipped sample, so that it
needs no download and stays fast): the docs cannot drift from the API unnoticed."""
from __future__ import annotations

import re
from pathlib import Path

from editlens.cli.basic import sample_data_path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_quickstart_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quickstart writes rows.csv
    text = README.read_text(encoding="utf-8")
    m = re.search(r"## Quickstart: Python\n\n```python\n(.*?)```", text, re.S)
    assert m, "README has no '## Quickstart: Python' code block"
    code = m.group(1)
    assert '"smollm2-135m"' in code and '"facts.json"' in code
    code = code.replace('"smollm2-135m"', '"tiny-llama"').replace('"facts.json"', repr(str(sample_data_path())))
    exec(compile(code, "README.md (quickstart)", "exec"), {})
    out = capsys.readouterr().out
    assert "probe_kind" in out and "wall_time_s" in out
