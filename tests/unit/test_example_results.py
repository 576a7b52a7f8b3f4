"""scripts/example_results.py: the README's example tables (a) locality sweep, (b) teacher-forced vs autoregressive,
(c) sequential editing, generated from stores. Cells and the sensitivity τ are checked against hand computations
from the stored rows (stores written through the Store API with chosen values, and two small real runs on the tiny
random model for the layout the runner writes); the "—" cell; the README markers (only their insides change; exit 1
without them); determinism."""
from __future__ import annotations

import importlib.util
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kendalltau, sem

from editlens.runs.store import Store

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def E():
    spec = importlib.util.spec_from_file_location("example_results", REPO / "scripts" / "example_results.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["example_results"] = mod  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules["example_results"]
        raise
    yield mod
    sys.modules.pop("example_results", None)


def _meta(method, dataset, n, sweep=None, label=None, regime="batch"):
    return {"method": method, "label": label or method, "dataset": dataset, "n_edits": n, "regime": regime,
            "sweep": sweep or {}}


def _cell(vals):
    """The expected "mean ± s.e." text, computed here with numpy / scipy."""
    v = np.asarray(vals, dtype=float)
    m, s = float(np.mean(v)), float(sem(v))

    def f(x):
        t = f"{abs(x):.3f}"
        return ("−" if x < 0 else "") + (t[1:] if t.startswith("0.") else t)
    return f"{f(m)} ± {f(s)}"


def _row(table: str, *first: str) -> list[str]:
    """The cells of the table row whose first cells are ``first``."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:len(first)] == list(first):
            return cells
    raise AssertionError(f"no row {first} in\n{table}")


# ------------------------------------------------------------------------------------------ (a) locality sweep
# neighbourhood c_acc / kl per case (3 cases) and mean ||dk|| per λ; the unedited unit is the λ -> inf point
A_CF = {150.0: ([0.0, 1.0, 0.0], [0.1, 0.3, 0.2], 0.30),
        15000.0: ([1.0, 0.0, 1.0], [0.05, 0.07, 0.03], 0.20),
        1500000.0: ([1.0, 1.0, 0.0], [0.0, 0.01, 0.02], 0.05)}
A_CF_BASE = ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
A_SYN = {150.0: ([0.0, 0.0, 1.0], [0.4, 0.2, 0.3], 0.5), 1500000.0: ([0.0, 1.0, 1.0], [0.1, 0.1, 0.4], 0.1)}


def _build_a(results: Path) -> Path:
    d = results / "locality_sweep"
    d.mkdir(parents=True)
    with Store(d / "store.sqlite") as st:
        st.start_run("old", {"name": "locality_sweep"}, {}, "fp", [0])  # an older run: never pooled
        st.commit_unit("old", "memit-x", [(1, 3, "c0", "neighborhood", "kl", 99.0)],
                       meta=_meta("memit", "counterfact", 3, {"memit": {"mom2_update_weight": 150.0}}))
        st.start_run("r", {"name": "locality_sweep", "x": 1}, {}, "fp", [0])
        for ds, table in (("counterfact", A_CF), ("synthetic", A_SYN)):
            for i, (lam, (cacc, kl, dk)) in enumerate(table.items()):
                rows = []
                for j in range(3):
                    rows += [(1, 3, f"{ds}{j}", "neighborhood", "c_acc", cacc[j]),
                             (1, 3, f"{ds}{j}", "neighborhood", "kl", kl[j]),
                             (1, 3, f"{ds}{j}", "neighborhood", "s_acc", 0.0),
                             (1, 3, f"{ds}{j}", "rewrite", "c_acc", 1.0 - j / 2)]
                    if ds == "counterfact":  # the synthetic units record no top-k: a "—" cell
                        rows.append((1, 3, f"{ds}{j}", "neighborhood", "topk@5", 0.2 * (i + j)))
                st.commit_unit("r", f"memit-{ds}-{i}", rows, diagnostics=[(1, "delta_k_mean", dk)],
                               meta=_meta("memit", ds, 3, {"memit": {"mom2_update_weight": lam}}))
        # the unedited model on counterfact only: its row and sweep point exist there, not on synthetic
        cacc, kl = A_CF_BASE
        st.commit_unit("r", "none-counterfact", [r for j in range(3) for r in (
            (0, 0, f"counterfact{j}", "neighborhood", "c_acc", cacc[j]),
            (0, 0, f"counterfact{j}", "neighborhood", "kl", kl[j]),
            (0, 0, f"counterfact{j}", "neighborhood", "s_acc", 0.0),
            (0, 0, f"counterfact{j}", "neighborhood", "topk@5", 1.0))],
            meta=_meta("none", "counterfact", 0))
    return d


def test_a_table_cells_and_sensitivity_match_hand_computation(E, tmp_path):
    d = _build_a(tmp_path / "results")
    assert E.main(["--results", str(tmp_path / "results")]) == 0
    table = (d / "table.md").read_text()
    # rows: dataset x λ (ascending), the unedited row only where the run has a none unit
    lines = [l for l in table.splitlines() if l.startswith("| CounterFact") or l.startswith("| synthetic")]
    assert [tuple(_row(l)[:2]) for l in lines] == [
        ("CounterFact", "1.5e2"), ("CounterFact", "1.5e4 (papers' default)"), ("CounterFact", "1.5e6"),
        ("CounterFact", "unedited"), ("synthetic", "1.5e2"), ("synthetic", "1.5e6")]
    r = _row(table, "CounterFact", "1.5e2")
    # columns s_acc, c_acc, kl, topk@5, rewrite c_acc; kl by hand: mean .2, s.e. = .1 / sqrt(3) = .0577
    assert r[4] == ".200 ± .058" == _cell(A_CF[150.0][1])
    assert r[3] == _cell(A_CF[150.0][0]) == ".333 ± .333"
    assert r[2] == ".000 ± .000" and r[6] == _cell([1.0, 0.5, 0.0])
    assert r[5] == _cell([0.0, 0.2, 0.4])  # topk@5 of λ index 0: .2 * (0 + j)
    assert _row(table, "synthetic", "1.5e6")[5] == "—"  # no top-k recorded there
    assert _row(table, "CounterFact", "unedited")[3:6] == ["1.000 ± .000", ".000 ± .000", "1.000 ± .000"]
    assert "99" not in table  # the older run is not read

    # summary.csv: the repro_results layout, the same figures
    s = pd.read_csv(d / "summary.csv")
    assert list(s.columns) == ["method", "setting", "metric", "mean", "sem", "n"]
    one = s[(s.method == "memit") & (s.setting == "dataset=counterfact; mom2_update_weight=150; n_edits=3")
            & (s.metric == "neighborhood/kl")]
    assert one["mean"].item() == pytest.approx(0.2) and one["sem"].item() == pytest.approx(0.1 / math.sqrt(3))
    assert one["n"].item() == 3
    assert ((s.method == "none") & (s.setting == "dataset=counterfact; n_edits=0")).any()  # no sweep value: no NaN

    # sensitivity: τ-b of the per-point neighbourhood mean against the mean ||dk||, the unedited point at dk = 0
    sens = pd.read_csv(d / "sensitivity.csv")
    for ds, table_, base in (("counterfact", A_CF, A_CF_BASE), ("synthetic", A_SYN, None)):
        for k, metric in ((0, "c_acc"), (1, "kl")):
            dks = [v[2] for v in table_.values()] + ([0.0] if base else [])
            means = [np.mean(v[k]) for v in table_.values()] + ([np.mean(base[k])] if base else [])
            want = kendalltau(dks, means).statistic
            got = sens[(sens.dataset == ds) & (sens.metric == f"neighborhood/{metric}")]
            assert got["tau"].item() == pytest.approx(want), (ds, metric)
            assert got["n_points"].item() == len(dks) and (got["reference"] == "delta_k").all()
            if metric == "c_acc":  # coverage: (max - min) of the point means over the range [0, 1]
                assert got["coverage"].item() == pytest.approx(max(means) - min(means))
            else:
                assert math.isnan(got["coverage"].item())  # KL: unbounded, no coverage
    cf_c = kendalltau([0.3, 0.2, 0.05, 0.0], [1 / 3, 2 / 3, 2 / 3, 1.0]).statistic
    assert -1 < cf_c < 0  # a tied, non-trivial τ: the check above cannot pass by ±1 alone
    assert math.isnan(sens[(sens.dataset == "counterfact") & (sens.metric == "neighborhood/s_acc")]["tau"].item())
    line = next(l for l in table.splitlines() if l.startswith("Sensitivity to the regulariser"))
    assert f"`c_acc` τ = {E.fmt_num(cf_c, 2)} (coverage .67)" in line and "`s_acc` τ n/a (constant)" in line
    assert "CounterFact (4 points)" in line and "synthetic (2 points)" in line and "`topk@5` —" in line


# ------------------------------------------------------------------------------------------ (b) tf vs ar
def _build_b(results: Path) -> Path:
    d = results / "tf_vs_ar"
    d.mkdir(parents=True)
    with Store(d / "store.sqlite") as st:
        st.start_run("r", {"name": "tf_vs_ar"}, {}, "fp", [0])
        for ds in ("counterfact", "zsre"):
            for m, base in (("rome", 0.5), ("memit", 0.25)):
                rows = []
                for j in range(2):
                    rows += [(1, 2, f"{ds}{j}", "rewrite", "t_acc", base + j / 4),
                             (1, 2, f"{ds}{j}", "rewrite", "ar_em", float(j)),
                             (1, 2, f"{ds}{j}", "paraphrase", "t_acc", base * j),
                             (1, 2, f"{ds}{j}", "paraphrase", "ar_em", 0.0)]
                    if not (m == "memit" and ds == "zsre"):
                        rows.append((1, 2, f"{ds}{j}", "paraphrase", "tf_ar_gap", base * j - 0.5))
                st.commit_unit("r", f"{m}-{ds}", rows, meta=_meta(m, ds, 2))
    return d


def test_b_all_methods_and_datasets_and_missing_cell(E, tmp_path):
    d = _build_b(tmp_path / "results")
    res = E.process_example(E.EXAMPLES[1], tmp_path / "results")
    assert res.exists and res.run_id == "r"
    table = (d / "table.md").read_text()
    body = [l for l in table.splitlines() if l.startswith("| ROME") or l.startswith("| MEMIT")]
    assert [tuple(_row(l)[:2]) for l in body] == [("ROME", "CounterFact"), ("MEMIT", "CounterFact"),
                                                  ("ROME", "zsRE"), ("MEMIT", "zsRE")]
    r = _row(table, "ROME", "zsRE")
    assert r[2:] == [_cell([0.5, 0.75]), _cell([0.0, 1.0]), _cell([0.0, 0.5]), ".000 ± .000", _cell([-0.5, 0.0])]
    assert r[6] == "−.250 ± .250"  # a negative gap keeps its sign
    assert _row(table, "MEMIT", "zsRE")[6] == "—"  # the store has no tf_ar_gap there: a dash, no crash
    assert not (d / "sensitivity.csv").exists()


# ------------------------------------------------------------------------------------------ (c) sequential
SEQ_CPS = (3, 7)  # not the spec's checkpoints: the table must read them from the store


def _build_c(results: Path, *, same_base: bool = True) -> Path:
    d = results / "sequential"
    d.mkdir(parents=True)
    with Store(d / "store.sqlite") as st:
        st.start_run("r", {"name": "sequential"}, {}, "fp", [0])
        for mi, m in enumerate(("memit", "scr")):
            rows = []
            for step, n in enumerate((0,) + SEQ_CPS):
                shift = 0.0 if (n == 0 and same_base) else 0.1 * (mi + 1)
                for j in range(2):
                    rows += [(step, n, f"syn{j}", "rewrite", "t_acc", min(1.0, 0.25 * j + n / 10 + shift)),
                             (step, n, f"syn{j}", "paraphrase", "t_acc", 0.5 * j),
                             (step, n, f"syn{j}", "neighborhood", "kl", n / 100 + j / 100)]
                    if n == 0 or m == "memit":  # scr records no rewrite ar_em after step 0
                        rows.append((step, n, f"syn{j}", "rewrite", "ar_em", float(j == 1 and n > 0)))
                rows.append((step, n, "text:heldout.txt", "general", "ppl", 30.0 + n / 4 + (shift if n else 0)))
                rows += [(step, n, f"qa-{q}", "general", "downstream_acc@factual_qa", float(q < 2)) for q in range(4)]
            st.commit_unit("r", f"{m}-u", rows, meta=_meta(m, "synthetic-30", 7, regime="sequential"))
        st.commit_unit("r", "none-u", [(0, 0, "syn0", "rewrite", "t_acc", 0.25 if same_base else 0.9)],
                       meta=_meta("none", "synthetic-30", 0, regime="sequential"))
    return d


def test_c_checkpoints_from_the_store_and_step_zero(E, tmp_path):
    d = _build_c(tmp_path / "results")
    E.process_example(E.EXAMPLES[2], tmp_path / "results")
    table = (d / "table.md").read_text()
    head = _row(table, "method")
    assert head[1:] == ["edits", "rewrite `t_acc`", "rewrite `ar_em`", "paraphrase `t_acc`", "neighbourhood `kl`",
                        "`ppl`", "factual QA"]
    # memit and scr give the same step 0 but the none unit evaluated one case only: one row per unit then
    rows0 = [_row(l)[0] for l in table.splitlines() if l.startswith("| ") and _row(l)[1] == "0"]
    assert rows0 == ["MEMIT (unedited)", "SCR (unedited)", "unedited"]
    m = _row(table, "MEMIT")
    assert m[1] == "3 / 7"
    # rewrite t_acc at 3 edits: cases .25 * j + .3 + .1 -> .4, .65; at 7: .8, 1.05 clipped to 1; kl n / 100 + j / 100
    assert m[2] == ".525 / .900" and m[3] == ".500 / .500" and m[4] == ".250 / .250" and m[5] == ".035 / .075"
    assert m[6] == "30.85 / 31.85" and m[7] == ".500 / .500"  # ppl: one row per checkpoint; QA 2 of 4
    s = _row(table, "SCR")
    assert s[3] == "— / —"  # no ar_em after step 0: dashes, no crash
    assert s[6] == "30.95 / 31.95"
    memit0 = _row(table, "MEMIT (unedited)")
    assert memit0[1] == "0" and memit0[2] == _cell([0.0, 0.25]) and memit0[6] == "30.00"  # n = 1: the mean alone
    assert _row(table, "unedited")[2] == ".250" and _row(table, "unedited")[3] == "—"  # the none unit
    sem_line = next(l for l in table.splitlines() if l.startswith("_Checkpoint cells"))
    want = sorted(sem(np.array([0.25 * j + n / 10 + 0.1 * (mi + 1) for j in range(2)]).clip(max=1.0))
                  for mi in range(2) for n in SEQ_CPS)
    assert f"rewrite `t_acc` {E.fmt_num(want[0])}–{E.fmt_num(want[-1])}" in sem_line


def test_c_one_unedited_row_when_every_unit_agrees(E, tmp_path):
    results = tmp_path / "results"
    d = _build_c(results)
    with Store(d / "store.sqlite") as st:  # a run without the partial none unit: memit and scr agree at step 0
        st.start_run("r2", {"name": "sequential", "y": 2}, {}, "fp", [0])
        for u in ("memit-u", "scr-u"):
            rows = st.rows("r", unit=u)
            st.commit_unit("r2", u, rows[["step", "n_edits", "case_id", "probe_kind", "metric", "value"]],
                           meta=st.unit_meta("r", u))
    E.process_example(E.EXAMPLES[2], results)
    table = (d / "table.md").read_text()
    r = _row(table, "(all, unedited)")
    assert r[1] == "0" and r[2] == _cell([0.0, 0.25]) and r[6] == "30.00" and r[7] == _cell([1, 1, 0, 0])
    assert "run `r2`" in table and "(unedited)" not in table


# ------------------------------------------------------------------------------------------ README, determinism
def _segments(text: str, E) -> list[str]:
    """The README outside the example markers."""
    out, rest = [], text
    for ex in E.EXAMPLES:
        a, rest = rest.split(ex.begin, 1)
        out.append(a)
        _, rest = rest.split(ex.end, 1)
    return out + [rest]


def _inside(text: str, ex) -> str:
    return text.split(ex.begin, 1)[1].split(ex.end, 1)[0]


def test_readme_markers_only_their_insides_change(E, tmp_path, capsys):
    results = tmp_path / "results"
    _build_a(results)
    _build_c(results)  # (b) has no store: its table stays as it is
    readme = tmp_path / "README.md"
    original = (REPO / "README.md").read_text(encoding="utf-8")
    readme.write_text(original, encoding="utf-8")
    assert E.main(["--results", str(results), "--readme", "--readme-path", str(readme)]) == 0
    new = readme.read_text(encoding="utf-8")
    assert _segments(new, E) == _segments(original, E)  # nothing outside the markers changed
    a, b, c = E.EXAMPLES
    assert _inside(new, a) == "\n" + (results / "locality_sweep" / "table.md").read_text()
    assert _inside(new, c) == "\n" + (results / "sequential" / "table.md").read_text()
    assert _inside(new, b) == _inside(original, b)
    assert "Sensitivity to the regulariser (Kendall" in _inside(new, a)
    # a second pass is a fixed point
    assert E.main(["--results", str(results), "--readme", "--readme-path", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == new

    # a missing marker: exit 1 naming it, before any work (nothing written)
    broken = original.replace(b.end, "")
    readme.write_text(broken, encoding="utf-8")
    fresh = tmp_path / "fresh"
    _build_a(fresh)
    assert E.main(["--results", str(fresh), "--readme", "--readme-path", str(readme)]) == 1
    err = capsys.readouterr().err
    assert b.end in err and "tf_vs_ar" in err
    assert readme.read_text(encoding="utf-8") == broken and not (fresh / "locality_sweep" / "table.md").exists()
    readme.write_text(original + "\n" + a.begin + "\n", encoding="utf-8")  # repeated marker: refused too
    assert E.main(["--results", str(fresh), "--readme", "--readme-path", str(readme)]) == 1


def test_output_is_deterministic(E, tmp_path):
    results = tmp_path / "results"
    _build_a(results)
    _build_b(results)
    _build_c(results)

    def snapshot():
        return {p.relative_to(results).as_posix(): p.read_bytes() for p in sorted(results.rglob("*"))
                if p.is_file() and ".sqlite" not in p.name}
    assert E.main(["--results", str(results)]) == 0
    first = snapshot()
    assert set(first) == {"locality_sweep/summary.csv", "locality_sweep/table.md", "locality_sweep/sensitivity.csv",
                          "tf_vs_ar/summary.csv", "tf_vs_ar/table.md", "sequential/summary.csv",
                          "sequential/table.md"}
    assert E.main(["--results", str(results)]) == 0
    assert snapshot() == first


def test_missing_stores_are_reported_not_errors(E, tmp_path, capsys):
    assert E.main(["--results", str(tmp_path / "nothing")]) == 0
    out = capsys.readouterr().out
    assert out.count("not run yet") == 3


# ------------------------------------------------------------------------------------------ real runs (tiny model)
def _write(p: Path, text: str) -> Path:
    p.write_text(textwrap.dedent(text).lstrip())
    return p


@pytest.fixture(scope="module")
def lm():
    import editlens

    return editlens.load_model("tiny-llama")


def test_real_sweep_run_table_and_tau(E, tmp_path, lm):
    """The layout the runner writes (sweep columns, the none unit, the delta_k_mean diagnostic) gives the cells and
    τ computed here from the stored rows."""
    from editlens.runs.runner import run_spec

    results = tmp_path / "results"
    (results / "locality_sweep").mkdir(parents=True)
    store = results / "locality_sweep" / "store.sqlite"
    spec = _write(tmp_path / "locality_sweep.toml", """
        name = "locality_sweep"
        model = "tiny-llama"
        metrics = ["c_acc", "kl", "topk"]  # no s_acc: greedy generation is the slow part
        [[datasets]]
        name = "synthetic"
        path = "synthetic:3"
        [[methods]]
        name = "memit"
        hparams = { stats_n_samples = 8, stats_max_length = 16, v_num_grad_steps = 4 }
        [[methods]]
        name = "none"
        [regime]
        kind = "batch"
        sizes = [3]
        [sweep]
        "memit.mom2_update_weight" = [15.0, 1500000.0]
    """)
    rid = run_spec(spec, store=store, lm=lm, progress=False)
    res = E.process_example(E.EXAMPLES[0], results)
    assert res.run_id == rid
    with Store(store, readonly=True) as st:
        rows = st.rows_with_meta(rid)
        diags = st.diagnostics(rid, key="delta_k_mean")
    nb = rows[rows.probe_kind == "neighborhood"]
    lam = "sweep.memit.mom2_update_weight"
    table = (results / "locality_sweep" / "table.md").read_text()
    for v, label in ((15.0, "15"), (1500000.0, "1.5e6")):
        kl = nb[(nb[lam] == v) & (nb.metric == "kl")]["value"].to_numpy()
        assert len(kl) >= 3 and _row(table, "synthetic", label)[4] == _cell(kl)
    assert _row(table, "synthetic", "15")[2] == "—"  # s_acc not measured
    base = nb[nb.method == "none"]
    assert _row(table, "synthetic", "unedited")[5] == _cell(base[base.metric == "topk@5"]["value"])
    # τ of topk@5 against the mean ||dk|| of each unit, the unedited point at 0
    dk = diags.set_index("unit")["value"]
    pts = [(float(dk[u]), float(g[g.metric == "topk@5"]["value"].mean()))
           for u, g in nb[nb.method == "memit"].groupby("unit")]
    pts.append((0.0, float(base[base.metric == "topk@5"]["value"].mean())))
    want = kendalltau([p[0] for p in pts], [p[1] for p in pts]).statistic
    got = res.sensitivity[res.sensitivity.metric == "neighborhood/topk@5"]["tau"].item()
    assert not math.isnan(want) and got == pytest.approx(want)
    assert len(pts) == 3 and all(p[0] > 0 for p in pts[:2])


def test_real_sequential_run_checkpoints(E, tmp_path, lm):
    from editlens.runs.runner import run_spec

    results = tmp_path / "results"
    (results / "sequential").mkdir(parents=True)
    store = results / "sequential" / "store.sqlite"
    spec = _write(tmp_path / "sequential.toml", """
        name = "sequential"
        model = "tiny-llama"
        metrics = ["t_acc", "kl", "ppl"]
        [[datasets]]
        path = "synthetic:3"
        [[methods]]
        name = "ft-m"
        [regime]
        kind = "sequential"
        checkpoints = [1, 3]
        batch_size = 1
    """)
    rid = run_spec(spec, store=store, lm=lm, progress=False)
    E.process_example(E.EXAMPLES[2], results)
    table = (results / "sequential" / "table.md").read_text()
    with Store(store, readonly=True) as st:
        rows = st.rows(rid)
    r = _row(table, "FT-M")
    assert r[1] == "1 / 3"
    want = [rows[(rows.n_edits == k) & (rows.probe_kind == "rewrite") & (rows.metric == "t_acc")]["value"].mean()
            for k in (1, 3)]
    assert r[2] == " / ".join(E.fmt_num(w) for w in want)
    assert r[3] == "— / —" and r[7] == "— / —"  # ar_em and factual QA not measured by this spec
    ppl0 = rows[(rows.n_edits == 0) & (rows.metric == "ppl")]["value"].item()
    assert _row(table, "(all, unedited)")[6] == E.fmt_num(ppl0)
