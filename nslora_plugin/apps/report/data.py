"""A run's artifacts turned into the series and rows the report draws: no HTML, no plotting here,
so what the page shows can be tested against the JSON it came from."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nslora_plugin.core.artifacts import NSLoRAArtifacts, _checkpoint_step, load_artifacts
from nslora_plugin.core.util import read_jsonl_tolerant

#: probe summary keys and the words the report uses for them (others are shown by their key)
METRIC_NAMES = {"reward": "probe reward", "correctness": "accuracy", "format": "format compliance",
                "length": "length compliance", "json": "valid JSON", "ref_nll": "reference NLL"}


@dataclass
class Check:
    """One routing decision of the run (a row of `decisions.jsonl` with kind "route")."""

    step: int
    action: str
    reason: str
    loss: float | None
    c1: float | None
    c2: float | None
    scores: dict[str, Any]
    labels: list[dict[str, Any]]
    probe: dict[str, Any]


@dataclass
class Candidate:
    """One candidate prompt with the prompt it would have replaced (the accepted one before it)."""

    index: int
    step: int
    editor: str
    prompt: str
    replaces: str
    accepted: bool
    version: int | None
    reward_before: float | None
    reward_after: float | None
    reason: str
    components_after: dict[str, float]
    rationale: str = ""


@dataclass
class Event:
    """A mark on the timeline: a routing decision, a gate verdict, an editor fault, a resume."""

    step: int
    kind: str  # numerical | symbolic | accepted | rejected | fault | resume
    text: str


@dataclass
class RunData:
    """Everything the run report shows, read once."""

    arts: NSLoRAArtifacts
    train_log: list[dict[str, Any]] = field(default_factory=list)
    train_log_source: str | None = None

    @property
    def config(self) -> dict[str, Any]:
        return self.arts.config

    @property
    def summary(self) -> dict[str, Any]:
        return self.arts.summary

    def losses(self) -> list[tuple[int, float]]:
        """(step, training loss) of every trainer log line that has one."""
        out = []
        for row in self.train_log:
            if isinstance(row.get("loss"), (int, float)) and isinstance(row.get("step"), int):
                out.append((row["step"], float(row["loss"])))
        return out

    def checks(self) -> list[Check]:
        out = []
        for d in self.arts.decisions:
            if d.get("kind") != "route":
                continue
            signal = d.get("signal") or {}
            out.append(Check(step=int(d.get("step", 0)), action=str(d.get("action", "")),
                             reason=str(d.get("reason", "")), loss=signal.get("loss"),
                             c1=signal.get("c1"), c2=signal.get("c2"), scores=d.get("scores") or {},
                             labels=list(d.get("labels") or []), probe=d.get("probe") or {}))
        return out

    def probe_metrics(self) -> list[str]:
        """The reward components the probe reports carry (reward first)."""
        keys: list[str] = []
        for row in self.arts.probe_reports:
            for k, v in row.items():
                if k not in keys and isinstance(v, (int, float)) and k not in (
                        "step", "prompt_version", "n", "failures", "ref_nll", "candidate"):
                    keys.append(k)
        return sorted(keys, key=lambda k: (k != "reward", k != "correctness", k != "format", k))

    def probe_series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every probe evaluation, in order; an accepted candidate's re-score at
        the same step follows the check's own, so an edit shows as a jump at its step."""
        return [(int(r.get("step", 0)), float(r[key])) for r in self.arts.probe_reports
                if isinstance(r.get(key), (int, float))]

    def events(self) -> list[Event]:
        out = []
        for d in self.arts.decisions:
            kind, step = d.get("kind"), int(d.get("step", 0))
            if kind == "route":
                out.append(Event(step, str(d.get("action")), str(d.get("reason", ""))))
            elif kind == "edit":
                out.append(Event(step, "accepted" if d.get("accepted") else "rejected",
                                 f"{d.get('editor')}: {d.get('reason', '')}"))
            elif kind == "fault":
                out.append(Event(step, "fault", f"{d.get('where')}: {d.get('message', '')}"))
            elif kind == "resume":
                out.append(Event(step, "resume", "resumed from a checkpoint"))
        return out

    def faults(self) -> list[dict[str, Any]]:
        return [d for d in self.arts.decisions if d.get("kind") == "fault"]

    def candidates(self) -> list[Candidate]:
        """Every candidate after the initial prompt, each with the accepted prompt before it and
        the editor's rationale from its `edit` decision (matched in order)."""
        edits = [d for d in self.arts.decisions if d.get("kind") == "edit"]
        history = list(self.arts.prompt_history)
        current = history[0].get("prompt", "") if history else (self.arts.initial_system_prompt or "")
        out: list[Candidate] = []
        for i, c in enumerate(history[1:] if history and history[0].get("editor") == "initial" else history):
            rationale = ""
            for j, d in enumerate(edits):  # the first unused edit of the same step and editor
                if d.get("step") == c.get("step") and d.get("editor") == c.get("editor"):
                    rationale = str((d.get("meta") or {}).get("rationale") or "")
                    del edits[j]
                    break
            out.append(Candidate(index=i + 1, step=int(c.get("step", 0)), editor=str(c.get("editor")),
                                 prompt=str(c.get("prompt") or ""), replaces=current,
                                 accepted=bool(c.get("accepted")), version=c.get("version"),
                                 reward_before=c.get("reward_before"), reward_after=c.get("reward_after"),
                                 reason=str(c.get("reason", "")),
                                 components_after=dict(c.get("components_after") or {}),
                                 rationale=rationale))
            if c.get("accepted"):
                current = str(c.get("prompt") or "")
        return out

    def usage(self) -> dict[str, Any]:
        return self.summary.get("editor_usage") or self.arts.state.get("usage") or {}

    def decision_counts(self) -> dict[str, int]:
        return self.summary.get("decisions") or self.arts.state.get("decision_counts") or {}


def _trainer_state_log(folder: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The log history of `folder/trainer_state.json`, else of its latest checkpoint's."""
    candidates = [folder / "trainer_state.json"]
    if folder.is_dir():
        checkpoints = sorted((p for p in folder.glob("checkpoint-*") if _checkpoint_step(p) >= 0),
                             key=_checkpoint_step, reverse=True)
        candidates += [p / "trainer_state.json" for p in checkpoints]
    for path in candidates:
        if path.is_file():
            try:
                history = json.loads(path.read_text(encoding="utf-8")).get("log_history") or []
            except (OSError, ValueError, AttributeError):
                continue
            return [r for r in history if isinstance(r, dict)], str(path)
    return [], None


def load_run(path: str | Path) -> RunData:
    """The run under `path` (run folder, checkpoint, final folder or `nslora/` folder). The
    training loss comes from `train_log.jsonl` (written at train end), else from the
    `trainer_state.json` next to the artifacts or in the latest checkpoint."""
    arts = load_artifacts(path)
    log_path = arts.root / "train_log.jsonl"
    if log_path.is_file():
        return RunData(arts, read_jsonl_tolerant(log_path), str(log_path))
    for folder in (arts.root.parent, Path(path)):
        rows, source = _trainer_state_log(folder)
        if rows:
            return RunData(arts, rows, source)
    return RunData(arts)


#: Failure labels written by runs before the vocabulary was unified ("factual" / "style").
_OLD_LABELS = {"factual": "numerical", "style": "symbolic"}


def label_kind(label: str | None) -> str | None:
    """A failure label in today's vocabulary ("numerical" / "symbolic"), old runs' included."""
    return _OLD_LABELS.get(label or "", label)
