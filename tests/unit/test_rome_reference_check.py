"""scripts/rome_reference_check.py (issue 16): the parts that do not need the reference code.

The side-by-side run itself needs an exported tree of the reference implementation and an environment of its own
(outside the repository), so it is not run here; its committed output is results/rome_reference/. Checked here:
the comparison figures against hand-computed values, the pass rules, the device patch of the reference tree (and
its refusal of a tree that does not look like the expected version), the reference hyperparameters built from
editlens's, the fact list, and that the committed CSV and README agree.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "rome_reference_check.py"
RESULTS = ROOT / "results" / "rome_reference"


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("rome_reference_check", SCRIPT)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_compare_against_hand_values(mod):
    a = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)  # ‖a‖ = 5
    b = torch.tensor([[0.0, 0.0], [0.0, 5.0]], dtype=torch.float64)  # ‖b‖ = 5, <a, b> = 20
    got = mod.compare(a, b)
    assert got["norm_editlens"] == pytest.approx(5.0) and got["norm_reference"] == pytest.approx(5.0)
    assert got["norm_ratio"] == pytest.approx(1.0)
    assert got["cosine"] == pytest.approx(20 / 25)
    assert got["rel_diff"] == pytest.approx(math.sqrt(9 + 1) / 5)  # a − b = [[3, 0], [0, −1]]
    same = mod.compare(b, b)
    assert same["rel_diff"] == 0 and same["cosine"] == pytest.approx(1.0)


def test_pass_rules(mod):
    def row(setting, rel=0.0, ratio=1.0, cos=1.0):
        return dict(setting=setting, rel_diff=str(rel), norm_ratio=str(ratio), cosine=str(cos))

    assert mod.verdict(row("same_prefixes", rel=9.9e-4))
    assert not mod.verdict(row("same_prefixes", rel=1.1e-3))
    assert mod.verdict(row("own_prefixes", rel=0.5, ratio=0.76, cos=0.86))
    assert not mod.verdict(row("own_prefixes", ratio=1.26))
    assert not mod.verdict(row("own_prefixes", ratio=0.74))
    assert not mod.verdict(row("own_prefixes", cos=0.84))


def _fake_tree(root: Path, n_v=4, n_u=1) -> Path:
    (root / "rome").mkdir(parents=True)
    (root / "rome" / "compute_v.py").write_text('x = 1\n' + 'a.to("cuda")\n' * n_v)
    (root / "rome" / "compute_u.py").write_text('m.to("cuda")\n' * n_u)
    (root / "rome" / "rome_main.py").write_text("")
    (root / "globals.yml").write_text("")
    return root


def test_device_patch_on_a_copy(mod, tmp_path):
    src = _fake_tree(tmp_path / "src")
    done = mod.patched_reference_tree(src, tmp_path / "patched", "cpu")
    assert len(done) == 2
    assert (tmp_path / "patched" / "rome" / "compute_v.py").read_text().count('"cpu"') == 4
    assert '"cuda"' not in (tmp_path / "patched" / "rome" / "compute_u.py").read_text()
    assert (src / "rome" / "compute_v.py").read_text().count('"cuda"') == 4  # the source tree is untouched
    assert mod.patched_reference_tree(src, tmp_path / "patched", "cuda") == []  # on CUDA nothing is patched


def test_device_patch_refuses_another_version(mod, tmp_path):
    src = _fake_tree(tmp_path / "src", n_v=3)
    with pytest.raises(SystemExit, match="compute_v.py: expected 4"):
        mod.patched_reference_tree(src, tmp_path / "patched", "cpu")


def test_reference_hparams_are_editlens_defaults(mod):
    from editlens.edit.rome import ROMEHParams

    hp = ROMEHParams(layer=4, v_lr=0.3, v_num_grad_steps=17, kl_factor=0.1, v_weight_decay=0.7,
                     clamp_norm_factor=3.0)
    got = mod.reference_hparams(hp, n_layers=30)
    assert (got["layers"], got["v_lr"], got["v_num_grad_steps"], got["kl_factor"], got["v_weight_decay"],
            got["clamp_norm_factor"], got["v_loss_layer"]) == ([4], 0.3, 17, 0.1, 0.7, 3.0, 29)
    assert got["rewrite_module_tmp"].format(4) == "model.layers.4.mlp.down_proj"
    assert got["mom2_adjustment"] is True and got["fact_token"] == "subject_last"


def test_facts_are_the_known_facts_and_sample_cases(mod):
    from editlens.data.known_facts import known_facts

    got = mod.facts()
    assert len(got) == len(known_facts()) + len(mod.SAMPLE_CASES)
    assert [f["subject"] for f in got[:6]] == [s for _t, s, _o, _n in known_facts()]
    assert all("{}" in f["prompt"] and f["target"] for f in got)
    with pytest.raises(SystemExit, match="no case 'nope'"):
        mod.facts(("nope",))


def test_committed_results_agree_with_their_readme(mod):
    path = RESULTS / "deltas.csv"
    if not path.is_file():
        pytest.skip("results/rome_reference not generated")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and list(rows[0]) == mod.COLUMNS
    readme = (RESULTS / "README.md").read_text()
    for r in rows:
        assert f"| {r['fact']} | {r['setting']} | {float(r['norm_editlens']):.4f} |" in readme
        # the figures are consistent with each other
        assert float(r["norm_ratio"]) == pytest.approx(float(r["norm_editlens"]) / float(r["norm_reference"]),
                                                       rel=1e-4)


def test_readme_reports_the_yardstick(mod, tmp_path):
    """reference_vs_itself rows are marked as the yardstick (never pass/fail) and set beside own_prefixes."""
    meta = json.loads((RESULTS / "meta.json").read_text()) if (RESULTS / "meta.json").is_file() else None
    if meta is None:
        pytest.skip("results/rome_reference not generated")
    meta = dict(meta, yardstick_seed=1, yardstick_templates=["{}", "a. {}"])

    def row(fact, setting, cos):
        return dict(fact=fact, setting=setting, norm_editlens="1.0", norm_reference="1.0", rel_diff="0.5",
                    norm_ratio="1.0", cosine=str(cos), steps_editlens="20", steps_reference="20")

    rows = [row("f1", "own_prefixes", 0.80), row("f2", "own_prefixes", 0.90),
            row("f1", "reference_vs_itself", 0.82), row("f2", "reference_vs_itself", 0.85)]
    mod.write_readme(tmp_path, rows, meta)
    text = (tmp_path / "README.md").read_text()
    assert "| f1 | reference_vs_itself | 1.0000 |" in text and "(yardstick)" in text
    assert "| f1 | 0.80000 | 0.82000 |" in text and "| f2 | 0.90000 | 0.85000 |" in text
    assert "at least the reference's cosine to itself on 1/2 facts" in text
    assert "torch seed 0 and 1" in text


def test_sampler_mask_patch(mod, tmp_path):
    """generate_fast's mask of the new token alone becomes the mask of every position up to it; another version of
    the sampler is refused."""
    src = _fake_tree(tmp_path / "src")
    (src / "util").mkdir()
    line = "            attention_mask=attention_mask[:, cur_context],\n"
    (src / "util" / "generate.py").write_text("x = 1\n" + line)
    done = mod.patched_reference_tree(src, tmp_path / "patched", "cuda")
    text = (tmp_path / "patched" / "util" / "generate.py").read_text()
    assert "attention_mask=attention_mask[:, : cur_context.stop]," in text and "[:, cur_context]" not in text
    assert len(done) == 1 and "generate.py" in done[0]
    (src / "util" / "generate.py").write_text("x = 1\n")
    with pytest.raises(SystemExit, match="generate.py: expected 1"):
        mod.patched_reference_tree(src, tmp_path / "patched2", "cuda")
