"""The one-shot GPU check (benchmarks/gpu_check.sh): its target logic on hand-made figures, its refusals, and a
``--dry-run`` of the whole orchestration on the CPU (what a CPU machine can check of the script's setup)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.common import config_n_params, load_bench_model

ROOT = Path(__file__).resolve().parents[2]


def test_targets_compare_each_figure_with_its_threshold():
    res = {"eval:config:llama-3-8b": {"eval_speedup_vs_naive": 31.0, "eval_fraction_of_flop_bound": 0.59},
           "edit:config:llama-3-8b": {"rome_s_per_edit": 3.0},
           "consistency": {"flips_equal": 1.0, "undo_exact": 0.0}}
    t = gpu_check.check_targets(res)
    assert t["bulk_vs_naive_llama"]["ok"] is True
    assert t["flop_bound_llama"]["ok"] is False  # 0.59 < 0.60
    assert t["rome_s_per_edit_llama"]["ok"] is True  # <= 3.0, boundary included
    assert t["undo_exact"]["ok"] is False and t["flips_equal"]["ok"] is True
    assert t["flop_bound_gpt2xl"]["ok"] is None and t["flop_bound_gpt2xl"]["value"] is None  # part not run


def test_paper_size_configs_have_the_papers_parameter_counts():
    # counted on the meta device: GPT2-XL 1.56B, Llama-3-8B 8.03B, SmolLM2-135M 134.5M (public model cards)
    assert config_n_params("config:gpt2-xl") == pytest.approx(1.558e9, rel=2e-3)
    assert config_n_params("config:llama-3-8b") == pytest.approx(8.030e9, rel=2e-3)
    assert config_n_params("config:smollm2-135m") == pytest.approx(134.5e6, rel=2e-3)
    with pytest.raises(ValueError, match="unknown benchmark config"):
        config_n_params("config:gpt-5")


def test_config_models_are_seeded_and_load_in_the_asked_dtype():
    a = load_bench_model("config:smollm2-135m", "cpu", "bfloat16")
    w = a.module(a.arch.mlp_out_at(3)).weight
    assert w.dtype == torch.bfloat16 and a.n_layers == 30
    b = load_bench_model("config:smollm2-135m", "cpu", "bfloat16")
    assert torch.equal(w, b.module(b.arch.mlp_out_at(3)).weight)  # same seed, same weights (base == copies)


def _run(*args, timeout=900):
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_and_without_dry_run_it_stops_at_once(tmp_path):
    p = _run("--json", str(tmp_path / "x.json"), timeout=120)
    assert p.returncode == 2 and "no CUDA device" in p.stderr
    assert not (tmp_path / "x.json").exists()


def test_unknown_part_is_refused(tmp_path):
    p = _run("--dry-run", "--only", "eval:config:gpt-5", "--json", str(tmp_path / "x.json"), timeout=120)
    assert p.returncode == 2 and "unknown part" in p.stderr


def test_dry_run_runs_every_part_kind_and_writes_the_json(tmp_path):
    out = tmp_path / "gpu.json"
    p = _run("--dry-run", "--budget-s", "840", "--json", str(out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["meta"]["dry_run"] is True
    assert set(rep["meta"]["config_n_params"]) == set(gpu_check.CONFIGS)
    parts = rep["parts"]
    assert set(parts) == {"consistency", "device_map", "eval:config:llama-3-8b", "edit:config:llama-3-8b"}
    assert all(r["status"] == "ok" for r in parts.values()), parts
    c = parts["consistency"]
    assert c["undo_exact"] == 1.0 and c["ref"] == "cpu/float32" and c["test"] == "cpu/bfloat16"
    assert parts["eval:config:llama-3-8b"]["eval_max_abs_diff"] < 1e-3  # bulk == naive on the toy run too
    assert parts["edit:config:llama-3-8b"]["memit_batch"] == 3
    d = parts["device_map"]  # tiny-llama over cpu and disk, the edited layers offloaded
    assert d["offloaded_modules"] > 0 and "disk" in d["device_map"].values()
    assert d["edits_equal"] == 1.0 and d["undo_exact"] == 1.0 and d["rome_weight_max_abs_diff"] == 0.0
    assert set(rep["targets"]) == set(gpu_check.TARGETS)
    assert "== targets ==" in p.stdout
