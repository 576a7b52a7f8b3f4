"""Sequential editing with ``rome`` (the reference key) vs ``r-rome`` (the consistent key): issue 16's comparison.

For each method, ``--n`` facts (the six known facts of ``editlens/resources/known_facts.json`` first, then
fictional facts of ``editlens.synthetic_cases``) are written one after the other into SmolLM2 with the method's
default hyperparameters (layer 4), except the context prefixes when ``--prefixes`` is given (``settings.json``
records the settings; a resumed run must use the same). Recorded:

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

Rows are appended as they are measured, so an interrupted run leaves its partial results, and running the same
command again **resumes** it: a method's edits already in ``per_edit.csv`` are re-applied (the same cases in the same
order with the same seed: the same weights) without being measured again, and the run goes on from the first edit
not recorded; a checkpoint row missing from ``summary.csv`` is measured when its edit is reached. (``wall_s`` of a
resumed run continues from the last recorded figure and so also counts the re-application.)

    .venv/bin/python scripts/rome_vs_rrome.py --n 50 --out results/rome_vs_rrome
"""
from __future__ import annotations

import argparse
import csv
import json
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


def _recorded(path: Path, method: str) -> list[dict]:
    """The rows of ``path`` for ``method`` (none when the file does not exist)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["method"] == method]


def run_method(lm, method: str, cases, args, out: Path) -> None:
    import statistics

    from editlens.edit import edit_sequential, get_method
    from editlens.evaluate import ModelSystem, evaluate

    base = ModelSystem(lm)
    layer = get_method(method).hparams_class.for_model(lm).layer
    ppl_base = _metric(evaluate(base, cases[:1], metrics=["ppl"], progress=False), "ppl")
    # resume: the edits and checkpoints already recorded (rows in edit order, as appended)
    done = {int(r["edit"]): r for r in _recorded(out / "per_edit.csv", method)}
    done_marks = {int(r["n_edits"]) for r in _recorded(out / "summary.csv", method)}
    if list(done) != list(range(1, len(done) + 1)):
        raise SystemExit(f"{out / 'per_edit.csv'}: the rows of {method!r} are not edits 1..N in order; remove them "
                         f"to rerun that method")
    state = {"ppl_prev": ppl_base, "norms": [], "disabling": 0, "t0": time.monotonic()}
    if done:
        last = done[len(done)]
        state["t0"] -= float(last["wall_s"])
        print(f"[{method}] resuming after edit {len(done)} (re-applying the recorded edits)", flush=True)
    checkpoints = set(args.checkpoints)
    if len(done) >= len(cases) and checkpoints <= done_marks:
        print(f"[{method}] complete: {len(done)} edits recorded", flush=True)
        return

    def callback(step, n_edits, run):
        case = cases[n_edits - 1]
        norm = float(run.diagnostics.get(f"delta_norm/{layer}", float("nan")))
        if n_edits in done:  # recorded before: restore the running figures from the row, measure nothing
            r = done[n_edits]
            if abs(float(r["step_delta_norm"]) - norm) > 1e-4 * max(1.0, abs(norm)):
                raise SystemExit(f"[{method}] edit {n_edits}: ‖ΔW_i‖ = {norm:.6g} re-applied, {r['step_delta_norm']} "
                                 f"recorded: the resumed run does not reproduce the recorded one")
            state["norms"].append(norm)
            state["disabling"] += int(r["disabling"])
            state["ppl_prev"] = float(r["ppl"])
            if n_edits in checkpoints and n_edits not in done_marks:  # killed between the two rows: measure it
                ppl_now = _metric(evaluate(run.system, cases[:1], metrics=["ppl"], progress=False), "ppl")
                _checkpoint(run, n_edits, ppl_now, time.monotonic() - state["t0"])
            return
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
        _checkpoint(run, n_edits, ppl, wall)

    def _checkpoint(run, n_edits: int, ppl: float, wall: float) -> None:
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

    run = edit_sequential(lm, cases, method, callback=callback, **args.hparams)
    run.undo()


README_BEGIN, README_END = "<!-- rrome:begin -->", "<!-- rrome:end -->"


def _fmt(x: str, spec: str) -> str:
    try:
        return format(float(x), spec)
    except (TypeError, ValueError):
        return "—"


def render_table(out: Path, n_target: int | None = None) -> str:
    """The comparison table (Markdown) generated from ``summary.csv`` and ``per_edit.csv`` in ``out``, with a line
    saying how many edits each method has recorded (and PARTIAL when fewer than ``n_target``)."""
    summary = {m: _recorded(out / "summary.csv", m) for m in ("rome", "r-rome")}
    per_edit = {m: _recorded(out / "per_edit.csv", m) for m in ("rome", "r-rome")}
    done = {m: len(rows) for m, rows in per_edit.items()}
    lines = ["| method | edits | early `s_acc` | early `c_acc` | `hidden_rank` (edited / base) | ‖ΣΔW‖_F | σ₁ / σ₂ of ΣΔW "
             "| ppl / base | disabling edits | max ‖ΔW_i‖ | median ‖ΔW_i‖ |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, rows in summary.items():
        for r in sorted(rows, key=lambda r: int(r["n_edits"])):
            try:
                ratio = float(r["delta_s1"]) / float(r["delta_s2"])
                s12 = f"{ratio:.3g}"
            except (ValueError, ZeroDivisionError):
                s12 = "—"
            lines.append(f"| `{m}` | {r['n_edits']} (first {r['early_n']}) | {_fmt(r['early_s_acc'], '.2f')} | "
                         f"{_fmt(r['early_c_acc'], '.2f')} | {_fmt(r['hidden_rank'], '.4f')} | "
                         f"{_fmt(r['delta_fro'], '.4g')} | {s12} | {_fmt(r['ppl_ratio'], '.3f')} | "
                         f"{r['n_disabling']} | {_fmt(r['max_step_norm'], '.4g')} | "
                         f"{_fmt(r['median_step_norm'], '.4g')} |")
    status = ", ".join(f"`{m}` {n} edit{'s' if n != 1 else ''}" for m, n in done.items())
    partial = n_target is not None and any(n < n_target for n in done.values())
    head = (f"**PARTIAL** (of {n_target} edits per method): {status} recorded so far; rerun the same command to "
            f"resume." if partial else f"Recorded: {status}.")
    took = {m: sum(int(r["took"]) for r in rows) for m, rows in per_edit.items()}
    took_line = "Edits that took when written (greedy continuation starts with the new object): " + ", ".join(
        f"`{m}` {took[m]}/{done[m]}" for m in per_edit) + "."
    return "\n".join([head, "", *lines, "", took_line])


def _recorded_settings(path: Path) -> dict:
    """``settings.json``; a run recorded before ``prefix_start`` existed sampled its prefixes after MEMIT's seed
    words (the only start then), which is said explicitly here so that it resumes with the same prefixes."""
    settings = json.loads(path.read_text())
    hp = settings.get("hparams") or {}
    if "prefix_groups" in hp and "prefix_start" not in hp:
        settings["hparams"] = {**hp, "prefix_start": "words"}
    return settings


def render(out: Path, n_target: int | None, readme: Path | None) -> None:
    """Write ``out/README.md`` (generated) and, with ``readme``, the table between :data:`README_BEGIN` and
    :data:`README_END` of that file."""
    table = render_table(out, n_target)
    settings = _recorded_settings(out / "settings.json") if (out / "settings.json").exists() else {}
    groups = (settings.get("hparams") or {}).get("prefix_groups")
    start = (settings.get("hparams") or {}).get("prefix_start")
    prefixes = (f"**context prefixes `prefix_groups={groups}`, `prefix_start={start!r}`** for both methods "
                f"({1 + sum(c for _, c in groups)} prompts with the empty one"
                + (", sampled after MEMIT's seed words" if start == "words" else "")
                + ", instead of the reference ROME's 21 sampled after `<|endoftext|>`, to fit the CPU budget; R-ROME "
                "changes the key, not the prefixes)") if groups else "the methods' default context prefixes"
    table = f"Settings: {settings.get('model', '?')}, {prefixes}.\n\n{table}"
    (out / "README.md").write_text(
        "# rome vs r-rome, sequential (scripts/rome_vs_rrome.py)\n\n"
        "Generated by `python scripts/rome_vs_rrome.py --render` from `summary.csv` (checkpoint rows) and "
        "`per_edit.csv` (one row per edit); do not edit by hand. SmolLM2-135M, default hyperparameters (layer 4; context prefixes as the Settings line says), "
        "the six known facts then fictional synthetic facts, written one after the other. Early efficacy is on "
        "the first 10 facts (fewer before 10 edits); `hidden_rank` is the effective rank of the edited layer's "
        "hidden states on the shipped held-out text, edited / base; ΣΔW is the accumulated change of the edited "
        "matrix; a *disabling* edit multiplies the held-out perplexity by ≥ 2 at once (Gupta et al.).\n\n"
        f"{table}\n\nRerun / resume: `.venv/bin/python scripts/rome_vs_rrome.py --n 50 --out results/rome_vs_rrome`, "
        "then `--render --readme`.\n")
    if readme is not None:
        text = readme.read_text()
        if README_BEGIN not in text or README_END not in text:
            raise SystemExit(f"{readme}: markers {README_BEGIN} / {README_END} not found")
        a, rest = text.split(README_BEGIN, 1)
        _, b = rest.split(README_END, 1)
        readme.write_text(f"{a}{README_BEGIN}\n{table}\n{README_END}{b}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--render", action="store_true", help="only write the generated README.md of --out (and, with "
                    "--readme, the README table) from the recorded CSV files; run nothing")
    ap.add_argument("--readme", nargs="?", const=ROOT / "README.md", type=Path, default=None,
                    help="with --render: also replace the table between the rrome markers of this README")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=50, help="number of sequential edits")
    ap.add_argument("--methods", default="rome,r-rome")
    ap.add_argument("--checkpoints", default="1,5,10,20,30,40,50")
    ap.add_argument("--early", type=int, default=10, help="efficacy is measured on the first EARLY edits")
    ap.add_argument("--disable-factor", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "rome_vs_rrome")
    ap.add_argument("--prefixes", default="",
                    help="context prefix groups LENGTH:COUNT[,LENGTH:COUNT...] for both methods (default: the methods' "
                         "own, the reference ROME's 5:10,10:10); e.g. 10:5 for MEMIT's six prompts, 3.5x cheaper")
    ap.add_argument("--prefix-start", choices=("words", "document"), default=None,
                    help="what the context prefixes are sampled after, for both methods (default: the methods' own, "
                         "'document', with their default prefixes; 'words', MEMIT's, with --prefixes)")
    args = ap.parse_args(argv)
    try:
        groups = [[int(x) for x in g.split(":")] for g in args.prefixes.split(",") if g.strip()]
        if any(len(g) != 2 or min(g) < 1 for g in groups):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--prefixes {args.prefixes!r}: expected LENGTH:COUNT[,LENGTH:COUNT...], e.g. 10:5") from None
    args.hparams = {"prefix_groups": groups} if groups else {}
    start = args.prefix_start or ("words" if groups else None)
    if start is not None:
        args.hparams["prefix_start"] = start
    args.checkpoints = sorted({int(x) for x in args.checkpoints.split(",") if int(x) <= args.n} | {args.n})
    if args.render:
        render(args.out, args.n, args.readme)
        return 0
    import editlens

    args.out.mkdir(parents=True, exist_ok=True)
    meta_path = args.out / "settings.json"
    settings = {"model": args.model, "n": args.n, "hparams": args.hparams, "disable_factor": args.disable_factor,
                "early": args.early}
    if meta_path.exists() and _recorded_settings(meta_path) != settings:
        raise SystemExit(f"{meta_path} records other settings ({meta_path.read_text().strip()}); use another --out or "
                         f"remove that folder")
    meta_path.write_text(json.dumps(settings, sort_keys=True) + "\n")
    lm = editlens.load_model(args.model)
    cases = cases_for(args.n)
    for method in args.methods.split(","):
        run_method(lm, method.strip(), cases, args, args.out)
    render(args.out, args.n, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
