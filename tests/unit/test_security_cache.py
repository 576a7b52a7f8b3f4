"""The on-disk base cache decodes only request types editlens registered: a tampered entry never runs code.

A cache entry naming ``module:qualname`` used to be imported and called with arguments from the file; now the
name is looked up in a closed registry of :class:`CustomRequest` subclasses, and anything else makes the whole
entry count as corrupt (a warning naming the file, then the base answers are recomputed and the file rewritten).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from editlens.data.schema import Probe, Rewrite, make_case
from editlens.evaluate import evk
from editlens.evaluate.core import BaseCache, CustomRequest, NextToken, _from_plain, _to_plain, evaluate
from editlens.evaluate.system import ModelSystem


def _cases(n: int = 2):
    out = []
    for i in range(n):
        rw = Rewrite("The capital of {} is", f"Country{i}", "Seoul", "Tokyo")
        out.append(make_case(f"c{i}", rw, {
            "neighborhood": [Probe("The capital of China is", "Beijing"), Probe(f"The capital of Land{i} is", "X")],
        }))
    return out


class Counting(ModelSystem):
    """Counts the base system's calls (a recomputation shows up as new calls)."""

    def __init__(self, lm):
        super().__init__(lm)
        self.calls = 0

    def next_token_logprobs(self, prompts):
        self.calls += 1
        return super().next_token_logprobs(prompts)


def _metrics():
    # kl: built-in NextToken requests; evk_kl: CustomRequest subclasses (EvkNext, EvkHead) that must round-trip
    return ["kl", evk.EvkKL("subject", sigmas=(0.2,), n_samples=1)]


def _rows(res):
    return sorted((r.case_id, r.probe_kind, r.metric, round(float(r.value), 6)) for r in res.rows)


def _tamper(path: Path, entry: tuple) -> None:
    plain = torch.load(path, weights_only=True)
    plain.append(entry)
    torch.save(plain, path)


def _only_file(d: Path) -> Path:
    files = sorted(d.glob("*.pt"))
    assert len(files) == 1, files
    return files[0]


@pytest.mark.parametrize("entry", [
    # the reproducer: os.system("touch <marker>")
    lambda marker: ("c", "os:system", (f"touch {marker}",), None),
    # a real editlens callable that is not a request class (it would write a file)
    lambda marker: ("c", "pathlib:Path.touch", (marker,), None),
    lambda marker: ("c", "editlens.data:save_cases", ((), marker), None),
    # the base class itself, and a registered name with a non-plain argument
    lambda marker: ("c", "editlens.evaluate.core:CustomRequest", (), None),
    lambda marker: ("c", "editlens.evaluate.evk:EvkHead", (torch.zeros(1),), torch.zeros(1)),
    # a well-formed entry the key does not stand for (a planted answer)
    lambda marker: ("c", "editlens.evaluate.evk:EvkHead", ("planted",), torch.zeros(1)),
], ids=["os-system", "pathlib-touch", "editlens-function", "base-class", "non-plain-argument", "extra-request"])
def test_tampered_cache_entry_runs_nothing_and_is_recomputed(tiny_llama, tmp_path, entry):
    marker = tmp_path / "PWNED"
    d = tmp_path / "cache"
    base = Counting(tiny_llama)
    clean = evaluate(base, _cases(), base=base, metrics=_metrics(), cache=BaseCache(d), progress=False)
    path = _only_file(d)
    calls = base.calls
    assert calls > 0

    _tamper(path, entry(str(marker)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = evaluate(base, _cases(), base=base, metrics=_metrics(), cache=BaseCache(d), progress=False)
    assert not marker.exists()
    assert any(str(path) in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert base.calls > calls  # the entry was dropped and the base answers recomputed
    assert again.meta["base_cache_hit"] is False
    assert _rows(again) == _rows(clean)

    # the recomputed entry replaced the tampered file: the next run hits, without a warning
    calls = base.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = evaluate(base, _cases(), base=base, metrics=_metrics(), cache=BaseCache(d), progress=False)
    assert base.calls == calls and third.meta["base_cache_hit"] is True
    assert _rows(third) == _rows(clean)


def test_unreadable_cache_file_is_a_warning_and_recomputed(tiny_llama, tmp_path):
    d = tmp_path / "cache"
    base = Counting(tiny_llama)
    clean = evaluate(base, _cases(), base=base, metrics=["kl"], cache=BaseCache(d), progress=False)
    path = _only_file(d)
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable"):
        again = evaluate(base, _cases(), base=base, metrics=["kl"], cache=BaseCache(d), progress=False)
    assert _rows(again) == _rows(clean)
    assert BaseCache(d).get(path.stem) is not None  # rewritten


def test_custom_requests_round_trip_through_the_registry():
    reqs = [evk.EvkNext("The capital of X is", "subject", 0.2, 0, 7, 15, 16), evk.EvkHead()]
    for r in reqs:
        back, ans = _from_plain(_to_plain(r, torch.ones(2)))
        assert back == r and type(back) is type(r) and torch.equal(ans, torch.ones(2))
    from editlens.evaluate.core import registered_request_types

    names = registered_request_types()
    assert names["editlens.evaluate.evk:EvkNext"] is evk.EvkNext
    assert all(issubclass(c, CustomRequest) for c in names.values())


def test_a_request_class_defined_later_registers_itself():
    @dataclass(frozen=True, order=True)
    class LocalReq(CustomRequest):
        prompt: str
        n: int = 1
        xs: tuple = ()

    r = LocalReq("p", 2, (1, ("a", 2.5)))
    back, _ = _from_plain(_to_plain(r, "ans"))
    assert back == r
    # nested non-plain values are refused on decode
    with pytest.raises(ValueError, match="plain"):
        _from_plain(("c", f"{LocalReq.__module__}:{LocalReq.__qualname__}", ("p", 2, (print,)), None))
    with pytest.raises(ValueError, match="not a registered request type"):
        _from_plain(("c", "builtins:eval", ("1",), None))
    with pytest.raises(ValueError):
        _from_plain(("n", NextToken("x"), None))


def test_cli_eval_cache_dir_tampered(tmp_path, monkeypatch):
    """The issue's reproducer through ``editlens eval --cache-dir D``."""
    from click.testing import CliRunner

    from editlens.cli.main import cli
    from editlens.data import save_cases

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "cases.json"
    save_cases(_cases(1), data)
    d = tmp_path / "D"
    args = ["eval", "--model", "tiny-llama", "--data", str(data), "--metrics", "kl", "--cache-dir", str(d),
            "--out", str(tmp_path / "a.csv")]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    path = _only_file(d)
    _tamper(path, ("c", "os:system", ("touch PWNED",), None))
    args[-1] = str(tmp_path / "b.csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = CliRunner().invoke(cli, args)
    assert not (tmp_path / "PWNED").exists()
    assert second.exit_code == 0, second.output
    assert any(str(path) in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
