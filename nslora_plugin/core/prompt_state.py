"""The current system prompt and its full history (every candidate, accepted or not, with scores)."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PromptCandidate:
    version: int | None
    step: int
    editor: str
    prompt: str
    accepted: bool
    reward_before: float | None
    reward_after: float | None
    reason: str
    components_after: dict[str, float] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PromptState:
    """Thread-safe holder read by the collator at batch time and written by the loop."""

    def __init__(self, initial: str | None) -> None:
        self._lock = threading.Lock()
        self.initial = initial
        self.current = initial
        self.version = 0
        self.history: list[PromptCandidate] = [
            PromptCandidate(version=0, step=0, editor="initial", prompt=initial or "",
                            accepted=True, reward_before=None, reward_after=None,
                            reason="initial system prompt")]

    def snapshot(self) -> tuple[str | None, int]:
        with self._lock:
            return self.current, self.version

    def record(self, candidate: PromptCandidate) -> None:
        with self._lock:
            if candidate.accepted:
                self.version += 1
                candidate.version = self.version
                self.current = candidate.prompt
            self.history.append(candidate)

    # ---------------------------------------------------------------- resume
    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"initial": self.initial, "current": self.current, "version": self.version,
                    "history": [c.to_dict() for c in self.history]}

    def load_state(self, state: dict[str, Any]) -> None:
        with self._lock:
            self.initial = state["initial"]
            self.current = state["current"]
            self.version = int(state["version"])
            self.history = [PromptCandidate(**c) for c in state["history"]]
