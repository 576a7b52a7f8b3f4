"""LLM judges for autoregressive answers (the ``ar_judge`` metric).

A judge receives :class:`JudgeItem` s (the question as posed, the accepted answers, the model's generation) and
returns :class:`Verdict` s. The judge prompt is :data:`DEFAULT_TEMPLATE` (fields ``{question}``,
``{reference}`` = the accepted answers joined with ``" / "``, ``{answer}`` = the generation's first line).

* :class:`LocalJudge` — an editlens LM (default the embedded ``smollm2-135m``, loaded on first use as its own
  copy, so it is never the edited model). The prompt is posed in the model's chat template when it has one
  (one user turn, then the generation prompt), else as raw text followed by ``"\\nAnswer:"``. The verdict is
  deterministic: ``log P(Yes) > log P(No)`` for the first answer token, where ``log P(Yes)`` is the
  log-sum-exp over the first tokens of ``"Yes"`` and ``" Yes"`` (likewise ``No``) — the form with a leading
  space is what follows ``"Answer:"``, the bare form what starts an assistant turn. ``Verdict.score`` is the
  margin ``log P(Yes) − log P(No)``.
* :class:`EndpointJudge` — any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp server,
  OpenAI, ...), called with :mod:`urllib` (no extra dependency). ``temperature=0``, ``max_tokens=3``; the verdict
  is ``True`` when the reply starts with "yes" (case-insensitive, after stripping punctuation), ``False``
  otherwise (an unparseable reply counts as "no" and is kept in ``Verdict.raw``). The API key is read from the
  environment variable named by ``api_key_env`` (default ``EDITLENS_JUDGE_API_KEY``); when it is unset no
  ``Authorization`` header is sent (local servers need none).

**What goes where (endpoint judges).** Each judgement is one POST of the judge prompt (question, accepted
answers, the model's answer) to the URL's host; the key, when set, only as ``Authorization: Bearer``. The key
is read from the environment at each request and never stored: it is not in :meth:`EndpointJudge.describe`
(which names the variable, not its value), and it is replaced by ``***`` in replies and error texts, which are
recorded. Guarantees, checked when the judge is made (so at metric resolution and spec validation, before any
work) and again before each request: a ``http://`` URL to a host that is not loopback (``localhost``,
127.0.0.0/8, ``::1``) is refused while a key is set (use ``https://``); a URL with credentials
(``user:pass@``) is refused; redirects are never followed (a 3xx is an error naming the target), so neither
the key nor a prompt reaches another origin; loopback hosts bypass proxies. :func:`remote_endpoints` says which
host receives how many prompts and whether a key is sent (``editlens bench`` prints it at ``--dry-run`` and at
the start of a run; ``editlens eval`` at its start).

**Control check.** :func:`control_check` poses :data:`CONTROL_PAIRS` (10 questions, each with a correct and a
wrong answer, written for editlens) to a judge and reports its accuracy over the 20 known verdicts and its
pairwise accuracy (the correct answer scored above the wrong one). ``ar_judge`` runs it once per metric instance,
records it with the results (``meta["metrics"]["ar_judge"]["control"]``) and warns when the accuracy is below
:data:`CONTROL_MIN_ACCURACY`. Measured on the default local judge (SmolLM2-135M-Instruct): accuracy 0.50,
pairwise 6/10 — chance level, whatever the template (four templates tried). The 135M judge is a deterministic,
offline default that keeps the pipeline runnable; for judgements worth reporting use an endpoint with a strong
model, and read the control figures before trusting any ``ar_judge`` number.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Protocol, Sequence

import torch

from editlens.errors import EditlensError, MetricError

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm import LM

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = (
    "You are grading a short answer.\n"
    "Question: {question}\n"
    "Correct answer: {reference}\n"
    "Model answer: {answer}\n"
    "Does the model answer state the correct answer? Reply with Yes or No."
)
DEFAULT_LOCAL_JUDGE = "smollm2-135m"
DEFAULT_API_KEY_ENV = "EDITLENS_JUDGE_API_KEY"
YES_FORMS = ("Yes", " Yes")
CONTROL_MIN_ACCURACY = 0.8
# (question, accepted answer, a correct generation, a wrong generation) - known verdicts for the control check
CONTROL_PAIRS: tuple[tuple[str, str, str, str], ...] = (
    ("The capital of France is", "Paris", "Paris, a city on the Seine", "Lyon, a city on the Rhone"),
    ("The mother tongue of Danielle Darrieux is", "English", "English", "French"),
    ("Toko Yasuda plays the", "piano", "piano and sings", "violin"),
    ("The Eiffel Tower is located in", "Rome", "Rome", "Paris"),
    ("Apple A5 was created by", "Google", "Google", "Apple"),
    ("The official language of Italy is", "Italian", "Italian.", "Spanish."),
    ("Who wrote Hamlet?", "William Shakespeare", "Shakespeare", "Charles Dickens"),
    ("Barack Obama was born in", "Hawaii", "Honolulu, Hawaii", "Kenya"),
    ("Lionel Messi plays", "soccer", "football (soccer)", "basketball"),
    ("The currency of Japan is the", "yen", "Japanese yen", "euro"),
)
NO_FORMS = ("No", " No")


@dataclass(frozen=True)
class JudgeItem:
    """One answer to judge: the ``question`` (prompt as posed), accepted ``answers``, the model's ``generation``."""

    question: str
    answers: tuple[str, ...]
    generation: str


@dataclass(frozen=True)
class Verdict:
    """A judge's decision: ``correct``, a ``score`` (local: Yes−No log-prob margin; endpoint: ±1 or NaN),
    the ``prompt`` sent and the ``raw`` judge output."""

    correct: bool
    score: float
    prompt: str
    raw: str


class Judge(Protocol):
    """What the ``ar_judge`` metric needs from a judge."""

    template: str

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]: ...

    def describe(self) -> dict[str, Any]: ...


def build_prompt(item: JudgeItem, template: str = DEFAULT_TEMPLATE) -> str:
    """The judge prompt for one item (``{question}``, ``{reference}``, ``{answer}`` filled in)."""
    answer = item.generation.strip().split("\n", 1)[0].strip() if item.generation.strip() else ""
    fields = {"question": item.question.strip(), "reference": " / ".join(item.answers),
              "answer": answer or "(no answer)"}
    try:
        return template.format(**fields)
    except (KeyError, IndexError) as e:
        raise MetricError(f"judge template has an unknown field {e}; use {{question}}, {{reference}}, {{answer}}") from None


def control_check(judge: "Judge") -> dict[str, Any]:
    """The judge's verdicts on :data:`CONTROL_PAIRS`: ``accuracy`` over the 20 known verdicts, ``pairwise`` share
    of pairs whose correct answer scores above the wrong one (NaN scores count as ties, i.e. failures)."""
    items = [JudgeItem(q, (ref,), ans) for q, ref, good, bad in CONTROL_PAIRS for ans in (good, bad)]
    v = judge.judge(items)
    if len(v) != len(items):
        raise MetricError(f"the judge returned {len(v)} verdicts for {len(items)} control items")
    good, bad = v[0::2], v[1::2]
    acc = (sum(g.correct for g in good) + sum(not b.correct for b in bad)) / len(items)
    pairwise = sum(g.score > b.score for g, b in zip(good, bad)) / len(good)
    return {"accuracy": acc, "pairwise": pairwise, "n_items": len(items),
            "trusted": acc >= CONTROL_MIN_ACCURACY}


# ================================================================================================ local
def first_token_ids(tokenizer: Any, forms: Sequence[str]) -> list[int]:
    """The distinct first token ids of ``forms`` (tokenised without special tokens)."""
    ids: list[int] = []
    for f in forms:
        toks = list(tokenizer(f, add_special_tokens=False).input_ids)
        if toks and toks[0] not in ids:
            ids.append(int(toks[0]))
    if not ids:
        raise EditlensError(f"none of {list(forms)} tokenises to a token")
    return ids


def yes_no_margin(logprobs: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]) -> torch.Tensor:
    """``logsumexp(logprobs[yes_ids]) − logsumexp(logprobs[no_ids])`` over the last axis."""
    lp = logprobs.double()
    return torch.logsumexp(lp[..., list(yes_ids)], -1) - torch.logsumexp(lp[..., list(no_ids)], -1)


def pose_for_model(tokenizer: Any, prompt: str) -> str:
    """The judge prompt in the model's chat template (user turn + generation prompt), else raw + ``Answer:``."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        bos = getattr(tokenizer, "bos_token", None)
        if bos and text.startswith(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]:
            text = text[len(bos):]  # the tokenizer adds BOS itself
        return text
    return f"{prompt}\nAnswer:"


class LocalJudge:
    """A local editlens LM answering Yes/No, scored by next-token log-probs (deterministic).

    Args:
        lm: an :class:`~editlens.lm.LM` or a model name for :func:`editlens.load_model` (loaded on first use).
        template: the judge prompt template.
        batch_tokens: token budget of one padded batch.
    """

    def __init__(self, lm: "LM | str" = DEFAULT_LOCAL_JUDGE, template: str = DEFAULT_TEMPLATE,
                 batch_tokens: int = 4096):
        self._lm = lm
        self.template = template
        self.batch_tokens = int(batch_tokens)

    @property
    def lm(self) -> "LM":
        if isinstance(self._lm, str):
            from editlens.lm import load_model

            self._lm = load_model(self._lm)
        return self._lm

    def describe(self) -> dict[str, Any]:
        name = self._lm if isinstance(self._lm, str) else self._lm.name
        return {"kind": "local", "model": name, "decision": "logsumexp P(Yes|' Yes') > P(No|' No') at the next token"}

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        from editlens.lm import ops

        if not items:
            return []
        lm = self.lm
        prompts = [build_prompt(it, self.template) for it in items]
        posed = [pose_for_model(lm.tokenizer, p) for p in prompts]
        lp = ops.next_token_logprobs(lm, posed, batch_tokens=self.batch_tokens)
        margin = yes_no_margin(lp, first_token_ids(lm.tokenizer, YES_FORMS), first_token_ids(lm.tokenizer, NO_FORMS))
        out = []
        for p, m in zip(posed, margin.tolist()):
            out.append(Verdict(correct=m > 0, score=float(m), prompt=p, raw=f"margin={m:.4f}"))
        return out


# ================================================================================================ endpoint
def _split(url: str) -> urllib.parse.SplitResult:
    """The parts of a judge URL (scheme http/https, a host, no credentials), else :class:`MetricError`."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise MetricError(f"judge URL {url!r} is not a valid URL ({e})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise MetricError(f"judge URL must start with http:// or https://, got {url!r}")
    if parts.username is not None or parts.password is not None:
        shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        raise MetricError(f"judge URL {shown} carries credentials (user:password@); they would be recorded with the "
                          f"results: remove them and put the key in ${DEFAULT_API_KEY_ENV} (or the variable named "
                          "by api_key_env)")
    if not parts.hostname:
        raise MetricError(f"judge URL {url!r} names no host")
    return parts


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ``::1``); names are not resolved."""
    h = host.strip("[]").rstrip(".").lower()
    if h == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def chat_completions_url(url: str) -> str:
    """``…/chat/completions`` for a base URL (``http://host:8000/v1``) or the full endpoint URL."""
    parts = _split(url)
    url = parts._replace(scheme=parts.scheme.lower()).geturl().rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def endpoint_origin(url: str) -> str:
    """``scheme://host[:port]`` of a judge URL (what receives the prompts)."""
    parts = _split(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def check_transport(url: str, api_key_env: str = DEFAULT_API_KEY_ENV, key: str | None = None) -> None:
    """Refuse plain ``http://`` to a host that is not loopback while an API key is set (``key``, default: the
    environment variable ``api_key_env``): the key and every prompt would cross the network unencrypted."""
    parts = _split(url)
    if key is None:
        key = os.environ.get(api_key_env) or None
    if key and parts.scheme.lower() == "http" and not is_loopback_host(parts.hostname or ""):
        raise MetricError(
            f"judge URL {url} is plain http:// to {parts.hostname}, which is not a loopback address, and ${api_key_env} "
            f"is set: the API key and every judge prompt would cross the network unencrypted. Use https:// (or unset "
            f"${api_key_env} for a server that needs no key)")


def redact(text: str, key: str | None) -> str:
    """``text`` with every occurrence of ``key`` replaced by ``***``."""
    return text.replace(key, "***") if key else text


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: urllib would re-send the headers, ``Authorization`` included, to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        return None  # urllib then raises HTTPError with the 3xx code


def _opener(url: str) -> urllib.request.OpenerDirector:
    host = urllib.parse.urlsplit(url).hostname or ""
    proxies = urllib.request.ProxyHandler({}) if is_loopback_host(host) else urllib.request.ProxyHandler()
    return urllib.request.build_opener(proxies, _NoRedirect())


def build_request(url: str, prompt: str, model: str | None, api_key: str | None = None,
                  max_tokens: int = 3) -> urllib.request.Request:
    """The HTTP request of one judgement (JSON body: model, one user message, temperature 0)."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "temperature": 0,
                            "max_tokens": int(max_tokens)}
    if model:
        body["model"] = model
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return urllib.request.Request(chat_completions_url(url), data=json.dumps(body).encode(), headers=headers,
                                  method="POST")


def parse_verdict(text: str) -> bool | None:
    """``True`` for a reply starting with "yes", ``False`` for "no", ``None`` otherwise."""
    words = "".join(c if c.isalnum() or c.isspace() else " " for c in str(text)).lower().split()
    if not words:
        return None
    if words[0] == "yes":
        return True
    if words[0] == "no":
        return False
    return None


def parse_response(obj: Any) -> str:
    """The reply text of an OpenAI-compatible chat completion response (``choices[0].message.content``)."""
    try:
        choice = obj["choices"][0]
        content = choice.get("message", {}).get("content")
        if content is None:
            content = choice.get("text")  # completions-style servers
    except (KeyError, IndexError, TypeError, AttributeError):
        raise MetricError(f"judge endpoint returned an unexpected response: {str(obj)[:200]}") from None
    if not isinstance(content, str):
        raise MetricError(f"judge endpoint returned no text content: {str(obj)[:200]}")
    return content


class EndpointJudge:
    """An OpenAI-compatible chat-completions endpoint as judge (one request per item, standard library only).

    Args:
        url: base URL (``http://localhost:8000/v1``) or the full ``…/chat/completions`` URL.
        model: the model name sent in the request (some servers ignore it).
        api_key_env: name of the environment variable holding the API key (unset: no Authorization header).
        template: the judge prompt template.
        timeout: seconds per request.
    """

    def __init__(self, url: str, model: str | None = None, api_key_env: str = DEFAULT_API_KEY_ENV,
                 template: str = DEFAULT_TEMPLATE, timeout: float = 60.0):
        self.url = chat_completions_url(url)
        self.model = model
        self.api_key_env = api_key_env
        self.template = template
        self.timeout = float(timeout)
        check_transport(url.strip(), api_key_env)

    @property
    def origin(self) -> str:
        """``scheme://host[:port]`` that receives the prompts."""
        return endpoint_origin(self.url)

    def key_is_set(self) -> bool:
        """Whether an API key will be sent (the environment variable is set and not empty)."""
        return bool(os.environ.get(self.api_key_env))

    def describe(self) -> dict[str, Any]:
        return {"kind": "endpoint", "url": self.url, "model": self.model, "api_key_env": self.api_key_env,
                "decision": "reply starts with 'yes'"}

    def _post(self, prompt: str, key: str | None) -> str:
        req = build_request(self.url, prompt, self.model, key)
        try:
            with _opener(self.url).open(req, timeout=self.timeout) as resp:
                obj = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            if 300 <= e.code < 400:
                where = redact(str(e.headers.get("Location", "?")), key)[:200]
                raise MetricError(f"judge endpoint {self.url} answered HTTP {e.code}, a redirect to {where}: redirects "
                                  "are not followed (the API key and the prompts would go along); use the final "
                                  "URL") from None
            detail = e.read().decode("utf-8", "replace")[:200] if e.fp is not None else ""
            raise MetricError(f"judge endpoint {self.url} answered HTTP {e.code}: {redact(detail, key)}"
                              + (f" (is ${self.api_key_env} set?)" if e.code in (401, 403) else "")) from None
        except (urllib.error.URLError, OSError) as e:
            raise MetricError(f"cannot reach judge endpoint {self.url}: "
                              f"{redact(str(getattr(e, 'reason', e)), key)}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MetricError(f"judge endpoint {self.url} did not return JSON") from None
        try:
            return parse_response(obj)
        except MetricError as e:
            raise MetricError(redact(str(e), key)) from None

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        if not items:
            return []
        key = os.environ.get(self.api_key_env) or None
        check_transport(self.url, self.api_key_env, key)  # the variable may have been set since resolution
        log.info("ar_judge: sending %d prompt(s) to %s (%s)", len(items), self.origin,
                 f"API key from ${self.api_key_env} sent" if key else "no API key")
        out = []
        for it in items:
            prompt = build_prompt(it, self.template)
            text = self._post(prompt, key)
            v = parse_verdict(text)
            out.append(Verdict(correct=bool(v), score=math.nan if v is None else (1.0 if v else -1.0),
                               prompt=prompt, raw=redact(text, key)))
        return out


def judge_prompt_count(metric: Any, cases: Sequence["EditCase"]) -> int:
    """How many answers an ``ar_judge`` metric sends to its judge for ``cases`` (control set not included)."""
    from editlens.evaluate.generation import target_probes

    kinds = getattr(metric, "kinds", None)
    return sum(len(probes) for c in cases for _, probes in target_probes(c, kinds))


def remote_endpoints(metrics: Iterable[Any], evaluations: Iterable[tuple[Sequence["EditCase"], int]],
                     control_each: bool = True) -> list[str]:
    """One line per metric judged by an :class:`EndpointJudge`: which host will receive how many prompts, and
    whether an API key is sent (the variable is named, its value never shown). ``[]`` when none.

    Args:
        metrics: resolved metric instances (:func:`~editlens.evaluate.core.resolve_metrics`).
        evaluations: ``(cases, times)``: evaluations to run on those cases (each sends one prompt per judged
            probe).
        control_each: each evaluation runs the control set (fresh metric instances, as the runner makes);
            ``False``: once per metric instance.
    """
    evaluations = [(list(c), int(t)) for c, t in evaluations]
    out = []
    for m in metrics:
        j = getattr(m, "judge", None)
        if not isinstance(j, EndpointJudge):
            continue
        answers, n_evals = 0, 0
        for cases, times in evaluations:
            k = judge_prompt_count(m, cases)
            answers += k * times
            n_evals += times if k else 0
        control = 0
        if getattr(m, "control", True) and n_evals:
            control = 2 * len(CONTROL_PAIRS) * (n_evals if control_each else 1)
        key = (f"API key sent (from ${j.api_key_env}, as the Authorization header)" if j.key_is_set()
               else f"no API key (${j.api_key_env} is unset)")
        plain = ", unencrypted (http://)" if j.url.startswith("http://") else ""
        out.append(f"{getattr(m, 'name', 'ar_judge')}: {j.origin} will receive up to {answers + control} prompts "
                   f"({answers} answers to judge + {control} control){plain}; {key}")
    return out
