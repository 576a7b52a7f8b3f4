"""The model's context length: checks before any work, opt-in left truncation, and a guard on every forward pass.

A prompt longer than the model's context is an error, never a silent result: GPT-2-style models (a learned
position table) would crash with an ``IndexError``; RoPE models (LLaMA, Qwen2, ...) would quietly score positions
they were never trained on. So:

* :func:`check_requests` (called by :func:`editlens.evaluate.evaluate` before answering anything) measures every
  request in each system's prompt format (chat template included) and raises
  :class:`~editlens.errors.ContextLengthError` naming the case, the probe (``paraphrase[1]``), the token count and
  the context length. What a wrapper system adds to prompts at call time (IKE/SCR demonstrations) is measured by
  the model operations when that call is made. :func:`check_rewrites` does the same for the rewrites given to
  :func:`editlens.edit`.
* the model operations (:mod:`editlens.lm.ops`) check every prompt before their first forward pass, whoever calls
  them (a custom system, a metric);
* :func:`install_guard` (installed by :func:`editlens.load_model`) checks the width of every forward pass through
  the model's input embedding, so code that runs the model itself (editing methods' optimisation loops) cannot
  overflow either.

Left truncation is opt-in: inside ``with truncation("left")`` (``evaluate(..., truncate="left")``, ``editlens bench
--truncate left``) a prompt that does not fit loses its oldest tokens so that prompt + target (or prompt + the new
tokens of a generation) fill the context exactly; the target itself is never cut. Evaluations record the mode and
the number of truncated requests in ``Results.meta``; the runner records it with the run's options.

The context length is ``config.max_position_embeddings`` (``n_positions``, ``n_ctx``, ``seq_length`` for other
configs), times ``rope_scaling.factor`` when the config scales RoPE without recording the original length.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from editlens.errors import ContextLengthError, EditlensError

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM

TRUNCATE_MODES = ("left",)
#: a byte-level or byte-fallback tokenizer makes at most one token per byte, plus a few special / prefix tokens:
#: texts whose byte length plus this margin fits are not tokenised by the up-front checks
_SPECIAL_MARGIN = 8
_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("editlens_truncate", default=None)


def context_length(lm_or_model: Any) -> int | None:
    """The number of positions the model was built for (``None`` when its config does not say)."""
    model = getattr(lm_or_model, "model", lm_or_model)
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    n = None
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            n = v
            break
    if n is None:
        return None
    rs = getattr(cfg, "rope_scaling", None)
    if isinstance(rs, Mapping) and "original_max_position_embeddings" not in rs:
        f = rs.get("factor")
        if isinstance(f, (int, float)) and f > 1:
            n = int(n * f)
    return n


def check_truncate(mode: Any) -> str | None:
    """Validate a ``truncate`` setting: ``None`` (the default: too long is an error) or ``"left"``."""
    if mode is None or mode is False:
        return None
    if mode not in TRUNCATE_MODES:
        raise EditlensError(f"truncate must be None (too long prompts are an error) or 'left' (drop a too long "
                            f"prompt's oldest tokens), got {mode!r}")
    return str(mode)


@contextlib.contextmanager
def truncation(mode: str | None) -> Iterator[None]:
    """Within this context the model operations left-truncate prompts that do not fit (``"left"``) or raise
    (``None``). Context-local (threads and async tasks each have their own setting)."""
    token = _MODE.set(check_truncate(mode))
    try:
        yield
    finally:
        _MODE.reset(token)


def current_truncation() -> str | None:
    return _MODE.get()


def _snippet(text: str, n: int = 60) -> str:
    t = " ".join(text.split())
    return repr(t if len(t) <= n else t[:n // 2] + " … " + t[-n // 2:])


def _hint() -> str:
    return ("shorten it, or let it lose its oldest tokens with truncate='left' (evaluate(..., truncate='left'), "
            "editlens bench --truncate left; recorded with the results)")


def fit_ids(lm: "LM", ids: Sequence[int], reserved: int, *, what: str, index: int, text: str,
            allow_truncation: bool = True, reserved_what: str = "") -> list[int]:
    """``ids`` (a prompt's tokens) when ``len(ids) + reserved`` positions fit the context; else the last tokens that
    fit under ``truncation("left")``, else :class:`ContextLengthError` (``reserved``: positions the call adds after
    the prompt: target tokens but the last, or new tokens minus one)."""
    ctx = context_length(lm)
    ids = list(ids)
    if ctx is None or len(ids) + reserved <= ctx:
        return ids
    keep = ctx - reserved
    if allow_truncation and _MODE.get() == "left" and keep >= 1:
        return ids[len(ids) - keep:]
    name = getattr(lm, "name", "the model")
    if keep < 1:
        raise ContextLengthError(f"{what} {index}: {reserved} {reserved_what} alone need more than the "
                                 f"context of {ctx} positions of {name}; truncating the prompt cannot help",
                                 n_tokens=len(ids) + reserved, context=ctx)
    raise ContextLengthError(
        f"{what} {index} needs {len(ids) + reserved} positions ({len(ids)} prompt tokens"
        + (f" + {reserved} {reserved_what}".rstrip() if reserved else "")
        + f") but {name} has a context of {ctx} positions: {_snippet(text)}; "
        + (_hint() if allow_truncation else "shorten it"), n_tokens=len(ids) + reserved, context=ctx)


# ------------------------------------------------------------------------------------------------ forward guard
def install_guard(model: Any) -> None:
    """Make every forward pass of ``model`` over more tokens than its context raise :class:`ContextLengthError`.

    A forward pre-hook on the input embedding (idempotent; it only reads the width of the token ids): code that runs
    the model on full sequences itself (editing methods' optimisation loops) cannot overflow the context. It is not
    on the model itself, so "no hooks left on the model" checks of reversible edits are unaffected. Passes that
    bypass the embedding (``inputs_embeds``) and incremental decoding steps are not seen: the model operations
    check generations up front (prompt + new tokens)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None or getattr(emb, "_editlens_context_guard", None) is not None:
        return
    ctx = context_length(model)
    if ctx is None:
        return

    def guard(module: Any, args: tuple) -> None:
        x = args[0] if args else None
        if x is not None and hasattr(x, "shape") and len(x.shape) >= 1 and int(x.shape[-1]) > ctx:
            n = int(x.shape[-1])
            raise ContextLengthError(f"a forward pass over {n} positions exceeds the model's context of {ctx} "
                                     "positions (a prompt too long for this model)", n_tokens=n, context=ctx)

    emb._editlens_context_guard = emb.register_forward_pre_hook(guard)


# ------------------------------------------------------------------------------------------------ up-front checks
def _probe_name(case: "EditCase", prompt: str) -> str:
    for kind, probes in case.probes.items():
        for i, p in enumerate(probes):
            if p.prompt == prompt:
                return f"{kind}[{i}]"
    for i, r in enumerate(case.rewrites):
        if r.text == prompt:
            return "rewrite" if i == 0 else f"extra_rewrites[{i - 1}]"
    for kind, probes in case.probes.items():  # a metric that extends the probe's prompt
        for i, p in enumerate(probes):
            if p.prompt and p.prompt in prompt:
                return f"{kind}[{i}] (as extended by the metric)"
    return "a request built from its probes"


def _request_positions(lm: "LM", req: Any, posed: str) -> tuple[int, int] | None:
    """``(positions needed, positions the prompt must leave free)`` or ``None`` when it surely fits.

    A request says what follows its prompt by its class attribute ``context_kind`` (the evaluator's request types
    declare it, so this module need not import them): ``"next_token"`` (nothing), ``"score"`` (its ``target``),
    ``"generate"`` (``max_new_tokens`` new tokens); other requests are checked by the model operations they use."""
    from editlens.lm import ops

    ctx = context_length(lm)
    assert ctx is not None
    kind = getattr(type(req), "context_kind", None)
    n_bytes = len(posed.encode("utf-8")) + _SPECIAL_MARGIN
    if kind == "next_token":
        if n_bytes <= ctx:
            return None
        return len(ops.encode(lm.tokenizer, posed)), 0
    if kind == "score":
        if n_bytes + len(req.target.encode("utf-8")) + 1 <= ctx:
            return None
        p_ids, t_ids = ops.target_token_ids(lm.tokenizer, posed, req.target)
        return len(p_ids) + len(t_ids) - 1, len(t_ids) - 1
    if kind == "generate":
        if n_bytes + req.max_new_tokens <= ctx:
            return None
        return len(ops.encode(lm.tokenizer, posed)) + req.max_new_tokens - 1, req.max_new_tokens - 1
    return None  # metric-defined requests: checked by the model operations they use


def check_requests(systems: Mapping[str, Any], wanted: Mapping[str, Any], cases: Sequence["EditCase"],
                   metrics: Sequence[Any], truncate: str | None) -> int:
    """The up-front check of :func:`editlens.evaluate.evaluate`: every request of every role, as the role's system
    poses it. Returns the number of requests that will be left-truncated; raises :class:`ContextLengthError`
    naming the first case (in the given order) and probe that does not fit. Systems without a model (``lm``) and
    prompt posing (``_inputs``) -- precomputed answers, custom systems -- are skipped."""
    over: dict[Any, tuple[str, int, int, int, str]] = {}  # request -> (role, needed, reserved, ctx, model name)
    for role, system in systems.items():
        lm, fmt = getattr(system, "lm", None), getattr(system, "format", None)
        reqs = [r for r in wanted.get(role, ()) if hasattr(r, "prompt")]
        if lm is None or fmt is None or not reqs:
            continue
        ctx = context_length(lm)
        if ctx is None:
            continue
        from editlens.lm.prompting import format_prompts

        prompts = sorted({r.prompt for r in reqs})
        # the prompt format (chat template) is applied; a wrapper's own rewriting (IKE/SCR demonstrations) is not:
        # it may retrieve or count, and runs once, at call time, where the model operations check the result
        posed = dict(zip(prompts, format_prompts(fmt, prompts, lm.tokenizer)))
        for r in reqs:
            res = _request_positions(lm, r, posed[r.prompt])
            if res is not None and res[0] > ctx:
                over.setdefault(r, (role, res[0], res[1], ctx, getattr(lm, "name", "the model")))
    if not over:
        return 0
    hopeless = {r: v for r, v in over.items() if v[2] >= v[3]}
    if truncate == "left" and not hopeless:
        return len(over)
    bad = hopeless or over
    for case in cases:
        for m in metrics:
            for role, req in m.requests([case]):
                if req in bad:
                    _, n, reserved, ctx, name = bad[req]
                    probe = _probe_name(case, req.prompt)
                    kind = type(req).__name__
                    what = ("prompt with its target" if kind == "Score" else
                            f"prompt with {req.max_new_tokens} new tokens" if kind == "Generate" else "prompt")
                    parts = f"{n - reserved} prompt tokens as posed to the model" + (
                        f" + {reserved} target tokens fed after it" if kind == "Score" and reserved else
                        f" + {reserved} positions for the new tokens" if kind == "Generate" and reserved else "")
                    more = len(bad) - 1
                    tail = (f"; {more} more request(s) do not fit either" if more else "")
                    if req in hopeless:
                        advice = (f"its target / new tokens alone need {reserved} positions: truncating the prompt "
                                  "cannot help")
                    else:
                        advice = _hint()
                    raise ContextLengthError(
                        f"case {case.case_id!r}, probe {probe} (metric {m.name!r}, {role} system): the {what} needs "
                        f"{n} positions ({parts}) but {name} has a context of {ctx} positions: "
                        f"{_snippet(req.prompt)}; {advice}{tail}",
                        n_tokens=n, context=ctx, case_id=case.case_id, probe=probe)
    r, (role, n, reserved, ctx, name) = next(iter(bad.items()))  # pragma: no cover - requests not tied to a case
    raise ContextLengthError(f"a request ({role} system) needs {n} positions but {name} has a context of {ctx}: "
                             f"{_snippet(getattr(r, 'prompt', ''))}; {_hint()}", n_tokens=n, context=ctx)


def check_rewrites(lm: "LM", cases: Sequence["EditCase"], fmt: Any = None) -> None:
    """The up-front check of :func:`editlens.edit`: every rewrite's prompt with its new target must fit the context
    (editing methods read and optimise exactly that sequence; no truncation for edits). ``fmt``: the edit's
    :class:`~editlens.lm.prompting.PromptFormat` (the prompt is measured as posed in it; default raw)."""
    from editlens.lm import ops

    ctx = context_length(lm)
    if ctx is None:
        return
    for case in cases:
        for i, r in enumerate(case.rewrites):
            text = r.text if fmt is None else fmt.apply(r.text)
            if len(text.encode("utf-8")) + len(r.target_new.encode("utf-8")) + 1 + _SPECIAL_MARGIN <= ctx:
                continue
            p_ids, t_ids = ops.target_token_ids(lm.tokenizer, text, r.target_new)
            n = len(p_ids) + len(t_ids)
            if n > ctx:
                name = "rewrite" if i == 0 else f"extra_rewrites[{i - 1}]"
                raise ContextLengthError(
                    f"case {case.case_id!r}, {name}: the prompt with its new target is {n} tokens but "
                    f"{getattr(lm, 'name', 'the model')} has a context of {ctx} positions: {_snippet(text)}; "
                    "shorten it (edits are not truncated)", n_tokens=n, context=ctx, case_id=case.case_id,
                    probe=name)
