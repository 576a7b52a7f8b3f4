"""The report's per-case view: every case of every unit, what the base and the edited model said, and its metrics.

For each unit (method, setting, dataset — its last evaluation step) one table with a row per case and probe
kind: the case id, the edit (prompt, subject, new target, old target), the probe kind, the first probe of that
kind (its prompt and target, and how many probes of the kind the case has), the base model's and the edited
system's greedy answers to that probe, and the unit's metric values for that case and probe kind (a metric's value
for a kind is the metric's per-case row, e.g. the mean over the kind's probes).

Greedy answers come from the JSON diagnostic :data:`editlens.runs.answers.ANSWERS_KEY` the runner stores with a
unit's final step (:class:`editlens.runs.answers.CaseAnswers`); a unit without it (a store written before answers
were recorded, the pre-edit baseline) shows its metric values and "–" for the answers.

**Flipped.** A case is *flipped* when the edited system's greedy answer to its rewrite probe starts with the new
target and the base model's did not (both compared after stripping whitespace and ignoring case, the rule of
``s_acc``); *not flipped* otherwise; unknown (neither filter shows it) when no rewrite answer was recorded.

The page (:func:`cases_html`) has filters — flipped / not flipped, probe kind, "metric below a threshold" — and a
free-text search, all applied by a small inline script (no network, no library); every column header sorts. The
filter state lives in the URL hash (``#cases:kind=neighborhood&flip=yes&metric=s_acc&below=0.5&q=paris``, and
``sort=<column>`` / ``sort=-<column>`` for a descending sort of the per-case tables) so a filtered view can be
linked, and a test can open it. Every string from the store is HTML-escaped; the script
only reads ``textContent`` and data attributes written by this module (numbers and escaped names).
"""
from __future__ import annotations

import html as _html
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pandas as pd

#: the diagnostics key of recorded answers (the same string as :data:`editlens.runs.answers.ANSWERS_KEY`)
from editlens.runs.answers import ANSWERS_KEY, ANSWERS_VERSION  # noqa: E402


@dataclass
class CaseRow:
    """One row of the per-case table: one case and one probe kind of one unit."""

    case_id: str
    probe_kind: str
    prompt: str | None = None
    subject: str | None = None
    target_new: str | None = None
    target_true: str | None = None
    probe_prompt: str | None = None
    probe_target: str | None = None
    n_probes: int | None = None
    base: str | None = None
    edited: str | None = None
    flipped: bool | None = None
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class CaseUnit:
    """The per-case table of one unit."""

    key: str
    title: str
    metrics: list[str]
    rows: list[CaseRow]
    note: str = ""

    def frame(self) -> pd.DataFrame:
        """The rows as a DataFrame (one column per metric)."""
        recs = []
        for r in self.rows:
            d = {k: getattr(r, k) for k in ("case_id", "probe_kind", "prompt", "subject", "target_new", "target_true",
                                            "probe_prompt", "probe_target", "n_probes", "base", "edited", "flipped")}
            d.update({m: r.values.get(m, math.nan) for m in self.metrics})
            recs.append(d)
        return pd.DataFrame(recs)


def _norm(s: Any) -> str:
    return re.sub(r"\s+", " ", str(s)).strip().lower()


def starts_with_target(answer: str | None, target: str | None) -> bool | None:
    """Whether a greedy ``answer`` starts with ``target`` (whitespace-normalised, case-insensitive); ``None``
    when either is missing."""
    if answer is None or target is None or not str(target).strip():
        return None
    return _norm(answer).startswith(_norm(target))


def is_flipped(base: str | None, edited: str | None, target_new: str | None) -> bool | None:
    """The module docstring's rule: the edited answer starts with the new target and the base answer did not."""
    e = starts_with_target(edited, target_new)
    b = starts_with_target(base, target_new)
    if e is None or b is None:
        return None
    return bool(e and not b)


def _present(v: Any) -> bool:
    return not (v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)))


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def _unit_title(meta: Mapping[str, Any], sweep_cols: Sequence[str]) -> str:
    parts = [str(meta.get("method_label", "?"))]
    for c in sweep_cols:
        if _present(meta.get(c)):
            parts.append(f"{c.split('.')[-1]}={_fmt(meta[c])}")
    if _present(meta.get("dataset")):
        parts.append(f"dataset {meta['dataset']}")
    n = meta.get("n_edits")
    if _present(n):
        parts.append(f"{_fmt(n)} edits")
    if _present(meta.get("seed")):
        parts.append(f"seed {_fmt(meta['seed'])}")
    if _present(meta.get("run_id")) and meta.get("_several_runs"):
        parts.append(f"run {meta['run_id']}")
    return " · ".join(parts)


def _answers_of(diags: pd.DataFrame | None, run_id: Any, unit: Any) -> tuple[dict | None, str]:
    """The recorded answers of a unit (its last step that has them) and a note when they are unusable."""
    if diags is None or diags.empty or "key" not in diags.columns:
        return None, ""
    d = diags[diags["key"] == ANSWERS_KEY]
    if "unit" in d.columns:
        d = d[d["unit"] == unit]
    if run_id is not None and "run_id" in d.columns:
        d = d[d["run_id"] == run_id]
    if d.empty:
        return None, ""
    if "step" in d.columns:
        d = d.assign(_s=pd.to_numeric(d["step"], errors="coerce")).sort_values("_s", kind="stable")
    rec = d["value"].iloc[-1]
    if isinstance(rec, str):
        try:
            rec = json.loads(rec)
        except ValueError:
            return None, f"unit {unit}: its recorded answers are not valid JSON; answers not shown"
    if not isinstance(rec, dict) or not isinstance(rec.get("cases"), dict):
        return None, f"unit {unit}: its recorded answers have an unknown layout; answers not shown"
    if rec.get("version") != ANSWERS_VERSION:
        return None, (f"unit {unit}: answers recorded in format version {rec.get('version')!r}, this editlens reads "
                      f"version {ANSWERS_VERSION}; answers not shown")
    return rec, ""


def build_case_units(df: pd.DataFrame, diagnostics: pd.DataFrame | None = None, *,
                     max_rows: int | None = None) -> tuple[list[CaseUnit], list[str]]:
    """The per-case tables of a results frame (:func:`editlens.report.tables.results_frame`: rows joined with unit
    metadata) and the store's diagnostics; returns ``(units, notes)``.

    Each unit contributes its last evaluation step. Rows without a case id (general-ability metrics such as
    perplexity, which ignore the cases) are not per-case and are left to the summary tables. ``max_rows`` bounds
    the rows shown per unit (a note says how many were left out); ``None`` shows every row.
    """
    from editlens.report import tables

    if df.empty:
        return [], []
    if "method_label" not in df.columns or "column" not in df.columns:
        df = tables.results_frame(df)
    if "unit" not in df.columns:
        df = df.assign(unit="all")
    df = tables.final_rows(df)
    df = df[df["case_id"].notna()] if "case_id" in df.columns else df.iloc[0:0]
    sweep_cols = tables.sweep_columns(df)
    several_runs = "run_id" in df.columns and df["run_id"].nunique() > 1
    keys = ["run_id", "unit"] if "run_id" in df.columns else ["unit"]
    units: list[CaseUnit] = []
    notes: list[str] = []
    for key, g in df.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        run_id = key[0] if len(keys) == 2 else None
        unit = key[-1]
        meta = g.iloc[0].to_dict()
        meta["_several_runs"] = several_runs
        for c in ("n_edits", "meta.n_edits"):
            if c in meta and _present(meta[c]):
                meta["n_edits"] = meta[c]
        kinds = g["probe_kind"].astype(object).where(g["probe_kind"].notna(), "") if "probe_kind" in g.columns \
            else pd.Series([""] * len(g), index=g.index)
        metrics = list(dict.fromkeys(g["metric"].astype(str)))
        by: dict[tuple[str, str], CaseRow] = {}
        for cid, kind, metric, value in zip(g["case_id"].astype(str), kinds.astype(str), g["metric"].astype(str),
                                            g["value"]):
            row = by.get((cid, kind))
            if row is None:
                row = by[(cid, kind)] = CaseRow(cid, kind)
            if metric in row.values:  # several rows of one metric for a case and kind (seeds pooled in a unit)
                continue
            row.values[metric] = float(value) if _present(value) else math.nan
        rec, note = _answers_of(diagnostics, run_id, unit)
        if note:
            notes.append(note)
        if rec is not None:
            _join_answers(by, rec)
        rows = sorted(by.values(), key=lambda r: (_case_order(r.case_id), _KIND_ORDER.get(r.probe_kind, 99),
                                                  r.probe_kind))
        unit_note = "" if rec is not None else "No greedy answers were recorded for this unit."
        if max_rows is not None and len(rows) > max_rows:
            unit_note = (unit_note + " " if unit_note else "") + f"Showing the first {max_rows} of {len(rows)} rows."
            rows = rows[:max_rows]
        units.append(CaseUnit(f"{run_id}/{unit}" if run_id is not None else str(unit),
                              _unit_title(meta, sweep_cols), metrics, rows, unit_note))
    return units, notes


_KIND_ORDER = {k: i for i, k in enumerate(("rewrite", "paraphrase", "neighborhood", "attribute", "portability",
                                           "multihop", "other_attribution", "distract_neighbor", "locality",
                                           "generation"))}


def _case_order(cid: str) -> tuple:
    """Natural order of case ids (``c2`` before ``c10``)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", cid) if p)


def _join_answers(by: dict[tuple[str, str], CaseRow], rec: Mapping[str, Any]) -> None:
    """Fill the rows of ``by`` (adding rows for probe kinds that have answers but no metric rows) from a record."""
    kinds_of: dict[str, list[str]] = {}
    for cid, kind in by:
        kinds_of.setdefault(cid, []).append(kind)
    for cid, c in rec["cases"].items():
        if not isinstance(c, Mapping):
            continue
        cid = str(cid)
        probes = c.get("probes") if isinstance(c.get("probes"), Mapping) else {}
        rw = probes.get("rewrite")
        rw_items = rw.get("items") if isinstance(rw, Mapping) else None
        flipped = None
        if rw_items and isinstance(rw_items[0], Mapping):
            flipped = is_flipped(rw_items[0].get("base"), rw_items[0].get("edited"), c.get("target_new"))
        for kind in dict.fromkeys([*kinds_of.get(cid, []), *map(str, probes)]):
            row = by.get((cid, kind))
            if row is None:
                row = by[(cid, kind)] = CaseRow(cid, kind)
            row.prompt, row.subject = c.get("prompt"), c.get("subject")
            row.target_new, row.target_true = c.get("target_new"), c.get("target_true")
            row.flipped = flipped
            slot = probes.get(kind)
            if isinstance(slot, Mapping) and slot.get("items") and isinstance(slot["items"][0], Mapping):
                it = slot["items"][0]
                row.probe_prompt, row.probe_target = it.get("prompt"), it.get("target")
                row.base, row.edited = it.get("base"), it.get("edited")
                row.n_probes = slot.get("n")


# ============================================================================ HTML
def _e(s: Any) -> str:
    return _html.escape("" if s is None else str(s), quote=True)


def _num(v: float, digits: int) -> str:
    if not _present(v):
        return "–"
    if v != 0 and abs(v) < 10 ** (-digits):
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def cases_html(units: Sequence[CaseUnit], *, digits: int = 3) -> str:
    """The per-case section of the HTML page: filter bar, one scrollable sortable table per unit, the script.

    Returns ``""`` when there are no units."""
    if not units:
        return ""
    metrics = list(dict.fromkeys(m for u in units for m in u.metrics))
    m_index = {m: i for i, m in enumerate(metrics)}
    kinds = list(dict.fromkeys(r.probe_kind for u in units for r in u.rows))
    kinds.sort(key=lambda k: (_KIND_ORDER.get(k, 99), k))
    total = sum(len(u.rows) for u in units)
    parts = ["<section id='cases'><h2>Cases</h2>",
             "<p class='note'>Every case of every unit (its last evaluation step): the edit, the first probe of each "
             "kind, the base model's and the edited system's greedy answers, and the metric values for that case and "
             "probe kind. <b>Flipped</b>: the edited answer to the rewrite prompt starts with the new target and the "
             "base answer did not. Click a column header to sort; the filters apply to every table and are kept in "
             "the address (#cases:...).</p>",
             "<form id='case-filters' class='filters' onsubmit='return false'>",
             "<label>flipped <select id='f-flip'><option value=''>all</option><option value='yes'>flipped</option>"
             "<option value='no'>not flipped</option></select></label>",
             "<label>probe kind <select id='f-kind'><option value=''>all</option>"
             + "".join(f"<option value='{_e(k)}'>{_e(k)}</option>" for k in kinds) + "</select></label>",
             "<label>metric <select id='f-metric'><option value=''>–</option>"
             + "".join(f"<option value='{i}'>{_e(m)}</option>" for m, i in m_index.items())
             + "</select></label>",
             "<label>below <input id='f-below' type='number' step='any' size='6'></label>",
             "<label>search <input id='f-q' type='search' size='24' placeholder='case, prompt, answer…'></label>",
             f"<span id='case-count' data-total='{total}'>{total} of {total} rows</span>",
             "</form>"]
    for n, u in enumerate(units):
        parts.append(f"<details open class='unit' id='unit-{n}'><summary>{_e(u.title)} "
                     f"<span class='meta'>({len(u.rows)} rows)</span></summary>")
        if u.note:
            parts.append(f"<p class='note'>{_e(u.note)}</p>")
        head = ["case", "kind", "flipped", "edit prompt", "subject", "new target", "old target", "probe prompt",
                "probe target", "base answer", "edited answer", *u.metrics]
        parts.append("<div class='scroll'><table class='cases sortable'><thead><tr>"
                     + "".join(f"<th title='sort'>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>")
        for r in u.rows:
            flip = "" if r.flipped is None else ("yes" if r.flipped else "no")
            attrs = [f"data-kind='{_e(r.probe_kind)}'", f"data-flip='{flip}'"]
            attrs += [f"data-m{m_index[m]}='{float(v)!r}'" for m, v in r.values.items() if _present(v)]
            probe = _e(r.probe_prompt) + (f" <span class='meta'>(1 of {int(r.n_probes)})</span>"
                                          if r.n_probes and r.n_probes > 1 else "")
            cells = [_e(r.case_id), _e(r.probe_kind), {"yes": "✔", "no": "✘", "": "–"}[flip], _e(r.prompt),
                     _e(r.subject), _e(r.target_new), _e(r.target_true), probe, _e(r.probe_target),
                     f"<span class='ans'>{_e(r.base)}</span>" if r.base is not None else "–",
                     f"<span class='ans'>{_e(r.edited)}</span>" if r.edited is not None else "–"]
            cells += [f"<td class='num' data-sort='{float(r.values[m])!r}'>{_num(r.values[m], digits)}</td>"
                      if _present(r.values.get(m)) else "<td class='num' data-sort=''>–</td>" for m in u.metrics]
            parts.append(f"<tr {' '.join(attrs)}>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>"
                                                             for c in cells) + "</tr>")
        parts.append("</tbody></table></div></details>")
    parts.append("</section>")
    return "\n".join(parts)


#: CSS of the per-case view and the scrolling/sortable tables (added to the page's style)
CASES_CSS = """
.scroll { overflow-x: auto; max-width: 100%; }
table.cases td, table.cases th { text-align: left; vertical-align: top; max-width: 22em; overflow-wrap: anywhere; }
table.cases td:nth-child(-n+3), table.cases th { white-space: nowrap; }
table.cases td.num { text-align: right; white-space: nowrap; }
table.cases .ans { font-family: ui-monospace, monospace; white-space: pre-wrap; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th.asc::after { content: " ▲"; } table.sortable th.desc::after { content: " ▼"; }
.filters { display: flex; flex-wrap: wrap; gap: 0.8em; align-items: center; margin: 0.5em 0 1em; position: sticky;
           top: 0; background: #fff; padding: 0.4em 0; z-index: 1; }
details.unit > summary { font-weight: 600; cursor: pointer; margin: 0.6em 0; }
tr[hidden] { display: none; }
"""

#: the page's script: sorting for every ``table.sortable``, the case filters and their URL-hash state.
#: It reads only textContent and data attributes; it writes only textContent, ``hidden`` and classes.
PAGE_JS = r"""
(function () {
  function key(td) {
    if (!td) return [1, ""];
    var s = td.hasAttribute("data-sort") ? td.getAttribute("data-sort") : td.textContent.trim();
    var x = parseFloat(s);
    return (s !== "" && isFinite(x) && /^[-+]?[0-9.]/.test(s)) ? [0, x] : [1, s.toLowerCase()];
  }
  function sortBy(th, asc) {
    var table = th.closest("table"), idx = Array.prototype.indexOf.call(th.parentNode.children, th);
    if (asc === undefined) asc = !th.classList.contains("asc");
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.classList.remove("asc", "desc"); });
    th.classList.add(asc ? "asc" : "desc");
    Array.prototype.forEach.call(table.tBodies, function (tb) {
      var rows = Array.prototype.slice.call(tb.rows);
      rows.sort(function (a, b) {
        var ka = key(a.cells[idx]), kb = key(b.cells[idx]);
        if (ka[0] !== kb[0]) return ka[0] - kb[0];          // numbers first, blanks and text after
        var c = ka[1] < kb[1] ? -1 : ka[1] > kb[1] ? 1 : 0;
        return asc ? c : -c;                                 // Array.sort is stable: ties keep their order
      });
      rows.forEach(function (r) { tb.appendChild(r); });
    });
  }
  document.querySelectorAll("table.sortable thead th").forEach(function (th) {
    th.addEventListener("click", function () { sortBy(th); });
  });
  var form = document.getElementById("case-filters");
  if (!form) return;
  var F = { flip: "f-flip", kind: "f-kind", metric: "f-metric", below: "f-below", q: "f-q" };
  var sortKey = "";   // "<header>" ascending, "-<header>" descending: from the hash, or the last header clicked
  function el(k) { return document.getElementById(F[k]); }
  function state() {
    var s = {};
    Object.keys(F).forEach(function (k) { s[k] = el(k).value; });
    return s;
  }
  function apply() {
    var s = state(), q = s.q.trim().toLowerCase(), below = parseFloat(s.below), shown = 0;
    var rows = document.querySelectorAll("table.cases tbody tr");
    rows.forEach(function (tr) {
      var ok = true;
      if (s.flip && tr.getAttribute("data-flip") !== s.flip) ok = false;
      if (ok && s.kind && tr.getAttribute("data-kind") !== s.kind) ok = false;
      if (ok && s.metric !== "" && isFinite(below)) {
        var v = tr.getAttribute("data-m" + s.metric);
        ok = v !== null && parseFloat(v) < below;
      }
      if (ok && q && tr.textContent.toLowerCase().indexOf(q) < 0) ok = false;
      tr.hidden = !ok;
      if (ok) shown++;
    });
    var c = document.getElementById("case-count");
    c.textContent = shown + " of " + rows.length + " rows";
    c.setAttribute("data-shown", String(shown));
    var parts = [];
    Object.keys(F).forEach(function (k) {
      if (s[k] !== "") parts.push(k + "=" + encodeURIComponent(k === "metric" ? metricName(s[k]) : s[k]));
    });
    if (sortKey) parts.push("sort=" + encodeURIComponent(sortKey));
    var h = parts.length ? "#cases:" + parts.join("&") : "";
    if (location.hash !== h && (h || location.hash.indexOf("#cases:") === 0) && history.replaceState)
      history.replaceState(null, "", h || location.pathname + location.search);
  }
  function metricName(i) {
    var o = el("metric").querySelector("option[value='" + i + "']");
    return o ? o.textContent : "";
  }
  function load() {
    var h = location.hash;
    if (h.indexOf("#cases:") !== 0) return;
    h.slice(7).split("&").forEach(function (p) {
      var i = p.indexOf("="), k = p.slice(0, i), v;
      try { v = decodeURIComponent(p.slice(i + 1)); } catch (e) { return; }
      if (k === "sort" && i > 0) { sortKey = v; return; }
      if (!F[k] || i < 0) return;
      if (k === "metric") {
        var opts = el("metric").options;
        for (var j = 0; j < opts.length; j++) if (opts[j].textContent === v) el("metric").value = opts[j].value;
      } else {
        el(k).value = v;
      }
    });
  }
  function applySort() {   // sort every per-case table by the header named in sortKey
    if (!sortKey) return;
    var desc = sortKey.charAt(0) === "-", name = desc ? sortKey.slice(1) : sortKey;
    document.querySelectorAll("table.cases thead th").forEach(function (th) {
      if (th.textContent.replace(/ [\u25b2\u25bc]$/, "") === name) sortBy(th, !desc);
    });
  }
  document.querySelectorAll("table.cases thead th").forEach(function (th) {
    th.addEventListener("click", function () {
      sortKey = (th.classList.contains("asc") ? "" : "-") + th.textContent;
      apply();
    });
  });
  load();
  applySort();
  apply();
  Object.keys(F).forEach(function (k) {
    el(k).addEventListener(k === "q" || k === "below" ? "input" : "change", apply);
  });
  window.addEventListener("hashchange", function () { load(); applySort(); apply(); });
})();
"""

