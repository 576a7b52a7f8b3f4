"""Why IKE flips few unseen facts on SmolLM2, and what a faithful configuration achieves (issue 17).

Six CounterFact-style facts SmolLM2-135M-Instruct answers correctly (editlens/resources/known_facts.json when
present, else the list below) are edited to a counterfactual object, **one at a time** (as a new user edits one
fact) or all six in one batch, under IKE configurations that differ in where the demonstrations come from, how
many there are (k) and the prompt format:

* ``own``: demonstrations built from the edited cases only (editlens's IKE before this study). With one edited
  case there is no other case to draw from, so the query sees the new fact and no demonstration at all.
* ``synthetic``: a separate pool of demonstrations from 64 fictional cases (``editlens.synthetic_cases``:
  copy, update and retain demonstrations), as the paper draws them from a training split.
* ``counterfact``: the shipped CounterFact sample as the pool (real facts; a demonstration about the query's
  subject is excluded).

Modes: ``single`` (one fact edited at a time), ``batch`` (the six at once, rewrite prompts only: copy
demonstrations of the other five), ``batch-rich`` (the six at once, each with a paraphrase and two neighbourhood
probes as a CounterFact record has: copy, update and retain demonstrations of the other five).

For each edit: ``flipped`` = the greedy continuation (4 tokens) of the rewrite prompt starts with the new object;
``kept`` = of the other five facts' prompts, asked while this one fact is edited, how many still start with their
true object (IKE conditions every prompt on the most similar edited fact, so this is its locality cost).

Writes ``results/ike_unseen/summary.csv`` (one row per configuration) and ``results/ike_unseen/answers.csv``.
Run: ``python scripts/ike_unseen.py [--quick]``.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FACTS = [("The capital of {} is", "Japan", "Tokyo", "Madrid"),
         ("{} was written by", "Romeo and Juliet", "William Shakespeare", "Charles Dickens"),
         ("{} was painted by", "The Mona Lisa", "Leonardo da Vinci", "Pablo Picasso"),
         ("The official language of {} is", "France", "French", "Spanish"),
         ("The chemical symbol for {} is", "gold", "Au", "Ag"),
         ("{} is located in the city of", "The Eiffel Tower", "Paris", "Rome")]
MAX_NEW = 4
#: per fact: a paraphrase of the rewrite prompt and two neighbourhood prompts (same relation, other subject, with
#: their true answers) — the probes a CounterFact record carries, from which IKE builds update and retain
#: demonstrations
PROBES = {"Japan": ("Japan's capital city is", [("The capital of France is", "Paris"), ("The capital of Italy is", "Rome")]),
          "Romeo and Juliet": ("The author of Romeo and Juliet is", [("Pride and Prejudice was written by", "Jane Austen"),
                                                                     ("Oliver Twist was written by", "Charles Dickens")]),
          "The Mona Lisa": ("The artist who painted The Mona Lisa is", [("The Starry Night was painted by", "Vincent van Gogh"),
                                                                        ("Guernica was painted by", "Pablo Picasso")]),
          "France": ("The language spoken in France is", [("The official language of Germany is", "German"),
                                                          ("The official language of Italy is", "Italian")]),
          "gold": ("The symbol of the element gold is", [("The chemical symbol for silver is", "Ag"),
                                                         ("The chemical symbol for iron is", "Fe")]),
          "The Eiffel Tower": ("The Eiffel Tower can be found in the city of", [("The Colosseum is located in the city of", "Rome"),
                                                                                ("Big Ben is located in the city of", "London")])}


def known_facts() -> list[tuple[str, str, str, str]]:
    try:
        from editlens.resources import known_facts as kf  # type: ignore[attr-defined]

        return [tuple(x) for x in kf()]  # pragma: no cover - when the shared resource exists
    except Exception:  # noqa: BLE001
        return FACTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="raw format, k in (8,), fewer configurations")
    ap.add_argument("--out", default=str(REPO / "results" / "ike_unseen"))
    ap.add_argument("--only", default=None, help="comma-separated configurations format:pool:mode:k to run (rows of "
                                                 "other configurations already in summary.csv are kept)")
    ap.add_argument("--render", action="store_true", help="only write docs/ike-unseen.md from summary.csv")
    args = ap.parse_args()
    if args.render:
        render(Path(args.out), REPO / "docs" / "ike-unseen.md")
        return

    import torch

    import editlens
    from editlens.data.schema import Rewrite, make_case
    from editlens.edit.ike import IKEHParams, IKESystem
    from editlens.system import ModelSystem

    torch.manual_seed(0)
    lm = editlens.load_model("smollm2-135m")
    facts = known_facts()
    plain = [make_case(f"ik{i}", Rewrite(t, s, new, old)) for i, (t, s, old, new) in enumerate(facts)]
    from editlens.data.schema import Probe

    rich = [make_case(f"ik{i}", Rewrite(t, s, new, old), {
        "paraphrase": [Probe(PROBES[s][0], new, old)],
        "neighborhood": [Probe(p, a) for p, a in PROBES[s][1]]}) if s in PROBES else c
        for i, ((t, s, old, new), c) in enumerate(zip(facts, plain))]
    cases = plain
    prompts = [c.rewrite.text for c in cases]
    base = ModelSystem(lm).generate(prompts, max_new_tokens=MAX_NEW)
    known = [g.strip().startswith(c.rewrite.target_true) for g, c in zip(base, cases)]
    print("base answers:", base, "known:", known, flush=True)
    pools = {"own": [], "synthetic": editlens.synthetic_cases(64, seed=11)}
    cf_path = REPO / "editlens" / "resources" / "data" / "counterfact_sample.json"
    subjects = {c.rewrite.subject.lower() for c in cases}
    pools["counterfact"] = [c for c in editlens.load_cases(cf_path) if c.rewrite.subject.lower() not in subjects]
    configs = []
    for fmt in (("raw",) if args.quick else ("raw", "chat")):
        configs.append((fmt, "own", "batch", 8))
        configs.append((fmt, "own", "single", 8))
        for k in ((8,) if args.quick else (8, 16, 32)):
            configs.append((fmt, "synthetic", "single", k))
        if not args.quick:
            configs.append((fmt, "counterfact", "single", 16))
    if args.only:
        want = [tuple(x.split(":")) for x in args.only.split(",")]
        configs = [(f, p, m, int(k)) for f, p, m, k in want]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, answers = [], []
    done = {(f, p, m, k) for f, p, m, k in configs}
    for name, acc in (("summary.csv", rows), ("answers.csv", answers)):  # resume: keep other configurations' rows
        if (out / name).is_file():
            with open(out / name, newline="") as f:
                acc.extend(r for r in csv.DictReader(f)
                           if (r["format"], r["pool"], r["mode"], int(r["k"])) not in done)
    for fmt, pool, mode, k in configs:
        t0 = time.perf_counter()
        hp = IKEHParams.for_model(lm).replace(k=k)
        flipped, kept, demos = [], [], []
        groups = ([rich] if mode == "batch-rich" else [cases] if mode == "batch" else [[c] for c in cases])
        for group in groups:
            system = IKESystem(ModelSystem(lm, prompt_format=fmt), hp, demo_cases=pools[pool])
            system.add_cases(group)
            gens = system.generate(prompts, max_new_tokens=MAX_NEW)
            edited = {c.case_id for c in group}
            for c, g in zip(cases, gens):
                if c.case_id in edited:
                    flipped.append(g.strip().startswith(c.rewrite.target_new))
                    answers.append({"format": fmt, "pool": pool, "mode": mode, "k": k, "case": c.case_id,
                                    "role": "edited", "answer": g.strip(), "target_new": c.rewrite.target_new})
                elif not mode.startswith("batch"):
                    kept.append(g.strip().startswith(c.rewrite.target_true))
            demos.append(sum(system.demo_counts.values()))
        row = {"format": fmt, "pool": pool, "mode": mode, "k": k, "flipped": sum(flipped), "n": len(flipped),
               "kept": sum(kept) if kept else "", "n_kept": len(kept) if kept else "",
               "demos_per_query": round(sum(demos) / max(1, len(prompts) * len(groups)), 2),
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(out / "summary.csv", "w", newline="") as f:  # rewritten after every configuration
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        with open(out / "answers.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(answers[0]))
            w.writeheader()
            w.writerows(answers)
    render(out, REPO / "docs" / "ike-unseen.md")


MODE_TEXT = {"single": "one fact at a time", "batch": "six at once, rewrite prompts only",
             "batch-rich": "six at once, with paraphrase + 2 neighbourhood probes each"}
POOL_TEXT = {"own": "the other edited cases", "synthetic": "64 fictional cases (separate pool)",
             "counterfact": "shipped CounterFact sample"}


def render(out: Path, page: Path) -> None:
    """Write ``page`` (Markdown) from ``out/summary.csv``: the table and the reading of it."""
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    order = {"single": 0, "batch": 1, "batch-rich": 2}
    rows.sort(key=lambda r: (r["format"], order.get(r["mode"], 9), r["pool"], int(r["k"])))
    lines = ["<!-- generated by scripts/ike_unseen.py --render from results/ike_unseen/summary.csv: do not edit by "
             "hand -->", "# IKE on facts it has not seen (SmolLM2-135M-Instruct)", "",
             "Six CounterFact-style facts the model answers correctly (capital of Japan, author of Romeo and Juliet, "
             "painter of the Mona Lisa, language of France, symbol of gold, city of the Eiffel Tower) are edited to "
             "a counterfactual object. *flipped*: the greedy continuation (4 tokens) of the rewrite prompt starts "
             "with the new object. *kept* (one fact at a time only): of the other five facts' prompts, asked while "
             "one fact is edited, how many still give their true object. Source: `scripts/ike_unseen.py`, raw "
             "figures in `results/ike_unseen/` (`answers.csv` has every answer).", "",
             "| format | edited | demonstrations from | k | demos / query | flipped | kept |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = f"{r['kept']}/{r['n_kept']}" if r["kept"] not in ("", None) else "—"
        lines.append(f"| {r['format']} | {MODE_TEXT.get(r['mode'], r['mode'])} | {POOL_TEXT.get(r['pool'], r['pool'])} "
                     f"| {r['k']} | {float(r['demos_per_query']):.1f} | {r['flipped']}/{r['n']} | {kept} |")
    def fl(fmt: str, pool: str, mode: str, k: int = 8) -> str:
        r = next((r for r in rows if (r["format"], r["pool"], r["mode"], int(r["k"])) == (fmt, pool, mode, k)), None)
        return f"{r['flipped']}/{r['n']}" if r else "not run"

    lines += ["", "## Reading", "",
              f"* **No reproduction of \"1 of 6\" on these facts.** Edited one at a time with no demonstration at all "
              f"(a lone edit has no other case to draw demonstrations from), IKE flips {fl('raw', 'own', 'single')} "
              f"(raw) and {fl('chat', 'own', 'single')} (chat): SmolLM2-135M does follow a new fact stated in context.",
              f"* **What hurts is where the demonstrations come from.** Edited together, each case's demonstrations "
              f"are the other edited cases: rewrite prompts only (copy demonstrations) flip {fl('raw', 'own', 'batch')}"
              f" in raw format; CounterFact-like cases that also carry neighbourhood probes add *retain* "
              f"demonstrations of the same relation (\"New Fact: <another edit> / Prompt: The capital of France is "
              f"Paris\"), the most similar to the query, and flip {fl('raw', 'own', 'batch-rich')} (k = 8) and "
              f"{fl('raw', 'own', 'batch-rich', 32)} (k = 32); the facts that fail then answer their old object (`answers.csv`), "
              f"consistent with the model copying the retain pattern.",
              f"* **A faithful configuration** draws demonstrations from a separate pool, as the paper draws them from "
              f"a training split: `demo_pool=\"synthetic:64\"` (fictional facts, copy/update/retain) flips "
              f"{fl('raw', 'synthetic', 'single')} in raw format and {fl('chat', 'synthetic', 'single')} in the chat "
              "format, while the other facts' prompts keep their answers as often as without demonstrations.",
              "* The chat format is more robust here than raw text: the instruction in the user turn states that the "
              "new fact must be used.",
              "* editlens's default stays `demo_pool=\"edited\"` (figures elsewhere in the docs were made with it); "
              "use `demo_pool=\"synthetic:64\"` when edited cases carry neighbourhood probes of the edited relations, "
              "or when you edit one fact at a time and want demonstrations.",
              "* Six facts are a small sample: one fact more or less is within noise; the pattern (retain "
              "demonstrations of the same relation from other edits hurt, a separate pool does not) is what the runs "
              "show, not a precise rate.",
              "", "Not every configuration was run (each costs minutes to tens of minutes on the shared 2-core CPU); "
              "the table lists those that were."]
    page.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
