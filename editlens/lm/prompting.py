"""How prompts are posed to a model: the one meaning of ``prompt_format``.

``prompt_format`` takes one of :data:`PROMPT_FORMATS`, everywhere it is accepted (:class:`~editlens.evaluate.system.
ModelSystem`, :func:`editlens.edit`, :func:`editlens.edit.edit_sequential`, :func:`editlens.evaluate`, the CLI's
``--prompt-format``, a run spec's ``model.prompt_format``):

* ``raw`` — the prompt text as is;
* ``chat`` — ``<chat template with one user turn and the generation prompt><prompt>``: the model is asked
  (``instruction``) and the statement is already the start of the assistant's reply, so its completion is scored
  exactly like a raw completion. Only models whose tokenizer has a chat template accept ``chat``;
* ``auto`` — ``chat`` when the model's tokenizer has a chat template, else ``raw``. It is resolved once, by
  :func:`resolve_prompt_format`, when a system is made (or an edit / evaluation starts); systems, results and
  caches only ever record the resolved ``raw`` / ``chat``.

An unknown value is a :class:`~editlens.errors.PromptFormatError` naming the allowed values, raised before any
work. The chosen format is recorded with results (``System.prompt_format``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from editlens.errors import PromptFormatError

DEFAULT_INSTRUCTION = "Complete the following statement with a short factual answer."

#: the accepted values of ``prompt_format`` (see the module docstring)
PROMPT_FORMATS = ("raw", "chat", "auto")


def _allowed() -> str:
    return ", ".join(repr(v) for v in PROMPT_FORMATS)


def check_prompt_format(value: Any, what: str = "prompt_format") -> str:
    """``value`` if it is one of :data:`PROMPT_FORMATS` (or a :class:`PromptFormat`'s name), else a
    :class:`PromptFormatError` naming ``what`` and the allowed values. Needs no model."""
    if isinstance(value, PromptFormat):
        return value.name
    if not isinstance(value, str) or value not in PROMPT_FORMATS:
        raise PromptFormatError(f"{what} must be one of {_allowed()} (auto = chat when the model's tokenizer has a "
                                f"chat template, else raw), got {value!r}")
    return value


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` has a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_prompt_format(value: Any, tokenizer: Any, what: str = "prompt_format") -> str:
    """``"raw"`` or ``"chat"``: ``value`` checked (:func:`check_prompt_format`) and ``auto`` resolved against
    ``tokenizer`` (chat when it has a chat template, else raw) — the one place ``auto`` is given a meaning.

    Raises:
        PromptFormatError: an unknown value, or ``chat`` for a tokenizer without a chat template.
    """
    name = check_prompt_format(value, what)
    if name == "auto":
        return "chat" if has_chat_template(tokenizer) else "raw"
    if name == "chat" and not has_chat_template(tokenizer):
        model = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise PromptFormatError(f"{what}='chat' needs a model whose tokenizer has a chat template, and {model!r} has "
                                "none; use 'raw' or 'auto'")
    return name


def chat_prefix(tokenizer: Any, user_text: str) -> str:
    """The chat template with one user turn ``user_text`` and the generation prompt, as text; the BOS token is
    left out when the tokenizer adds it itself (no doubled BOS). What follows it is the assistant's reply."""
    prefix = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                           add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and prefix.startswith(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]:
        prefix = prefix[len(bos):]
    return prefix


@dataclass(frozen=True)
class PromptFormat:
    """A resolved prompt format: ``name`` is ``"raw"`` or ``"chat"``; ``prefix`` is the chat scaffolding before
    the text (the user turn with ``instruction`` and the generation prompt)."""

    name: str = "raw"
    instruction: str = DEFAULT_INSTRUCTION
    prefix: str = ""

    @staticmethod
    def parse(value: "str | PromptFormat", tokenizer: Any, what: str = "prompt_format") -> "PromptFormat":
        """The :class:`PromptFormat` for ``value`` (``raw`` / ``chat`` / ``auto``) on ``tokenizer``.

        Raises:
            PromptFormatError: see :func:`resolve_prompt_format`.
        """
        if isinstance(value, PromptFormat):
            return value
        name = resolve_prompt_format(value, tokenizer, what)
        if name == "raw":
            return PromptFormat("raw")
        return PromptFormat("chat", DEFAULT_INSTRUCTION, chat_prefix(tokenizer, DEFAULT_INSTRUCTION))

    def apply(self, prompt: str) -> str:
        return self.prefix + prompt if self.name == "chat" else prompt


def format_prompts(fmt: PromptFormat, prompts: Sequence[str], tokenizer: Any = None) -> list[str]:
    """Apply ``fmt`` to every prompt."""
    return [fmt.apply(p) for p in prompts]
