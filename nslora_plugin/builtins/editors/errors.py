"""The editor LLM's fault types. Every one carries a one-line message that is safe to log; the
loop records them as faults and training goes on."""

from __future__ import annotations


class EditorError(Exception):
    """An editor LLM fault, with a one-line message that is safe to log (no secrets)."""


class EditorUnreachable(EditorError):
    """The endpoint refused or dropped the connection (down, crashed, wrong URL)."""


class EditorTimeout(EditorError):
    """A call took longer than its timeout."""


class EditorHTTPError(EditorError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EditorBadReply(EditorError):
    """The reply was not a chat completion (garbage, wrong JSON, non-text content)."""


class EditorEmptyReply(EditorBadReply):
    """A chat completion with empty content."""


class EditorNoTags(EditorBadReply):
    """The optimizer reply had no <IMPROVED_VARIABLE> text, even after one repair request."""


class EditorUnsafeCandidate(EditorBadReply):
    """The proposed prompt carries chat-template control tokens (an injected role turn)."""


class EditorOverlongCandidate(EditorBadReply):
    """The proposed prompt is longer than max_prompt_chars."""


class EditorBudgetSpent(EditorError):
    def __init__(self, message: str, scope: str) -> None:
        super().__init__(message)
        self.scope = scope  # "round" or "run"


#: Faults that say the endpoint itself is in trouble: the next round health-checks it first.
TRANSPORT_FAULTS = (EditorUnreachable, EditorTimeout, EditorHTTPError)
