"""Run editlens's ``rome`` side by side with the reference implementation of ROME (Meng et al., 2022) and compare ΔW.

    .venv/bin/python scripts/rome_reference_check.py --reference-src /tmp/romeref/src \\
        --reference-python /tmp/romeref/venv/bin/python [--out results/rome_reference] [--workdir /tmp/romeref/work]

``--reference-src`` is an exported work tree of the reference code (github.com/kmeng01/rome, e.g.
``git -C <mirror> archive HEAD | tar -x -C /tmp/romeref/src``); ``--reference-python`` is the python of an
environment of its own, outside this repository (a plain venv reusing the same torch/transformers wheels is
enough). Nothing of the reference is imported into editlens or copied into this repository: this script runs it
in a subprocess of that python (``--worker``, which imports only torch, transformers and the reference tree).

What is compared (issue 16): on SmolLM2-135M (editlens's embedded weights, saved once as a plain Hugging Face
checkpoint in ``--workdir`` so that both tools load the same float32 tensors; checked by a hash of every
parameter), for each fact (the six known facts of :mod:`editlens.data.known_facts` and four rewrites of the shipped
CounterFact sample), the rank-one update ΔW of ``model.layers.L.mlp.down_proj`` that each tool computes from the
unedited model, with editlens's ROME defaults for SmolLM2 (layer, lr, steps, KL factor, weight decay, clamp,
``v_loss_layer`` = the last layer) given to the reference as its hyperparameters, and

* ``same_prefixes``: the same second-moment matrix C (editlens's, injected where the reference loads its
  covariance statistics) and the same context prefixes (editlens's, injected as the reference's context
  templates) — the issue asks for ΔW equal to within 1e-3 relative;
* ``own_prefixes``: the same C, each tool its own context prefixes (the reference generates its own with its
  published ``context_template_length_params`` [[5, 10], [10, 10]]) — ‖ΔW‖ within ±25% and cosine ≥ 0.85;
* ``reference_vs_itself`` (with ``--yardstick-seed S``): the reference's own templates sampled again with torch
  seed ``S``, its ΔW compared with the reference's at ``--seed``: how far resampling the prefixes alone moves ΔW,
  the yardstick for ``own_prefixes``.

Per fact and setting: ``rel_diff = ‖ΔW_e − ΔW_r‖_F / ‖ΔW_r‖_F``, ``norm_ratio = ‖ΔW_e‖_F / ‖ΔW_r‖_F`` and the
Frobenius cosine. Writes ``deltas.csv`` and ``README.md`` (generated from the CSV: how to rerun, what was
injected and patched, the table, pass/fail) in ``--out``. CPU by default: each fact costs each tool up to 20
value-optimisation steps on SmolLM2, the reference's own 21 context templates about 3× the 6 shared ones
(``--limit``, ``--sample-cases`` and ``--own-limit`` run a subset; ``--reuse`` keeps the ΔW of an earlier run with
the same inputs).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "results" / "rome_reference"
#: rewrites of the shipped CounterFact sample added to the six known facts (case ids of counterfact_sample.json);
#: 0 and 2 repeat the relations of two known facts, so they are left out
SAMPLE_CASES = ("1", "3", "5", "6")
#: the issue's thresholds
SAME_REL_TOL = 1e-3
OWN_NORM_TOL = 0.25
OWN_MIN_COSINE = 0.85
#: the reference's own context_template_length_params (its published hparams for GPT-2 XL / GPT-J)
REFERENCE_TEMPLATE_LENGTHS = [[5, 10], [10, 10]]
#: textual patches applied to a copy of the reference tree (file, old, new, expected count): the reference moves
#: its tensors to the literal device "cuda"; on a machine without one they go to the device of the run instead
DEVICE_PATCHES = (("rome/compute_v.py", '"cuda"', 4), ("rome/compute_u.py", '"cuda"', 1))
#: the reference's sampler of context templates (util/generate.py, generate_fast) passes, with the KV cache, only the
#: attention-mask column of the new token. The GPT-2 of the transformers it was written for broadcast that column over
#: every key (all ones: nothing masked); transformers 5 reads it as "only the newest key is visible" on a Llama-layout
#: model, so each token is sampled nearly without its context (checked: the next-token logits differ by up to 19 from
#: a full forward pass) and the templates come out as fragments like '--,-.'. Patched to pass the mask of every
#: position up to the new token, which is what the code computes in its own environment.
COMPAT_PATCHES = (("util/generate.py", "attention_mask=attention_mask[:, cur_context],",
                   "attention_mask=attention_mask[:, : cur_context.stop],", 1),)
COLUMNS = ["fact", "setting", "norm_editlens", "norm_reference", "rel_diff", "norm_ratio", "cosine",
           "steps_editlens", "steps_reference"]


# ============================================================================== the reference side (--worker)
def param_hash(model) -> str:
    """sha256 over every parameter's name and float32 bytes (tied weights once): both sides compute it."""
    import torch

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def worker(job_path: str) -> None:
    """Run the reference ROME (imported from the patched tree named in the job) for every fact and setting."""
    import types

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = json.loads(Path(job_path).read_text())
    src = job["src"]
    os.chdir(src)  # util/globals.py reads globals.yml from the working directory
    sys.path.insert(0, src)
    stubbed = []
    try:
        import datasets  # noqa: F401
    except ImportError:  # only rome/layer_stats.py's Wikipedia loader uses it, and the injected C replaces that
        stub = types.ModuleType("datasets")

        def load_dataset(*a, **k):
            raise RuntimeError("datasets is a stub in this check: the second moment is injected")

        stub.load_dataset = load_dataset
        sys.modules["datasets"] = stub
        stubbed.append("datasets")
    import rome.compute_u as ref_u
    import rome.rome_main as ref_main
    from rome import ROMEHyperParams, execute_rome

    torch.set_num_threads(int(job["threads"]))
    device = job["device"]
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # as the reference's own experiment scripts do
    tok.padding_side = "right"  # compute_v puts each target at the end of its attention mask: right padding
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32,
                                                 attn_implementation=job["attn_implementation"]).to(device).eval()
    model.config.n_embd = model.config.hidden_size  # compute_v sizes δ by GPT-2's config name
    C = torch.load(job["cov_path"], map_location=device, weights_only=True)

    class _Moment:
        def __init__(self, m):
            self._m = m

        def moment(self):
            return self._m

    def injected_layer_stats(*args, **kwargs):  # replaces the reference's Wikipedia statistics: editlens's C
        return types.SimpleNamespace(mom2=_Moment(C.clone()))

    ref_u.layer_stats = injected_layer_stats
    ref_u.inv_mom2_cache.clear()
    hp = ROMEHyperParams(**job["hparams"])
    original_templates = ref_main.get_context_templates
    out = {"deltas": {}, "steps": {}, "templates": {}, "param_hash": param_hash(model), "stubbed": stubbed,
           "torch": str(torch.__version__), "transformers": str(__import__("transformers").__version__)}
    for setting in [x for x in ("same_prefixes", "own_prefixes") if x in job["settings"]]:
        templates = job["settings"][setting]
        if templates is None:  # the reference's own: generated once (seeded), then cached by the reference
            ref_main.CONTEXT_TEMPLATES_CACHE = None
            torch.manual_seed(int(job["seed"]))
            ref_main.get_context_templates = original_templates
            with contextlib.redirect_stdout(io.StringIO()):
                used = original_templates(model, tok, hp.context_template_length_params)
        else:
            used = list(templates)
            ref_main.get_context_templates = lambda *a, _t=used, **k: list(_t)
        out["templates"][setting] = used
        todo = job["facts"][: job["own_limit"] or None] if templates is None else job["facts"]
        for fact in todo:
            request = {"prompt": fact["prompt"], "subject": fact["subject"], "target_new": {"str": fact["target"]}}
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                deltas = execute_rome(model, tok, request, hp)
            (u, v), = deltas.values()  # left (input side) and right (output side) vectors of one layer
            key = f"{setting}|{fact['fact']}"
            out["deltas"][key] = torch.outer(v.double(), u.double()).cpu()  # [out, in]
            out["steps"][key] = sum(1 for line in buf.getvalue().splitlines() if line.startswith("loss "))
            print(f"[reference] {setting} {fact['fact']}: ‖ΔW‖ {float(out['deltas'][key].norm()):.4g}, "
                  f"steps {out['steps'][key]}", flush=True)
            out["editlens_imported"] = "editlens" in sys.modules
            torch.save(out, job["out_path"])  # after every fact: a run stopped early keeps what it has


# ============================================================================== the editlens side
def patched_reference_tree(src: Path, dst: Path, device: str) -> list[str]:
    """Copy ``src`` to ``dst`` and apply :data:`DEVICE_PATCHES` (when ``device`` is not "cuda"); returns the lines
    describing each patch. Fails when a file does not hold the expected number of literals (another version)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    done = []

    def checked_text(rel: str, old: str, count: int) -> str:
        """The text of ``dst / rel``; fails unless it holds ``old`` exactly ``count`` times (another version)."""
        text = (dst / rel).read_text()
        if text.count(old) != count:
            raise SystemExit(f"{src / rel}: expected {count} occurrence(s) of {old} (the reference at commit "
                             f"0874014), found {text.count(old)}: another version of the reference code?")
        return text

    for rel, old, count in DEVICE_PATCHES:
        text = checked_text(rel, old, count)
        if device != "cuda":
            (dst / rel).write_text(text.replace(old, json.dumps(device)))
            done.append(f"`{rel}`: the {count} literal device {old} replaced by \"{device}\"")
    for rel, old, new, count in COMPAT_PATCHES:
        if not (dst / rel).is_file():
            continue  # a tree without the sampler (the tests' stand-in): nothing to patch
        (dst / rel).write_text(checked_text(rel, old, count).replace(old, new))
        done.append(f"`{rel}`: `{old}` replaced by `{new}` (generate_fast passed only the new token's mask column "
                    "with the KV cache; transformers 5 then hides the context from each sampled token on this "
                    "model, which the GPT-2 of the reference's transformers did not)")
    return done


def reference_hparams(hp, n_layers: int) -> dict:
    """editlens's ROME hyperparameters as the reference's ``ROMEHyperParams`` (Llama module names)."""
    return dict(
        layers=[hp.layer], fact_token="subject_last", v_num_grad_steps=hp.v_num_grad_steps, v_lr=hp.v_lr,
        v_loss_layer=n_layers - 1, v_weight_decay=hp.v_weight_decay, clamp_norm_factor=hp.clamp_norm_factor,
        kl_factor=hp.kl_factor, mom2_adjustment=True, context_template_length_params=REFERENCE_TEMPLATE_LENGTHS,
        rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
        mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn", ln_f_module="model.norm",
        lm_head_module="lm_head", mom2_dataset="injected-editlens-C", mom2_n_samples=0, mom2_dtype="float64")


def facts(sample_cases=SAMPLE_CASES) -> list[dict]:
    """The six known facts and :data:`SAMPLE_CASES` of the shipped CounterFact sample: ``fact`` (short id),
    ``prompt``, ``subject``, ``target`` (new object)."""
    from editlens.cli.basic import sample_data_path
    from editlens.data.known_facts import known_facts

    out = [dict(fact=f"known{i}:{s}", prompt=t, subject=s, target=new)
           for i, (t, s, _old, new) in enumerate(known_facts())]
    records = {str(r["case_id"]): r["requested_rewrite"] for r in json.loads(sample_data_path().read_text())}
    for cid in sample_cases:
        if cid not in records:
            raise SystemExit(f"--sample-cases: no case {cid!r} in {sample_data_path()} (ids: {', '.join(records)})")
        rr = records[cid]
        out.append(dict(fact=f"cf{cid}:{rr['subject']}", prompt=rr["prompt"], subject=rr["subject"],
                        target=rr["target_new"]["str"]))
    return out


def editlens_deltas(lm, hp, fact_list) -> tuple[dict, dict]:
    """ΔW of editlens's ``rome`` per fact from the unedited model (weights after − before, float64; each edit
    undone and the restore checked bit for bit), and its number of value-optimisation steps."""
    import torch

    from editlens.data.schema import Rewrite, make_case
    from editlens.edit import edit

    name = lm.arch.mlp_out_at(hp.layer)
    W = lm.module(name).weight
    before = W.detach().clone()
    deltas, steps = {}, {}
    for f in fact_list:
        case = make_case(f["fact"], Rewrite(f["prompt"], f["subject"], f["target"]))
        e = edit(lm, [case], "rome", hp)
        deltas[f["fact"]] = W.detach().double().cpu() - before.double().cpu()
        steps[f["fact"]] = int(round(e.diagnostics["loss/steps"]))
        e.undo()
        if not torch.equal(W.detach(), before):
            raise SystemExit("editlens undo did not restore the weights bit for bit")
        print(f"[editlens] {f['fact']}: ‖ΔW‖ {float(deltas[f['fact']].norm()):.4g}, steps {steps[f['fact']]}",
              flush=True)
    return deltas, steps


def compare(a, b) -> dict:
    """Figures of ΔW_editlens ``a`` against ΔW_reference ``b`` (float64)."""
    na, nb = float(a.norm()), float(b.norm())
    return dict(norm_editlens=na, norm_reference=nb, rel_diff=float((a - b).norm()) / nb, norm_ratio=na / nb,
                cosine=float((a * b).sum()) / (na * nb))


def verdict(row: dict) -> bool:
    if row["setting"] == "same_prefixes":
        return float(row["rel_diff"]) <= SAME_REL_TOL
    return abs(float(row["norm_ratio"]) - 1) <= OWN_NORM_TOL and float(row["cosine"]) >= OWN_MIN_COSINE


def write_readme(out: Path, rows: list[dict], meta: dict) -> None:
    """``README.md`` of the results, generated from ``deltas.csv`` and the run's metadata."""
    lines = [
        "# ROME: editlens vs the reference implementation",
        "",
        "Generated by `scripts/rome_reference_check.py` from `deltas.csv` (do not edit by hand). Rerun:",
        "",
        "```",
        "git -C <clone of github.com/kmeng01/rome> archive HEAD | tar -x -C /tmp/romeref/src",
        "python -m venv /tmp/romeref/venv   # its own environment, outside the repository; here it reuses",
        "echo $PWD/.venv/lib/python3.11/site-packages > \\",
        "    /tmp/romeref/venv/lib/python3.11/site-packages/editlens_wheels.pth   # editlens's torch/transformers",
        ".venv/bin/python scripts/rome_reference_check.py --reference-src /tmp/romeref/src \\",
        "    --reference-python /tmp/romeref/venv/bin/python",
        "```",
        "",
        f"This table was made by: `{meta['command']}`.",
        "",
        f"Reference: github.com/kmeng01/rome, tree {meta['reference_tree']}, run by {meta['reference_python']} "
        f"(torch {meta['ref_torch']}, transformers {meta['ref_transformers']}, editlens not imported: "
        f"{not meta['ref_editlens_imported']}). editlens {meta['editlens_version']} (commit {meta['commit']}), "
        f"device {meta['device']}.",
        "",
        f"Model: SmolLM2-135M (editlens's embedded weights saved as a plain checkpoint; the parameter hashes of "
        f"both processes are equal: {meta['same_weights']}). Edited module `{meta['module']}`, each fact edited "
        f"alone from the unedited model. Hyperparameters (editlens's ROME defaults for SmolLM2, given to both): "
        + ", ".join(f"{k} {v}" for k, v in meta["hparams"].items()) + ".",
        "",
        "Given to both tools:",
        "",
        f"* the same second-moment matrix C (editlens's, `{meta['stats']}`): injected into the reference by "
        "replacing `rome.compute_u.layer_stats` (its Wikipedia statistics) in the worker process; the reference "
        "inverts it itself (`torch.inverse`, in float64 as its `mom2_dtype` says, then float32);",
        "* `same_prefixes`: editlens's context prefixes as the reference's context templates (`\"{}\"` and "
        "`prefix + \"{}\"`), by replacing `rome.rome_main.get_context_templates`:",
        "",
    ]
    lines += [f"  - `{t!r}`" for t in meta["editlens_templates"]]
    own = meta["templates"].get("own_prefixes")
    lines += ["", (
        f"* `own_prefixes`: editlens its own (the list above), the reference its own, generated by its "
        f"`get_context_templates` with `context_template_length_params` {REFERENCE_TEMPLATE_LENGTHS} "
        f"(torch seed {meta['seed']}): {len(own)} templates, e.g. " + ", ".join(f"`{t!r}`" for t in own[1:4]) + "."
        if own else "* `own_prefixes`: not run this time (`--settings`)."), ""]
    lines += [
        "Patched in the reference's environment only (a copy of the tree; nothing else changed):",
        "",
    ]
    lines += [f"* {p}" for p in meta["patches"]] or ["* nothing in the source"]
    lines += [
        "* in the worker process, not in the source: `model.config.n_embd = hidden_size` (compute_v sizes δ by "
        "GPT-2's config name); the tokenizer's pad token is its EOS (as the reference's experiment scripts set "
        "it) and padding is on the right (compute_v assumes it); module names of the Llama layout in the "
        "hyperparameters"
        + ("; `datasets` (imported by `rome/layer_stats.py` for its Wikipedia loader, never called here) is a "
           "stub module" if meta["stubbed"] else "") + ".",
        "",
        "## Figures",
        "",
        f"`rel_diff = ‖ΔW_editlens − ΔW_reference‖_F / ‖ΔW_reference‖_F`, `norm_ratio = ‖ΔW_editlens‖_F / "
        f"‖ΔW_reference‖_F`, `cosine` the Frobenius cosine; steps: forward passes of each tool's value "
        f"optimisation. Pass: `same_prefixes` rel_diff ≤ {SAME_REL_TOL:g}; `own_prefixes` |norm_ratio − 1| ≤ "
        f"{OWN_NORM_TOL:g} and cosine ≥ {OWN_MIN_COSINE:g}.",
        "",
        "| fact | setting | ‖ΔW‖ editlens | ‖ΔW‖ reference | rel_diff | norm_ratio | cosine | steps e/r | pass |",
        "|---|---|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        lines.append(f"| {r['fact']} | {r['setting']} | {float(r['norm_editlens']):.4f} | "
                     f"{float(r['norm_reference']):.4f} | {float(r['rel_diff']):.2e} | {float(r['norm_ratio']):.4f} "
                     f"| {float(r['cosine']):.5f} | {r['steps_editlens']}/{r['steps_reference']} | "
                     f"{mark(r)} |")
    lines += ["", "## Summary", ""]
    for setting in ("same_prefixes", "own_prefixes", "reference_vs_itself"):
        rs = [r for r in rows if r["setting"] == setting]
        if not rs:
            continue
        ok = sum(verdict(r) for r in rs)
        worst_rel = max(float(r["rel_diff"]) for r in rs)
        ratios = [float(r["norm_ratio"]) for r in rs]
        cos = [float(r["cosine"]) for r in rs]
        lines.append(f"* `{setting}`: {ok}/{len(rs)} facts " + ("within the own_prefixes thresholds"
                                                                if setting == "reference_vs_itself" else "pass")
                     + f"; largest rel_diff {worst_rel:.2e}; norm_ratio {min(ratios):.6f}–{max(ratios):.6f}; "
                     f"cosine {min(cos):.8f}–{max(cos):.8f}.")
    own = meta["templates"].get("own_prefixes")
    if own:
        lines.append(f"* With its own prefixes each tool averages keys and the target loss over a different set of "
                     f"prompts: editlens {len(meta['editlens_templates'])} (the empty prefix and "
                     f"{len(meta['editlens_templates']) - 1} sampled texts), the reference {len(own)} (the empty "
                     f"prefix and {len(own) - 1} texts its generator samples after `<|endoftext|>`); the formulas "
                     "are compared by `same_prefixes`.")
    yard = {r["fact"]: float(r["cosine"]) for r in rows if r["setting"] == "reference_vs_itself"}
    if yard:
        own_cos = {r["fact"]: float(r["cosine"]) for r in rows if r["setting"] == "own_prefixes"}
        both = [f for f in own_cos if f in yard]
        at_least = sum(own_cos[f] >= yard[f] for f in both)
        lines += [
            "",
            "## Yardstick: the reference against itself",
            "",
            f"`reference_vs_itself` runs the reference twice with its own prefixes, sampled with torch seed "
            f"{meta['seed']} and {meta['yardstick_seed']} (same model, C, hyperparameters and code; only the "
            f"{len(meta['yardstick_templates'] or [])} context templates differ), and compares the two ΔW "
            f"(`‖ΔW‖ editlens` holds the second run there). It measures how far ΔW moves when ROME's context "
            f"templates are sampled again, the agreement that an implementation of the same formulas with its own "
            f"prefixes can be expected to reach.",
            "",
            "| fact | cosine editlens vs reference | cosine reference vs itself |",
            "|---|---:|---:|",
        ]
        lines += [f"| {f} | {own_cos[f]:.5f} | {yard[f]:.5f} |" for f in both]
        lines += [
            "",
            f"* editlens's cosine to the reference is at least the reference's cosine to itself on {at_least}/"
            f"{len(both)} facts; mean {sum(own_cos[f] for f in both) / max(len(both), 1):.4f} vs "
            f"{sum(yard[f] for f in both) / max(len(both), 1):.4f}.",
        ]
    lines.append("")
    (out / "README.md").write_text("\n".join(lines))


def mark(row: dict) -> str:
    if row["setting"] == "reference_vs_itself":
        return "(yardstick)"
    return "yes" if verdict(row) else "**no**"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference-src", type=Path, help="exported work tree of github.com/kmeng01/rome")
    ap.add_argument("--reference-python", type=Path, help="python of the reference's own environment")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/romeref/work"),
                    help="scratch directory outside the repository (model checkpoint, C, patched tree)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the reference's own context templates")
    ap.add_argument("--yardstick-seed", type=int, default=None,
                    help="also run the reference's own templates with this torch seed and compare the reference "
                         "with itself (setting reference_vs_itself): how far two samples of its own prefixes move "
                         "ΔW, the yardstick for own_prefixes")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of each process (1 is fastest on a busy machine)")
    ap.add_argument("--settings", default="same_prefixes,own_prefixes",
                    help="comma-separated subset of same_prefixes,own_prefixes")
    ap.add_argument("--limit", type=int, default=0, help="only the first N facts (0: all)")
    ap.add_argument("--sample-cases", default=",".join(SAMPLE_CASES),
                    help="case ids of the shipped CounterFact sample added after the six known facts")
    ap.add_argument("--own-limit", type=int, default=0,
                    help="own_prefixes only for the first N facts (0: all; the reference's own 21 templates make "
                         "it the slowest part)")
    ap.add_argument("--reference-commit", default="",
                    help="the commit the reference tree was exported from (only printed in the README)")
    ap.add_argument("--stats-n-samples", type=int, default=0,
                    help="documents of editlens's statistics corpus for C (0: editlens's default)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the ΔW of either side saved in --workdir by an earlier run with the same inputs")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.reference_src is None or args.reference_python is None:
        ap.error("--reference-src and --reference-python are required")
    src, py = args.reference_src.resolve(), args.reference_python
    for need in ("rome/compute_v.py", "rome/compute_u.py", "rome/rome_main.py", "globals.yml"):
        if not (src / need).is_file():
            raise SystemExit(f"--reference-src {src}: no {need} (export github.com/kmeng01/rome there)")
    if not (py.is_file() and os.access(py, os.X_OK)):
        raise SystemExit(f"--reference-python {py}: not an executable file")
    settings = [x.strip() for x in args.settings.split(",") if x.strip()]
    if not settings or any(x not in ("same_prefixes", "own_prefixes") for x in settings):
        raise SystemExit(f"--settings {args.settings!r}: a comma-separated subset of same_prefixes,own_prefixes")
    work = args.workdir.resolve()
    if work == ROOT or ROOT in work.parents:
        raise SystemExit(f"--workdir {work} is inside the repository; the reference must run outside it")
    work.mkdir(parents=True, exist_ok=True)

    import torch

    import editlens
    from editlens.edit import get_method, locate

    torch.set_num_threads(args.threads)
    lm = editlens.load_model("smollm2-135m", device=args.device, dtype="float32")
    hp = get_method("rome")().default_hparams(lm)
    if args.stats_n_samples:
        hp = hp.replace(stats_n_samples=args.stats_n_samples)
    fact_list = facts(tuple(x.strip() for x in args.sample_cases.split(",") if x.strip()))[: args.limit or None]
    cov, prefixes = locate.prepare(lm, hp, [hp.layer])
    C = cov[hp.layer].double().cpu()

    model_dir = work / f"smollm2-{lm.fingerprint}"
    if not (model_dir / "config.json").is_file():
        lm.model.save_pretrained(str(model_dir))
        lm.tokenizer.save_pretrained(str(model_dir))
    torch.save(C, work / "C.pt")
    patches = patched_reference_tree(src, work / "reference_src", args.device)
    templates = ["{}"] + [p + "{}" for p in prefixes[1:]]
    if prefixes[0] != "":
        raise SystemExit(f"editlens's first context prefix is {prefixes[0]!r}, expected ''")
    job = dict(src=str(work / "reference_src"), model_dir=str(model_dir), device=args.device,
               attn_implementation=lm.model.config._attn_implementation, cov_path=str(work / "C.pt"),
               hparams=reference_hparams(hp, lm.n_layers), facts=fact_list, seed=args.seed, threads=args.threads,
               own_limit=args.own_limit, patches=patches,  # in the job, so that a reused result had the same patches
               settings={k: v for k, v in (("same_prefixes", templates), ("own_prefixes", None)) if k in settings},
               out_path=str(work / "reference.pt"))

    own_hash = param_hash(lm.model)
    e_path, r_path = work / "editlens.pt", work / "reference.pt"
    e_key = hashlib.sha256((own_hash + json.dumps([fact_list, job["hparams"], prefixes, hp.update_key, hp.v_decay,
                                                   hp.early_stop_on, hp.early_stop_loss, hp.kl_template])).encode()
                           + C.numpy().tobytes()).hexdigest()
    saved = torch.load(e_path, weights_only=True) if args.reuse and e_path.is_file() else None
    if saved is not None and saved["key"] == e_key:
        e_deltas, e_steps = saved["deltas"], saved["steps"]
        print(f"editlens side: reused {e_path}", flush=True)
    else:
        t0 = time.time()
        e_deltas, e_steps = editlens_deltas(lm, hp, fact_list)
        torch.save(dict(key=e_key, deltas=e_deltas, steps=e_steps), e_path)
        print(f"editlens side: {time.time() - t0:.0f} s", flush=True)
    ref = run_worker(py, job, work / "job.json", r_path, work, args.threads, args.reuse, "reference side")
    if ref["param_hash"] != own_hash:
        raise SystemExit("the reference process loaded other weights than editlens's (parameter hashes differ)")
    alt = None
    if args.yardstick_seed is not None:
        if "own_prefixes" not in settings or args.yardstick_seed == args.seed:
            raise SystemExit("--yardstick-seed needs the own_prefixes setting and a seed other than --seed")
        alt_job = dict(job, seed=args.yardstick_seed, settings={"own_prefixes": None},
                       out_path=str(work / "reference_alt.pt"))
        alt = run_worker(py, alt_job, work / "job_alt.json", work / "reference_alt.pt", work, args.threads,
                         args.reuse, "reference side (yardstick seed)")
        if alt["param_hash"] != own_hash:
            raise SystemExit("the reference process loaded other weights than editlens's (parameter hashes differ)")

    rows = []
    for setting in settings:
        for f in fact_list:
            if f"{setting}|{f['fact']}" not in ref["deltas"]:
                continue  # own_prefixes beyond --own-limit
            row = dict(fact=f["fact"], setting=setting,
                       **compare(e_deltas[f["fact"]], ref["deltas"][f"{setting}|{f['fact']}"]),
                       steps_editlens=e_steps[f["fact"]], steps_reference=ref["steps"][f"{setting}|{f['fact']}"])
            rows.append(row)
    if alt is not None:  # the reference (yardstick seed) against the reference (--seed): same formulas, other prompts
        for f in fact_list:
            k = f"own_prefixes|{f['fact']}"
            if k in ref["deltas"] and k in alt["deltas"]:
                rows.append(dict(fact=f["fact"], setting="reference_vs_itself", **compare(alt["deltas"][k],
                                                                                           ref["deltas"][k]),
                                 steps_editlens=alt["steps"][k], steps_reference=ref["steps"][k]))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "deltas.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.10g}" if isinstance(v, float) else v) for k, v in row.items()})
    with open(out / "deltas.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    meta = dict(
        reference_tree=(args.reference_commit or "commit not given") + f", files {_tree_digest(src)}", reference_python=str(py), ref_torch=ref["torch"],
        ref_transformers=ref["transformers"], ref_editlens_imported=ref["editlens_imported"],
        editlens_version=getattr(editlens, "__version__", "?"), commit=commit, device=args.device,
        same_weights=ref["param_hash"] == own_hash, module=lm.arch.mlp_out_at(hp.layer),
        hparams=dict(layer=hp.layer, v_lr=hp.v_lr, v_num_grad_steps=hp.v_num_grad_steps, kl_factor=hp.kl_factor,
                     v_weight_decay=hp.v_weight_decay, clamp_norm_factor=hp.clamp_norm_factor,
                     v_loss_layer=lm.n_layers - 1, kl_template=hp.kl_template, early_stop_loss=hp.early_stop_loss,
                     v_decay=hp.v_decay, early_stop_on=hp.early_stop_on, update_key=hp.update_key),
        stats=f"sampled corpus, {hp.stats_n_samples} documents × {hp.stats_max_length} tokens, seed {hp.seed}",
        command="scripts/rome_reference_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        templates=ref["templates"], editlens_templates=templates, seed=args.seed, patches=patches,
        yardstick_seed=args.yardstick_seed, yardstick_templates=(alt or {}).get("templates", {}).get("own_prefixes"),
        stubbed=ref["stubbed"])
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    write_readme(out, rows, meta)
    for row in rows:
        print(f"{row['fact']:28s} {row['setting']:14s} rel_diff {float(row['rel_diff']):.2e} ratio "
              f"{float(row['norm_ratio']):.4f} cos {float(row['cosine']):.5f} {'ok' if verdict(row) else 'FAIL'}")
    return 0


def run_worker(py: Path, job: dict, job_path: Path, out_path: Path, work: Path, threads: int, reuse: bool,
               label: str) -> dict:
    """Run the reference worker on ``job`` in its own python (or reuse ``out_path`` when ``reuse`` and the job
    file holds the same job); returns what the worker saved."""
    import torch

    job_text = json.dumps(job, indent=1, sort_keys=True)
    if not (reuse and out_path.is_file() and job_path.is_file() and job_path.read_text() == job_text):
        job_path.write_text(job_text)
        out_path.unlink(missing_ok=True)
        t0 = time.time()
        r = subprocess.run([str(py), str(Path(__file__).resolve()), "--worker", str(job_path)], cwd=str(work),
                           env={**os.environ, "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": str(threads)})
        if r.returncode != 0:
            raise SystemExit(f"the reference worker failed (exit {r.returncode})")
        print(f"{label}: {time.time() - t0:.0f} s", flush=True)
    else:
        print(f"{label}: reused {out_path}", flush=True)
    return torch.load(out_path, weights_only=True)  # tensors and plain containers only: a file never runs code


def _tree_digest(src: Path) -> str:
    """sha256 (first 12 hex digits) of the reference's files (path and bytes, sorted): which tree was run."""
    h = hashlib.sha256()
    for p in sorted(q for q in src.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(src)).encode())
        h.update(p.read_bytes())
    return "sha256:" + h.hexdigest()[:12]


if __name__ == "__main__":
    sys.exit(main())
