"""``ar_judge@URL``: where the judge prompts and the API key go (loopback servers only: 127.0.0.0/8).

* ``http://`` to a host that is not loopback is refused when a key is set, at metric resolution (before any work);
* redirects are never followed (a cross-origin redirect would otherwise carry ``Authorization`` along);
* the key is sent only as the ``Authorization`` header and never reaches results, a store, a report, a log or
  an error message, even when the server echoes it back;
* ``editlens bench --dry-run`` and the run start say which host receives how many prompts and whether a key is sent.
"""
from __future__ import annotations

import json
import logging
import re
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from editlens.data.schema import Probe, Rewrite, make_case
from editlens.errors import MetricError, SpecError
from editlens.evaluate import judge as J
from editlens.evaluate.core import evaluate, resolve_metrics
from editlens.evaluate.system import ModelSystem

SECRET = "sk-editlens-test-9f8e7d6c5b4a"
ENV = J.DEFAULT_API_KEY_ENV


class _Server:
    """A threaded HTTP server on a loopback address that records every request and answers with ``reply``."""

    def __init__(self, host: str = "127.0.0.1", reply=None):
        self.requests: list[dict] = []
        self.reply = reply or (lambda handler, body: (200, {}, json.dumps(
            {"choices": [{"message": {"content": "Yes"}}]}).encode()))
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                outer.requests.append({"method": self.command, "path": self.path,
                                       "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                code, headers, data = outer.reply(self, body)
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_GET = _handle

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.timeout = 10
        self.host = host
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture()
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture()
def no_proxy(monkeypatch):
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)


def _cases(n: int = 2):
    return [make_case(f"c{i}", Rewrite("The capital of {} is", f"Country{i}", "Seoul", "Tokyo"),
                      {"paraphrase": [Probe(f"Country{i}'s capital city is", "Seoul")]}) for i in range(n)]


# ---------------------------------------------------------------------------------------------- plain http + key
@pytest.mark.parametrize("url", ["http://example.com/v1", "http://10.1.2.3:8000/v1", "http://judge.internal/v1",
                                 "HTTP://Example.com/v1"])
def test_plain_http_to_remote_host_with_key_is_refused_at_resolution(monkeypatch, url):
    monkeypatch.setenv(ENV, SECRET)
    with pytest.raises(MetricError) as e:
        resolve_metrics([f"ar_judge@{url}"])
    msg = str(e.value)
    assert url in msg and "https://" in msg and ENV in msg and SECRET not in msg


def test_plain_http_refused_in_spec_validation(monkeypatch, tmp_path):
    from editlens.runs.runner import load_validated_spec

    monkeypatch.setenv(ENV, SECRET)
    spec = _judge_spec(tmp_path, "http://example.com/v1")
    with pytest.raises(SpecError, match="example.com") as e:
        load_validated_spec(spec)
    assert SECRET not in str(e.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1", "http://127.0.0.53/v1", "http://localhost:8000/v1",
                                 "http://[::1]:8000/v1", "https://example.com/v1"])
def test_loopback_http_and_https_are_accepted_with_a_key(monkeypatch, url):
    monkeypatch.setenv(ENV, SECRET)
    (m,) = resolve_metrics([f"ar_judge@{url}"])
    assert isinstance(m.judge, J.EndpointJudge)


def test_plain_http_remote_without_key_is_allowed(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    (m,) = resolve_metrics(["ar_judge@http://example.com/v1"])
    assert m.judge.url == "http://example.com/v1/chat/completions"


def test_credentials_in_the_url_are_refused(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(MetricError, match="credentials") as e:
        J.EndpointJudge("https://user:hunter2@example.com/v1")
    assert "hunter2" not in str(e.value)


def test_key_set_after_resolution_is_still_checked_before_sending(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    j = J.EndpointJudge("http://example.com/v1")
    monkeypatch.setenv(ENV, SECRET)
    with pytest.raises(MetricError, match="https://"):
        j.judge([J.JudgeItem("q", ("a",), "a")])


# ---------------------------------------------------------------------------------------------- redirects
@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirects_are_not_followed_and_authorization_not_forwarded(monkeypatch, no_proxy, code):
    target = _Server("127.0.0.2")  # another origin (host and port)
    where = target.url("127.0.0.2") + "/chat/completions"
    src = _Server(reply=lambda h, b: (code, {"Location": where}, b"{}"))
    try:
        monkeypatch.setenv(ENV, SECRET)
        j = J.EndpointJudge(src.url())
        with pytest.raises(MetricError, match="redirect") as e:
            j.judge([J.JudgeItem("The capital of France is", ("Paris",), "Paris")])
        assert SECRET not in str(e.value)
        assert len(src.requests) == 1 and src.requests[0]["headers"]["authorization"] == f"Bearer {SECRET}"
        assert target.requests == []  # nothing was sent to the redirect target, with or without the key
    finally:
        src.close()
        target.close()


# ---------------------------------------------------------------------------------------------- the key's path
def test_key_is_sent_as_header_and_never_recorded(monkeypatch, no_proxy, tiny_llama, caplog, capsys):
    # a hostile server echoes the Authorization header back in its reply
    def echo(handler, body):
        auth = handler.headers.get("Authorization", "")
        return 200, {}, json.dumps({"choices": [{"message": {"content": f"Yes {auth}"}}]}).encode()

    s = _Server(reply=echo)
    try:
        monkeypatch.setenv(ENV, SECRET)
        caplog.set_level(logging.DEBUG)
        base = ModelSystem(tiny_llama)
        metrics = resolve_metrics([f"ar_judge@{s.url()}"])
        with _no_secret_warnings():
            res = evaluate(base, _cases(2), base=base, metrics=metrics, cache=False, progress=False)
        assert s.requests, "the judge was never called"
        assert all(r["headers"].get("authorization") == f"Bearer {SECRET}" for r in s.requests)
        assert all(SECRET not in r["body"].decode() for r in s.requests)
        # one per probe (2 cases x rewrite + paraphrase) + the control set
        assert len(s.requests) == 2 * 2 + len(J.CONTROL_PAIRS) * 2
        assert res.value(metrics[0].name, "paraphrase") == 1.0
        dumped = json.dumps(res.meta, default=str) + repr(res.rows) + json.dumps(metrics[0].params, default=str)
        assert SECRET not in dumped and "Bearer" in dumped  # the echoed reply is kept, the key redacted
        out = capsys.readouterr()
        assert SECRET not in out.out + out.err + caplog.text
    finally:
        s.close()


class _no_secret_warnings:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self.w = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *a):
        self._cm.__exit__(*a)
        assert all(SECRET not in str(x.message) for x in self.w)


def test_error_replies_never_carry_the_key(monkeypatch, no_proxy):
    s = _Server(reply=lambda h, b: (401, {}, json.dumps({"error": f"bad key {h.headers.get('Authorization')}"}).encode()))
    try:
        monkeypatch.setenv(ENV, SECRET)
        with pytest.raises(MetricError, match="401") as e:
            J.EndpointJudge(s.url()).judge([J.JudgeItem("q", ("a",), "a")])
        assert SECRET not in str(e.value) and ENV in str(e.value)
    finally:
        s.close()


def test_no_key_no_authorization_header(monkeypatch, no_proxy, server):
    monkeypatch.delenv(ENV, raising=False)
    v = J.EndpointJudge(server.url()).judge([J.JudgeItem("q", ("a",), "a")])
    assert v[0].correct and "authorization" not in server.requests[0]["headers"]


# ---------------------------------------------------------------------------------------------- announcements
def test_remote_endpoints_lines(monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    metrics = resolve_metrics(["kl", "ar_judge@http://127.0.0.1:9/v1", "ar_judge"])
    lines = J.remote_endpoints(metrics, [(_cases(3), 2)])
    assert len(lines) == 1
    line = lines[0]
    # 3 cases x 2 probes (rewrite, paraphrase) x 2 evaluations + the control set (20 prompts) per evaluation
    assert "127.0.0.1:9" in line and f"{3 * 2 * 2 + 2 * 2 * len(J.CONTROL_PAIRS)} prompts" in line
    assert f"${ENV}" in line and "key sent" in line and SECRET not in line
    monkeypatch.delenv(ENV)
    assert "no API key" in J.remote_endpoints(metrics, [(_cases(3), 1)])[0]
    assert J.remote_endpoints(resolve_metrics(["kl", "ar_judge"]), [(_cases(3), 1)]) == []


def _judge_spec(tmp_path: Path, url: str) -> Path:
    p = tmp_path / "judge.toml"
    p.write_text(textwrap.dedent(f"""
        name = "judge"
        model = "tiny-llama"
        metrics = ["ar_judge@{url}"]
        [[datasets]]
        path = "synthetic:2"
        [[methods]]
        name = "none"
        [regime]
        kind = "batch"
        sizes = [2]
    """).lstrip())
    return p


def test_bench_dry_run_and_run_start_announce_the_endpoint(monkeypatch, no_proxy, tmp_path, server):
    from click.testing import CliRunner

    from editlens.cli.main import cli

    monkeypatch.setenv(ENV, SECRET)
    spec = _judge_spec(tmp_path, server.url())
    dry = CliRunner().invoke(cli, ["bench", str(spec), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f"127.0.0.1:{server.port}" in dry.output and "prompts" in dry.output and "key sent" in dry.output
    assert SECRET not in dry.output
    assert server.requests == []  # a dry run sends nothing

    store = tmp_path / "judge.sqlite"
    run = CliRunner().invoke(cli, ["bench", str(spec), "--store", str(store)])
    assert run.exit_code == 0, run.output
    assert f"127.0.0.1:{server.port}" in run.output and "key sent" in run.output
    assert server.requests and SECRET not in run.output
    # the announced count is what the server received (dry run and run start agree), each with the key
    announced = {int(re.search(r"up to (\d+) prompts", o).group(1)) for o in (dry.output, run.output)}
    assert announced == {len(server.requests)}
    assert all(r["headers"].get("authorization") == f"Bearer {SECRET}" for r in server.requests)
    # neither the store nor the report holds the key
    assert SECRET.encode() not in store.read_bytes()
    for f in (tmp_path / "judge_report").rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


@pytest.mark.parametrize("method", ["none", "ft-m"])
def test_sequential_run_sends_what_was_announced(monkeypatch, no_proxy, tmp_path, server, capsys, method):
    from editlens.runs.runner import run_spec

    monkeypatch.delenv(ENV, raising=False)
    spec = tmp_path / "seq.toml"
    spec.write_text(textwrap.dedent(f"""
        name = "seq"
        model = "tiny-llama"
        metrics = ["ar_judge@{server.url()}"]
        [[datasets]]
        path = "synthetic:3"
        [[methods]]
        name = "{method}"
        hparams = {{}}
        [regime]
        kind = "sequential"
        checkpoints = [1, 2]
        batch_size = 1
    """).lstrip())
    with pytest.warns(UserWarning, match="control set"):  # the test server says Yes to everything
        run_spec(spec, store=tmp_path / "seq.sqlite", progress=False)
    err = capsys.readouterr().err
    m = re.search(r"127\.0\.0\.1:\d+ will receive up to (\d+) prompts .*no API key", err)
    assert m, err
    assert int(m.group(1)) == len(server.requests) > 0
    assert all("authorization" not in r["headers"] for r in server.requests)


def test_cli_eval_announces_what_it_sends(monkeypatch, no_proxy, tmp_path, server):
    from click.testing import CliRunner

    from editlens.cli.main import cli
    from editlens.data import save_cases

    monkeypatch.setenv(ENV, SECRET)
    data = tmp_path / "cases.json"
    save_cases(_cases(2), data)
    with pytest.warns(UserWarning, match="control set"):
        r = CliRunner().invoke(cli, ["eval", "--model", "tiny-llama", "--data", str(data), "--metrics",
                                     f"ar_judge@{server.url()}"])
    assert r.exit_code == 0, r.output
    m = re.search(r"127\.0\.0\.1:\d+ will receive up to (\d+) prompts .*key sent", r.output)
    assert m, r.output
    assert int(m.group(1)) == len(server.requests) == 2 * 2 + 2 * len(J.CONTROL_PAIRS)
    assert SECRET not in r.output
