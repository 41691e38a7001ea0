"""Chat messages and their rendering, in one place: every stage that builds a conversation (the
probe, the collator, training rows, prompts-as-data, the editor client, inference) goes through
these two functions, so the system prompt is placed the same way everywhere."""

from __future__ import annotations

from typing import Any


def chat_messages(system: str | None, user: str, assistant: str | None = None) -> list[dict[str, str]]:
    """`[system?, user, assistant?]` messages; a None system prompt (or reply) is left out."""
    messages: list[dict[str, str]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user})
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return messages


def render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    """The conversation as the tokenizer's chat template writes it (text, not ids)."""
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)
