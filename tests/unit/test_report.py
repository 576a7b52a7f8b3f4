"""Report: tables, plots, HTML (checked in headless Chromium) and the `editlens report` command."""
from __future__ import annotations

import base64
import math
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from editlens.cli.report import report as report_cmd
from editlens.report import build_report, write_html, write_report
from editlens.report import plots
from editlens.report.tables import methods_table, metric_group, rank_stability_table, results_frame, \
    sensitivity_table, summarize, to_markdown
from editlens.runs.store import Store

LAMS = [1.5e2, 1.5e3, 1.5e4, 1.5e5, 1.5e6]


def make_store(path, seed: int = 0) -> Store:
    """A synthetic run: a MEMIT lambda sweep, two more methods and a pre-edit baseline on two datasets,
    two sequential units with checkpoints 1/10/100, teacher-forced and autoregressive accuracies and an
    EVK metric at two sigmas. Strength s in [0, 1): KL grows with it, top-1 overlap falls."""
    rng = np.random.default_rng(seed)
    st = Store(path)
    st.start_run("r", {"name": "synthetic", "report": {"title": "Synthetic report"}}, {"editlens": "test"}, "fp", [0])
    for ds in ("mcf", "zsre"):
        for method, pts in (("memit", LAMS), ("alphaedit", [None]), ("pmet", [None]), ("pre-edit", [None])):
            for lam in pts:
                s = 0.0 if method == "pre-edit" else (1 / (1 + math.log10(lam)) if lam else
                                                       {"alphaedit": 0.3, "pmet": 0.5}[method])
                rows = []
                for c in range(4):
                    for kind, metric, v in (("rewrite", "t_acc", 0.2 + 0.7 * (s > 0)),
                                            ("rewrite", "s_acc", 0.1 + 0.5 * (s > 0)),
                                            ("neighborhood", "s_acc", 0.3 + rng.normal(0, 0.05)),
                                            ("neighborhood", "kl", 2 * s + 0.001 * c),
                                            ("neighborhood", "topk@1", 1 - 0.8 * s - 0.001 * c),
                                            ("neighborhood", "evk@sigma=0.1", 1 - 0.2 * s),
                                            ("neighborhood", "evk@sigma=1.0", 1 - 0.6 * s)):
                        rows.append((0, 100, f"c{c}", kind, metric, float(v)))
                meta = {"method": method, "label": method, "dataset": ds, "n_edits": 100, "seed": 0,
                        "hparams": {"mom2_update_weight": lam} if lam else {},
                        "sweep": {"memit.mom2_update_weight": lam} if lam else {}}
                st.commit_unit("r", f"{method}-{ds}-{lam}", rows, meta=meta,
                               diagnostics={"delta_k_mean": 10 * s, "wall_s": 1.0})
    for method, slope in (("memit", 0.2), ("rome", 0.4)):
        unit, meta = f"seq-{method}", {"method": method, "label": f"{method}-seq", "dataset": "mcf",
                                       "regime": "sequential", "n_edits": 100, "checkpoints": [1, 10, 100]}
        for step, n in enumerate((1, 10, 100)):
            st.commit_step("r", unit, step, [(step, n, f"c{c}", "neighborhood", "topk@1",
                                              1 - slope * math.log10(n)) for c in range(3)], meta=meta)
        st.commit_unit("r", unit, [], meta=meta)
    return st


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    st = make_store(tmp_path_factory.mktemp("store") / "res.sqlite")
    yield st
    st.close()


@pytest.fixture(scope="module")
def built(store):
    """The full report (figures included) is built once for the module: rendering is the slow part."""
    return build_report(store)


def test_metric_groups():
    assert metric_group("t_acc", "rewrite") == "target"
    assert metric_group("s_acc", "neighborhood") == "gt_based"
    assert metric_group("kl", "neighborhood") == "gt_free"
    assert metric_group("topk@5", "locality") == "gt_free"
    assert metric_group("nkl", "neighborhood") == "gt_free"
    assert metric_group("fluency", "generation") == "other"
    assert metric_group("s_acc", "neighborhood", {"gt_free": ["neighborhood/s_acc"]}) == "gt_free"


def test_rows_with_meta_columns(store):
    df = store.rows_with_meta("r")
    for c in ("method", "label", "dataset", "hparams.mom2_update_weight", "sweep.memit.mom2_update_weight",
              "meta.n_edits", "n_edits", "seed"):
        assert c in df.columns, c


def test_summarize_mean_and_sem(store):
    df = results_frame(store)
    s = summarize(df)
    row = s[(s.method_label == "memit") & (s.dataset == "mcf") & (s["sweep.memit.mom2_update_weight"] == 1.5e2)
            & (s.column == "neighborhood/kl")].iloc[0]
    s150 = 1 / (1 + math.log10(150))
    vals = [2 * s150 + 0.001 * c for c in range(4)]
    assert row["mean"] == pytest.approx(np.mean(vals)) and row["n"] == 4
    assert row["sem"] == pytest.approx(np.std(vals, ddof=1) / 2)
    # sequential units contribute their last checkpoint only
    seq = s[(s.method_label == "rome-seq") & (s.column == "neighborhood/topk@1")].iloc[0]
    assert seq["mean"] == pytest.approx(1 - 0.4 * 2)
    # columns come grouped: target, then GT-based, then GT-free
    order = list(dict.fromkeys(s["group"]))
    assert order == ["target", "gt_based", "gt_free"]


def test_methods_table_markdown(store):
    t = methods_table(results_frame(store))
    md = to_markdown(t)
    assert "Target knowledge: rewrite/t_acc" in md and "GT-free specificity: neighborhood/kl" in md
    assert md.index("GT-based specificity") < md.index("GT-free specificity")
    assert "± " in md and "| pre-edit |" in md and "| alphaedit |" in md
    assert len(t) == 2 * 5 + 2 * 3 + 2  # memit points + other methods per dataset + 2 sequential


def test_sensitivity_table_uses_delta_k_and_baseline(store):
    df = results_frame(store)
    sens = sensitivity_table(df, diagnostics=store.diagnostics("r"))
    assert set(sens["reference"]) == {"delta_k"}
    kl = sens[(sens.metric == "neighborhood/kl") & (sens.dataset == "mcf")].iloc[0]
    assert kl.n_points == 6  # five lambdas + the pre-edit point
    assert kl.tau == pytest.approx(1.0) and math.isnan(kl.coverage)
    top1 = sens[(sens.metric == "neighborhood/topk@1") & (sens.dataset == "mcf")].iloc[0]
    s150 = 1 / (1 + math.log10(150))
    assert top1.tau == pytest.approx(-1.0)
    # max is the pre-edit point (1 - 0.0015 averaged over cases), min the lambda = 150 point
    assert top1.coverage == pytest.approx((1 - 0.0015) - (1 - 0.8 * s150 - 0.0015))
    # without diagnostics: correlate with lambda itself
    sens2 = sensitivity_table(df)
    assert set(sens2["reference"]) == {"reg_value"}
    assert sens2[(sens2.metric == "neighborhood/kl") & (sens2.dataset == "mcf")].iloc[0].tau == pytest.approx(-1.0)


def test_rank_stability_table(store):
    per_metric, per_group = rank_stability_table(results_frame(store))
    r = per_metric.set_index("metric")
    assert r.loc["neighborhood/kl", "tau"] == pytest.approx(1.0)  # same ordering on both datasets
    assert r.loc["neighborhood/kl", "group"] == "gt_free"
    assert "GT-free specificity" in set(per_group["group"])


def test_plots_generic_and_specific(tmp_path, store):
    df = results_frame(store)
    fig = plots.plot_lines(pd.DataFrame({"x": [1, 10, 100, 1, 10, 100], "y": [1, 2, 3, 2, 3, 4],
                                         "h": ["a", "a", "a", "b", "b", "b"]}), "x", "y", "h")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and len(ax.get_lines()) == 2
    png = plots.figure_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.tf_ar_pairs(["t_acc", "s_acc", "kl", "x_tf", "x_ar"]) == [("acc", "t_acc", "s_acc"),
                                                                          ("x", "x_tf", "x_ar")]
    fig = plots.plot_tf_vs_ar(df)
    assert len(fig.axes) == 1  # only rewrite probes have both t_acc and s_acc
    fig = plots.plot_sigma(df)
    assert fig.axes[0].get_title() == "neighborhood/evk"
    xs = sorted({x for line in fig.axes[0].get_lines() for x in line.get_xdata()})
    assert xs == [0.1, 1.0]
    fig = plots.plot_sweep(df[df["sweep.memit.mom2_update_weight"].notna()], "sweep.memit.mom2_update_weight",
                           ["neighborhood/kl"])
    assert fig.axes[0].get_xscale() == "log"
    s = plots.split_sigma(pd.DataFrame({"metric": ["a@sigma=0.5", "b"], "value": [1, 2]}))
    assert list(s["sigma"]) == [0.5] and list(s["metric_base"]) == ["a"]


def test_report_dir_and_html(tmp_path, store, built):
    rep = built
    assert rep.title == "Synthetic report"
    # the run has a pre-edit baseline: the paired table (every system minus pre-edit) follows the methods table
    assert [t.name for t in rep.tables] == ["methods", "paired", "sensitivity", "rank_stability",
                                            "rank_stability_groups"]
    names = [f.name for f in rep.figures]
    assert names == ["edits_curve_0", "sweep_memit_mom2_update_weight_0", "tf_vs_ar", "sigma"]
    paths = rep.write_dir(tmp_path / "out")
    assert {p.name for p in paths} >= {"methods.md", "methods.csv", "sensitivity.csv", "index.md", "sigma.png"}
    assert pd.read_csv(tmp_path / "out" / "sensitivity.csv")["tau"].notna().any()
    assert (tmp_path / "out" / "sigma.png").read_bytes() == rep.figures[-1].png
    html = rep.to_html()
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(imgs) == 4 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in imgs)
    assert "<table" in html and "GT-free specificity" in html and "http" not in html.split("<body>")[1]
    # a DataFrame works as a source too (write_report / write_html wrap build_report), and an empty store
    # gives a page with a note
    paths = write_report(store.rows_with_meta(), tmp_path / "df", plots_enabled=False)
    assert (tmp_path / "df" / "methods.csv").exists() and not any(p.suffix == ".png" for p in paths)
    with Store(tmp_path / "empty.sqlite") as empty:
        empty.start_run("e", {}, {}, None, [])
        assert "no result rows" in write_html(empty, tmp_path / "e.html").read_text()


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


_CHECK = ("<script>window.addEventListener('load',function(){var im=document.images,ok=0;"
          "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}"
          "var d=document.createElement('div');d.id='imgcheck';d.textContent='total='+im.length+';ok='+ok;"
          "document.body.appendChild(d);});</script>")


def _loaded_images(chromium: str, page, tmp_path) -> tuple[int, int]:
    probe = tmp_path / f"probe-{page.name}"
    probe.write_text(page.read_text().replace("</body>", _CHECK + "</body>"))
    profile = tmp_path / "chromium-profile"
    out = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120)
    m = re.search(r'<div id="imgcheck">total=(\d+);ok=(\d+)</div>', out.stdout)
    assert m, f"no check result in the dumped DOM (rc={out.returncode}): {out.stderr[-2000:]}"
    return int(m.group(1)), int(m.group(2))


def test_html_images_load_in_chromium(tmp_path, built):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium binary found (apt-get install -y chromium)")
    page = tmp_path / "report.html"
    page.write_text(built.to_html(), encoding="utf-8")
    total, ok = _loaded_images(chromium, page, tmp_path)
    assert total == 4 and ok == total
    # the check itself can fail: a page with a broken image reports it
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><img src='data:image/png;base64,AAAA'></body></html>")
    assert _loaded_images(chromium, broken, tmp_path) == (1, 0)


def test_cli_report(tmp_path, store):
    runner = CliRunner()
    res = runner.invoke(report_cmd, [str(store.path), "--html", str(tmp_path / "r.html"), "--out",
                                     str(tmp_path / "o"), "--export", str(tmp_path / "rows.csv"),
                                     "--range", "s_acc=0:1"])
    assert res.exit_code == 0, res.output
    assert "## Sensitivity to the swept regulariser" in res.output
    assert (tmp_path / "r.html").exists() and (tmp_path / "o" / "methods.md").exists()
    assert len(pd.read_csv(tmp_path / "rows.csv")) == len(store.rows())
    res = runner.invoke(report_cmd, [str(store.path), "--run", "nope"])
    assert res.exit_code != 0 and "no run 'nope'" in res.output
    res = runner.invoke(report_cmd, [str(store.path), "--range", "kl=3"])
    assert res.exit_code != 0 and "METRIC=LOW:HIGH" in res.output
