"""When to spend a matched editor budget: the schedule arms of `nslora compare --task drift`.

Every arm gets the same editor budget R (`--max-symbolic-rounds`) and the same editor: the
scripted constraint editor (`ScriptedEditor`, "scripted" in the output; no LLM). At a round it
states each constraint of `spec_at(step)` the prompt does not state yet, and restates, in a
phrasing the prompt does not have yet, a stated one that a failing reply breaks. The schedule arms
differ only in when their rounds happen (`ScheduleRoute`, an `nslora_route` plugin that answers
before the built-in router):

- `fixed@0`: one round at the check before the first step (the constraints active then), no more;
- `fixed-even`: R rounds at evenly spaced checks (check `i * n // R` of the n checks, i < R);
- `alternate`: a round at every check until R are spent;
- `random-timing`: R rounds at checks drawn by an RNG seeded with the training seed;
- `oracle-onset`: a round at the first check after each onset a prompt can address (the changed
  spec, then side effects, then forgetting; at most R): at or after a spec onset, which that
  check's probe already scores, strictly after a data onset, whose rows must be trained on first.
  It knows the task's schedule: an upper bound, labelled as one;

and `lora_instruction_final`: plain LoRA with the manual fix for the final spec as every row's
system prompt from step 0 (and at evaluation). `lora`, `neurosymbolic` and the other arms of
compare run as they are, with the scripted editor and the drift rewards.

Budget R: a schedule route never answers "symbolic" once the run has R symbolic decisions (one
round each), the built-in router stops at `max_symbolic_rounds`, and `DriftArm.results` counts
each arm's rounds from its decisions and stops the run if one ran more than R. A planned round at
a check where nothing fails is skipped, as compare's `fixed` arm does. On a drift task every
NSLoRA arm checks before the first step (`check_at_start`), so all arms have the same checks.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from nslora_plugin.apps.harness.drift import (ComplianceRecorder, DriftRewards, DriftTask,
                                              compliance_curve_callback, plot_compliance)
from nslora_plugin.core.config import NSLoRAConfig
from nslora_plugin.core.hookspecs import hookimpl
from nslora_plugin.core.records import EditorStatus, EditProposal, ProbeReport, RouteDecision

__all__ = ["DRIFT_ARMS", "PRACTICAL_SCHEDULES", "SCHEDULE_ARMS", "schedule_decision", "SCRIPTED", "DriftArm", "ScheduleRoute", "ScriptedEditor",
           "check_drift_arms", "check_steps", "drift_arm", "final_instruction_rows",
           "planned_checks", "report_drift"]

SCHEDULE_ARMS = ("fixed@0", "fixed-even", "alternate", "random-timing", "oracle-onset")
#: the schedules a user could run without knowing when weaknesses appear: the comparators of the
#: drift decision rule (`schedule_decision`); the oracle is an upper bound, reported beside them
PRACTICAL_SCHEDULES = ("fixed@0", "fixed-even", "alternate", "random-timing")
#: the drift task's pre-registered target: margin in points over the best practical schedule
TARGET_POINTS = 3.0
#: arms that exist for `--task drift` only
DRIFT_ARMS = (*SCHEDULE_ARMS, "lora_instruction_final")
SCRIPTED = "scripted"
#: the onsets a prompt can address, in the order the oracle spends its rounds on them
ORACLE_PRIORITY = ("changed_spec", "side_effects", "forgetting")
LABELS = {"fixed@0": "scripted, one round at step 0",
          "fixed-even": "scripted, evenly spaced",
          "alternate": "scripted, every check until R",
          "random-timing": "scripted, random checks",
          "oracle-onset": "scripted, upper bound: knows the onsets",
          "lora_instruction_final": "manual fix for the final spec, no editor"}


# ------------------------------------------------------------------ the checks and the plans
def check_steps(max_steps: int, check_every: int, *, warmup_steps: int = 0,
                at_start: bool = True) -> list[int]:
    """The steps a run of `max_steps` checks at (as `NeurosymbolicLoop.check_due` decides)."""
    first = max(warmup_steps, 1)
    steps = [s for s in range(check_every, max_steps + 1, check_every) if s >= first]
    return ([0] if at_start else []) + steps


def oracle_checks(task: DriftTask, checks: Sequence[int], budget: int) -> list[int]:
    """The first check after each prompt-addressable onset, in `ORACLE_PRIORITY`, at most `budget`."""
    chosen: list[int] = []
    for mechanism in ORACLE_PRIORITY:
        for onset in task.onsets():
            if onset.mechanism != mechanism:
                continue
            after = next((c for c in checks
                          if (c >= onset.step if onset.kind == "spec" else c > onset.step)), None)
            if after is not None and after not in chosen:
                chosen.append(after)
    return sorted(chosen[:max(budget, 0)])


def planned_checks(arm: str, checks: Sequence[int], budget: int, *, seed: int = 0,
                   task: DriftTask | None = None) -> list[int]:
    """The checks at which `arm` plans a symbolic round, at most `budget` of them (`alternate`:
    every check, its rounds stop once `budget` are spent)."""
    checks = list(checks)
    if budget <= 0 or not checks:
        return []
    if arm == "fixed@0":
        return [0] if 0 in checks else []
    if arm == "fixed-even":
        k = min(budget, len(checks))
        return [checks[i * len(checks) // k] for i in range(k)]
    if arm == "alternate":
        return checks
    if arm == "random-timing":
        rng = random.Random(f"nslora-random-timing:{seed}")
        return sorted(rng.sample(checks, min(budget, len(checks))))
    if arm == "oracle-onset":
        if task is None:
            raise ValueError("oracle-onset needs the task (its onsets)")
        return oracle_checks(task, checks, budget)
    raise ValueError(f"{arm!r} is not a schedule arm ({', '.join(SCHEDULE_ARMS)})")


# ------------------------------------------------------------------ plugins
class ScheduleRoute:
    """A schedule arm's router: a symbolic round at each planned check while something fails and
    fewer than the budget's rounds have run; LoRA otherwise."""

    def __init__(self, arm: str, planned: Sequence[int], budget: int) -> None:
        self.arm, self.planned, self.budget = arm, set(planned), budget

    @hookimpl(tryfirst=True)
    def nslora_route(self, signal: Any, report: ProbeReport, labels: Sequence[Any],
                     config: NSLoRAConfig, run: Any) -> RouteDecision:
        rounds = run.decision_counts["symbolic"]
        budget = min(self.budget, config.max_symbolic_rounds)
        scores = {"failures": float(len(report.failures)), "symbolic_rounds": float(rounds),
                  "budget": float(budget)}

        def decide(action: str, reason: str) -> RouteDecision:
            return RouteDecision(step=signal.step, action=action,  # type: ignore[arg-type]
                                 reason=f"{self.arm}: {reason}", scores=scores, labels=list(labels),
                                 signal=signal, probe=report.summary())

        if signal.step not in self.planned:
            return decide("numerical", "no round planned at this check")
        if rounds >= budget:
            return decide("numerical", f"editor budget spent ({rounds}/{budget} rounds)")
        if not report.failures:
            return decide("numerical", "planned round skipped: nothing fails")
        if not run.editor.available:
            return decide("numerical", f"no editor ({run.editor.reason})")
        return decide("symbolic", f"planned round {rounds + 1}/{budget}")


class ScriptedEditor:
    """The scripted constraint editor of the drift arms (see the module docstring)."""

    name = SCRIPTED

    def __init__(self, task: DriftTask) -> None:
        self.task = task

    @hookimpl
    def nslora_editor_start(self) -> EditorStatus:
        return EditorStatus(SCRIPTED, ready=True)

    @hookimpl
    def nslora_editor_status(self) -> EditorStatus:
        return EditorStatus(SCRIPTED, ready=True)

    @hookimpl(tryfirst=True)
    def nslora_propose_edit(self, prompt: str, failures: Sequence[Any], config: NSLoRAConfig,
                            tried: tuple[str, ...], run: Any) -> EditProposal | None:
        if SCRIPTED in tried:
            return None
        made = self.task.statements(prompt, [f.completion for f in failures], run.step)
        if made is None or len(made[0]) > config.max_prompt_chars:
            return None
        candidate, why = made
        return EditProposal(editor=SCRIPTED, prompt=candidate,
                            rationale=f"state the constraints of the spec at step {run.step}: "
                                      + ", ".join(f"{k} {v}" for k, v in why.items()),
                            meta={"constraints": why, "spec_step": run.step})


# ------------------------------------------------------------------ one arm
@dataclass
class DriftArm:
    """What a drift task adds to one arm of `nslora compare`."""

    arm: str
    task: DriftTask
    budget: int
    checks: list[int]
    planned: list[int] | None
    editor: ScriptedEditor
    rewards: DriftRewards
    recorder: ComplianceRecorder
    curve: Any = None
    plugins: list[Any] = field(default_factory=list)

    def configure(self, config: NSLoRAConfig, plugins: list[Any]) -> NSLoRAConfig:
        """Add the route (first), the scripted editor, the rewards and the recorder to `plugins`;
        the config checks at step 0 and has the built-in constraint editor blocked (one editor)."""
        self.plugins = [self.editor, self.rewards, self.recorder]
        if self.planned is not None:
            plugins.insert(0, ScheduleRoute(self.arm, self.planned, self.budget))
        plugins.extend(self.plugins)
        return config.replace(check_at_start=True,
                              plugins=[*config.plugins, "no:nslora.editor.constraint"])

    def watch(self, trainer: Any, tokenizer: Any, config: NSLoRAConfig, prompt: str | None) -> None:
        """An arm without NSLoRA: record its probe compliance at the NSLoRA arms' checks."""
        self.curve = compliance_curve_callback(self.task, tokenizer, config, prompt, config.check_every)
        trainer.add_callback(self.curve)

    def study_options(self) -> dict[str, Any]:
        """`InterventionStudy` keywords: the arm's editor, its rewards, the ordered rows."""
        return {"editor": self.editor, "scoring_plugins": [self.rewards], "in_order": True}

    def results(self, decisions: Sequence[dict[str, Any]], report: ProbeReport,
                examples: dict[str, Any]) -> dict[str, Any]:
        """Editor rounds and proposals, the schedule, compliance over steps and at the end."""
        rounds_at = [d["step"] for d in decisions
                     if d.get("kind") == "route" and d.get("action") == "symbolic"]
        if len(rounds_at) > self.budget:
            raise RuntimeError(f"arm {self.arm} ran {len(rounds_at)} symbolic rounds, over the "
                               f"editor budget R={self.budget}")
        edits = [d for d in decisions if d.get("kind") == "edit"]
        points = self.recorder.points if self.curve is None else self.curve.points
        return {"editor": SCRIPTED if decisions else "none",
                "editor_rounds": len(rounds_at), "editor_proposals": len(edits),
                "rounds_at": rounds_at, "budget": self.budget,
                "schedule": {"arm": self.arm, "label": LABELS.get(self.arm, ""),
                             "checks": self.checks, "planned_checks": self.planned,
                             "upper_bound": self.arm == "oracle-onset"},
                "compliance": points,
                "held_out_compliance": self.task.compliance(
                    [r.completion for r in report.results],
                    [examples[r.example_id].answer for r in report.results])}


def drift_arm(arm: str, task: Any, config: NSLoRAConfig, max_steps: int) -> DriftArm | None:
    """The drift part of `arm` (None unless `task` is a drift task)."""
    if not isinstance(task, DriftTask):
        return None
    checks = check_steps(max_steps, config.check_every, warmup_steps=config.warmup_steps)
    budget = config.max_symbolic_rounds
    planned = planned_checks(arm, checks, budget, seed=config.seed, task=task) \
        if arm in SCHEDULE_ARMS else None
    return DriftArm(arm=arm, task=task, budget=budget, checks=checks, planned=planned,
                    editor=ScriptedEditor(task), rewards=DriftRewards(task),
                    recorder=ComplianceRecorder(task))


def final_instruction_rows(task: DriftTask,
                           rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """`lora_instruction_final`: every row under the final spec's prompt, which is also the
    evaluation prompt."""
    prompt = task.final_prompt()
    return [{**r, "system_prompt": prompt} for r in rows], prompt


def check_drift_arms(arms: Sequence[str], args: argparse.Namespace) -> None:
    """Stop with a message when the arms or the editor do not fit the task."""
    drift = args.task == "drift"
    only = [a for a in arms if a in DRIFT_ARMS]
    if only and not drift:
        raise SystemExit(f"--arms {','.join(only)}: these arms need --task drift")
    if drift and args.editor != "constraint":
        raise SystemExit("--task drift: every arm uses the scripted constraint editor (the statements "
                         "of the spec at each check); use --editor constraint")
    if drift and getattr(args, "hide_format_rule", False):
        raise SystemExit("--task drift: --hide-format-rule hides what the scripted editor states")


# ------------------------------------------------------------------ the decision rule
def schedule_decision(result: dict[str, Any], margin: Any) -> dict[str, Any] | None:
    """The drift task's decision rule: neurosymbolic against the best practical schedule arm
    (highest held-out accuracy; among tied arms, the one against which neurosymbolic's paired
    interval is lowest). It wins only if the interval of its margin lies above 0; the target
    also asks for >= `TARGET_POINTS` points at the same or fewer editor rounds. `margin(a, b)` is
    compare's paired hierarchical-bootstrap margin. None without neurosymbolic or a schedule arm."""
    arms = result.get("arms", {})
    schedules = [a for a in PRACTICAL_SCHEDULES if a in arms]
    if "neurosymbolic" not in arms or not schedules:
        return None
    acc = {a: arms[a]["held_out"]["accuracy"] for a in schedules}
    top = max(acc.values())
    margins = {a: margin("neurosymbolic", a) for a in schedules if abs(acc[a] - top) < 1e-9}
    best = min(margins, key=lambda a: (margins[a]["interval95_points"][0], schedules.index(a)))
    m = margins[best]

    def rounds(arm: str) -> float:
        runs = arms[arm].get("editor_rounds_per_run") or [0]
        return round(sum(runs) / len(runs), 3)

    wins = m["interval95_points"][0] > 0
    out = {"rule": "neurosymbolic wins only if the 95 % hierarchical-bootstrap interval of its "
                   "held-out accuracy margin over the best practical schedule arm lies above 0",
           "comparators": schedules, "best_schedule_arm": best, "margin": m,
           "editor_rounds_mean": {"neurosymbolic": rounds("neurosymbolic"), best: rounds(best)},
           "wins": wins,
           "target_met": bool(wins and m["points"] >= TARGET_POINTS
                              and rounds("neurosymbolic") <= rounds(best)),
           "target": f">= {TARGET_POINTS:g} points, interval above 0, same or fewer editor rounds"}
    for other in ("oracle-onset", "lora_instruction_final", "lora"):
        if other in arms:
            out.setdefault("beside", {})[other] = margin("neurosymbolic", other)
    return out


# ------------------------------------------------------------------ output
def drift_lines(result: dict[str, Any]) -> list[str]:
    """Per arm: the editor rounds against R, where they ran, held-out compliance per constraint."""
    settings = result.get("settings", {})
    budget = settings.get("max_symbolic_rounds")
    lines = [f"drift: editor scripted (states the constraints active at each check; no LLM), "
             f"budget R={budget} symbolic rounds per arm; every NSLoRA arm checks at step 0; final spec "
             + ", ".join(result.get("task", {}).get("final_spec", [])) + "; onsets "
             + ", ".join(f"{o['mechanism']}@{o['step']}" for o in result.get("task", {}).get("onsets", []))]
    decision = (result.get("verdict") or {}).get("drift_decision")
    if decision:
        m = decision["margin"]
        lines.append(f"decision rule: neurosymbolic - {decision['best_schedule_arm']} (best practical "
                     f"schedule) {m['points']:+.1f} points [{m['interval95_points'][0]:+.1f}, "
                     f"{m['interval95_points'][1]:+.1f}] ({m['levels']}): "
                     + ("wins" if decision["wins"] else "does not win")
                     + ("; target met" if decision["target_met"] else "; target not met"))
    per_arm: dict[str, list[dict[str, Any]]] = {}
    for by_seed in (result.get("runs") or {}).values():
        for arms in by_seed.values():
            for arm, a in arms.items():
                per_arm.setdefault(arm, []).append(a)
    for arm, runs in per_arm.items():
        label = (runs[0].get("schedule") or {}).get("label") or ""
        rounds = [r.get("editor_rounds", 0) for r in runs]
        where = "; ".join(str(r.get("rounds_at", [])) for r in runs)
        held = runs[0].get("held_out_compliance") or {}
        comp = ", ".join(f"{k} {v:.3f}" for k, v in (held.get("compliance") or {}).items())
        lines.append(f"  {arm}{' (' + label + ')' if label else ''}: rounds "
                     f"{'/'.join(map(str, rounds))} of R={budget} at steps {where}; proposals "
                     f"{sum(r.get('editor_proposals', 0) for r in runs)}, accepted "
                     f"{sum(r.get('edits_accepted', 0) for r in runs)}; held-out compliance "
                     f"(first run) {comp}")
    return lines


def report_drift(console: Any, result: dict[str, Any], json_path: Path) -> Path | None:
    """For a drift result: print `drift_lines` and write the compliance plot next to the JSON."""
    if result.get("task", {}).get("name") != "drift":
        return None
    for line in drift_lines(result):
        console.print(line, markup=False, highlight=False)
    path = plot_compliance(result, json_path.with_name(json_path.stem + "-compliance.png"))
    console.print(f"compliance plot: {path}" if path else "compliance plot: not written (no matplotlib)")
    return path
