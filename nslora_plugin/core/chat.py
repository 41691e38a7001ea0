"""Chat messages and their rendering, in one place: every stage that builds a conversation (the
probe, the collator, training rows, prompts-as-data, the editor client, inference) goes through
these two functions, so the system prompt is placed the same way everywhere; and the one filter
for text that must not carry chat-template tokens (candidate prompts, rewritten questions)."""

from __future__ import annotations

from typing import Any

from nslora_plugin.core.util import GENERIC_MARKER, ROLE_MARKERS

_MARKUP = set("<>[]|")


def template_tokens(tokenizer: Any = None) -> set[str]:
    """Every token a prompt must not contain: the tokenizer's special tokens, its added tokens
    that look like markup (`<filename>`, `<|im_start|>`, `[INST]`: they encode as single special
    ids), and the common chat-template markers of other model families."""
    found = set(ROLE_MARKERS) | set(getattr(tokenizer, "all_special_tokens", None) or [])
    added = getattr(tokenizer, "get_added_vocab", None)
    if callable(added):
        try:
            found |= {t for t in added() if len(t) >= 3 and _MARKUP & set(t)}
        except Exception:  # a tokenizer without an added vocabulary has nothing to add
            pass
    return {t for t in found if t and t.strip()}


def control_tokens(text: str, tokenizer: Any = None) -> list[str]:
    """The template tokens (see `template_tokens`) and `<|...|>` markers found in `text`."""
    found = {t for t in template_tokens(tokenizer) if t in text}
    found.update(GENERIC_MARKER.findall(text))
    return sorted(found)


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
