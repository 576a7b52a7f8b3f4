"""The report's per-case view (issue 18 part 3): rows per case and probe kind with the recorded greedy answers and
metric values, the flipped rule, escaping of hostile strings, filters in the page; the runner-side recorder
(:class:`editlens.runs.answers.CaseAnswers`) on a tiny model; spec ``report.ref``."""
from __future__ import annotations

import html as _html
import re
from pathlib import Path

import pytest

from editlens.report import build_report
from editlens.report.cases import build_case_units, cases_html, is_flipped, starts_with_target
from editlens.runs.answers import ANSWERS_KEY, CaseAnswers
from editlens.runs.store import Store

HOSTILE = "<script>alert(1)</script>\"'&"


def _answers(cases: dict) -> dict:
    return {"version": 1, "max_new_tokens": 8, "per_kind": 1, "prompt_format": "raw", "cases": cases}


def _case(prompt, subject, new, old, probes):
    return {"prompt": prompt, "subject": subject, "target_new": new, "target_true": old,
            "probes": {k: {"n": n, "items": [{"prompt": p, "target": t, "foil": None, "base": b, "edited": e}]}
                       for k, (n, p, t, b, e) in probes.items()}}


def make_store(path: Path, odd: str = HOSTILE) -> Path:
    """Two units (rome, memit) over cases c1, c2, c10; rome flips c1 and c10, memit flips c2 only; the string
    ``odd`` (default: a hostile one) is case c2's subject, part of its prompts and answers, and of rome's label."""
    HOSTILE = odd  # noqa: N806 - the module constant's role, under the caller's value
    ans = {
        "rome": _answers({
            "c1": _case("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris",
                        {"rewrite": (1, "The Eiffel Tower is in", "Rome", " Paris, France", " Rome, Italy"),
                         "neighborhood": (3, "The Louvre is in", "Paris", " Paris", " Rome")}),
            "c2": _case(f"{HOSTILE} is a", HOSTILE, "cat", "dog",
                        {"rewrite": (1, f"{HOSTILE} is a", "cat", " dog", f" {HOSTILE}")}),
            "c10": _case("Danielle Darrieux speaks", "Danielle Darrieux", "English", "French",
                         {"rewrite": (1, "Danielle Darrieux speaks", "English", " French", " english fluently")}),
        }),
        "memit": _answers({
            "c1": _case("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris",
                        {"rewrite": (1, "The Eiffel Tower is in", "Rome", " Paris, France", " Paris")}),
            "c2": _case(f"{HOSTILE} is a", HOSTILE, "cat", "dog",
                        {"rewrite": (1, f"{HOSTILE} is a", "cat", " dog", " Cat")}),
            "c10": _case("Danielle Darrieux speaks", "Danielle Darrieux", "English", "French",
                         {"rewrite": (1, "Danielle Darrieux speaks", "English", " English", " English")}),
        }),
    }
    s_acc = {"rome": {"c1": 1.0, "c2": 0.0, "c10": 1.0}, "memit": {"c1": 0.0, "c2": 1.0, "c10": 1.0}}
    kl = {"rome": {"c1": 0.30, "c2": 0.02, "c10": 0.05}, "memit": {"c1": 0.01, "c2": 0.20, "c10": 0.04}}
    with Store(path) as st:
        st.start_run("r1", {"name": "cases"}, {}, "fp", [0])
        for m in ("rome", "memit"):
            rows = [(1, 3, c, "rewrite", "s_acc", v) for c, v in s_acc[m].items()]
            rows += [(1, 3, "c1", "neighborhood", "kl", kl[m]["c1"])]
            rows += [(1, 3, c, "rewrite", "kl", v) for c, v in kl[m].items() if c != "c1"]
            rows += [(1, 3, None, None, "perplexity", 12.5)]  # a general metric: no case, not in the per-case view
            label = m if m == "memit" or odd != globals()["HOSTILE"] else f"rome {HOSTILE}"
            st.commit_unit("r1", f"{m}-u", rows, diagnostics={ANSWERS_KEY: ans[m], "wall_time_s": 1.0},
                           meta={"method": m, "label": label, "dataset": "mcf", "n_edits": 3, "seed": 0})
    return path


def test_flip_rule_by_hand():
    assert starts_with_target(" Rome, Italy", "Rome") is True
    assert starts_with_target("  ROME", " rome ") is True
    assert starts_with_target("in Rome", "Rome") is False
    assert starts_with_target(None, "Rome") is None and starts_with_target("x", None) is None
    assert is_flipped(" Paris", " Rome", "Rome") is True
    assert is_flipped(" Rome", " Rome", "Rome") is False      # the base already said it: nothing flipped
    assert is_flipped(" Paris", " Paris", "Rome") is False
    assert is_flipped(None, " Rome", "Rome") is None


def test_case_units_join_rows_answers_and_flips(tmp_path):
    path = make_store(tmp_path / "s.sqlite")
    with Store(path, readonly=True) as st:
        from editlens.report.tables import results_frame

        units, notes = build_case_units(results_frame(st), st.diagnostics())
    assert notes == []
    assert [u.key for u in units] == ["r1/rome-u", "r1/memit-u"]
    rome = units[0].frame()
    # rows: c1 rewrite, c1 neighborhood, c2 rewrite, c10 rewrite, in natural case order (c2 before c10)
    assert list(zip(rome["case_id"], rome["probe_kind"])) == [("c1", "rewrite"), ("c1", "neighborhood"),
                                                             ("c2", "rewrite"), ("c10", "rewrite")]
    assert list(rome["flipped"]) == [True, True, False, True]
    assert rome.loc[1, "base"] == " Paris" and rome.loc[1, "edited"] == " Rome" and rome.loc[1, "n_probes"] == 3
    assert rome.loc[1, "kl"] == pytest.approx(0.30) and rome.loc[0, "s_acc"] == 1.0
    assert rome.loc[2, "subject"] == HOSTILE and rome.loc[2, "edited"] == f" {HOSTILE}"
    assert "perplexity" not in units[0].metrics           # case-less rows are left to the summary tables
    memit = units[1].frame()
    assert list(memit["flipped"]) == [False, False, True, False]  # c10: the base already said English
    assert units[0].title.startswith("rome <script>") and "dataset mcf" in units[0].title and "3 edits" in units[0].title


def test_units_without_answers_and_unknown_versions(tmp_path):
    path = tmp_path / "s.sqlite"
    with Store(path) as st:
        st.start_run("r1", {"name": "x"}, {}, "fp", [0])
        st.commit_unit("r1", "a", [(1, 1, "c1", "rewrite", "s_acc", 1.0)], meta={"method": "ft"})
        st.commit_unit("r1", "b", [(1, 1, "c1", "rewrite", "s_acc", 0.0)], meta={"method": "rome"},
                       diagnostics={ANSWERS_KEY: {"version": 99, "cases": {}}})
    rep = build_report(path, plots_enabled=False)
    a, b = rep.cases
    assert a.rows[0].base is None and "No greedy answers" in a.note
    assert any("format version 99" in n for n in rep.notes)
    assert a.rows[0].values == {"s_acc": 1.0} and b.rows[0].values == {"s_acc": 0.0}


def test_html_escapes_every_string_and_is_self_contained(tmp_path):
    path = make_store(tmp_path / "s.sqlite")
    page = build_report(path, plots_enabled=False).to_html()
    assert "<script>alert(1)</script>" not in page
    assert page.count("<script>") == 1                          # the page's own script, nothing injected
    assert _html.escape(HOSTILE, quote=True) in page            # shown as text
    assert not re.search(r"(src|href)=['\"]https?:", page)        # nothing fetched from the network
    assert "id='cases'" in page and "<a href='#cases'>Cases</a>" in page
    assert "class='scroll'" in page and "table class='cases sortable'" in page
    # every data row carries its filter attributes
    rows = re.findall(r"<tr data-kind='([^']*)' data-flip='([^']*)'", page)
    assert rows == [("rewrite", "yes"), ("neighborhood", "yes"), ("rewrite", "no"), ("rewrite", "yes"),   # rome
                    ("rewrite", "no"), ("neighborhood", "no"), ("rewrite", "yes"), ("rewrite", "no")]    # memit


def test_cases_off_and_row_bound(tmp_path):
    path = make_store(tmp_path / "s.sqlite")
    assert build_report(path, plots_enabled=False, cases=False).cases == []
    rep = build_report(path, plots_enabled=False, cases_max_rows=2)
    assert [len(u.rows) for u in rep.cases] == [2, 2] and "first 2 of 4 rows" in rep.cases[0].note
    assert cases_html([]) == ""


def test_case_answers_recorder_on_a_tiny_model(tiny_llama):
    """The runner-side recorder: base answers frozen before the edit, edited answers after; the record is what the
    model's own generate() says, and base != edited answers come from different weights."""
    import editlens
    from editlens.data import synthetic_cases
    from editlens.system import ModelSystem

    cases = synthetic_cases(2, seed=0)
    ca = CaseAnswers(tiny_llama, cases, max_new_tokens=4)
    base_direct = ModelSystem(tiny_llama).generate([cases[0].rewrite.text], max_new_tokens=4)[0]
    e = editlens.edit(tiny_llama, cases, "ft", hparams={"steps": 3, "lr": 0.5})
    try:
        rec = ca.record(e.system)
        edited_direct = e.system.generate([cases[0].rewrite.text], max_new_tokens=4)[0]
    finally:
        e.undo()
    c0 = rec["cases"][cases[0].case_id]
    assert c0["subject"] == cases[0].rewrite.subject and c0["target_new"] == cases[0].rewrite.target_new
    item = c0["probes"]["rewrite"]["items"][0]
    assert item["base"] == base_direct and item["edited"] == edited_direct
    assert set(c0["probes"]) == set(cases[0].kinds)
    assert all(len(s["items"]) == 1 and s["n"] == len(cases[0].probes_of(k)) for k, s in c0["probes"].items())
    with pytest.raises(editlens.EditlensError, match="max_new_tokens"):
        CaseAnswers(tiny_llama, cases, max_new_tokens=0)


def test_spec_report_ref_is_accepted_and_checked(tmp_path):
    from editlens.errors import SpecError
    from editlens.runs.spec import load_spec

    base = ('name = "x"\nmetrics = ["s_acc"]\n[model]\nname = "tiny-llama"\n[[datasets]]\nname = "d"\n'
            'path = "synthetic:2"\n[[methods]]\nname = "ft"\n[regime]\nkind = "batch"\nsizes = [1]\n[report]\n')
    p = tmp_path / "a.toml"
    p.write_text(base + 'ref = "ft"\n')
    assert load_spec(p).report["ref"] == "ft"
    p.write_text(base + "ref = 3\n")
    with pytest.raises(SpecError, match=r"report\.ref.*non-empty string"):
        load_spec(p)


def _runner_records_answers() -> bool:
    import inspect

    from editlens.runs import runner

    return "CaseAnswers" in inspect.getsource(runner)


RUN_SPEC = """
name = "answers"
model = "tiny-llama"
metrics = ["s_acc", "kl"]
[[datasets]]
path = "synthetic:3"
[[methods]]
name = "ft"
hparams = { steps = 3, lr = 0.5 }
[regime]
kind = "{kind}"
{regime}
"""


@pytest.mark.skipif(not _runner_records_answers(), reason="the runner does not record greedy answers yet "
                                                          "(editlens.runs.answers.CaseAnswers is not called)")
@pytest.mark.parametrize("kind,regime", [("batch", "sizes = [3]"),
                                         ("sequential", "checkpoints = [1, 3]\nbatch_size = 1")])
def test_runner_records_answers_and_the_report_shows_them(tmp_path, kind, regime):
    """A run on a tiny model stores the base and edited greedy answers with each unit's final step; the report's
    per-case view shows them next to the metric values of the same rows."""
    from editlens.runs.runner import RunOptions, run_spec

    spec = tmp_path / "s.toml"
    spec.write_text(RUN_SPEC.replace("{kind}", kind).replace("{regime}", regime))
    store = tmp_path / "s.sqlite"
    run_spec(spec, store, progress=False, options=RunOptions(eval_cases=2 if kind == "sequential" else None))
    with Store(store, readonly=True) as st:
        d = st.diagnostics(key=ANSWERS_KEY)
    assert len(d) == 1                                            # the final step only
    rec = d["value"].iloc[0]
    n_cases = 2 if kind == "sequential" else 3
    assert rec["version"] == 1 and len(rec["cases"]) == n_cases
    rep = build_report(store, plots_enabled=False)
    (unit,) = [u for u in rep.cases]
    rw = [r for r in unit.rows if r.probe_kind == "rewrite"]
    assert len(rw) == n_cases and all(r.base is not None and r.edited is not None for r in rw)
    assert all(r.flipped == is_flipped(r.base, r.edited, r.target_new) for r in rw)
    assert all("s_acc" in r.values for r in rw)


def test_spec_report_ref_must_name_a_method(tmp_path):
    from editlens.errors import SpecError
    from editlens.runs.spec import load_spec

    p = tmp_path / "a.toml"
    p.write_text('name = "x"\nmetrics = ["s_acc"]\n[model]\nname = "tiny-llama"\n[[datasets]]\nname = "d"\n'
                 'path = "synthetic:2"\n[[methods]]\nname = "ft"\n[[methods]]\nname = "none"\n[regime]\n'
                 'kind = "batch"\nsizes = [1]\n[report]\nref = "memit"\n')
    with pytest.raises(SpecError, match=r"a\.toml:\d+: report\.ref: 'memit' is not a method label of this spec; "
                                        r"labels: ft, none"):
        load_spec(p)
    p.write_text(p.read_text().replace('ref = "memit"', 'ref = "ft | lr=0.1"'))
    assert load_spec(p).report["ref"] == "ft | lr=0.1"


def test_cli_report_html_has_the_cases_and_can_leave_them_out(tmp_path):
    from click.testing import CliRunner

    from editlens.cli.main import cli

    path = make_store(tmp_path / "s.sqlite")
    r = CliRunner().invoke(cli, ["report", str(path), "--html", str(tmp_path / "a.html"), "--no-plots", "-q",
                                 "--cases-max-rows", "3"])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "a.html").read_text()
    assert page.count("<tr data-kind=") == 6 and "Showing the first 3 of 4 rows" in page
    r = CliRunner().invoke(cli, ["report", str(path), "--html", str(tmp_path / "b.html"), "--no-plots", "-q",
                                 "--no-cases"])
    assert r.exit_code == 0 and "id='cases'" not in (tmp_path / "b.html").read_text()


def test_write_dir_writes_one_case_csv_per_unit(tmp_path):
    import pandas as pd

    rep = build_report(make_store(tmp_path / "s.sqlite"), plots_enabled=False)
    rep.write_dir(tmp_path / "out")
    a = pd.read_csv(tmp_path / "out" / "cases_000.csv", keep_default_na=False)
    assert list(a["case_id"]) == ["c1", "c1", "c2", "c10"] and a.loc[2, "subject"] == HOSTILE
    assert (tmp_path / "out" / "cases_001.csv").is_file()
    idx = (tmp_path / "out" / "index.md").read_text()
    assert "(cases_000.csv): 4 rows" in idx and "<script>" not in idx     # the unit title is escaped there too
