"""The benchmark entry point runs in its CI-sized form and prints every figure (values are not checked here:
speed is measured by ``python -m benchmarks all``, not by tests)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: figures every suite must print (prefix match for those whose name carries a count)
EXPECTED = [
    "eval_speedup_vs_naive", "eval_fraction_of_flop_bound", "eval_peak_mib", "edit.stats_one_pass_speedup",
    "edit.rome_s_per_edit", "edit.rome_speedup_vs_naive", "edit.memit_naive_per_case_s",
    "edit.memit_batch", "edit.alphaedit_s_per_seq_edit", "seq.alphaedit_s_per_edit_at_10", "seq.alphaedit_growth",
    "seq.naive_growth", "scr", "trace.speedup_vs_loop", "trace.bulk_s", "trace.loop_s",
    "stats.default_s", "stats.previous_s", "stats.speedup_vs_previous", "stats.default_sampling_s",
    "stats.default_accumulation_s", "stats.default_tokens",
    "scale.memit_peak_ratio", "scale.alphaedit_peak_ratio", "scale.memit_time_ratio", "scale.eval_peak_ratio",
    "scale.seq_growth", "scale.seq_s_per_edit_at_10",
]


def test_benchmarks_quick_run_prints_every_row(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "all", "--quick", "--device", "cpu",
                           "--model", "tiny-llama", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "EDITLENS_STATS_DIR": str(tmp_path / "stats")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    names = [k for k in figures if k != "meta"]
    for want in EXPECTED:
        hits = [k for k in names if k.startswith(want)]
        assert hits, (want, names)
        for k in hits:
            assert k in proc.stdout, k  # printed in the table
            assert math.isfinite(figures[k]), (k, figures[k])
    assert figures["meta"]["quick"] is True
    assert figures["scale.seq_resumed"] == 1.0  # the quick sequential run is stopped half-way and resumed
    assert figures["scale.eval24_rows"] > figures["scale.eval12_rows"] > 0  # rows read back from the store
