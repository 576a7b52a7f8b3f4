"""The HTML report's per-case view in a real browser (issue 18 part 3): headless Chromium opens the page with a
filter in the address (``#cases:...``, what the filter controls write there), runs the page's script, and the
test reads the DOM Chromium dumps: which rows are shown, the "N of M rows" counter, the sort order, and that
hostile case strings stayed text (one script element: the page's own).

Skipped, with the reason, only when no Chromium/Chrome executable is found. ``EDITLENS_DOCS_SCREENSHOT=1`` also
writes the screenshot of docs/report-cases.md (docs/img/report-cases.png).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest

from editlens.report import write_html
from tests.unit.test_report_cases import HOSTILE, make_store

DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img" / "report-cases.png"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium/Chrome executable found (looked for chromium, "
                                                         "chromium-browser, google-chrome, chrome on PATH)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-extensions", "--hide-scrollbars"]


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args], capture_output=True,
                          text=True, timeout=120)


def _dom(page: Path, hash_: str, tmp: Path) -> str:
    res = _run(["--dump-dom", page.resolve().as_uri() + hash_], tmp)
    assert res.returncode == 0 and "<html" in res.stdout, res.stderr[-2000:]
    return res.stdout


class _Rows(HTMLParser):
    """The rows of the per-case tables, in DOM order: (unit index, cells' text, hidden?); the counter; scripts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[tuple[int, list[str], bool]] = []
        self.unit = -1
        self.in_cases = self.in_td = False
        self.cell: list[str] = []
        self.count = ""
        self.in_count = False
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "details" and "unit" in (a.get("class") or ""):
            self.unit += 1
        if tag == "table":
            self.in_cases = "cases" in (a.get("class") or "").split()
        if self.in_cases and tag == "tr" and "data-kind" in a:
            self.rows.append((self.unit, [], "hidden" in a))
        if self.in_cases and tag == "td" and self.rows:
            self.in_td, self.cell = True, []
        if tag == "span" and a.get("id") == "case-count":
            self.in_count = True

    def handle_endtag(self, tag):
        if tag == "td" and self.in_td:
            self.rows[-1][1].append("".join(self.cell).strip())
            self.in_td = False
        if tag == "table":
            self.in_cases = False
        if tag == "span":
            self.in_count = False

    def handle_data(self, data):
        if self.in_td:
            self.cell.append(data)
        if self.in_count:
            self.count += data


def _shown(dom: str) -> tuple[list[tuple[int, str, str]], _Rows]:
    p = _Rows()
    p.feed(dom)
    return [(u, cells[0], cells[1]) for u, cells, hidden in p.rows if not hidden], p


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("chromium")
    store = make_store(tmp / "s.sqlite")
    return write_html(store, tmp / "report.html", plots_enabled=False)


def test_filters_applied_in_chromium(page, tmp_path):
    # unit 0 = rome (flips c1, c10), unit 1 = memit (flips c2); 8 rows in all
    shown, p = _shown(_dom(page, "#cases:flip=yes&kind=rewrite", tmp_path))
    assert shown == [(0, "c1", "rewrite"), (0, "c10", "rewrite"), (1, "c2", "rewrite")]
    assert p.count.strip() == "3 of 8 rows"
    assert p.scripts == 1                                    # nothing injected by the hostile strings

    shown, p = _shown(_dom(page, "#cases:flip=no", tmp_path))
    assert shown == [(0, "c2", "rewrite"), (1, "c1", "rewrite"), (1, "c1", "neighborhood"), (1, "c10", "rewrite")]

    # metric below a threshold: kl < 0.1 (rows without kl are hidden)
    shown, p = _shown(_dom(page, "#cases:metric=kl&below=0.1", tmp_path))
    assert shown == [(0, "c2", "rewrite"), (0, "c10", "rewrite"), (1, "c1", "neighborhood"), (1, "c10", "rewrite")]
    assert p.count.strip() == "4 of 8 rows"

    # free-text search for the hostile string: it is text in the page, found as text
    shown, p = _shown(_dom(page, "#cases:q=" + quote(HOSTILE, safe=""), tmp_path))
    assert shown == [(0, "c2", "rewrite"), (1, "c2", "rewrite")]
    cells = [c for u, c, h in p.rows if not h]
    assert all(HOSTILE in " ".join(c) for c in cells)   # subject and prompt shown literally, not interpreted
    assert p.scripts == 1


def test_sort_from_the_address(page, tmp_path):
    shown, _ = _shown(_dom(page, "#cases:sort=-kl", tmp_path))
    rome = [(c, k) for u, c, k in shown if u == 0]
    # kl descending: c1/neighborhood 0.30, c10 0.05, c2 0.02; c1/rewrite has no kl (blank: last)
    assert rome == [("c1", "neighborhood"), ("c10", "rewrite"), ("c2", "rewrite"), ("c1", "rewrite")]
    shown, _ = _shown(_dom(page, "#cases:sort=kl", tmp_path))
    assert [(c, k) for u, c, k in shown if u == 0] == [("c2", "rewrite"), ("c10", "rewrite"),
                                                         ("c1", "neighborhood"), ("c1", "rewrite")]


def test_screenshot(tmp_path):
    """The docs' screenshot: the same store with a plain subject in place of the hostile string."""
    page = write_html(make_store(tmp_path / "s.sqlite", odd="Garfield"), tmp_path / "report.html",
                      plots_enabled=False, title="editlens report: per-case view")
    out = tmp_path / "shot.png"
    res = _run([f"--screenshot={out}", "--window-size=1300,900",
                page.resolve().as_uri() + "#cases:kind=rewrite&sort=-kl"], tmp_path)
    assert res.returncode == 0 and out.is_file(), res.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    if os.environ.get("EDITLENS_DOCS_SCREENSHOT") == "1":
        DOCS_IMG.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, DOCS_IMG)
