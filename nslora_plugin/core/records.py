"""Plain data passed between the stages of the loop: trainer → monitor → router → (editor | LoRA) → artifacts.

Everything here is a small dataclass with `to_dict()` so the decision log and the artifacts are
JSON lines a user can read without this package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["numerical", "symbolic"]
#: The kind of update a failure needs: the weights ("numerical") or the prompt ("symbolic").
Label = Literal["numerical", "symbolic"]


class _Serializable:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class ProbeExample(_Serializable):
    """One held-out example: the user turn, the reference assistant reply and its final answer;
    `system`: the row's own system message, if it had one (the loop refuses one that differs
    from the run's prompt: every row is probed under the run's prompt)."""

    id: str
    question: str
    reference: str
    answer: str | None = None
    system: str | None = None


@dataclass
class ProbeResult(_Serializable):
    """What the current adapter + current prompt did on one probe example."""

    example_id: str
    completion: str
    rewards: dict[str, float]
    reward: float
    ref_nll: float
    #: diagnostics that are not reward components (they never change `reward` or the gate), e.g.
    #: `answer_present`: 1 if the right answer appears anywhere in the reply, whatever its form.
    signals: dict[str, float] = field(default_factory=dict)
    #: the reply reached the probe's token cap without ending (`probe_max_new_tokens`)
    cut: bool = False

    @property
    def passed(self) -> bool:
        return self.reward >= 1.0 - 1e-9


@dataclass
class ProbeReport(_Serializable):
    """All probe results of one evaluation, with the prompt version it was made under."""

    step: int
    prompt_version: int
    results: list[ProbeResult]

    def mean(self, key: str | None = None) -> float:
        if not self.results:
            return 0.0
        if key is None:
            return sum(r.reward for r in self.results) / len(self.results)
        values = [r.rewards[key] for r in self.results if key in r.rewards]
        return sum(values) / len(values) if values else float("nan")

    @property
    def mean_reward(self) -> float:
        return self.mean()

    @property
    def mean_nll(self) -> float:
        return sum(r.ref_nll for r in self.results) / max(len(self.results), 1)

    @property
    def failures(self) -> list[ProbeResult]:
        return [r for r in self.results if not r.passed]

    def summary(self) -> dict[str, Any]:
        keys = sorted({k for r in self.results for k in r.rewards})
        out: dict[str, Any] = {"step": self.step, "prompt_version": self.prompt_version,
                               "n": len(self.results), "reward": round(self.mean_reward, 4),
                               "ref_nll": round(self.mean_nll, 4),
                               "failures": len(self.failures)}
        cut = sum(r.cut for r in self.results)
        if cut:
            out["cut_replies"] = cut
        for k in keys:
            out[k] = round(self.mean(k), 4)
        return out


@dataclass
class TrainingSignal(_Serializable):
    """The unified monitoring signal at one check (see `monitor.SignalMonitor`)."""

    step: int
    loss: float | None
    c1: float | None
    c2: float | None
    loss_flat: bool
    grad_small: bool


@dataclass
class FailureLabel(_Serializable):
    """The classifier's verdict on one failing probe example."""

    example_id: str
    label: Label
    p_symbolic: float
    features: dict[str, float]


@dataclass
class RouteDecision(_Serializable):
    """One routing decision with its inputs, scores and a one-line reason."""

    step: int
    action: Action
    reason: str
    scores: dict[str, float] = field(default_factory=dict)
    labels: list[FailureLabel] = field(default_factory=list)
    signal: TrainingSignal | None = None
    probe: dict[str, Any] = field(default_factory=dict)


@dataclass
class EditProposal(_Serializable):
    """A candidate system prompt from an editor plugin."""

    editor: str
    prompt: str
    rationale: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EditOutcome(_Serializable):
    """The validation gate's verdict on one candidate."""

    step: int
    editor: str
    candidate: str
    accepted: bool
    reward_before: float
    reward_after: float | None
    reason: str
    prompt_version: int
    components_after: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class DecisionRecord(_Serializable):
    """What `nslora_on_decision` receives: a routing decision or an edit verdict."""

    kind: Literal["route", "edit", "fault", "start", "end", "resume", "question_edits"]
    step: int
    payload: dict[str, Any]


@dataclass(frozen=True)
class EditorStatus(_Serializable):
    """One editor's answer to "can you edit now?" (`nslora_editor_start`, `nslora_editor_status`)."""

    editor: str
    ready: bool
    #: why it cannot edit, when not ready (shown in route reasons and fault records)
    reason: str = ""
    #: True for editors that call an external LLM (reported as `llm_editor_ready`)
    uses_llm: bool = False
    #: True once the run's editor budget is spent: no symbolic round runs after that, by any editor
    budget_spent: bool = False
