"""``python -m benchmarks all [--quick] --device cpu|cuda [--model NAME] [--json PATH]``

Runs every benchmark, prints one table of flat figures (each with its naive baseline measured in the same run
and the ratio), and writes them as JSON. Individual suites: ``eval``, ``edit``, ``seq``, ``scr``, ``trace``, ``trained``,
``scale`` (options, resume: ``python -m benchmarks.bench_scale --help``), ``stats``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import Figures

SUITES = {
    "eval": "benchmarks.bench_eval",  # bulk evaluation vs naive per-probe loop, FLOP-bound fraction
    "edit": "benchmarks.bench_edit",  # ROME s/edit, MEMIT 100 (and 1000) batch, statistics one-pass vs per-layer
    "seq": "benchmarks.bench_seq",  # sequential editing: time per edit at edit 10 vs at edit N (no growth)
    "scr": "benchmarks.bench_scr",  # SCR latency per query vs a weight-edited model
    "trace": "benchmarks.bench_trace",  # causal tracing: bulk (batched, layer reuse) vs one restoration per forward
    "trained": "benchmarks.bench_trained",  # MEND/MALMEN: training cost, edit s vs ROME, MALMEN batch vs MEND singles
    "scale": "benchmarks.bench_scale",  # MEMIT/AlphaEdit 1,000-fact batch vs 100, eval 2,000 vs 200 cases, 1,000 seq edits (peak RSS)
    "stats": "benchmarks.bench_stats",  # second-moment statistics on a cold cache: default vs the old 256 x 128
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", nargs="?", default="all", choices=["all", *SUITES])
    ap.add_argument("--quick", action="store_true", help="CI-sized run (small counts; checks every row prints)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--model", default=None, help="model name/path (default: smollm2-135m; on cuda try a config "
                                                  "name such as config:gpt2-xl or config:llama-3-8b)")
    ap.add_argument("--dtype", default=None, help="model dtype (default float32 on cpu, bfloat16 on cuda)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures as flat JSON here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    figs = Figures()
    meta = {"device": args.device, "quick": args.quick, "model": args.model or "smollm2-135m",
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    if args.device.startswith("cuda") and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    failed = []
    for name in suites:
        mod = importlib.import_module(SUITES[name])
        print(f"== {name} ==", flush=True)
        kwargs = {"device": args.device, "quick": args.quick}
        if args.model:
            kwargs["model"] = args.model
        if args.dtype:
            kwargs["dtype"] = args.dtype
        try:
            figs.update(mod.run(**kwargs))
        except Exception as e:  # noqa: BLE001 - one failing suite must not hide the others' figures
            failed.append(name)
            print(f"suite {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
    print()
    print(figs.table())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, **figs.values}, indent=2, sort_keys=True))
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
