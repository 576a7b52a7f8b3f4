"""Sequential editing with ``rome`` (the reference key) vs ``r-rome`` (the consistent key): issue 16's comparison.

For each method, ``--n`` facts (the six known facts of ``editlens/resources/known_facts.json`` first, then
fictional facts of ``editlens.synthetic_cases``) are written one after the other into SmolLM2 with the method's
default hyperparameters (layer 4). Recorded:

* after **every** edit (``per_edit.csv``): the norm ‖ΔW_i‖ of that edit's own update, whether that edit took
  (greedy continuation of its rewrite prompt starts with the new object), and the perplexity of the held-out text
  (``ppl``). An edit is counted as **disabling** when the perplexity after it is at least ``--disable-factor``
  (default 2) times the perplexity before it — Gupta et al.'s "disabling edit": one update that breaks the model;
* at the checkpoints (``summary.csv``): efficacy on the **early edits** (the first ``--early`` cases: ``s_acc``,
  greedy continuation starts with the new object, and ``c_acc``, P(new) > P(old), on their rewrite prompts),
  ``hidden_rank`` (``hidden_rank@L`` at the edited layer L: effective rank of its hidden states on the held-out
  text, edited / base),
  ``delta_spectrum`` of the edited layer (‖ΔW‖_F and σ₁…σ₄ of the accumulated change), perplexity ratio to the
  base, the number of disabling edits so far and the wall time.

Rows are appended as they are measured, so an interrupted run leaves its partial results.

    .venv/bin/python scripts/rome_vs_rrome.py --n 50 --out results/rome_vs_rrome
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUMMARY_FIELDS = ["method", "layer", "n_edits", "early_n", "early_s_acc", "early_c_acc", "hidden_rank", "delta_fro",
                  "delta_s1", "delta_s2", "delta_s3", "delta_s4", "ppl", "ppl_ratio", "n_disabling", "max_step_norm",
                  "median_step_norm", "wall_s"]
PER_EDIT_FIELDS = ["method", "edit", "case_id", "step_delta_norm", "took", "ppl", "ppl_jump", "disabling", "wall_s"]


def cases_for(n: int):
    from editlens.data.known_facts import known_fact_cases
    from editlens.data.synthetic import synthetic_cases

    known = known_fact_cases()
    return (known + synthetic_cases(max(0, n - len(known)), seed=0))[:n]


def _append(path: Path, fields: list[str], row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in fields})


def _metric(res, metric: str, kind: str | None = None, case_id: str | None = None) -> float:
    df = res.to_pandas()
    df = df[df.metric == metric]
    if kind is not None:
        df = df[df.probe_kind == kind]
    if case_id is not None:
        df = df[df.case_id == case_id]
    return float(df.value.mean()) if len(df) else float("nan")


def run_method(lm, method: str, cases, args, out: Path) -> None:
    import statistics

    from editlens.edit import edit_sequential, get_method
    from editlens.evaluate import ModelSystem, evaluate

    base = ModelSystem(lm)
    layer = get_method(method).hparams_class.for_model(lm).layer
    ppl_base = _metric(evaluate(base, cases[:1], metrics=["ppl"], progress=False), "ppl")
    state = {"ppl_prev": ppl_base, "norms": [], "disabling": 0, "t0": time.monotonic()}
    checkpoints = set(args.checkpoints)

    def callback(step, n_edits, run):
        case = cases[n_edits - 1]
        norm = float(run.diagnostics.get(f"delta_norm/{layer}", float("nan")))
        state["norms"].append(norm)
        gen = run.system.generate([case.rewrite.text], max_new_tokens=6)[0]
        took = gen.strip().startswith(case.rewrite.target_new)
        ppl = _metric(evaluate(run.system, cases[:1], metrics=["ppl"], progress=False), "ppl")
        jump = ppl / state["ppl_prev"]
        disabling = jump >= args.disable_factor
        state["disabling"] += int(disabling)
        state["ppl_prev"] = ppl
        wall = time.monotonic() - state["t0"]
        _append(out / "per_edit.csv", PER_EDIT_FIELDS, dict(
            method=method, edit=n_edits, case_id=case.case_id, step_delta_norm=f"{norm:.6g}", took=int(took),
            ppl=f"{ppl:.6g}", ppl_jump=f"{jump:.4g}", disabling=int(disabling), wall_s=f"{wall:.1f}"))
        print(f"[{method}] edit {n_edits}: |dW_i|={norm:.4g} took={took} ppl={ppl:.4g} (x{jump:.3g}) "
              f"{wall:.0f}s", flush=True)
        if n_edits not in checkpoints:
            return
        early = cases[:min(args.early, n_edits)]
        res = evaluate(run.system, early, base=base, metrics=["s_acc", "c_acc"], progress=False)
        col = evaluate(run.system, cases[:1], base=base, metrics=[f"hidden_rank@{layer}", "delta_spectrum"],
                       progress=False)
        cid = f"mlp_out:{layer}"
        row = dict(method=method, layer=layer, n_edits=n_edits, early_n=len(early),
                   early_s_acc=f"{_metric(res, 's_acc', 'rewrite'):.4f}",
                   early_c_acc=f"{_metric(res, 'c_acc', 'rewrite'):.4f}",
                   hidden_rank=f"{_metric(col, f'hidden_rank@{layer}'):.5f}",
                   delta_fro=f"{_metric(col, 'delta_spectrum', case_id=cid):.5g}",
                   **{f"delta_s{i}": f"{_metric(col, f'delta_spectrum_s{i}', case_id=cid):.5g}" for i in range(1, 5)},
                   ppl=f"{ppl:.5g}", ppl_ratio=f"{ppl / ppl_base:.4f}", n_disabling=state["disabling"],
                   max_step_norm=f"{max(state['norms']):.5g}",
                   median_step_norm=f"{statistics.median(state['norms']):.5g}", wall_s=f"{wall:.0f}")
        _append(out / "summary.csv", SUMMARY_FIELDS, row)
        print(f"[{method}] checkpoint {n_edits}: {row}", flush=True)

    run = edit_sequential(lm, cases, method, callback=callback)
    run.undo()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=50, help="number of sequential edits")
    ap.add_argument("--methods", default="rome,r-rome")
    ap.add_argument("--checkpoints", default="1,5,10,20,30,40,50")
    ap.add_argument("--early", type=int, default=10, help="efficacy is measured on the first EARLY edits")
    ap.add_argument("--disable-factor", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "rome_vs_rrome")
    args = ap.parse_args(argv)
    args.checkpoints = sorted({int(x) for x in args.checkpoints.split(",") if int(x) <= args.n} | {args.n})
    import editlens

    args.out.mkdir(parents=True, exist_ok=True)
    lm = editlens.load_model(args.model)
    cases = cases_for(args.n)
    for method in args.methods.split(","):
        run_method(lm, method.strip(), cases, args, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
