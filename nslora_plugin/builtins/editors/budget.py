"""Usage accounting and budgets for the editor LLM.

`Usage` is what the artifacts show (state.json / summary.json `editor_usage`, the trainer's
`nslora/editor_*` metrics): calls, tokens (from the server's `usage` field, estimated at 4
characters a token when a server leaves it out), seconds, cache hits, failures.

`Budget` enforces the configured caps (0 = no cap), per symbolic round and per run:

    editor_max_calls_per_round / editor_max_calls_per_run      LLM calls started (cache hits are free)
    editor_max_tokens_per_round / editor_max_tokens_per_run    prompt + completion tokens
    editor_max_seconds_per_round / editor_max_seconds_per_run  editor wall time (rounds only)

The caps are hard: a call is not started if it could take a total past its cap (its prompt is
estimated at 4 characters a token, its reply at `editor_max_tokens`), and a call's timeout is cut
to the time left. A round plans its batch to fit the calls left. When a run budget can no longer
pay for the smallest round the editor reports it spent and the router stays numerical, saying why.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from nslora_plugin.builtins.editors.errors import EditorBudgetSpent
from nslora_plugin.core.config import NSLoRAConfig


def estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)




@dataclass
class Usage:
    calls: int = 0               # LLM calls that returned (cache hits not included)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_calls: int = 0     # calls whose tokens were estimated (no `usage` in the reply)
    failed_calls: int = 0        # calls that raised (HTTP error, timeout, refused, malformed)
    retried_calls: int = 0
    cached_calls: int = 0        # answered from the reply cache (no call, no tokens)
    health_checks: int = 0
    seconds: float = 0.0         # summed call durations (exceeds wall time when calls overlap)
    rounds: int = 0
    wall_seconds: float = 0.0    # editor wall time summed over rounds (what the seconds budget counts)
    last_round: dict[str, Any] = field(default_factory=dict)
    budget_limits: dict[str, float] = field(default_factory=dict)
    budget_spent: str = ""       # why the run budget is spent, once it is

    def tokens_used(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def started_calls(self) -> int:
        """Calls that reached the backend (answered or failed; cache hits are not calls)."""
        return self.calls + self.failed_calls

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total_tokens"] = self.tokens_used()
        out["seconds"] = round(self.seconds, 3)
        out["wall_seconds"] = round(self.wall_seconds, 3)
        return out

    def load(self, data: dict[str, Any]) -> None:
        """Restore counters from a saved `to_dict()` (a resumed run keeps its run budget; the
        limits themselves come from the current config)."""
        for key, value in data.items():
            if key in self.__dataclass_fields__ and key != "budget_limits":
                setattr(self, key, value)


LIMIT_KEYS = ("editor_max_calls_per_round", "editor_max_calls_per_run",
              "editor_max_tokens_per_round", "editor_max_tokens_per_run",
              "editor_max_seconds_per_round", "editor_max_seconds_per_run")


class Budget:
    """Thread-safe meter of one run's editor spending against the configured caps."""

    def __init__(self, config: NSLoRAConfig, usage: Usage) -> None:
        self.usage = usage
        self.max_reply_tokens = config.editor_max_tokens
        lim = {k: float(getattr(config, k)) for k in LIMIT_KEYS}
        usage.budget_limits = {k: v for k, v in lim.items() if v > 0}

        def cap(key: str) -> float:
            return lim[key] if lim[key] > 0 else math.inf

        self.calls_round, self.calls_run = cap("editor_max_calls_per_round"), cap("editor_max_calls_per_run")
        self.tokens_round, self.tokens_run = cap("editor_max_tokens_per_round"), cap("editor_max_tokens_per_run")
        self.seconds_round, self.seconds_run = cap("editor_max_seconds_per_round"), cap("editor_max_seconds_per_run")
        self._lock = threading.Lock()
        self.inflight = 0           # calls started and not yet settled
        self.reserved = 0           # tokens reserved by calls in flight
        self.round_calls = 0
        self.round_tokens = 0
        self.round_t0: float | None = None

    # ---------------------------------------------------------------- rounds
    def start_round(self) -> None:
        with self._lock:
            self.round_calls = self.round_tokens = 0
            self.round_t0 = time.monotonic()

    def end_round(self) -> float:
        with self._lock:
            elapsed = time.monotonic() - self.round_t0 if self.round_t0 is not None else 0.0
            self.round_t0 = None
            self.usage.wall_seconds += elapsed
            self.usage.rounds += 1
            return elapsed

    def _round_elapsed(self) -> float:
        return time.monotonic() - self.round_t0 if self.round_t0 is not None else 0.0

    def run_calls(self) -> int:
        """Calls of this run so far (answered, failed or in flight); survives a resume via Usage."""
        return self.usage.started_calls() + self.inflight

    def calls_left(self) -> float:
        """Calls this round may still start (inf when uncapped)."""
        return min(self.calls_round - self.round_calls, self.calls_run - self.run_calls())

    # ---------------------------------------------------------------- calls
    def reserve(self, prompt_tokens: int) -> int:
        """Admit one call or raise `EditorBudgetSpent`; returns the tokens reserved for it."""
        need = prompt_tokens + self.max_reply_tokens
        with self._lock:
            problem = self._refusal(need)
            if problem is not None:
                raise EditorBudgetSpent(*problem)
            self.inflight += 1
            self.round_calls += 1
            self.reserved += need
            return need

    def settle(self, reserved: int, tokens: int) -> None:
        """Close a call admitted by `reserve` (after Usage has counted it)."""
        with self._lock:
            self.inflight -= 1
            self.reserved -= reserved
            self.round_tokens += tokens

    def _refusal(self, need: int) -> tuple[str, str] | None:
        spent_run = self.usage.tokens_used() + self.reserved
        spent_round = self.round_tokens + self.reserved
        if self.round_calls >= self.calls_round:
            return f"editor_max_calls_per_round={int(self.calls_round)} reached", "round"
        if self.run_calls() >= self.calls_run:
            return f"editor_max_calls_per_run={int(self.calls_run)} reached", "run"
        if spent_round + need > self.tokens_round:
            return (f"editor_max_tokens_per_round={int(self.tokens_round)} would be passed "
                    f"({spent_round} spent or in flight, next call up to {need})"), "round"
        if spent_run + need > self.tokens_run:
            return (f"editor_max_tokens_per_run={int(self.tokens_run)} would be passed "
                    f"({spent_run} spent or in flight, next call up to {need})"), "run"
        elapsed = self._round_elapsed()
        if elapsed >= self.seconds_round:
            return f"editor_max_seconds_per_round={self.seconds_round:g} reached", "round"
        if self.usage.wall_seconds + elapsed >= self.seconds_run:
            return f"editor_max_seconds_per_run={self.seconds_run:g} reached", "run"
        return None

    def call_timeout(self, timeout: float) -> tuple[float, str | None]:
        """The call's timeout, cut to the time the seconds budgets leave (at least 0.1 s), and the
        name of the budget that cut it (None when it was not cut)."""
        elapsed = self._round_elapsed()
        left_round = self.seconds_round - elapsed
        left_run = self.seconds_run - self.usage.wall_seconds - elapsed
        if min(left_round, left_run) >= timeout:
            return timeout, None
        name = (f"editor_max_seconds_per_round={self.seconds_round:g}" if left_round <= left_run
                else f"editor_max_seconds_per_run={self.seconds_run:g}")
        return max(0.1, min(left_round, left_run)), name

    # ---------------------------------------------------------------- planning
    def run_spent(self, min_calls: int) -> str | None:
        """Why the run budget cannot pay for a round of `min_calls` calls, or None."""
        with self._lock:
            used = self.run_calls()
            if self.calls_run - used < min_calls:
                return (f"{used}/{int(self.calls_run)} calls used (editor_max_calls_per_run); "
                        f"a round needs at least {min_calls}")
            tokens = self.usage.tokens_used()
            # a round of min_calls calls at this run's mean tokens per call (a reply, before any)
            per_call = tokens / self.usage.calls if self.usage.calls else self.max_reply_tokens
            if tokens + min_calls * per_call > self.tokens_run:
                return (f"{tokens}/{int(self.tokens_run)} tokens used (editor_max_tokens_per_run); "
                        f"a round needs about {int(min_calls * per_call)}")
            if self.usage.wall_seconds >= self.seconds_run:
                return (f"{self.usage.wall_seconds:.1f}/{self.seconds_run:g} s used "
                        "(editor_max_seconds_per_run)")
        return None

    def plan_batch(self, wanted: int, calls_per_example: int, extra_calls: int) -> int:
        """The largest batch (<= wanted) whose calls fit the calls left; 0 if none fits."""
        left = self.calls_left()
        if math.isinf(left):
            return wanted
        return max(0, min(wanted, int((left - extra_calls) // calls_per_example)))
