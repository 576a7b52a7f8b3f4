"""Paper-size runs in bounded memory (issue 19 §2): MEMIT/AlphaEdit batches of N facts, evaluation of many cases,
a sequential run to 1,000 edits — each against its small counterpart measured in the same run.

``python -m benchmarks scale [--quick] --device cpu`` (defaults) or, with every option,
``python -m benchmarks.bench_scale [--quick] [--device cpu] [--model NAME] [--state DIR] [--n 1000] [--base-n 100]
[--eval-cases 2000] [--eval-base 200] [--eval-chunk 100] [--seq-edits 1000] [--v-steps K] [--seq-v-steps 5]
[--v-chunk-size C] [--only edit,eval,seq] [--methods memit,alphaedit]`` prints and returns:

* ``scale.{memit,alphaedit}_batch{n}_s`` / ``..._peak_mib`` for the small batch (100) and the large one (N =
  1,000), ``scale.{method}_time_ratio`` (large / small; linear scaling gives N/100) and
  ``scale.{method}_peak_ratio`` (target: the large batch's peak ≤ 8 GiB; the value optimisation runs in chunks
  of ``v_chunk_size`` facts, so its memory does not grow with N);
* ``scale.eval{n}_s`` / ``..._peak_mib`` for 200 and 2,000 cases evaluated with ``gt`` + ``gtfree`` against the
  base (``evaluate(chunk_cases=..., on_rows=...)``, rows written to a SQLite store chunk by chunk, no base cache),
  and ``scale.eval_peak_ratio`` (target ≈ 1: peak independent of the number of cases);
* ``scale.seq_s_per_edit_at_10`` (mean over edits 1–10), ``scale.seq_s_per_edit_at_{N}`` (mean over the last 10)
  and ``scale.seq_growth`` (target ≤ 1.5) of a sequential AlphaEdit run of N edits (1,000);
* ``scale.v_num_grad_steps_batch`` / ``scale.v_num_grad_steps_seq``: the value optimisation's step budget used
  (the sequential run is shortened to 5 steps and 2 prefixes by default, as ``bench_seq``: growth, not speed, is
  measured there; ``--v-steps`` shortens the batches too, and the output says so).

Every configuration runs in its own subprocess, so each peak RSS (``VmHWM`` after the model is loaded and the
statistics are cached: the edit or the evaluation alone, model weights included) is its own. Results go to the
state directory (``--state``, default ``~/.cache/editlens/bench-scale/<model>``, a temporary one with
``--quick``) as one JSON file per configuration; a configuration with a result file is not run again, and the
sequential run saves its weights and AlphaEdit's accumulated state every ``--seq-save-every`` edits and resumes
from there. So the full run (hours on 2 CPU cores) can be started in the background and restarted after an
interruption: ``nohup python -m benchmarks.bench_scale --state DIR > scale.log 2>&1 &``; ``--only`` picks parts,
``--methods`` the batch methods of the edit part.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: statistics for editing, as in bench_edit (cached before any timing)
FAST = dict(stats_n_samples=128, stats_max_length=64)
QUICK_FAST = dict(stats_n_samples=16, stats_max_length=32)


# ============================================================================================ workers (subprocess)
def _cases(n: int, seed: int):
    from editlens.data import synthetic_cases

    cases = list(synthetic_cases(n, seed=seed))[:n]
    if len(cases) < n:
        raise ValueError(f"the synthetic generator gave {len(cases)} cases, the benchmark needs {n}")
    return cases


def _load(args):
    from benchmarks.common import load_bench_model

    return load_bench_model(args.model, device=args.device, dtype=args.dtype)


def _hp(args, seq: bool = False) -> dict[str, Any]:
    hp = dict(QUICK_FAST if args.quick else FAST)
    steps = args.seq_v_steps if seq else args.v_steps
    if steps:
        hp["v_num_grad_steps"] = int(steps)
    if seq:
        hp["n_prefixes"] = 2
    elif getattr(args, "v_chunk_size", None) is not None:
        hp["v_chunk_size"] = int(args.v_chunk_size)
    elif args.quick:
        hp["v_chunk_size"] = 4  # the quick batches (6 and 12 facts) go through the chunked value optimisation
    return hp


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def worker_prepare(args) -> dict:
    """Second moments and context prefixes into the statistics cache (not timed by any configuration)."""
    from editlens.edit import edit

    lm = _load(args)
    edit(lm, _cases(1, 0), "memit", progress=False, **_hp(args)).undo()
    return {"ok": 1.0}


def worker_edit(args) -> dict:
    from benchmarks.common import peak_memory, sync
    from editlens.edit import edit

    lm = _load(args)
    cases = _cases(args.n, 0)
    hp = _hp(args)
    with peak_memory(args.device) as mem:
        t0 = time.perf_counter()
        e = edit(lm, cases, args.method, progress=not args.quick, **hp)
        sync(args.device)
        wall = time.perf_counter() - t0
    diag = e.diagnostics
    e.undo()
    return {"s": wall, "peak_mib": mem["mib"], "n": args.n, "v_chunk_size": float(e.hparams.v_chunk_size),
            "v_num_grad_steps": float(e.hparams.v_num_grad_steps), "loss_nll": float(diag.get("loss/nll", "nan"))}


def worker_eval(args) -> dict:
    from benchmarks.common import peak_memory
    from editlens.evaluate import evaluate
    from editlens.runs.store import Store
    from editlens.system import ModelSystem

    lm = _load(args)
    cases = _cases(args.n, 2)
    system, base = ModelSystem(lm), ModelSystem(lm)  # two systems: base and evaluated answered separately
    db = Path(args.out).with_suffix(".sqlite")
    if db.exists():
        db.unlink()
    store = Store(db)
    run_id, unit = f"scale-eval-{args.n}", "eval"
    store.start_run(run_id, {"benchmark": "scale", "cases": args.n})
    store.start_unit(run_id, unit)
    chunks = [0]

    def sink(rows) -> None:  # one transaction per chunk of cases (benchmark layout: step = chunk index)
        chunks[0] += 1
        store.commit_step(run_id, unit, chunks[0], [(chunks[0], 0, *r) for r in rows])

    with peak_memory(args.device) as mem:
        t0 = time.perf_counter()
        res = evaluate(system, cases, base=base, metrics=["gt", "gtfree"], cache=False, progress=False,
                       chunk_cases=args.eval_chunk, on_rows=sink)
        wall = time.perf_counter() - t0
    n_rows = int(store.rows(run_id).shape[0])
    store.close()
    if n_rows != res.meta["n_rows"] or n_rows == 0:
        raise RuntimeError(f"store holds {n_rows} rows, the evaluation produced {res.meta['n_rows']}")
    return {"s": wall, "peak_mib": mem["mib"], "n": args.n, "rows": float(n_rows), "chunks": float(chunks[0])}


def worker_seq(args) -> dict:
    """A sequential AlphaEdit run of ``args.n`` edits, saved every ``args.seq_save_every`` edits into
    ``<state>/seq-ckpt.pt`` (:func:`editlens.edit.save_sequence`: the edited weights, the run's accumulated method
    state, the random-number state, plus the per-edit seconds so far) and resumed from there
    (``edit_sequential(..., resume=load_sequence(...))``: a file of tensors and plain containers, read with
    ``weights_only=True``); ``args.stop_after`` ends the process after that many edits in total (for testing the
    resume)."""
    from benchmarks.common import peak_memory, sync
    from editlens.edit import edit_sequential, load_sequence, save_sequence

    lm = _load(args)
    cases = _cases(args.n, 1)
    ckpt = Path(args.out).with_name("seq-ckpt.pt")
    hp = _hp(args, True)
    config = {"n": args.n, "hp": hp, "model": args.model}
    times: list[float] = []
    resume = None
    if ckpt.exists():
        resume = load_sequence(ckpt)
        extra = resume.get("extra") or {}
        if extra.get("config") != config:
            raise RuntimeError(f"{ckpt} belongs to another configuration ({extra.get('config')}); remove it or use "
                               "another --state")
        times = [float(t) for t in extra.get("times", [])]
        if len(times) != resume["n_edits"]:
            raise RuntimeError(f"{ckpt}: {len(times)} edit times for {resume['n_edits']} edits")
    done = len(times)
    stamp = [time.perf_counter()]
    stop = args.stop_after or args.n

    class _Stop(Exception):
        pass

    def cb(step: int, n_edits: int, so_far) -> None:
        sync(args.device)
        now = time.perf_counter()
        times.append(now - stamp[0])
        if n_edits % args.seq_save_every == 0 or n_edits in (args.n, stop):
            save_sequence(so_far, ckpt, config=config, times=list(times))
        if not args.quick and n_edits % 50 == 0:
            print(f"seq: {n_edits}/{args.n} edits, last edit {times[-1]:.2f} s", flush=True)
        if n_edits >= stop and n_edits < args.n:
            raise _Stop
        stamp[0] = time.perf_counter()  # the checkpoint's save is not part of the next edit's time

    if done < args.n and done < stop:
        with peak_memory(args.device) as mem:
            stamp[0] = time.perf_counter()
            try:
                edit_sequential(lm, cases, "alphaedit", batch_size=1, callback=cb, progress=False, resume=resume,
                                **hp)
            except _Stop:
                pass
        peak = mem["mib"]
    else:
        peak = float("nan")
    return {"done": float(len(times)), "times": times,
            "n": args.n, "resumed": float(resume is not None), "peak_mib": peak,
            "complete": float(len(times) >= args.n)}


WORKERS = {"prepare": worker_prepare, "edit": worker_edit, "eval": worker_eval, "seq": worker_seq}


# ============================================================================================ driver
def _spawn(args, kind: str, out: Path, **extra: Any) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--worker", kind, "--out", str(out),
           "--device", args.device, "--model", args.model]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.quick:
        cmd.append("--quick")
    for k in ("v_steps", "seq_v_steps", "eval_chunk", "seq_save_every", "v_chunk_size"):
        v = getattr(args, k)
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "EDITLENS_STATS_DIR": os.environ.get("EDITLENS_STATS_DIR", str(Path(args.state) / "stats"))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {kind} {extra} failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def _cached(args, kind: str, name: str, **extra: Any) -> dict:
    out = Path(args.state) / f"{name}.json"
    if out.exists():
        got = json.loads(out.read_text())
        print(f"scale: {name} from {out} (measured earlier)", flush=True)
        return got
    print(f"scale: running {name} ...", flush=True)
    return _spawn(args, kind, out, **extra)


def run(device: str = "cpu", model: str = "smollm2-135m", quick: bool = False, dtype: str | None = None,
        state: str | None = None, n: int | None = None, base_n: int | None = None, eval_cases: int | None = None,
        eval_base: int | None = None, eval_chunk: int | None = None, seq_edits: int | None = None,
        v_steps: int | None = None, seq_v_steps: int | None = 5, seq_save_every: int | None = None,
        only: str = "edit,eval,seq", v_chunk_size: int | None = None,
        methods: str = "memit,alphaedit") -> dict[str, float]:
    """Run (or resume) the scale benchmark; returns ``{figure: value}``."""
    if quick:
        n, base_n = n or 12, base_n or 6
        eval_cases, eval_base, eval_chunk = eval_cases or 24, eval_base or 12, eval_chunk or 6
        seq_edits, v_steps, seq_save_every = seq_edits or 24, v_steps or 3, seq_save_every or 7
        seq_v_steps = 2
    n, base_n = n or 1000, base_n or 100
    eval_cases, eval_base, eval_chunk = eval_cases or 2000, eval_base or 200, eval_chunk or 100
    seq_edits, seq_save_every = seq_edits or 1000, seq_save_every or 50
    if state is None:
        state = (tempfile.mkdtemp(prefix="editlens-scale-") if quick else
                 str(Path.home() / ".cache" / "editlens" / "bench-scale" / model.replace("/", "_").replace(":", "_")))
    Path(state).mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(device=device, model=model, quick=quick, dtype=dtype, state=state, v_steps=v_steps,
                              seq_v_steps=seq_v_steps, eval_chunk=eval_chunk, seq_save_every=seq_save_every,
                              v_chunk_size=v_chunk_size)
    parts = {p.strip() for p in only.split(",") if p.strip()}
    bad = parts - {"edit", "eval", "seq"}
    if bad:
        raise ValueError(f"--only: unknown part(s) {sorted(bad)}; use edit, eval, seq")
    batch_methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not batch_methods or set(batch_methods) - {"memit", "alphaedit"}:
        raise ValueError(f"--methods: {methods!r}; use memit, alphaedit or both")
    print(f"scale: state in {state}", flush=True)
    if v_steps:
        print(f"scale: value optimisation shortened to v_num_grad_steps={v_steps} in the batches (speed and memory "
              "are measured, not edit quality)", flush=True)
    if "seq" in parts:
        print(f"scale: sequential run with v_num_grad_steps={seq_v_steps or 'default'} and 2 prefixes (per-edit "
              "time growth is measured, not edit quality)", flush=True)
    out: dict[str, float] = {}
    if parts & {"edit", "seq"}:
        _cached(args, "prepare", "prepare")
    if "edit" in parts:
        for method in batch_methods:
            got = {k: _cached(args, "edit", f"edit-{method}-{k}", method=method, n=k) for k in (base_n, n)}
            for k, g in got.items():
                out[f"scale.{method}_batch{k}_s"] = g["s"]
                out[f"scale.{method}_batch{k}_peak_mib"] = g["peak_mib"]
            out[f"scale.{method}_time_ratio"] = got[n]["s"] / got[base_n]["s"]
            out[f"scale.{method}_peak_ratio"] = got[n]["peak_mib"] / got[base_n]["peak_mib"]
            out[f"scale.{method}_v_chunk_size"] = got[n]["v_chunk_size"]
            out["scale.v_num_grad_steps_batch"] = got[n]["v_num_grad_steps"]
    if "eval" in parts:
        got = {k: _cached(args, "eval", f"eval-{k}", n=k) for k in (eval_base, eval_cases)}
        for k, g in got.items():
            out[f"scale.eval{k}_s"] = g["s"]
            out[f"scale.eval{k}_peak_mib"] = g["peak_mib"]
            out[f"scale.eval{k}_rows"] = g["rows"]
        out["scale.eval_time_ratio"] = got[eval_cases]["s"] / got[eval_base]["s"]
        out["scale.eval_peak_ratio"] = got[eval_cases]["peak_mib"] / got[eval_base]["peak_mib"]
    if "seq" in parts:
        out_path = Path(state) / f"seq-{seq_edits}.json"
        if out_path.exists() and json.loads(out_path.read_text()).get("complete"):
            g = json.loads(out_path.read_text())
            print(f"scale: seq-{seq_edits} from {out_path} (measured earlier)", flush=True)
        else:
            if quick:  # exercise the resume: stop half-way, then a second process finishes the run
                _spawn(args, "seq", out_path, n=seq_edits, stop_after=seq_edits // 2)
            g = _spawn(args, "seq", out_path, n=seq_edits)
        times = g["times"]
        if len(times) < seq_edits:
            raise RuntimeError(f"sequential run stopped at {len(times)} of {seq_edits} edits")
        early, late = sum(times[:10]) / 10, sum(times[-10:]) / 10
        out["scale.seq_s_per_edit_at_10"] = early
        out[f"scale.seq_s_per_edit_at_{seq_edits}"] = late
        out["scale.seq_growth"] = late / early
        out["scale.seq_resumed"] = g["resumed"]
        out["scale.v_num_grad_steps_seq"] = float(seq_v_steps or 0)
    from benchmarks.common import print_figures

    print_figures(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--state", default=None, help="directory of results and the sequential checkpoint (resume)")
    ap.add_argument("--n", type=int, default=None, help="large batch / number of cases of a worker")
    ap.add_argument("--base-n", type=int, default=None, help="small batch (100)")
    ap.add_argument("--eval-cases", type=int, default=None)
    ap.add_argument("--eval-base", type=int, default=None)
    ap.add_argument("--eval-chunk", type=int, default=None, help="cases per evaluation chunk (100)")
    ap.add_argument("--seq-edits", type=int, default=None)
    ap.add_argument("--v-steps", type=int, default=None, help="v_num_grad_steps of the batches (default: method's)")
    ap.add_argument("--seq-v-steps", type=int, default=5, help="v_num_grad_steps of the sequential run (5)")
    ap.add_argument("--v-chunk-size", type=int, default=None,
                    help="v_chunk_size of the batches (default: the method's, 100; 0 = unchunked, for comparison)")
    ap.add_argument("--seq-save-every", type=int, default=None, help="checkpoint the sequential run every K edits")
    ap.add_argument("--only", default="edit,eval,seq", help="comma-separated parts: edit, eval, seq")
    ap.add_argument("--methods", default="memit,alphaedit", help="batch methods of the edit part: memit, alphaedit")
    # worker mode (internal: one configuration per subprocess)
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default="memit", help=argparse.SUPPRESS)
    ap.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        import torch

        torch.manual_seed(0)
        res = WORKERS[a.worker](a)
        _write(Path(a.out), res)
        return 0
    run(device=a.device, model=a.model, quick=a.quick, dtype=a.dtype, state=a.state, n=a.n, base_n=a.base_n,
        eval_cases=a.eval_cases, eval_base=a.eval_base, eval_chunk=a.eval_chunk, seq_edits=a.seq_edits,
        v_steps=a.v_steps, seq_v_steps=a.seq_v_steps, seq_save_every=a.seq_save_every, only=a.only,
        v_chunk_size=a.v_chunk_size, methods=a.methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
