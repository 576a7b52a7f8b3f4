"""How prompts are posed to a model: ``raw`` text, or ``chat`` with the statement pre-filled as the reply.

With ``chat`` the prompt becomes ``<chat template with one user turn and the generation prompt><prompt>``: the
model is asked (``instruction``) and the statement is already the start of the assistant's reply, so its
completion is scored exactly like a raw completion. Only models with a chat template accept ``chat``.
The chosen format is recorded with results (``System.prompt_format``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from editlens.errors import EditlensError

DEFAULT_INSTRUCTION = "Complete the following statement with a short factual answer."


@dataclass(frozen=True)
class PromptFormat:
    """A prompt format: ``name`` is ``"raw"`` or ``"chat"``; ``prefix`` is the chat scaffolding before the text."""

    name: str = "raw"
    instruction: str = DEFAULT_INSTRUCTION
    prefix: str = ""

    @staticmethod
    def parse(value: "str | PromptFormat", tokenizer: Any) -> "PromptFormat":
        if isinstance(value, PromptFormat):
            return value
        if value == "raw":
            return PromptFormat("raw")
        if value == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise EditlensError("prompt_format='chat' needs a model with a chat template; use 'raw'")
            prefix = tokenizer.apply_chat_template([{"role": "user", "content": DEFAULT_INSTRUCTION}], tokenize=False,
                                                   add_generation_prompt=True)
            bos = getattr(tokenizer, "bos_token", None)
            # the tokenizer adds BOS itself when it is configured to: avoid a doubled BOS
            if bos and prefix.startswith(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]:
                prefix = prefix[len(bos):]
            return PromptFormat("chat", DEFAULT_INSTRUCTION, prefix)
        raise EditlensError(f"unknown prompt format {value!r}; use 'raw' or 'chat'")

    def apply(self, prompt: str) -> str:
        return self.prefix + prompt if self.name == "chat" else prompt


def format_prompts(fmt: PromptFormat, prompts: Sequence[str], tokenizer: Any = None) -> list[str]:
    """Apply ``fmt`` to every prompt."""
    return [fmt.apply(p) for p in prompts]
