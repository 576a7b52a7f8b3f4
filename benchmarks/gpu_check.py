"""One-shot GPU check: ``bash benchmarks/gpu_check.sh [--dry-run] [--json PATH] [--budget-s S]``.

Everything editlens wants to know from a GPU, in one run of at most ``--budget-s`` seconds (default 480), downloading
nothing. Each part runs in its own subprocess (a part that fails or runs out of time cannot take the others with it,
and GPU memory is returned between parts); the figures go to one JSON file and a summary with the targets.

Parts:

1. ``consistency`` — on SmolLM2-135M (the embedded GGUF; when it is not installed on the GPU machine, a model of
   SmolLM2's shape, randomly initialised with a fixed seed, and the JSON says so): six facts edited with ROME (one
   at a time) and MEMIT (one batch), first in float32 on the CPU, then in bfloat16 on CUDA, both with the same
   statistics corpus (sampled once on the CPU and written to a file). The sets of facts whose greedy answer flips to
   the new object must be equal, and ``undo()`` must restore every tensor bit for bit on both devices.
2. ``device_map`` — a model larger than one device, simulated: SmolLM2-135M (tiny-llama when it is not installed)
   loaded with ``device_map`` across ``cuda:0``, ``cpu`` (offloaded: weights in CPU memory, computed on the GPU) and
   ``disk`` (offloaded to a folder), with the edited layers offloaded, against the same model on ``cuda:0`` alone,
   both float32: the second moments, ROME's and MEMIT's edited weights and the logits after each edit must be equal
   (``edits_equal``: bit for bit), and ``undo()`` must restore every tensor, offloaded copies included
   (``undo_exact``). See :mod:`editlens.lm.placement`.
3. ``eval:<config>`` — the bulk evaluator against the naive per-probe loop (``benchmarks.bench_eval``) on randomly
   initialised GPT2-XL and Llama-3-8B configurations: speed-up and fraction of the forward FLOP bound.
4. ``edit:<config>`` — ROME seconds per edit (3 edits after a warm-up; statistics cached first) and a 1,000-case
   MEMIT batch: wall time and peak CUDA memory.

Targets (issue 19): bulk ≥ 30× the naive loop and ≥ 60% of the FLOP bound on Llama-3-8B, ≥ 35% on GPT2-XL; ROME
≤ 3 s/edit on Llama-3-8B on an H100-class GPU; consistency equal and undo exact.

``--dry-run`` runs the same orchestration on the CPU at toy size (tiny-llama instead of SmolLM2, float32 vs bfloat16
on the CPU, ``device_map`` across ``cpu`` and ``disk`` on tiny-llama, the paper-size configurations only built on
the meta device and counted, one evaluation and one editing part on tiny-llama) so that a CPU machine checks the script's own setup; ``make test`` runs it
(tests/unit/test_gpu_check.py). Without ``--dry-run`` and without CUDA the script stops at once with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from editlens.data.known_facts import known_facts

#: (template, subject, true object, new object) — facts SmolLM2-135M-Instruct answers correctly
FACTS = known_facts()
CONFIGS = ("config:gpt2-xl", "config:llama-3-8b")
TARGETS = {  # (part, figure, comparison, threshold)
    "bulk_vs_naive_llama": ("eval:config:llama-3-8b", "eval_speedup_vs_naive", ">=", 30.0),
    "flop_bound_llama": ("eval:config:llama-3-8b", "eval_fraction_of_flop_bound", ">=", 0.60),
    "flop_bound_gpt2xl": ("eval:config:gpt2-xl", "eval_fraction_of_flop_bound", ">=", 0.35),
    "rome_s_per_edit_llama": ("edit:config:llama-3-8b", "rome_s_per_edit", "<=", 3.0),
    "flips_equal": ("consistency", "flips_equal", ">=", 1.0),
    "undo_exact": ("consistency", "undo_exact", ">=", 1.0),
    "device_map_edits_equal": ("device_map", "edits_equal", ">=", 1.0),
    "device_map_undo_exact": ("device_map", "undo_exact", ">=", 1.0),
}


# --------------------------------------------------------------------------------------------- parts (subprocess)
def _snapshot(lm) -> dict:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _same(lm, snap: dict) -> bool:
    import torch

    sd = lm.model.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in snap)


def _flips(lm, cases, method: str, hp: dict) -> tuple[list[bool], bool]:
    """Edit (ROME: one case at a time; MEMIT: one batch); which rewrite prompts now greedily answer the new object;
    whether undo restored every tensor bit for bit."""
    from editlens.edit import edit
    from editlens.lm import ops

    snap = _snapshot(lm)
    flipped: list[bool] = []
    exact = True
    groups = [[c] for c in cases] if method == "rome" else [list(cases)]
    for group in groups:
        e = edit(lm, group, method, **hp)
        prompts = [c.rewrite.text for c in group]
        gens = ops.generate(lm, prompts, max_new_tokens=6)
        flipped += [g.strip().startswith(c.rewrite.target_new.strip()[:4]) for g, c in zip(gens, group)]
        e.undo()
        exact = exact and _same(lm, snap)
    return flipped, exact


def part_consistency(dry_run: bool, workdir: Path) -> dict:
    import torch

    from benchmarks.common import load_bench_model
    from editlens.data.schema import Rewrite, make_case
    from editlens.edit.stats import sampled_corpus
    from editlens.lm.load import installed_models

    if dry_run:
        model, ref, test = "tiny-llama", ("cpu", "float32"), ("cpu", "bfloat16")
    else:
        model = ("smollm2-135m" if installed_models().get("smollm2-135m") == "installed"
                 else "config:smollm2-135m")
        ref, test = ("cpu", "float32"), ("cuda", "bfloat16")
    facts = FACTS[:2] if dry_run else FACTS
    cases = [make_case(f"g{i}", Rewrite(t, s, new, old)) for i, (t, s, old, new) in enumerate(facts)]
    lm = load_bench_model(model, *ref)
    # one statistics corpus for both devices: sampled once here (float32, CPU), written to a file
    n_docs, length = (16, 32) if dry_run else (96, 64)
    docs = sampled_corpus(lm, n_docs, length, seed=0)
    corpus = workdir / "gpu-check-corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    hp = dict(stats_corpus=str(corpus), stats_n_samples=n_docs, stats_max_length=length,
              stats_dir=str(workdir / "stats"))
    if dry_run:
        hp.update(n_prefixes=1, prefix_length=4, v_num_grad_steps=4)
    out: dict = {"model": model, "model_is_random": model.startswith("config:") or model.startswith("tiny"),
                 "ref": "/".join(ref), "test": "/".join(test), "facts": len(cases)}
    res = {}
    for dev, dt in (ref, test):
        if dev != lm.device.type or str(next(lm.model.parameters()).dtype) != f"torch.{dt}":
            del lm
            lm = load_bench_model(model, dev, dt)
        for method in ("rome", "memit"):
            t0 = time.perf_counter()
            flips, exact = _flips(lm, cases, method, hp)
            if dev == "cuda":
                torch.cuda.synchronize()
            res[(dev, dt, method)] = flips
            out[f"{method}_{dev}_{dt}_flipped"] = sum(flips)
            out[f"{method}_{dev}_{dt}_undo_exact"] = float(exact)
            out[f"{method}_{dev}_{dt}_s"] = time.perf_counter() - t0
    out["flips_equal"] = float(all(res[(*ref, m)] == res[(*test, m)] for m in ("rome", "memit")))
    out["undo_exact"] = float(all(v for k, v in out.items() if k.endswith("_undo_exact")))
    return out


def _device_map(n_layers: int, edited: set[int], dry_run: bool) -> dict:
    """Embeddings, head and most layers on GPU 0; the edited layers offloaded to ``cpu`` (to ``disk`` in the dry
    run, where ``cpu`` is the main device and not an offload); the two layers after them on ``disk``."""
    main = "cpu" if dry_run else 0
    after = {max(edited) + 1, max(edited) + 2} & set(range(n_layers))
    dmap = {"model.embed_tokens": main, "model.rotary_emb": main, "model.norm": main, "lm_head": main}
    for l in range(n_layers):
        dmap[f"model.layers.{l}"] = ("disk" if dry_run else "cpu") if l in edited else "disk" if l in after else main
    return dmap


def part_device_map(dry_run: bool, workdir: Path) -> dict:
    import torch

    import editlens
    from editlens.data.schema import Rewrite, make_case
    from editlens.edit import edit
    from editlens.edit.stats import sampled_corpus, second_moment
    from editlens.lm import placement
    from editlens.lm.load import installed_models

    model = "smollm2-135m" if not dry_run and installed_models().get("smollm2-135m") == "installed" else "tiny-llama"
    device = "cpu" if dry_run else "cuda"
    ref = editlens.load_model(model, device, "float32")
    facts = FACTS[:1] if dry_run else FACTS[:4]
    cases = [make_case(f"d{i}", Rewrite(t, s, new, old)) for i, (t, s, old, new) in enumerate(facts)]
    n_docs, length = (16, 32) if dry_run else (64, 64)
    corpus = workdir / "device-map-corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in sampled_corpus(ref, n_docs, length, seed=0)))
    hp = dict(stats_corpus=str(corpus), stats_n_samples=n_docs, stats_max_length=length,
              stats_dir=str(workdir / "stats-device-map"))
    if dry_run:
        hp.update(n_prefixes=1, prefix_length=4, v_num_grad_steps=4)
    from editlens.edit import get_method

    hps = {m: get_method(m).hparams_class.for_model(ref) for m in ("rome", "memit")}
    edited = {hps["rome"].layer, *hps["memit"].layers}
    dmap = _device_map(ref.n_layers, edited, dry_run)
    lm = editlens.load_model(model, dtype="float32", device_map=dmap, offload_dir=workdir / "offload")
    out: dict = {"model": model, "device_map": {str(k): str(v) for k, v in dmap.items()},
                 "offloaded_modules": len(placement.offloaded_modules(lm.model)), "edited_layers": sorted(edited)}

    def values(m) -> dict:
        return {k: v.detach().to("cpu", copy=True) for k, v in placement.state_tensors(m.model)}

    def logits(m):
        enc = m.tokenizer([c.rewrite.text for c in cases], return_tensors="pt", padding=True).to(m.device)
        with torch.no_grad():
            return m.model(**enc).logits.float().cpu()

    before = values(ref)
    layers = sorted(edited)
    a = second_moment(ref, layers, corpus=str(corpus), n_samples=n_docs, max_length=length, use_cache=False,
                      progress=False, out_dtype=torch.float64)
    b = second_moment(lm, layers, corpus=str(corpus), n_samples=n_docs, max_length=length, use_cache=False,
                      progress=False, out_dtype=torch.float64)
    out["second_moment_max_abs_diff"] = max(float((a[l].cpu() - b[l].cpu()).abs().max()) for l in layers)
    equal, exact, diffs = out["second_moment_max_abs_diff"] == 0.0, True, []
    for method in ("rome", "memit"):
        t0 = time.perf_counter()
        e = edit(lm, cases, method, **hp)
        if device == "cuda":
            torch.cuda.synchronize()
        out[f"{method}_dispatched_s"] = time.perf_counter() - t0
        e_ref = edit(ref, cases, method, **hp)
        va, vb = values(ref), values(lm)
        diff = max(float((va[k] - vb[k]).abs().max()) for k in va)
        ldiff = float((logits(ref) - logits(lm)).abs().max())
        out[f"{method}_weight_max_abs_diff"], out[f"{method}_logits_max_abs_diff"] = diff, ldiff
        equal = equal and diff == 0.0 and ldiff == 0.0
        e.undo()
        e_ref.undo()
        vb = values(lm)
        exact = exact and all(torch.equal(vb[k], before[k]) for k in before)
    out["edits_equal"] = float(equal)
    out["undo_exact"] = float(exact)
    return out


def part_eval(config: str, dry_run: bool) -> dict:
    from benchmarks import bench_eval
    from benchmarks.common import config_n_params

    if dry_run:
        figs = bench_eval.run(device="cpu", model="tiny-llama", n_cases=3, quick=True)
        figs["config_n_params"] = config_n_params(config)  # built on the meta device: the config is valid
        return figs
    figs = bench_eval.run(device="cuda", model=config, n_cases=200)
    figs["config_n_params"] = config_n_params(config)
    return figs


def part_edit(config: str, dry_run: bool, workdir: Path) -> dict:
    import torch

    from benchmarks.bench_edit import _cases
    from benchmarks.common import config_n_params, load_bench_model, peak_memory, sync
    from editlens.edit import edit

    device = "cpu" if dry_run else "cuda"
    lm = load_bench_model("tiny-llama" if dry_run else config, device=device)
    hp = dict(stats_n_samples=16 if dry_run else 128, stats_max_length=32 if dry_run else 64,
              stats_dir=str(workdir / "stats"))
    if dry_run:
        hp.update(n_prefixes=1, prefix_length=4, v_num_grad_steps=4)
    n_batch = 3 if dry_run else 1000
    out: dict = {"config_n_params": config_n_params(config), "memit_batch": n_batch}
    edit(lm, _cases(1), "rome", **hp).undo()  # statistics and prefixes cached: the timings below are edits only
    n_rome = 1 if dry_run else 3
    sync(device)
    t0 = time.perf_counter()
    for c in _cases(n_rome + 1)[1:]:
        edit(lm, [c], "rome", **hp).undo()
    sync(device)
    out["rome_s_per_edit"] = (time.perf_counter() - t0) / n_rome
    edit(lm, _cases(1), "memit", **hp).undo()
    with peak_memory(device) as mem:
        t0 = time.perf_counter()
        e = edit(lm, _cases(n_batch), "memit", **hp)
        sync(device)
    out["memit_batch_s"] = time.perf_counter() - t0
    out["memit_batch_peak_mib"] = mem["mib"]
    e.undo()
    if device == "cuda":
        out["gpu_total_mib"] = torch.cuda.get_device_properties(0).total_memory / 2**20
    return out


def _run_part(name: str, dry_run: bool, workdir: str) -> dict:
    wd = Path(workdir)
    if name == "consistency":
        return part_consistency(dry_run, wd)
    if name == "device_map":
        return part_device_map(dry_run, wd)
    kind, config = name.split(":", 1)
    if kind == "eval":
        return part_eval(config, dry_run)
    if kind == "edit":
        return part_edit(config, dry_run, wd)
    raise ValueError(f"unknown part {name!r}")


# --------------------------------------------------------------------------------------------- driver
def parts() -> list[str]:
    return ["consistency", "device_map", *(f"eval:{c}" for c in reversed(CONFIGS)), *(f"edit:{c}" for c in reversed(CONFIGS))]


def check_targets(results: dict) -> dict[str, dict]:
    """``{target: {value, threshold, ok}}``; ``ok`` is None where the part did not produce the figure."""
    out = {}
    for name, (part, fig, cmp, thr) in TARGETS.items():
        v = results.get(part, {}).get(fig) if isinstance(results.get(part), dict) else None
        ok = None if v is None else (v >= thr if cmp == ">=" else v <= thr)
        out[name] = {"part": part, "figure": fig, "value": v, "target": f"{cmp} {thr}", "ok": ok}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="check the setup on a CPU machine at toy size")
    ap.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="where the figures go")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-time budget of the whole check")
    ap.add_argument("--only", action="append", default=None, help=f"run only these parts ({', '.join(parts())})")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part, print JSON
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        res = _run_part(args.part, args.dry_run, args.workdir)
        print("GPU_CHECK_RESULT " + json.dumps(res), flush=True)
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); use --dry-run on a CPU "
              "machine", file=sys.stderr)
        return 2
    # the dry run checks each code path once: one configuration per part kind (both are counted in meta)
    todo = args.only or ([p for p in parts() if p in ("consistency", "device_map") or p.endswith(CONFIGS[-1])]
                         if args.dry_run
                         else parts())
    unknown = [p for p in todo if p not in parts()]
    if unknown:
        print(f"gpu_check: unknown part(s) {unknown}; known: {parts()}", file=sys.stderr)
        return 2
    meta = {"dry_run": args.dry_run, "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget_s}
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
    from benchmarks.common import config_n_params

    meta["config_n_params"] = {c: config_n_params(c) for c in CONFIGS}  # each built on the meta device
    results: dict = {}
    t_start = time.monotonic()
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    with tempfile.TemporaryDirectory(prefix="editlens-gpu-check-") as wd:
        for part in todo:
            left = args.budget_s - (time.monotonic() - t_start)
            if left < 10:
                results[part] = {"status": "skipped: budget spent"}
                print(f"[gpu_check] {part}: skipped (budget spent)", flush=True)
                continue
            cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--part", part, "--workdir", wd]
            if args.dry_run:
                cmd.append("--dry-run")
            print(f"[gpu_check] {part} ({left:.0f} s left)", flush=True)
            t0 = time.monotonic()
            try:
                proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=left)
            except subprocess.TimeoutExpired:
                results[part] = {"status": f"timeout after {left:.0f} s"}
                print(f"[gpu_check] {part}: timed out", flush=True)
                continue
            lines = [l for l in proc.stdout.splitlines() if l.startswith("GPU_CHECK_RESULT ")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
                results[part] = {"status": f"failed (exit {proc.returncode})", "error_tail": tail}
                print(f"[gpu_check] {part}: FAILED\n  " + "\n  ".join(tail), flush=True)
                continue
            results[part] = {"status": "ok", "wall_s": time.monotonic() - t0,
                             **json.loads(lines[-1][len("GPU_CHECK_RESULT "):])}
            print(f"[gpu_check] {part}: ok in {time.monotonic() - t0:.1f} s", flush=True)
    targets = check_targets(results)
    report = {"meta": meta, "parts": results, "targets": targets,
              "wall_s": time.monotonic() - t_start}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, sort_keys=True, default=float))
    print("\n== targets ==")
    for name, t in targets.items():
        mark = {True: "PASS", False: "MISS", None: "n/a "}[t["ok"]]
        val = "—" if t["value"] is None else f"{t['value']:.4g}"
        print(f"{mark}  {name:<24} {val:>10}  {t['target']}  ({t['part']}: {t['figure']})")
    print(f"\nwrote {args.json} in {report['wall_s']:.0f} s")
    failed = [p for p, r in results.items() if r.get("status") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
