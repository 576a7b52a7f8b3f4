"""The report's collapse figure (issue 16): ``hidden_rank@L`` and ``delta_spectrum`` over the number of sequential
edits, per method, read back from the files the report writes (the CSV beside the PNG, the PNG's text chunk) and
from the figure's lines."""
from __future__ import annotations

import base64
import io
import re

import pandas as pd
import pytest
from PIL import Image

from editlens.report import build_report, plots, write_html, write_report
from editlens.runs.store import Store

CHECKPOINTS = (1, 10, 100)


def rank(method: str, n: int) -> float:
    return {"rome": 1.0 - 0.002 * n, "memit": 1.0 - 0.0005 * n}[method]


def norm(method: str, layer: int, n: int) -> float:
    """‖ΔW‖ of mlp_out:<layer> after n edits; 0 for matrices the method does not edit."""
    edited = {"rome": {1: 1.0}, "memit": {1: 0.5, 2: 0.25}}[method]
    return edited.get(layer, 0.0) * n ** 0.5


def sv(method: str, layer: int, n: int, i: int) -> float:
    return norm(method, layer, n) / (i + 1)


def make_store(path, checkpoints=CHECKPOINTS) -> Store:
    st = Store(path)
    st.start_run("r", {"name": "collapse"}, {"editlens": "test"}, "fp", [0])
    for method in ("rome", "memit"):
        unit = f"seq-{method}"
        meta = {"method": method, "label": method, "dataset": "mcf", "regime": "sequential",
                "n_edits": checkpoints[-1], "checkpoints": list(checkpoints)}
        for step, n in enumerate(checkpoints):
            rows = [(step, n, f"c{c}", "rewrite", "t_acc", 1.0 - 0.001 * n) for c in range(2)]
            rows.append((step, n, "text:heldout.txt", "general", "hidden_rank@2", rank(method, n)))
            for layer in range(4):
                cid = f"mlp_out:{layer}"
                rows.append((step, n, cid, "general", "delta_spectrum", norm(method, layer, n)))
                rows += [(step, n, cid, "general", f"delta_spectrum_s{i + 1}", sv(method, layer, n, i))
                         for i in range(4)]
            st.commit_step("r", unit, step, rows, meta=meta)
        st.commit_unit("r", unit, [], meta=meta)
    return st


def expected_series() -> dict[tuple, float]:
    out = {}
    for method in ("rome", "memit"):
        for n in CHECKPOINTS:
            out[(method, "hidden_rank@2", "", "ratio", n)] = rank(method, n)
            for layer in range(4):
                if norm(method, layer, 100) == 0:
                    continue  # never edited: left out
                out[(method, "delta_spectrum", f"mlp_out:{layer}", "norm", n)] = norm(method, layer, n)
                for i in range(4):
                    out[(method, "delta_spectrum", f"mlp_out:{layer}", f"s{i + 1}", n)] = sv(method, layer, n, i)
    return out


def as_dict(df: pd.DataFrame) -> dict[tuple, float]:
    return {(r.method, r.metric, "" if pd.isna(r.matrix) else str(r.matrix), r.quantity, int(r.n_edits)):
            float(r.value) for r in df.itertuples()}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    st = make_store(tmp_path_factory.mktemp("collapse") / "res.sqlite")
    yield st
    st.close()


def test_collapse_series_from_a_store(store):
    from editlens.report.tables import results_frame

    s = plots.collapse_series(results_frame(store))
    got = as_dict(s)
    want = expected_series()
    assert set(got) == set(want)  # unedited matrices (mlp_out:0, :3; rome's :2) are left out
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12), k
    assert (s["n"] == 1).all()


def test_report_writes_the_collapse_plot_with_its_series(store, tmp_path):
    paths = write_report(store, tmp_path / "rep")
    png, csv = tmp_path / "rep" / "collapse.png", tmp_path / "rep" / "collapse.csv"
    assert png in paths and csv in paths
    from_csv = pd.read_csv(csv, keep_default_na=False)
    got, want = as_dict(from_csv), expected_series()
    assert set(got) == set(want) and all(got[k] == pytest.approx(v, rel=1e-12) for k, v in want.items())
    img = Image.open(png)
    assert img.size[0] > 100 and img.size[1] > 100
    from_png = pd.read_csv(io.StringIO(img.text["editlens:series"]), keep_default_na=False)
    assert as_dict(from_png) == got
    index = (tmp_path / "rep" / "index.md").read_text()
    assert "Collapse diagnostics vs number of edits" in index and "(collapse.csv)" in index
    # the generic metric-vs-edits figure still shows the ordinary metrics
    assert (tmp_path / "rep" / "edits_curve_0.png").is_file()


def test_html_page_embeds_the_collapse_plot(store, tmp_path):
    page = write_html(store, tmp_path / "r.html").read_text()
    m = re.search(r"<section id='fig-collapse'>.*?src='data:image/png;base64,([^']+)'", page, re.S)
    assert m, "no collapse figure in the page"
    img = Image.open(io.BytesIO(base64.b64decode(m.group(1))))
    assert as_dict(pd.read_csv(io.StringIO(img.text["editlens:series"]), keep_default_na=False)) == \
        pytest.approx(expected_series(), rel=1e-12)


def test_collapse_figure_lines_hold_the_series(store):
    from editlens.report.tables import results_frame

    fig = plots.plot_collapse(plots.collapse_series(results_frame(store)))
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    ranks = {l.get_label(): (list(l.get_xdata()), list(l.get_ydata())) for l in axes["hidden_rank@2"].get_lines()
             if not l.get_label().startswith("_")}
    assert ranks == {m: (list(map(float, CHECKPOINTS)), [pytest.approx(rank(m, n)) for n in CHECKPOINTS])
                     for m in ("memit", "rome")}
    memit_norms = axes["delta_spectrum: ||dW||_F, memit"].get_lines()
    assert [l.get_label() for l in memit_norms] == ["mlp_out:1", "mlp_out:2"]  # largest last value first
    assert list(memit_norms[1].get_ydata()) == pytest.approx([norm("memit", 2, n) for n in CHECKPOINTS])
    svs = axes["delta_spectrum: top singular values of mlp_out:1, rome"].get_lines()
    assert [l.get_label() for l in svs] == ["sigma_1", "sigma_2", "sigma_3", "sigma_4"]
    assert list(svs[2].get_ydata()) == pytest.approx([sv("rome", 1, n, 2) for n in CHECKPOINTS])


def test_no_collapse_figure_without_several_checkpoints(tmp_path):
    st = make_store(tmp_path / "one.sqlite", checkpoints=(5,))
    try:
        rep = build_report(st, cases=False)
    finally:
        st.close()
    assert "collapse" not in [f.name for f in rep.figures]


def test_collapse_metric_names():
    assert all(plots.is_collapse_metric(m) for m in ("hidden_rank@0", "hidden_rank@12", "delta_spectrum",
                                                     "delta_spectrum_s3", "delta_spectrum@attn_out",
                                                     "delta_spectrum@mlp_in_s1"))
    assert not any(plots.is_collapse_metric(m) for m in ("hidden_rank", "t_acc", "delta_spectrumX", None))


def test_report_of_a_store_with_only_the_unedited_baseline(tmp_path):
    """Regression: with no edited rows the collapse filter got an empty object-dtype mask, which ``df[...]`` takes
    as a column selection; every later figure then lost the 'metric' column (KeyError in ``editlens bench``)."""
    st = Store(tmp_path / "base.sqlite")
    st.start_run("r", {"name": "pre-edit"}, {"editlens": "test"}, "fp", [0])
    meta = {"method": "none", "label": "none", "dataset": "mcf", "regime": "batch", "n_edits": 2, "checkpoints": [2]}
    st.commit_step("r", "u-none", 0, [(0, 0, f"c{c}", "rewrite", "t_acc", 0.5) for c in range(2)], meta=meta)
    st.commit_unit("r", "u-none", [], meta=meta)
    try:
        rep = build_report(st, cases=False)
    finally:
        st.close()
    assert "collapse" not in [f.name for f in rep.figures]
    assert rep.tables  # the summary of the baseline rows is there
