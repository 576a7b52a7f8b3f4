"""Issue 19 (second-moment statistics fast by default): the default's settings and cache key, progress of both
phases (a bar on a terminal, plain lines and log records otherwise, also through ``editlens.edit``), the figures
``editlens stats`` prints, and that the per-token progress counter leaves the sampled corpus unchanged."""
from __future__ import annotations

import io
import logging
import re

import pytest
import torch
from click.testing import CliRunner

from editlens import progress as P
from editlens.edit import stats as st
from editlens.edit.hparams import LocateHParams


def test_default_settings_and_their_cache_key(tiny_llama, tmp_path):
    hp = LocateHParams()
    assert (hp.stats_n_samples, hp.stats_max_length) == (st.DEFAULT_N_SAMPLES, st.DEFAULT_MAX_LENGTH)
    # the new default is half the old one's tokens (see docs/methods.md, "Second-moment statistics")
    assert st.DEFAULT_N_SAMPLES * st.DEFAULT_MAX_LENGTH * 2 == st.PREVIOUS_N_SAMPLES * st.PREVIOUS_MAX_LENGTH
    assert (st.DEFAULT_N_SAMPLES, st.DEFAULT_MAX_LENGTH) == (128, 128)
    kw = hp.stats_kwargs()
    assert (kw["n_samples"], kw["max_length"], kw["corpus"]) == (st.DEFAULT_N_SAMPLES, st.DEFAULT_MAX_LENGTH, None)
    # the old settings stay reachable and are cached under another key
    old = LocateHParams(stats_n_samples=st.PREVIOUS_N_SAMPLES, stats_max_length=st.PREVIOUS_MAX_LENGTH)
    assert old.stats_kwargs()["n_samples"] == 256 and old.stats_kwargs()["max_length"] == 128
    p_new = st._cache_path(tmp_path, tiny_llama, 1, "sampled0", st.DEFAULT_N_SAMPLES, st.DEFAULT_MAX_LENGTH)
    p_old = st._cache_path(tmp_path, tiny_llama, 1, "sampled0", 256, 128)
    assert p_new != p_old and f"-n{st.DEFAULT_N_SAMPLES}-t{st.DEFAULT_MAX_LENGTH}-" in p_new.name


def test_counted_sampling_gives_the_same_corpus_as_sample_texts(tiny_llama):
    """The progress counter (a logits processor) must not change what is sampled: the corpus equals
    ``locate.sample_texts`` with the same seeds and batches (so corpora cached before it stay valid)."""
    from editlens.edit.locate import sample_texts

    docs = st.sampled_corpus(tiny_llama, 6, 8, seed=3, cache=None, batch_size=4)
    seeds = [st.CORPUS_SEEDS[i % len(st.CORPUS_SEEDS)] for i in range(6)]
    ref = sample_texts(tiny_llama, seeds, 8, seed=3, temperature=1.0, top_k=50, batch_size=4)
    assert docs == ref
    assert len(set(docs)) > 1  # not a degenerate corpus


def test_progress_lines_and_log_records_for_both_phases(tiny_llama, tmp_path, caplog):
    s = io.StringIO()
    info: dict = {}
    with P.settings("lines", interval=0, stream=s), caplog.at_level(logging.INFO, logger="editlens.edit.stats"):
        C = st.second_moment(tiny_llama, [1, 2], n_samples=3, max_length=8, cache_dir=tmp_path, info=info)
    out = s.getvalue()
    assert "\r" not in out
    assert "second-moment statistics of layers 1, 2 over 3 documents x 8 tokens sampled from the model" in out
    # sampling counts generated tokens (3 documents x 8 tokens), accumulation counts batches
    assert re.search(r"sampling statistics corpus: 24/24 tok \[.*\] done", out), out
    assert re.search(r"second moments: \d+/\d+ batch \[.*\] done", out), out
    msgs = [r.getMessage() for r in caplog.records if r.name == "editlens.edit.stats"]
    assert any("computing over 3 documents x 8 tokens" in m for m in msgs), msgs
    assert any(re.search(rf"{info['tokens']} tokens of 3 documents in [\d.]+ s \(sampling", m) for m in msgs), msgs
    assert info["computed"] == [1, 2] and info["cached"] == [] and info["documents"] == 3
    assert 3 * 8 <= info["tokens"] <= 3 * 8 + 3  # every document: its seed word (1 token here) + up to 8 new
    assert info["sampling_s"] > 0 and info["accumulation_s"] > 0 and info["total_s"] >= info["sampling_s"]
    # second call: everything from the cache, nothing printed, nothing logged, same matrices
    s2, info2 = io.StringIO(), {}
    caplog.clear()
    with P.settings("lines", interval=0, stream=s2), caplog.at_level(logging.INFO, logger="editlens.edit.stats"):
        C2 = st.second_moment(tiny_llama, [1, 2], n_samples=3, max_length=8, cache_dir=tmp_path, info=info2)
    assert s2.getvalue() == "" and not caplog.records
    assert info2["computed"] == [] and info2["cached"] == [1, 2] and info2["tokens"] == 0
    assert all(torch.equal(C[l], C2[l]) for l in (1, 2))


def test_quiet_prints_nothing_but_still_logs(tiny_llama, tmp_path, caplog):
    s = io.StringIO()
    with P.settings("lines", interval=0, stream=s), P.settings(quiet=True), \
            caplog.at_level(logging.INFO, logger="editlens.edit.stats"):
        st.second_moment(tiny_llama, [1], n_samples=2, max_length=4, cache_dir=tmp_path)
    assert s.getvalue() == ""
    assert any("computing over" in r.getMessage() for r in caplog.records)


def test_terminal_gets_a_tqdm_bar(tiny_llama, tmp_path):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    t = Tty()
    with P.settings("auto", stream=t):
        st.second_moment(tiny_llama, [1], n_samples=2, max_length=4, cache_dir=tmp_path)
    assert "\r" in t.getvalue() and "sampling statistics corpus" in t.getvalue()


def test_progress_shown_when_edit_is_called_from_a_script(tiny_llama, tmp_path):
    """``editlens.edit(...)`` has ``progress=False`` by default; the statistics, a one-off computation of minutes
    on a real model, report their progress anyway (the value optimisation stays silent)."""
    import editlens
    from editlens.data.schema import Rewrite, make_case
    from editlens.edit.hparams import TINY

    case = make_case("c0", Rewrite("{} is located in", "Paris", "Rome", "France"))
    s = io.StringIO()
    with P.settings("lines", interval=0, stream=s):
        e = editlens.edit(tiny_llama, [case], "rome", **{**TINY, "stats_dir": str(tmp_path)})
    e.undo()
    out = s.getvalue()
    assert "second-moment statistics of layers" in out
    assert re.search(r"sampling statistics corpus: \d+/\d+ tok .* done", out), out
    assert re.search(r"second moments: .* done", out), out


def test_cli_stats_prints_time_split_and_tokens(tmp_path, monkeypatch):
    from editlens.cli.main import cli

    monkeypatch.setenv("EDITLENS_PROGRESS", "off")
    args = ["stats", "--model", "tiny-llama", "--layers", "1-2", "--n-samples", "3", "--max-length", "8",
            "--cache-dir", str(tmp_path)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert re.search(r"computed layers 1, 2 over \d+ tokens of 3 documents \(3 documents x 8 tokens sampled", r.output)
    assert re.search(r"time: [\d.]+ s wall \(sampling [\d.]+ s, accumulation [\d.]+ s\)", r.output), r.output
    r2 = CliRunner().invoke(cli, args)
    assert r2.exit_code == 0 and "all layers read from the cache" in r2.output
    bad = CliRunner().invoke(cli, args[:-4] + ["--n-samples", "-1"])
    assert bad.exit_code != 0 and "--n-samples" in bad.output and "must be >= 1" in bad.output


def test_second_moment_holds_the_model_lock_throughout(tiny_llama, tmp_path, monkeypatch):
    """Another thread cannot edit or undo while statistics are computed: the fingerprint read for the cache key
    names the weights the keys were recorded from. Checked from inside both phases (sampling the corpus and the
    accumulation): a second thread fails to take ``lm.lock`` there, and takes it once the call has returned."""
    import threading

    def other_thread_gets_lock() -> bool:
        got = []

        def run():
            ok = tiny_llama.lock.acquire(blocking=False)
            got.append(ok)
            if ok:
                tiny_llama.lock.release()

        t = threading.Thread(target=run)
        t.start()
        t.join()
        return got[0]

    seen = []
    real_docs, real_acc = st._docs_and_key, st._accumulate

    def docs_spy(*a, **k):
        seen.append(("sampling", other_thread_gets_lock()))
        return real_docs(*a, **k)

    def acc_spy(*a, **k):
        seen.append(("accumulation", other_thread_gets_lock()))
        return real_acc(*a, **k)

    monkeypatch.setattr(st, "_docs_and_key", docs_spy)
    monkeypatch.setattr(st, "_accumulate", acc_spy)
    st.second_moment(tiny_llama, [1], n_samples=2, max_length=6, cache_dir=tmp_path, progress=False)
    assert seen == [("sampling", False), ("accumulation", False)]
    assert other_thread_gets_lock()
