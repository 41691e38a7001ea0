"""The one check a proposed system prompt meets before the gate scores it.

Every candidate, whichever editor proposed it, goes through `check_candidate` in the loop's gate
(`NeurosymbolicLoop.sanitize`); an editor may run the same check on its own candidate first, as the
TextGrad editor does, so that it can report an unusable reply as its fault and not replay it from
its cache. The check: not empty, no chat-template tokens (`chat.control_tokens`: a prompt that
carries them would forge turns of the conversation), at most `max_prompt_chars` characters once
trailing spaces are dropped, and no secret (an editor key or a URL password, which would otherwise
be trained on and written to the artifacts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from nslora_plugin.core.chat import control_tokens
from nslora_plugin.core.util import redact

__all__ = ["CandidateProblem", "check_candidate", "clean_candidate"]


@dataclass(frozen=True)
class CandidateProblem:
    """Why a candidate cannot be used: `kind` for code, `reason` for logs and decisions."""

    kind: Literal["empty", "control_tokens", "too_long", "secret"]
    reason: str

    def __str__(self) -> str:
        return self.reason


def clean_candidate(text: str) -> str:
    """The candidate as the gate scores it: trailing spaces of each line and surrounding blank
    lines dropped."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines()).strip()


def check_candidate(text: Any, max_chars: int,
                    tokenizer: Any = None) -> tuple[str | None, CandidateProblem | None]:
    """(the cleaned prompt, None), or (None, why it cannot be used)."""
    if not isinstance(text, str) or not text.strip():
        return None, CandidateProblem("empty", "empty candidate")
    found = control_tokens(text, tokenizer)
    if found:
        return None, CandidateProblem(
            "control_tokens", f"candidate contains chat-template tokens ({', '.join(found[:3])})")
    cleaned = clean_candidate(text)
    if len(cleaned) > max_chars:
        return None, CandidateProblem("too_long", f"candidate longer than max_prompt_chars={max_chars}")
    if redact(cleaned) != cleaned:
        return None, CandidateProblem(
            "secret", "candidate contains a secret (an editor key or a URL password)")
    return cleaned, None
