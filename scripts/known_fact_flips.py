"""How many of the six known facts each method flips on SmolLM2-135M (issue 16's efficacy figures).

    .venv/bin/python scripts/known_fact_flips.py [--methods lora,kn,melo,r-rome,rome] [--out results/known_fact_flips]

The six facts of ``editlens/resources/known_facts.json`` (SmolLM2 answers each correctly, greedy) are edited in
**one batch** with each method's defaults (KN with the settings of ``tests/integration/test_lora_kn_smollm.py``:
layers 10–29 attributed, two prefixed prompts, to bound the integrated gradients' CPU time). Per fact
(``flips.csv``): the greedy continuation (4 new tokens) of the rewrite prompt after the edit, whether it starts with
the new object (``flipped``), and whether the undo restored every tensor of the state dict bit for bit
(``undo_exact``, per method). ``README.md`` is generated from the CSV (one row per method: flipped / 6, the
method's edit time and its diagnostics of interest). A method already in ``flips.csv`` is not run again (delete
its rows to rerun it); ``--render`` only regenerates the README.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIELDS = ["method", "case_id", "prompt", "target_true", "target_new", "continuation", "flipped", "undo_exact",
          "edit_s", "settings"]
#: the KN settings of the integration test (layers 10..29 of 30, two prefixed prompts)
SETTINGS = {"kn": dict(layers=list(range(10, 30)), n_prompts=2)}
MAX_NEW = 4


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run_method(lm, method: str, cases, out: Path) -> None:
    import torch

    from editlens.edit import edit

    state = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    kw = SETTINGS.get(method, {})
    t0 = time.perf_counter()
    e = edit(lm, cases, method, **kw)
    edit_s = time.perf_counter() - t0
    try:
        gens = e.system.generate([c.rewrite.text for c in cases], max_new_tokens=MAX_NEW)
    finally:
        e.undo()
    now = lm.model.state_dict()
    exact = list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())
    new = not (out / "flips.csv").exists()
    with (out / "flips.csv").open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for c, g in zip(cases, gens):
            w.writerow(dict(method=method, case_id=c.case_id, prompt=c.rewrite.text, target_true=c.rewrite.target_true,
                            target_new=c.rewrite.target_new, continuation=g,
                            flipped=int(g.strip().startswith(c.rewrite.target_new)), undo_exact=int(exact),
                            edit_s=f"{edit_s:.1f}", settings=repr(kw) if kw else "defaults"))
    print(f"{method}: {sum(g.strip().startswith(c.rewrite.target_new) for c, g in zip(cases, gens))}/{len(cases)} "
          f"flipped, undo exact: {exact}, {edit_s:.0f} s", flush=True)


def render(out: Path) -> str:
    """``out/README.md`` from ``flips.csv``; returns the table."""
    rows = _rows(out / "flips.csv")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| method | flipped (of the 6 known facts, one batch) | undo bit-exact | edit wall time (s; a shared machine: not a benchmark) "
             "| settings |", "|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        lines.append(f"| `{m}` | {sum(int(r['flipped']) for r in rs)} / {len(rs)} | "
                     f"{'yes' if all(r['undo_exact'] == '1' for r in rs) else 'NO'} | {rs[0]['edit_s']} | "
                     f"{rs[0]['settings']} |")
    table = "\n".join(lines)
    per_fact = ["| method | prompt | true → new | continuation | flipped |", "|---|---|---|---|---|"]
    for r in rows:
        cont = r["continuation"].replace("|", "\\|").replace("\n", " ")
        per_fact.append(f"| `{r['method']}` | {r['prompt']} | {r['target_true']} → {r['target_new']} | {cont!r} | "
                        f"{'yes' if r['flipped'] == '1' else 'no'} |")
    (out / "README.md").write_text(
        "# Known facts flipped on SmolLM2-135M (scripts/known_fact_flips.py)\n\n"
        "Generated from `flips.csv`; do not edit by hand. The six facts of `editlens/resources/known_facts.json`, "
        f"edited in one batch with each method's defaults; a fact is flipped when the greedy continuation ({MAX_NEW} "
        "tokens) of its rewrite prompt starts with the new object. Rerun: `.venv/bin/python "
        "scripts/known_fact_flips.py` (methods already recorded are kept).\n\n"
        f"{table}\n\n## Per fact\n\n" + "\n".join(per_fact) + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="lora,kn,melo,r-rome,rome")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "known_fact_flips")
    ap.add_argument("--render", action="store_true", help="only regenerate README.md from flips.csv")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.render:
        import editlens
        from editlens.data.known_facts import known_fact_cases

        done = {r["method"] for r in _rows(args.out / "flips.csv")}
        todo = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() not in done]
        if todo:
            lm = editlens.load_model(args.model)
            cases = known_fact_cases()
            from editlens.lm import ops

            gens = ops.generate(lm, [c.rewrite.text for c in cases], max_new_tokens=MAX_NEW)
            wrong = [(c.case_id, g) for c, g in zip(cases, gens) if not g.strip().startswith(c.rewrite.target_true)]
            if wrong and args.model == "smollm2-135m":
                raise SystemExit(f"the unedited model does not answer these known facts: {wrong}")
            for m in todo:
                run_method(lm, m, cases, args.out)
    print(render(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
