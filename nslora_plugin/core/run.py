"""What a hook sees of the run: a narrow, typed view (`RunView`) and a per-plugin keyed store.

Hooks never receive the loop. They read the step, the config, the probe examples and reports so
far, whether an editor can edit (`EditorAvailability`), and they act only through `record`,
`record_fault`, `generate` and `score`. A plugin keeps its own state in `run.stash` under a key
it creates (pytest's `Stash` is the model), so no two plugins can step on each other's state and
the loop holds no plugin's fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Mapping, Protocol, Sequence, TypeVar

from nslora_plugin.core.config import NSLoRAConfig
from nslora_plugin.core.records import EditorStatus, ProbeExample, ProbeReport, ProbeResult
from nslora_plugin.core.util import redact

T = TypeVar("T")


class StashKey(Generic[T]):
    """A key into a `Stash`; only code holding the key object can read or write its value."""

    __slots__ = ("name",)

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


class Stash:
    """A plugin's own state for one run, keyed by `StashKey` objects."""

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], Any] = {}

    def __getitem__(self, key: StashKey[T]) -> T:
        return self._data[key]

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __contains__(self, key: StashKey[Any]) -> bool:
        return key in self._data

    def get(self, key: StashKey[T], default: T) -> T:
        return self._data.get(key, default)

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return self._data.setdefault(key, default)


def editor_down_message(reason: str, stand_in: str | None) -> str:
    """The one wording for an editor that cannot edit at the start of a run: why, and what edits
    instead (`stand_in`, another editor that is ready) or that training stays numerical. Said by
    the start-up check of the command-line adapters and by the loop when it starts its editors."""
    return f"{reason}; " + (f"the {stand_in} editor stands in" if stand_in
                            else "training stays numerical")


def editor_down_error(reason: str, backend: str) -> RuntimeError:
    """The one error for an editor that cannot edit at start with `on_editor_down: fail`."""
    return RuntimeError(f"NSLoRA: {reason}; point editor_base_url / editor_model at a working "
                        f"editor (editor_backend={backend!r}), or set on_editor_down='numerical'")


@dataclass(frozen=True)
class EditorAvailability:
    """Whether a symbolic round can run now, merged from every editor's `nslora_editor_status`."""

    available: bool
    llm_ready: bool
    reason: str = ""        # why not (or, while another editor stands in, which one is down)
    budget_spent: str = ""  # why the run's editor budget is spent, once it is

    @classmethod
    def merge(cls, statuses: Sequence[EditorStatus], config: NSLoRAConfig) -> "EditorAvailability":
        spent = redact(next((s.reason for s in statuses if s.budget_spent), ""))
        llm_ready = any(s.ready and s.uses_llm for s in statuses)
        if spent:  # the run's editor budget stops every symbolic round, whoever would edit
            return cls(False, llm_ready, f"editor budget spent: {spent}", spent)
        down = redact(next((s.reason for s in statuses if not s.ready and s.reason), ""))
        if any(s.ready for s in statuses):
            return cls(True, llm_ready, down)  # an editor stands in; `reason` says who is down
        return cls(False, False, down or f"editor={config.editor!r}")


class RunHost(Protocol):
    """What `RunView` needs from the loop that owns the run (kept apart so hooks cannot reach more)."""

    config: NSLoRAConfig
    tokenizer: Any
    examples: dict[str, ProbeExample]
    pool: dict[str, ProbeExample]
    reports: list[ProbeReport]
    decision_counts: dict[str, int]
    last_check_step: int
    stash: Stash

    def editor_availability(self) -> EditorAvailability: ...
    def record(self, kind: str, step: int, payload: dict[str, Any]) -> None: ...
    def record_fault(self, where: str, error: Any) -> None: ...
    def generate_one(self, system_prompt: str | None, question: str) -> str: ...
    def score(self, example: ProbeExample, completion: str) -> ProbeResult: ...
    def artifact_path(self, name: str) -> Path: ...


class RunView:
    """The run as hooks see it. Read-only except for the store and the two record methods."""

    __slots__ = ("_host",)

    def __init__(self, host: RunHost) -> None:
        self._host = host

    @property
    def config(self) -> NSLoRAConfig:
        return self._host.config

    @property
    def tokenizer(self) -> Any:
        return self._host.tokenizer

    @property
    def step(self) -> int:
        """The step of the check in progress (or the last one); 0 before the first check."""
        return max(self._host.last_check_step, 0)

    @property
    def examples(self) -> Mapping[str, ProbeExample]:
        return self._host.examples

    @property
    def pool(self) -> Mapping[str, ProbeExample]:
        """Labelled rows prompts-as-data may train on (`pool_path`); never probed. Empty: none."""
        return self._host.pool

    @property
    def reports(self) -> tuple[ProbeReport, ...]:
        """Every probe report so far (baseline, checks, accepted candidates), oldest first."""
        return tuple(self._host.reports)

    @property
    def decision_counts(self) -> Mapping[str, int]:
        """Routing decisions and gate verdicts so far: numerical, symbolic, accepted, rejected."""
        return dict(self._host.decision_counts)

    @property
    def editor(self) -> EditorAvailability:
        return self._host.editor_availability()

    @property
    def stash(self) -> Stash:
        return self._host.stash

    def path(self, name: str) -> Path:
        """A file or folder in the run's artifacts (for a plugin's own logs or cache)."""
        return self._host.artifact_path(name)

    def record(self, kind: str, payload: dict[str, Any]) -> None:
        """Write a record to the decision log at the current step (and tell `nslora_on_decision`)."""
        self._host.record(kind, self.step, payload)

    def record_fault(self, where: str, error: Any) -> None:
        """Report a fault once per kind; the run goes on with the last accepted prompt."""
        self._host.record_fault(where, error)

    def generate(self, system_prompt: str | None, question: str) -> str:
        """The model's greedy reply to `question` under `system_prompt`, as the probe generates."""
        return self._host.generate_one(system_prompt, question)

    def score(self, example: ProbeExample, completion: str) -> ProbeResult:
        """Score a reply with every `nslora_score_probe` plugin (no reference NLL: 0.0)."""
        return self._host.score(example, completion)
