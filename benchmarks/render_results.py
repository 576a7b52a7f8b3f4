"""Copy committed benchmark outputs into benchmarks/RESULTS.md, so that its figures are never typed by hand.

    python -m benchmarks.render_results            # rewrite the embedded blocks of RESULTS.md
    python -m benchmarks.render_results --check    # exit 1 when a block differs from its file (run by the tests)

A block of RESULTS.md is delimited by ``<!-- file:NAME -->`` and ``<!-- /file:NAME -->``, ``NAME`` a file of
``benchmarks/results/`` (the verbatim output of ``python -m benchmarks <suite> ... > benchmarks/results/NAME``);
the block becomes that file's text in a ``text`` code fence. Prose around the blocks may quote figures only by
pointing at a block. A marker naming a missing file is an error.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
RESULTS_DIR = HERE / "results"
BLOCK = re.compile(r"<!-- file:(?P<name>[\w.\-]+) -->\n.*?<!-- /file:(?P=name) -->", re.S)


def render(text: str, results_dir: Path = RESULTS_DIR) -> str:
    """``text`` with every file block replaced by the current content of its file."""
    def one(m: re.Match) -> str:
        name = m.group("name")
        path = results_dir / name
        if not path.is_file():
            raise SystemExit(f"RESULTS.md: block <!-- file:{name} --> names {path}, which does not exist")
        body = path.read_text().rstrip("\n")
        return f"<!-- file:{name} -->\n```text\n{body}\n```\n<!-- /file:{name} -->"

    return BLOCK.sub(one, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 when RESULTS.md is not what rendering gives")
    ap.add_argument("--path", type=Path, default=RESULTS_MD)
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    old = args.path.read_text()
    new = render(old, args.results_dir)
    if args.check:
        if new != old:
            print(f"{args.path} differs from the files it embeds: run python -m benchmarks.render_results",
                  file=sys.stderr)
            return 1
        return 0
    if new != old:
        args.path.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
