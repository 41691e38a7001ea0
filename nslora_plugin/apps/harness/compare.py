"""`nslora compare`: the neurosymbolic loop against fair baselines, same budgets, one table.

Arms on the same model, data, probe (gate) set and held-out set (the default is the first three):

- **numerical**: TRL `SFTTrainer` + LoRA for `--max-steps`, NSLoRA attached with a router that
  always answers "numerical" (so it probes at the same checks and logs the classifier's labels,
  but never edits the prompt);
- **symbolic**: no weight update at all — no trainer runs. The loop is driven directly: the same
  checks at steps `check_every, 2*check_every, ... <= max_steps`, and at each check a symbolic
  round (the editor proposes, the validation gate decides) while failures remain and the editor
  budget (`max_symbolic_rounds`) lasts. "Step" is only the check's label here;
- **neurosymbolic**: the loop as configured (the router decides at each check);
- **neurosymbolic_strict**: neurosymbolic with `gate_tie_break: reject` — an edit is kept only on
  a reward gain, never on the tie-break (does accepting ties help held-out accuracy?);
- **neurosymbolic_labels**: neurosymbolic with `unstated_constraint_round: false` — the router
  follows its failure labels only, never the one-time "constraint not stated yet" override;
- **lora**: plain LoRA (no NSLoRA) for `--max-steps` on every labelled row the neurosymbolic arm
  may train on: the training rows plus the pool (`--pool-size`) under the original prompt, the
  pool as ordinary rows of the training set (its share of a batch: pool / (train + pool));
- **lora_upsampled**: the same rows, but the pool at the share the NSLoRA arms give it: pool rows
  replace `augment_share` of every batch from step 0 (the prompts-as-data collator), training rows
  fill the rest;
- **lora_instruction**: the careful manual fix — the same rows as `lora`, with the format
  instruction written by hand into the system prompt of the rows whose replies follow it (the
  pool's), and that prompt at evaluation; **lora_instruction_upsampled** is it with the pool
  upsampled as in `lora_upsampled` — the mix `fixed` trains on once its step-0 edit is accepted;
  **lora_instruction_all** writes the instruction into every row's prompt;
- **fixed**: a fixed schedule in the style of DSPy's BetterTogether — a symbolic round on the
  baseline probe before the first step, then LoRA for the whole budget, prompts as data on;
- **neurosymbolic_questions**: the paper's joint system + question edits — neurosymbolic with
  `edit_questions: true` (an ablation; only the TextGrad editor rewrites questions);
- with `--task drift` (weaknesses that appear during training, `drift.py`): the schedule arms
  `fixed@0`, `fixed-even`, `alternate`, `random-timing` and `oracle-onset` (an upper bound) at one
  editor budget, and `lora_instruction_final`; every arm has the scripted constraint editor
  (`schedules.py`).

Each arm's data mix (the pool's share of a batch and from which step) is in the results (`mix`)
and in the table; the NSLoRA arms start mixing the pool in at their first accepted edit.

`--hide-format-rule`: no editor receives any text the user wrote about the format — neither
`format_instruction` nor the reward's regex (`format_instruction` is set to "", which the editors
read as "say nothing about the format"); the editors see only the failing examples and the
references. The constraint editor, which does nothing but state the rule, is unavailable then (as
the editor or the fallback): `--editor constraint` stops with a message. The manual-fix arms still
use the task's instruction (a user's hand-written fix).

Splits. With `--pool-size N` the labelled rows outside training are split in two: the probe is the
**gate split** (scored by the gate and the router, never trained on by any arm) and the **pool**
is what prompts-as-data and every LoRA baseline may train on; held-out rows are never seen, and
their facts are none of the gate's or the pool's (editors quote those). A run stops, naming the
row, if a held-out answer appears in a prompt it is evaluated under (`tasks.answer_leaks`).

Task instances and seeds. `--task-seeds 0,1,2` generates one task instance per seed (the synthetic
generator's seed, or the JSONL split's), `--seeds 0,1,2` runs every arm once per training seed
(LoRA init, batch order, probe order) on each instance; results are keyed by both (`runs`). Every
interval is a hierarchical bootstrap (`bootstrap.py`) over task instances, training seeds and
held-out items together, items paired across arms, printed with the n of each level; a margin
whose interval contains 0 is called a tie.

Numerical and neurosymbolic share the step budget; symbolic and neurosymbolic share the editor
budget. Each arm starts from a fresh copy of the base model. After each arm the held-out rows are
scored under that arm's final prompt (greedy, same generation settings as the probe).

Measures (per arm): held-out accuracy — the reply is right under the task's rule (correct answer
in the required `Final:` line) — with its interval; fact accuracy; format compliance; the probe
reward at the end; edits proposed / accepted, accepted edits split into those accepted on a reward
gain and on the gate's tie-break; editor LLM calls and tokens; wall time.

The router, two ways. *Label/rule agreement* (every arm that logs route decisions): the
classifier's label of each failing probe example against the task's rule (`tasks.failure_kind`),
which reads the same two things as the router's features — agreement by construction, never
called accuracy. *Router vs interventions* (the neurosymbolic arms, `--intervention-steps`): at
each check the run branches from the same state — the candidate prompt alone, k LoRA steps, both —
and a failure's true kind is the branch that fixes it (`interventions.py`); the router's labels
against that truth are its confusion matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nslora_plugin.core.config import NSLoRAConfig
from nslora_plugin.core.hookspecs import hookimpl
from nslora_plugin.core.answers import format_compliant
from nslora_plugin.core.run import RunView
from nslora_plugin.core.records import ProbeReport, RouteDecision
from nslora_plugin.core.util import read_jsonl_tolerant
from nslora_plugin.apps.harness import tables
from nslora_plugin.apps.harness.bootstrap import Interval, hierarchical_bootstrap
from nslora_plugin.apps.harness.tasks import Task, check_no_answer_in_prompt, load_task
from nslora_plugin.apps.harness.drift import add_drift_arguments, load_drift_task
from nslora_plugin.apps.harness.schedules import (DRIFT_ARMS, check_drift_arms, drift_arm,
                                                  final_instruction_rows, report_drift,
                                                  schedule_decision)

DEFAULT_ARMS = ("numerical", "symbolic", "neurosymbolic")
ARMS = (*DEFAULT_ARMS, "neurosymbolic_strict", "neurosymbolic_labels", "lora", "lora_upsampled", "lora_instruction",
        "lora_instruction_upsampled", "lora_instruction_all", "fixed", "neurosymbolic_questions",
        *DRIFT_ARMS)
PLAIN_LORA_ARMS = ("lora", "lora_upsampled", "lora_instruction", "lora_instruction_upsampled",
                   "lora_instruction_all", "lora_instruction_final")
#: plain-LoRA arms whose pool rows replace `augment_share` of every batch from step 0
UPSAMPLED_ARMS = ("lora_upsampled", "lora_instruction_upsampled")
#: what `--hide-format-rule` says when the constraint editor is asked for
HIDDEN_RULE_CONSTRAINT = (
    "--hide-format-rule: the constraint editor is unavailable — all it does is write the format "
    "rule (or the reward's regex) into the prompt, which is exactly what is hidden. Choose "
    "--editor demonstrations or --editor textgrad (its fallback is then off as well).")
#: The update an action makes, in the labels' vocabulary (one vocabulary: numerical / symbolic).
ACTION_KIND = {"symbolic": "symbolic", "numerical": "numerical"}


# ------------------------------------------------------------------ CLI
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from nslora_plugin.apps.student.choose import add_student_argument

    p = parser or argparse.ArgumentParser(prog="nslora compare", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="synthetic",
                   help="'synthetic' (fictional facts + a Final: line), 'drift' (weaknesses that "
                        "appear during training: --drift-* knobs), 'gsm8k', or a JSONL file "
                        "with question/answer rows (default: synthetic)")
    p.add_argument("--model", default=None,
                   help="local model folder or Hub id (default: embedded SmolLM2-135M-Instruct)")
    add_student_argument(p)
    p.add_argument("--output-dir", default="nslora-compare", help="run folder (default: ./nslora-compare)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help="comma-separated subset of " + ", ".join(ARMS) + " (default: "
                        + ",".join(DEFAULT_ARMS) + ")")
    p.add_argument("--max-steps", type=int, default=60, help="optimizer steps (numerical, neurosymbolic)")
    p.add_argument("--check-every", type=int, default=None, help="default: max_steps // 4")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--editor", choices=("constraint", "textgrad", "demonstrations"), default="constraint",
                   help="constraint: the deterministic editor (fast, no LLM); textgrad: an editor LLM "
                        "(--editor-base-url, else `transformers serve` on the model is started); "
                        "demonstrations: worked examples from the pool (needs --pool-size)")
    p.add_argument("--editor-backend", choices=("openai", "local"), default="openai",
                   help="with --editor textgrad: 'openai' calls an OpenAI-compatible endpoint "
                        "(--editor-base-url, else `transformers serve` on the model); 'local' runs "
                        "the editor model in-process (--editor-model, default the trained model's "
                        "folder) and starts each update reply with TextGrad's opening tag")
    p.add_argument("--editor-base-url", default=None)
    p.add_argument("--editor-model", default=None)
    p.add_argument("--max-symbolic-rounds", type=int, default=2, help="editor budget per arm")
    p.add_argument("--probe-size", type=int, default=16)
    p.add_argument("--held-out-size", type=int, default=None,
                   help="held-out rows (default: every fact for synthetic, 64 for JSONL)")
    p.add_argument("--train-size", type=int, default=None, help="training rows for JSONL tasks (default 256)")
    p.add_argument("--entities", type=int, default=12, help="fictional countries (synthetic task)")
    p.add_argument("--train-paraphrases", type=int, default=2, help="question templates in training (synthetic)")
    p.add_argument("--gsm8k-path", default=None, help="GSM8K JSONL for --task gsm8k")
    p.add_argument("--max-new-tokens", type=int, default=40, help="generation length for probe and held-out")
    p.add_argument("--config", default=None, help="YAML with NSLoRA settings (override the defaults here)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="one NSLoRA config value, e.g. --set nll_threshold=3 (repeatable)")
    p.add_argument("--json", default=None, help="where to write the results (default: <output-dir>/compare.json)")
    p.add_argument("--no-baseline", action="store_true", help="skip the held-out score of the untouched model")
    p.add_argument("--seed", type=int, default=0,
                   help="the task seed without --task-seeds and the training seed without --seeds")
    p.add_argument("--seeds", default=None,
                   help="comma-separated training seeds, e.g. 0,1,2: every arm runs once per seed "
                        "on each task instance (LoRA init, batch order, probe order)")
    p.add_argument("--task-seeds", default=None,
                   help="comma-separated task seeds, e.g. 0,1,2: one task instance per seed (the "
                        "synthetic generator's facts and splits, or a JSONL file's split); "
                        "default: --seed")
    p.add_argument("--intervention-steps", type=int, default=None,
                   help="router vs interventions: at each check of the neurosymbolic arms, branch "
                        "from the same state (candidate prompt alone; this many LoRA steps; both) "
                        "to see which update fixes each failure (default: check_every; 0: off)")
    p.add_argument("--pool-size", type=int, default=0,
                   help="labelled rows outside training that prompts-as-data and the LoRA "
                        "baselines may train on; the probe then is never trained on (default 0)")
    p.add_argument("--bootstrap", type=int, default=2000,
                   help="resamples of the hierarchical bootstrap behind every interval")
    p.add_argument("--router-start", choices=("prior", "flipped"), default="prior",
                   help="flipped: the NSLoRA arms' router starts from the prior weights with every "
                        "sign flipped (use with --set router=learned to see whether it recovers)")
    p.add_argument("--context-share", type=float, default=0.0,
                   help="synthetic task: share of facts stated in their questions (only the format "
                        "is left to learn for those; the knob of `nslora sweep`)")
    p.add_argument("--hide-format-rule", action="store_true",
                   help="no editor receives any text about the format, neither the instruction "
                        "nor the reward's regex: only the failing examples and references (the "
                        "constraint editor is unavailable; the lora_instruction arms, a user's "
                        "manual fix, still write the task's instruction by hand)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="train nothing: merge compare results files of the same experiment that "
                        "ran different arms (same model, task seeds, seeds and settings) into one, "
                        "with every interval and the verdict recomputed; written to --json")
    add_drift_arguments(p)
    return p


# ------------------------------------------------------------------ plugins used by the arms
class GroundTruthRecorder:
    """Decision listener: at each routing decision, the task's ground-truth kind of every failing
    probe example, from the very completions the router just saw."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.rows: list[dict[str, Any]] = []

    @hookimpl
    def nslora_on_decision(self, record: Any, run: RunView) -> None:
        if record.kind != "route" or not run.reports:
            return
        report: ProbeReport = run.reports[-1]
        for r in report.failures:
            example = run.examples[r.example_id]
            self.rows.append({"step": record.step, "example_id": r.example_id,
                              "kind": self.task.failure_kind(example.answer, r.completion),
                              "rewards": r.rewards, "ref_nll": round(r.ref_nll, 4),
                              "completion": r.completion})


class NumericalOnlyRoute:
    """The numerical-only arm's router: keep training LoRA at every check (the classifier still
    labels each failure, and its labels are logged, which `editor: "none"` would not give)."""

    @hookimpl(tryfirst=True)
    def nslora_route(self, signal: Any, report: ProbeReport, labels: Sequence[Any],
                     config: NSLoRAConfig) -> RouteDecision:
        return RouteDecision(step=signal.step, action="numerical",
                             reason="numerical-only arm: LoRA updates only",
                             scores={"failures": float(len(labels))}, labels=list(labels),
                             signal=signal, probe=report.summary())


class SymbolicOnlyRoute:
    """The symbolic-only arm's router: a symbolic round at every check while something fails and
    the editor budget lasts (the classifier still labels each failure; its labels are logged)."""

    @hookimpl(tryfirst=True)
    def nslora_route(self, signal: Any, report: ProbeReport, labels: Sequence[Any],
                     config: NSLoRAConfig, run: RunView) -> RouteDecision:
        rounds = run.decision_counts["symbolic"]  # one symbolic round per symbolic decision
        scores = {"failures": float(len(labels)), "symbolic_rounds": float(rounds)}

        def decide(action: str, reason: str) -> RouteDecision:
            return RouteDecision(step=signal.step, action=action, reason=reason,  # type: ignore[arg-type]
                                 scores=scores, labels=list(labels), signal=signal,
                                 probe=report.summary())

        if not labels:
            return decide("numerical", "symbolic-only arm: nothing fails; no update")
        if rounds >= config.max_symbolic_rounds:
            return decide("numerical", "symbolic-only arm: editor budget spent; no update "
                          "(weights are frozen in this arm)")
        editor = run.editor
        if not editor.available:
            return decide("numerical", f"symbolic-only arm: no editor ({editor.reason})")
        return decide("symbolic", "symbolic-only arm: a symbolic round at every check")


class FixedScheduleRoute:
    """The fixed arm's router: a symbolic round on the baseline probe (step 0, before any weight
    update), LoRA at every later check — prompt first, then weights, whatever the failures say."""

    @hookimpl(tryfirst=True)
    def nslora_route(self, signal: Any, report: ProbeReport, labels: Sequence[Any],
                     config: NSLoRAConfig, run: RunView) -> RouteDecision:
        first = (signal.step == 0 and bool(labels) and run.editor.available
                 and config.max_symbolic_rounds > 0)
        return RouteDecision(step=signal.step, action="symbolic" if first else "numerical",
                             reason="fixed schedule: " + ("prompt first" if first else "then LoRA"),
                             scores={"failures": float(len(labels))}, labels=list(labels),
                             signal=signal, probe=report.summary())


# ------------------------------------------------------------------ scoring
def held_out_metrics(report: ProbeReport, task: Task, examples: dict[str, Any]) -> dict[str, Any]:
    from nslora_plugin.apps.harness.tasks import fact_present

    n = len(report.results)
    passed = sum(r.passed for r in report.results)
    facts = sum(fact_present(examples[r.example_id].answer or "", r.completion, task.fact_match)
                for r in report.results)
    kinds = {"numerical": 0, "symbolic": 0}
    for r in report.failures:
        kind = task.failure_kind(examples[r.example_id].answer, r.completion)
        if kind:
            kinds[kind] += 1
    out = {"n": n, "accuracy": round(passed / n, 4) if n else 0.0,
            "fact_accuracy": round(facts / n, 4) if n else 0.0,
            "format_compliance": round(report.mean("format"), 4),
            "correctness_reward": round(report.mean("correctness"), 4),
            "reward": round(report.mean_reward, 4), "ref_nll": round(report.mean_nll, 4),
            "failure_kinds": kinds}
    out.update(probe_overlap(report, task, examples))
    return out


def probe_overlap(report: ProbeReport, task: Task, examples: dict[str, Any]) -> dict[str, Any]:
    """Held-out accuracy split by whether the fact is also asked in the probe set. The synthetic
    task's held-out facts are disjoint from the probe's (`n_probe_facts` is 0: the record that
    they are); a task that shares facts would show how much of a gain comes from the probe's
    references. Empty for tasks without shared facts (JSONL tasks are disjoint)."""
    def key(row: dict[str, Any]) -> Any:
        return (row["entity"], row["attribute"]) if "entity" in row and "attribute" in row else None

    probe_facts = {key(r) for r in task.probe} - {None}
    if not probe_facts:
        return {}
    in_probe = {r["id"] for r in task.held_out if key(r) in probe_facts}
    split: dict[str, Any] = {}
    for name, pick in (("probe_facts", True), ("other_facts", False)):
        from nslora_plugin.apps.harness.tasks import fact_present

        rows = [r for r in report.results if (r.example_id in in_probe) == pick]
        facts = sum(fact_present(examples[r.example_id].answer or "", r.completion, task.fact_match)
                    for r in rows)
        split[f"n_{name}"] = len(rows)
        split[f"accuracy_{name}"] = round(sum(r.passed for r in rows) / len(rows), 4) if rows else None
        split[f"fact_accuracy_{name}"] = round(facts / len(rows), 4) if rows else None
    return split


def label_rule_agreement(decisions: Sequence[dict[str, Any]], truth: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per failing probe example at each check: the classifier's label against the task's rule
    (`tasks.failure_kind`) — `label_rule_agreement` — and the check's action against it
    (`action_rule_agreement`). The rule reads the same two things as the router's features (is
    the format broken, is the answer in the reply), so this is agreement by construction, not
    accuracy; the router's accuracy comes from interventions (`interventions.py`)."""
    known = {(t["step"], t["example_id"]): t["kind"] for t in truth if t.get("kind")}
    confusion: dict[str, dict[str, int]] = {k: {"numerical": 0, "symbolic": 0} for k in ("numerical", "symbolic")}
    n = label_ok = action_ok = 0
    per_check = []
    for d in decisions:
        if d.get("kind") != "route":
            continue
        c_n = c_ok = 0
        truth_counts = {"numerical": 0, "symbolic": 0}
        for lab in d.get("labels", []):
            kind = known.get((d["step"], lab["example_id"]))
            if kind is None:
                continue
            n += 1
            c_n += 1
            truth_counts[kind] += 1
            confusion[kind][lab["label"]] += 1
            label_ok += lab["label"] == kind
            c_ok += lab["label"] == kind
            action_ok += ACTION_KIND.get(d["action"]) == kind
        per_check.append({"step": d["step"], "action": d["action"], "failures": c_n,
                          "rule": truth_counts,
                          "label_rule_agreement": round(c_ok / c_n, 4) if c_n else None})
    return {"failures": n, "label_rule_agreement": round(label_ok / n, 4) if n else None,
            "action_rule_agreement": round(action_ok / n, 4) if n else None,
            "confusion_rule_by_label": confusion, "per_check": per_check}


def gate_counts(edits: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How each candidate left the gate, from the decision records (the verdict text of
    `core.loop.gate_verdict`): accepted on a reward gain, accepted on the tie-break (an exact tie
    broken by the reference NLL or by `gate_tie_break: accept`), accepted without a gain under a
    negative `acceptance_margin`, rejected."""
    out = {"accepted_on_gain": 0, "accepted_on_tie_break": 0, "accepted_without_gain": 0,
           "rejected": 0}
    for e in edits:
        if not e.get("accepted"):
            out["rejected"] += 1
            continue
        reason = str(e.get("reason", ""))
        before, after = e.get("reward_before"), e.get("reward_after")
        if ", tie" in reason:
            out["accepted_on_tie_break"] += 1
        elif before is not None and after is not None and after - before > 1e-9:
            out["accepted_on_gain"] += 1
        else:
            out["accepted_without_gain"] += 1
    return out


# ------------------------------------------------------------------ one comparison
def build_config(args: argparse.Namespace, task: Task, output_dir: Path) -> NSLoRAConfig:
    check_every = args.check_every or max(args.max_steps // 4, 1)
    settings: dict[str, Any] = dict(
        task.config_overrides(), check_every=check_every, monitor_window=max(check_every // 2, 2),
        probe_size=len(task.probe), probe_max_new_tokens=args.max_new_tokens, probe_batch_size=16,
        editor=args.editor, editor_base_url=args.editor_base_url, editor_model=args.editor_model,
        editor_backend=getattr(args, "editor_backend", "openai"),
        editor_batch_size=1, editor_max_tokens=200, editor_timeout=90.0,
        max_symbolic_rounds=args.max_symbolic_rounds, seed=args.seed,
        output_dir=str(output_dir / "nslora"))
    if args.config:
        import yaml

        data = yaml.safe_load(Path(args.config).read_text()) or {}
        if isinstance(data.get("nslora"), dict):
            data = data["nslora"]
        settings.update(data)
    hidden = getattr(args, "hide_format_rule", False)
    if hidden:  # "": the editors are told nothing about the format, not even the regex
        settings["format_instruction"] = ""
        settings["editor_fallback"] = "none"
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        settings[key.strip()] = value.strip()
    config = NSLoRAConfig.from_dict(settings)
    if hidden and (config.editor == "constraint" or config.editor_fallback == "constraint"
                   or config.format_instruction):
        raise SystemExit(HIDDEN_RULE_CONSTRAINT)
    return config


def intervention_steps(args: argparse.Namespace, config: NSLoRAConfig) -> int:
    steps = getattr(args, "intervention_steps", None)
    return config.check_every if steps is None else max(int(steps), 0)


def _instance_dir(output_dir: Path, task_seed: int, seed: int, task_seeds: Sequence[int],
                  seeds: Sequence[int]) -> Path:
    out = output_dir
    if len(task_seeds) > 1:
        out = out / f"task-{task_seed}"
    if len(seeds) > 1:
        out = out / f"seed-{seed}"
    return out


def _load(args: argparse.Namespace, task_seed: int) -> Task:
    if args.task == "drift":
        return load_drift_task(args, task_seed)
    return load_task(args.task, seed=task_seed, probe_size=args.probe_size,
                     held_out_size=args.held_out_size, n_train=args.train_size,
                     n_entities=args.entities, train_paraphrases=args.train_paraphrases,
                     gsm8k_path=args.gsm8k_path, pool_size=args.pool_size,
                     context_share=getattr(args, "context_share", 0.0))


def _task_summary(task: Task) -> dict[str, Any]:
    return {"name": task.name, "train": len(task.train), "probe": len(task.probe),
            "pool": len(task.pool), "held_out": len(task.held_out), **task.meta}


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "merge", None):
        raise SystemExit("run_compare trains the arms; --merge trains nothing and is merge.run_merge")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs and CI: room for the whole table, unwrapped
    t_start = time.time()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # unwind like Ctrl-C (stops a server)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise SystemExit(f"--arms: unknown {bad}; choose from {', '.join(ARMS)}")
    check_drift_arms(arms, args)
    if args.pool_size <= 0 and any(a in UPSAMPLED_ARMS for a in arms):
        raise SystemExit(f"--arms {','.join(a for a in arms if a in UPSAMPLED_ARMS)}: an upsampled "
                         "pool needs a pool (--pool-size N)")
    seeds = _seeds(args)
    task_seeds = _seeds(args, "task_seeds")
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoTokenizer

    from nslora_plugin.apps.student.choose import choose_student

    console.rule("[bold]nslora compare")
    tasks = {ts: _load(args, ts) for ts in task_seeds}
    task = tasks[task_seeds[0]]
    build_config(args, task, output_dir)  # a bad setting (a hidden rule and the constraint editor) stops here
    model_path, student = choose_student(args, log=lambda m: console.print(m, markup=False), console=console)
    console.print(f"model: {model_path} ({student} student)")
    for ts, t in tasks.items():
        console.print(f"task (seed {ts}): {t.describe()}")
    if not torch.cuda.is_available():
        torch.set_num_threads(max(os.cpu_count() or 1, 1))
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))

    from nslora_plugin.apps.harness.endpoint import editor_endpoint

    local_editor = getattr(args, "editor_backend", "openai") == "local"
    if local_editor and not args.editor_model:
        args.editor_model = str(model_path)
    server_args = argparse.Namespace(no_editor_llm=args.editor != "textgrad" or local_editor,
                                     editor_base_url=args.editor_base_url, editor_model=args.editor_model)
    result: dict[str, Any] = {}
    with editor_endpoint(server_args, model_path, output_dir, console) as (base_url, editor_model):
        args.editor_base_url, args.editor_model = base_url, editor_model
        config = build_config(args, task, output_dir)
        console.print(f"budgets: {args.max_steps} steps (check every {config.check_every}), "
                      f"{config.max_symbolic_rounds} symbolic rounds, editor {config.editor}")
        result = {"task": {**_task_summary(task), "task_seeds": task_seeds},
                  "splits": task.splits(),
                  "task_instances": {str(ts): {"task": _task_summary(t), "splits": t.splits()}
                                     for ts, t in tasks.items()},
                  "model": str(model_path), "student": student, "machine": machine(), "command": _command(),
                  "settings": {"max_steps": args.max_steps, "check_every": config.check_every,
                               "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                               "lora_r": args.lora_r, "max_new_tokens": args.max_new_tokens,
                               "editor": config.editor, "max_symbolic_rounds": config.max_symbolic_rounds,
                               "seed": args.seed, "seeds": seeds, "task_seeds": task_seeds,
                               "router_start": args.router_start,
                               "augment_share": config.augment_share,
                               "intervention_steps": intervention_steps(args, config),
                               "bootstrap_resamples": args.bootstrap,
                               "format_rule": "hidden" if getattr(args, "hide_format_rule", False)
                               else "given",
                               "nslora_config": config.to_dict()},
                  "arms": {}}
        if getattr(args, "hide_format_rule", False):
            result["settings"]["constraint_editor"] = "unavailable: the format rule is hidden"
        bases: dict[str, Any] = {}
        runs: dict[str, dict[str, dict[str, Any]]] = {}
        for ts in task_seeds:
            task = tasks[ts]
            task_config = build_config(args, task, output_dir)
            check_no_answer_in_prompt(task.held_out, task_config.system_prompt,
                                      f"the initial system prompt, task seed {ts}",
                                      fact_match=task.fact_match)
            if not args.no_baseline:
                t0 = time.time()
                model = _load_model(model_path)
                console.print(f"held-out score of the untouched model (task seed {ts})…")
                held = _examples(task.held_out)
                report = _evaluate(tokenizer, held, task_config, model, task_config.system_prompt,
                                   plugins=task.scoring_plugins())
                bases[str(ts)] = {**held_out_metrics(report, task, held),
                                  "eval_seconds": round(time.time() - t0, 1)}
                del model
                result["base"] = _mean_base(bases)
            for seed in seeds:
                run_dir = _instance_dir(output_dir, ts, seed, task_seeds, seeds)
                seed_config = task_config if seed == task_config.seed else task_config.replace(seed=seed)
                seed_args = argparse.Namespace(**{**vars(args), "seed": seed})
                instance = runs.setdefault(str(ts), {}).setdefault(str(seed), {})
                for arm in arms:
                    label = " · ".join(x for x in (f"task seed {ts}" if len(task_seeds) > 1 else "",
                                                   f"seed {seed}" if len(seeds) > 1 else "") if x)
                    console.rule(f"arm: {arm}" + (f" · {label}" if label else ""))
                    instance[arm] = run_arm(arm, seed_args, task, seed_config, tokenizer, model_path,
                                            run_dir / arm, console, where=label)
                    result["runs"] = runs
                    result["arms"] = _arms_of(runs)
                    _write(result, args, output_dir)
    attach_intervals(result, n_boot=args.bootstrap)
    result["verdict"] = verdict(result, n_boot=args.bootstrap)
    result["wall_seconds"] = round(time.time() - t_start, 1)
    path = _write(result, args, output_dir)
    print_table(console, result)
    report_drift(console, result, path)
    announce(console, result, path)
    return result


def announce(console: Any, result: dict[str, Any], path: Path) -> None:
    """Say where the results went and write their HTML page beside them."""
    console.print(f"results: {path}")
    try:
        from nslora_plugin.apps.report import compare_report

        console.print(f"report: {compare_report(result, path.with_suffix('.html'))}")
    except Exception as exc:  # the results JSON is written; a page that fails must not lose them
        console.print(f"report: not written ({type(exc).__name__}: {exc})")


def _mean_base(bases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The untouched model's held-out scores: one task instance's, or their mean over instances
    (each instance's under `per_task_seed`)."""
    import statistics

    if len(bases) == 1:
        return next(iter(bases.values()))
    out: dict[str, Any] = {k: round(statistics.fmean(b[k] for b in bases.values()), 4)
                           for k in ("accuracy", "fact_accuracy", "format_compliance", "reward")}
    out["n"] = sum(b["n"] for b in bases.values())
    out["per_task_seed"] = bases
    return out


def _arms_of(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """One run: its arms as they are; several: aggregated over task instances and seeds."""
    flat = [(ts, s, r) for ts, by_seed in runs.items() for s, r in by_seed.items()]
    if len(flat) == 1:
        return flat[0][2]
    return aggregate_runs(runs)


def _seeds(args: argparse.Namespace, name: str = "seeds") -> list[int]:
    text = getattr(args, name, None)
    flag = "--" + name.replace("_", "-")
    if not text:
        return [args.seed]
    try:
        seeds = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"{flag} {text!r}: expected distinct integers, e.g. 0,1,2")
    return seeds


def planned_mix(arm: str, task: Task, cfg: NSLoRAConfig) -> dict[str, Any]:
    """The share of pool rows in a training batch, from which step, and how they get there."""
    n_pool, n_train = len(task.pool), len(task.train)
    if arm == "symbolic":
        return {"pool_share": 0.0, "from_step": None, "how": "no training"}
    if arm == "numerical":
        return {"pool_share": 0.0, "from_step": None,
                "how": "training rows only (this arm never edits, so prompts as data never starts)"}
    if arm in UPSAMPLED_ARMS:
        return {"pool_share": cfg.augment_share, "from_step": 0,
                "how": "upsampled: pool rows replace augment_share of every batch from step 0"}
    if arm in PLAIN_LORA_ARMS:
        share = n_pool / (n_pool + n_train) if n_pool else 0.0
        return {"pool_share": round(share, 4), "from_step": 0,
                "how": "uniform: the pool rows are ordinary rows of the training set"}
    source = "pool rows" if n_pool else "failing probe rows (no pool: the gate is trained on)"
    return {"pool_share": cfg.augment_share, "from_step": None,
            "how": f"prompts as data: {source} replace augment_share of every batch from the "
                   "first accepted edit"}


def pool_upsampler(tokenizer: Any, cfg: NSLoRAConfig, pool: Sequence[dict[str, Any]],
                   prompt: str | None, max_length: int | None) -> Any:
    """A `TrainerCallback` for the upsampled plain-LoRA arms: at train begin the trainer's
    collator is wrapped in the prompts-as-data collator with the pool as its augmented rows from
    step 0, under `prompt` (the original one, or the hand-written instruction; training rows whose
    reply breaks the format keep the original prompt, as `prompt_swap: compliant` does), exactly
    as the NSLoRA arms mix the pool after an accepted edit. `.collator` is the wrapped collator."""
    from transformers import TrainerCallback

    from nslora_plugin.builtins.augment import pool_rows
    from nslora_plugin.core.collator import NSLoRACollator
    from nslora_plugin.core.prompt_state import PromptState
    from nslora_plugin.trainer.callback import wrap_collate_fn

    class PoolUpsampler(TrainerCallback):
        collator: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None,
                           **kwargs: Any) -> None:
            prompt_state = PromptState(cfg.system_prompt)
            prompt_state.current = prompt
            reply_ok = None
            if cfg.answer_format and cfg.prompt_swap == "compliant":
                fmt = cfg.answer_format

                def reply_ok(text: str) -> bool:
                    return format_compliant(text, fmt)

            def wrap(base: Any) -> Any:
                self.collator = NSLoRACollator(base, tokenizer, prompt_state,
                                               augment_share=cfg.augment_share, seed=cfg.seed,
                                               max_length=max_length, reply_ok=reply_ok)
                self.collator.add_augmented(pool_rows(_examples(pool), 1, cfg),
                                            cfg.augment_max_examples)
                return self.collator

            if train_dataloader is None:
                raise RuntimeError("an upsampled arm needs the trainer's train_dataloader at train begin")
            wrap_collate_fn(train_dataloader, wrap)

    return PoolUpsampler()


def measured_mix(stats: dict[str, Any] | None) -> dict[str, Any]:
    """The pool's share of the examples the collator actually built (batches collated ahead of
    training included)."""
    if not stats or not stats.get("examples"):
        return {}
    return {"pool_share_measured": round(stats.get("augmented", 0) / stats["examples"], 4),
            "examples_collated": stats["examples"]}


def run_arm(arm: str, args: argparse.Namespace, task: Task, config: NSLoRAConfig, tokenizer: Any,
            model_path: Path, arm_dir: Path, console: Any, where: str = "") -> dict[str, Any]:
    from nslora_plugin.core.data import load_probe_examples

    arm_dir.mkdir(parents=True, exist_ok=True)
    cfg = config.replace(output_dir=str(arm_dir / "nslora"))
    recorder = GroundTruthRecorder(task)
    plugins: list[Any] = [recorder]
    if getattr(args, "router_start", "prior") == "flipped":  # replaces the built-in router
        from nslora_plugin.builtins.router import PRIOR_WEIGHTS, LearnedRouter, PriorRouter

        flipped = {k: -v for k, v in PRIOR_WEIGHTS.items()}
        plugins.append(LearnedRouter(flipped) if cfg.router == "learned" else PriorRouter(flipped))
        cfg = cfg.replace(plugins=[*cfg.plugins, "no:nslora.router"])
    if arm == "numerical":
        plugins.insert(0, NumericalOnlyRoute())
    if arm == "fixed":
        plugins.insert(0, FixedScheduleRoute())
        cfg = cfg.replace(check_at_start=True)
    if arm == "neurosymbolic_questions":  # the paper's joint system + question edits (TextGrad)
        cfg = cfg.replace(edit_questions=True)
    if arm == "neurosymbolic_strict":  # an edit is kept on a reward gain only
        cfg = cfg.replace(gate_tie_break="reject")
    if arm == "neurosymbolic_labels":  # the router follows its labels only
        cfg = cfg.replace(unstated_constraint_round=False)
    drift = drift_arm(arm, task, cfg, args.max_steps)  # a drift task: schedule, editor, rewards
    if drift is not None and arm not in PLAIN_LORA_ARMS:
        cfg = drift.configure(cfg, plugins)
    study = None
    if arm.startswith("neurosymbolic") and intervention_steps(args, cfg) > 0:
        from nslora_plugin.apps.harness.interventions import InterventionStudy

        study = InterventionStudy(intervention_steps(args, cfg), seed=cfg.seed,
                                  manual_instruction=task.format_instruction,
                                  **(drift.study_options() if drift is not None else {}))
        plugins.append(study)
    pool = task.pool or None
    mix = planned_mix(arm, task, cfg)
    t0 = time.time()
    model = _load_model(model_path)
    summary: dict[str, Any] = {}
    if arm in PLAIN_LORA_ARMS:  # no NSLoRA at all: the rows and prompt a careful user would use
        rows, final_prompt = baseline_rows(arm, task, cfg)
        trainer = _trainer(args, task, cfg, tokenizer, model, arm_dir, rows=rows)
        if drift is not None:
            drift.watch(trainer, tokenizer, cfg, final_prompt)
        if arm in UPSAMPLED_ARMS:
            upsampler = pool_upsampler(tokenizer, cfg, task.pool, final_prompt, args.max_length)
            trainer.add_callback(upsampler)
        trainer.train()
        if arm in UPSAMPLED_ARMS:
            mix.update(measured_mix(upsampler.collator.stats if upsampler.collator else None))
        final_model, train_steps = trainer.model, trainer.state.global_step
    elif arm == "symbolic":
        from nslora_plugin.core.loop import NeurosymbolicLoop

        probe = load_probe_examples(task.probe, limit=cfg.probe_size, seed=cfg.seed)
        loop = NeurosymbolicLoop(cfg, tokenizer, probe, output_dir=cfg.output_dir,
                                 plugins=[SymbolicOnlyRoute(), recorder, *(drift.plugins if drift else ())],
                                 console=console,
                                 pool=load_probe_examples(task.pool) if pool else ())
        loop.start(model)
        for step in range(cfg.check_every, args.max_steps + 1, cfg.check_every):
            loop.check(step, model)
        summary = loop.finish(model, args.max_steps)
        final_model, final_prompt = model, loop.prompt
        train_steps = 0
    else:
        from nslora_plugin.trainer.callback import attach

        trainer = _trainer(args, task, cfg, tokenizer, model, arm_dir)
        callback = attach(trainer, cfg, probe=task.probe, plugins=plugins, console=console, pool=pool)
        if study is not None:
            study.bind(trainer, callback)
        trainer.train()
        loop = callback.loop
        summary = callback.summary
        final_model, final_prompt = trainer.model, loop.prompt
        train_steps = trainer.state.global_step
        mix.update(measured_mix(summary.get("batches")))
    wall = time.time() - t0
    (arm_dir / "ground_truth.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recorder.rows))

    check_no_answer_in_prompt(task.held_out, final_prompt,
                              f"arm {arm}" + (f", {where}" if where else "") + " — its final system prompt",
                              fact_match=task.fact_match)
    t1 = time.time()
    held = _examples(task.held_out)
    report = _evaluate(tokenizer, held, cfg, final_model, final_prompt, plugins=task.scoring_plugins())
    metrics = held_out_metrics(report, task, held)
    (arm_dir / "held_out.jsonl").write_text("".join(
        json.dumps({**r.to_dict(), "kind": task.failure_kind(held[r.example_id].answer, r.completion)},
                   ensure_ascii=False) + "\n" for r in report.results))
    decisions = read_jsonl_tolerant(Path(cfg.output_dir) / "decisions.jsonl") \
        if arm not in PLAIN_LORA_ARMS else []
    edits = [d for d in decisions if d.get("kind") == "edit"]
    if arm not in PLAIN_LORA_ARMS and mix.get("from_step", 0) is None and arm not in ("numerical", "symbolic"):
        mix["from_step"] = next((e["step"] for e in edits if e.get("accepted")), None)
        if mix["from_step"] is None:
            mix["pool_share"] = 0.0
            mix["how"] += " (no edit was accepted: the pool was never mixed in)"
    usage = summary.get("editor_usage") or {}
    out = {
        "held_out": metrics,
        "held_out_passed": {r.example_id: int(r.passed) for r in report.results},
        "probe_before": summary.get("probe_before"), "probe_after": summary.get("probe_after"),
        "train_steps": train_steps,
        "mix": mix,
        "decisions": summary.get("decisions", {}),
        "edits_proposed": len(edits), "edits_accepted": sum(bool(e.get("accepted")) for e in edits),
        "gate": gate_counts(edits),
        "editors": editor_counts(edits, summary.get("faults", {})),
        "editor_calls": int(usage.get("calls", 0)),
        "editor_tokens": int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0)),
        "augmented_examples": summary.get("augmented_examples", 0),
        "system_prompt": final_prompt,
        "router": label_rule_agreement(decisions, recorder.rows),
        "faults": summary.get("faults", {}),
        "wall_seconds": round(wall, 1), "held_out_eval_seconds": round(time.time() - t1, 1),
        "artifacts": str(Path(cfg.output_dir)) if arm not in PLAIN_LORA_ARMS else str(arm_dir),
    }
    if drift is not None:
        out.update(drift.results(decisions, report, held))
    if study is not None:
        out["interventions"] = study.summary()
        (arm_dir / "interventions.jsonl").write_text(
            "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in study.checks))
    console.print(f"{arm}: held-out accuracy {metrics['accuracy']:.3f}, fact accuracy "
                  f"{metrics['fact_accuracy']:.3f}, format {metrics['format_compliance']:.3f} "
                  f"({out['wall_seconds']} s)")
    return out


UNUSABLE_REPLY_FAULTS = ("EditorNoTags", "EditorEmptyReply", "EditorUnsafeCandidate",
                         "EditorOverlongCandidate", "message")


def editor_counts(edits: Sequence[dict[str, Any]], faults: dict[str, int]) -> dict[str, Any]:
    """Per editor: candidates that reached the gate, accepted ones and their mean reward change,
    and replies that gave no usable candidate (empty, no tags, template tokens, too long)."""
    out: dict[str, dict[str, Any]] = {}
    for e in edits:
        name = str(e.get("editor", "?")).split(":")[0]
        c = out.setdefault(name, {"proposed": 0, "accepted": 0, "unusable": 0, "reward_change": []})
        c["proposed"] += 1
        c["accepted"] += int(bool(e.get("accepted")))
        if e.get("reward_after") is not None:
            c["reward_change"].append(e["reward_after"] - e["reward_before"])
    for kind, n in faults.items():
        where, _, error = kind.partition(":")
        if where in ("textgrad", "demonstrations") and error in UNUSABLE_REPLY_FAULTS:
            out.setdefault(where, {"proposed": 0, "accepted": 0, "unusable": 0, "reward_change": []})
            out[where]["unusable"] += n
    for c in out.values():
        changes = c.pop("reward_change")
        c["mean_reward_change"] = round(sum(changes) / len(changes), 4) if changes else None
    return out


def baseline_rows(arm: str, task: Task, cfg: NSLoRAConfig) -> tuple[list[dict[str, Any]], str | None]:
    """Training rows and evaluation prompt of a plain-LoRA arm: the training rows and the pool
    (every labelled row the neurosymbolic arm may train on); `lora_instruction` writes the format
    instruction into the prompt of the rows whose replies follow it, `_all` into every row's; both
    then evaluate under that prompt. The upsampled arms get the training rows only: their pool
    comes through the collator (`PoolUpsampler`), under the evaluation prompt."""
    upsampled = arm in UPSAMPLED_ARMS
    rows = [dict(r) for r in (task.train if upsampled else [*task.train, *task.pool])]
    if arm == "lora_instruction_final":  # drift tasks: the manual fix for the final spec
        return final_instruction_rows(task, rows)  # type: ignore[arg-type]
    if arm in ("lora", "lora_upsampled"):
        return rows, cfg.system_prompt
    instruction = cfg.format_instruction or task.format_instruction  # hidden from the editors only
    instructed = "\n".join(p for p in (cfg.system_prompt, instruction) if p)
    for row in rows:
        if arm == "lora_instruction_all" or format_compliant(row["answer"], cfg.answer_format or ""):
            row["system_prompt"] = instructed
    return rows, instructed


def _trainer(args: argparse.Namespace, task: Task, cfg: NSLoRAConfig, tokenizer: Any, model: Any,
             arm_dir: Path, rows: Sequence[dict[str, Any]] | None = None) -> Any:
    from nslora_plugin.apps.harness.sft import build_sft_trainer, sft_config

    sft_args = sft_config(arm_dir, max_steps=args.max_steps, batch_size=args.batch_size,
                          learning_rate=args.learning_rate, seed=args.seed, max_length=args.max_length,
                          disable_tqdm=True)
    # a task with a data schedule (drift) lays its rows out per step, read in order
    rows, in_order = task.training_rows(task.train if rows is None else rows, max_steps=args.max_steps,
                                        batch_size=args.batch_size, seed=args.seed)
    # quiet: the loop's own lines say what happens
    return build_sft_trainer(model, tokenizer, rows, cfg.system_prompt, sft_args,
                             lora_r=args.lora_r, quiet=True, in_order=in_order)


def _load_model(model_path: Path) -> Any:
    from nslora_plugin.apps.harness.sft import load_fp32_model

    return load_fp32_model(model_path)


def _examples(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    from nslora_plugin.core.data import load_probe_examples

    return {e.id: e for e in load_probe_examples(list(rows))}


def _evaluate(tokenizer: Any, examples: dict[str, Any], config: NSLoRAConfig, model: Any,
              prompt: str | None, plugins: Sequence[Any] = ()) -> ProbeReport:
    from nslora_plugin.core.registry import make_plugin_manager
    from nslora_plugin.core.probe import ProbeEvaluator

    evaluator = ProbeEvaluator(tokenizer, list(examples.values()), config,
                               make_plugin_manager(config, plugins))
    return evaluator.evaluate(model, prompt, step=-1, version=-1)


# ------------------------------------------------------------------ aggregation
def _flat_runs(runs: dict[str, dict[str, dict[str, Any]]]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(ts, s, r) for ts, by_seed in runs.items() for s, r in by_seed.items()]


def aggregate_runs(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per arm over every (task seed, training seed) run: means (and sd, per-run values) of the
    table's measures, sums of counts."""
    import statistics

    flat = _flat_runs(runs)
    arms: dict[str, Any] = {}
    for arm in flat[0][2]:
        mine = [(ts, s, r[arm]) for ts, s, r in flat if arm in r]
        done = [r for _, _, r in mine]
        held: dict[str, Any] = {}
        for key in ("accuracy", "fact_accuracy", "format_compliance", "reward"):
            values = [r["held_out"][key] for r in done]
            held[key] = round(statistics.fmean(values), 4)
            held[f"{key}_sd"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
            held[f"{key}_per_seed"] = values
        held["accuracy_per_run"] = [{"task_seed": int(ts), "seed": int(s),
                                     "accuracy": r["held_out"]["accuracy"]} for ts, s, r in mine]
        held["n"] = done[0]["held_out"]["n"]
        probes = [(r.get("probe_after") or {}).get("reward") for r in done]
        agreements = [r["router"]["label_rule_agreement"] for r in done
                      if r["router"]["label_rule_agreement"] is not None]
        measured = [r["mix"].get("pool_share_measured") for r in done
                    if r.get("mix", {}).get("pool_share_measured") is not None]
        # runs differ in whether an edit was accepted: describe the mix of one that mixed the pool in
        mixed = [r for r in done if (r.get("mix") or {}).get("pool_share")]
        mix = dict((mixed[0] if mixed else done[0]).get("mix") or {})
        if mixed and len(mixed) < len(done):
            mix["how"] = mix.get("how", "") + (f" ({len(done) - len(mixed)} of {len(done)} runs "
                                               "accepted no edit: the pool was never mixed in there)")
        mix["runs_with_pool"] = len(mixed)
        mix.pop("pool_share_measured", None)
        mix.pop("examples_collated", None)
        steps = [r.get("mix", {}).get("from_step") for r in done]
        mix["from_step_per_run"] = steps
        if measured:
            mix["pool_share_measured"] = round(statistics.fmean(measured), 4)
        arms[arm] = {
            "held_out": held,
            "probe_after": {"reward": round(statistics.fmean(probes), 4)} if None not in probes else None,
            "mix": mix,
            "edits_proposed": sum(r["edits_proposed"] for r in done),
            "edits_accepted": sum(r["edits_accepted"] for r in done),
            "gate": _sum_counts(r.get("gate") or {} for r in done),
            "editors": _sum_editors(r.get("editors", {}) for r in done),
            "editor_calls": sum(r["editor_calls"] for r in done),
            "editor_tokens": sum(r["editor_tokens"] for r in done),
            **({"editor_rounds_per_run": [r["editor_rounds"] for r in done]}  # drift tasks
               if "editor_rounds" in done[0] else {}),
            "router": {"label_rule_agreement": round(statistics.fmean(agreements), 4) if agreements else None,
                       "failures": sum(r["router"]["failures"] for r in done),
                       "confusion_rule_by_label": _sum_confusions(r["router"] for r in done)},
            "wall_seconds": round(sum(r["wall_seconds"] for r in done), 1),
            "runs": len(done), "seeds": len({s for _, s, _ in mine}),
            "task_seeds": len({ts for ts, _, _ in mine}),
        }
        studies = [r["interventions"] for r in done if r.get("interventions")]
        if studies:
            arms[arm]["interventions"] = _sum_interventions(studies)
    return arms


def _sum_counts(parts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for k, n in part.items():
            total[k] = total.get(k, 0) + n
    return total


def _sum_editors(per_run: Any) -> dict[str, dict[str, int]]:
    total: dict[str, dict[str, int]] = {}
    for editors in per_run:
        for name, c in editors.items():
            t = total.setdefault(name, {"proposed": 0, "accepted": 0, "unusable": 0})
            for key in t:
                t[key] += c[key]
    return total


def _sum_confusions(routers: Any, key: str = "confusion_rule_by_label") -> dict[str, dict[str, int]]:
    total: dict[str, dict[str, int]] = {}
    for r in routers:
        for truth, by_label in (r.get(key) or {}).items():
            row = total.setdefault(truth, {})
            for label, n in by_label.items():
                row[label] = row.get(label, 0) + n
    return total


def _sum_interventions(studies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    decisive = sum(s["single_update_failures"] for s in studies)
    right = sum(s["label_right"] for s in studies)
    return {"k_steps": studies[0]["k_steps"], "checks": sum(s["checks"] for s in studies),
            "failures": sum(s["failures"] for s in studies), "single_update_failures": decisive,
            "failures_without_a_prompt_candidate": sum(s.get("failures_without_a_prompt_candidate", 0)
                                                       for s in studies),
            "seconds": round(sum(s.get("seconds", 0.0) for s in studies), 1),
            "label_right": right,
            "label_accuracy_vs_interventions": round(right / decisive, 4) if decisive else None,
            "confusion_truth_by_label": _sum_confusions(studies, "confusion_truth_by_label"),
            "confusion_truth_by_action": _sum_confusions(studies, "confusion_truth_by_action"),
            "truth_counts": _sum_counts(s["truth_counts"] for s in studies),
            "candidate_sources": sorted({x for s in studies for x in s.get("candidate_sources", [])})}


# ------------------------------------------------------------------ intervals and verdict
def run_values(result: dict[str, Any]) -> dict[str, dict[str, dict[str, dict[str, int]]]]:
    """Per arm, `{task_seed: {seed: {held-out row: 1/0}}}` for the bootstrap. Reads this
    version's `runs`, the older `per_seed` (one task instance) and one-run results."""
    out: dict[str, dict[str, dict[str, dict[str, int]]]] = {}
    if result.get("runs"):
        nested = result["runs"]
    elif result.get("per_seed"):
        nested = {str(result.get("settings", {}).get("seed", 0)): result["per_seed"]}
    else:
        nested = {"0": {"0": result.get("arms", {})}}
    for ts, by_seed in nested.items():
        for s, arms in by_seed.items():
            for arm, r in arms.items():
                if isinstance(r, dict) and "held_out_passed" in r:
                    out.setdefault(arm, {}).setdefault(ts, {})[s] = r["held_out_passed"]
    return out


def arm_interval(result: dict[str, Any], arm: str, n_boot: int = 2000) -> Interval:
    """Mean held-out accuracy of `arm` and its hierarchical bootstrap interval."""
    return hierarchical_bootstrap(run_values(result)[arm], None, n_boot)


def margin_interval(result: dict[str, Any], a: str, b: str, n_boot: int = 2000) -> Interval:
    """Held-out accuracy of `a` minus `b`, paired: the same resampled instances, seeds, items."""
    values = run_values(result)
    return hierarchical_bootstrap(values[a], values[b], n_boot)


def call(interval: Interval, a: str, b: str) -> str:
    """"tie" when the interval of a - b contains 0, else who is ahead."""
    if interval.contains(0.0):
        return "tie"
    return f"{a} ahead" if interval.point > 0 else f"{b} ahead"


def _margin(result: dict[str, Any], a: str, b: str, n_boot: int) -> dict[str, Any]:
    iv = margin_interval(result, a, b, n_boot)
    return {"arms": [a, b], "points": round(100 * iv.point, 1),
            "interval95_points": [round(100 * iv.low, 1), round(100 * iv.high, 1)],
            "levels": iv.levels, "call": call(iv, a, b),
            "n": {"task_seeds": iv.task_seeds, "seeds": list(iv.seeds), "items": list(iv.items)}}


def attach_intervals(result: dict[str, Any], n_boot: int = 2000) -> None:
    """Every arm's held-out accuracy interval, under `held_out.accuracy_interval95`."""
    values = run_values(result)
    for arm, a in result.get("arms", {}).items():
        if arm in values:
            a["held_out"]["accuracy_interval95"] = hierarchical_bootstrap(values[arm], None, n_boot).to_dict()


def verdict(result: dict[str, Any], n_boot: int = 2000) -> dict[str, Any]:
    """Which arm has the highest held-out accuracy, and whether the data separate it from the
    runner-up; neurosymbolic's margin over every other arm with its paired interval (a tie when
    the interval contains 0); what tie-break acceptances are worth (neurosymbolic against
    neurosymbolic_strict). Measured numbers only: no targets."""
    arms = result.get("arms", {})
    values = run_values(result)
    out: dict[str, Any] = {}
    acc = {a: v["held_out"]["accuracy"] for a, v in arms.items()}
    if acc:
        top = max(acc.values())
        best_arms = [a for a in acc if abs(acc[a] - top) < 1e-9]
        out.update(winner=best_arms[0] if len(best_arms) == 1 else None, tied=best_arms
                   if len(best_arms) > 1 else [], winner_accuracy=top)
        ranked = sorted(acc, key=lambda a: -acc[a])
        if len(ranked) > 1 and ranked[0] in values and ranked[1] in values:
            out["top_vs_runner_up"] = _margin(result, ranked[0], ranked[1], n_boot)
    if "neurosymbolic" in arms and len(arms) > 1:
        others = {a: v for a, v in acc.items() if a != "neurosymbolic"}
        best = max(others, key=lambda a: others[a])
        out.update(best_other_arm=best,
                   margin_points=round(100 * (acc["neurosymbolic"] - others[best]), 1))
        if "neurosymbolic" in values and best in values:
            m = _margin(result, "neurosymbolic", best, n_boot)
            out.update(margin_interval95_points=m["interval95_points"], margin_levels=m["levels"],
                       margin_call=m["call"], bootstrap_resamples=n_boot, levels=m["n"])
            out["margins"] = {o: _margin(result, "neurosymbolic", o, n_boot)
                              for o in others if o in values}
        out["router_label_rule_agreement"] = arms["neurosymbolic"]["router"]["label_rule_agreement"]
        study = arms["neurosymbolic"].get("interventions")
        if study:
            out["router_vs_interventions"] = {k: study.get(k) for k in (
                "label_accuracy_vs_interventions", "single_update_failures", "failures", "k_steps")}
    if result.get("task", {}).get("name") == "drift":
        decision = schedule_decision(result, lambda x, y: _margin(result, x, y, n_boot))
        if decision is not None:
            out["drift_decision"] = decision
    if "neurosymbolic" in values and "neurosymbolic_strict" in values:
        out["tie_break_effect"] = {**_margin(result, "neurosymbolic", "neurosymbolic_strict", n_boot),
                                   "accepted_on_tie_break": (arms["neurosymbolic"].get("gate") or {})
                                   .get("accepted_on_tie_break")}
    # every arm with NSLoRA attached logs the classifier's labels at the same checks (only the
    # neurosymbolic arm acts on them); pooled, they cover failures the neurosymbolic arm never
    # meets (e.g. "symbolic" ones once the weights know the facts but no prompt asks for the format)
    pooled = {"agree": 0, "failures": 0, "symbolic": 0}
    for a in arms.values():
        r = a.get("router") or {}
        for rule, by_label in (r.get("confusion_rule_by_label") or {}).items():
            for label, n in by_label.items():
                pooled["failures"] += n
                pooled["agree"] += n if label == rule else 0
                pooled["symbolic"] += n if rule == "symbolic" else 0
    if pooled["failures"]:
        out.update(router_label_rule_agreement_all_arms=round(pooled["agree"] / pooled["failures"], 4),
                   router_failures_all_arms=pooled["failures"],
                   router_symbolic_failures_all_arms=pooled["symbolic"])
    return out


COLUMNS = ("arm", "held-out acc", "95 % interval", "fact acc", "format", "probe reward",
           "pool mix", "edits gain+tie/prop", "LLM calls/tokens", "label/rule agr.",
           "router vs interv.", "wall s")


def _shared_levels(result: dict[str, Any]) -> str | None:
    """The n of each level when every arm's interval has the same (they share the runs)."""
    texts = {(a["held_out"].get("accuracy_interval95") or {}).get("levels_text")
             for a in result.get("arms", {}).values()}
    return texts.pop() if len(texts) == 1 and None not in texts else None


def columns(result: dict[str, Any]) -> tuple[str, ...]:
    """`COLUMNS`, the interval's header naming the n of each level when the arms share them."""
    levels = _shared_levels(result)
    return tuple(f"95 % interval ({levels})" if c == "95 % interval" and levels else c for c in COLUMNS)


def _mix_cell(a: dict[str, Any]) -> str:
    mix = a.get("mix") or {}
    if not mix:
        return ""
    share = mix.get("pool_share", 0.0)
    if not share:
        return "none"
    steps = mix.get("from_step_per_run")
    start = mix.get("from_step") if steps is None else (
        steps[0] if len(set(map(str, steps))) == 1 else "/".join("–" if s is None else str(s) for s in steps))
    return f"{100 * share:.0f} % from step {'–' if start is None else start}"


def table_rows(result: dict[str, Any], base_label: str = "base") -> list[list[str]]:
    """One row per arm (and the untouched base model, when measured), as `COLUMNS`."""
    rows = []
    base = result.get("base")
    blank = [""] * (len(COLUMNS) - 5)
    shared = _shared_levels(result)
    if base:
        rows.append([base_label, f"{base['accuracy']:.3f}", "", f"{base['fact_accuracy']:.3f}",
                     f"{base['format_compliance']:.3f}", *blank])
    for arm, a in result["arms"].items():
        h = a["held_out"]
        probe = (a.get("probe_after") or {}).get("reward")
        agree = (a.get("router") or {}).get("label_rule_agreement",
                                             (a.get("router") or {}).get("label_accuracy"))
        iv = h.get("accuracy_interval95")
        interval = (f"[{iv['low']:.3f}, {iv['high']:.3f}]"
                    + ("" if shared else f" ({iv['levels_text']})")) if iv else ""
        study = a.get("interventions") or {}
        vs = study.get("label_accuracy_vs_interventions")
        gate = a.get("gate") or {}
        edits = (f"{gate.get('accepted_on_gain', 0)}+{gate.get('accepted_on_tie_break', 0)}"
                 f"/{a['edits_proposed']}" if gate else f"{a['edits_accepted']}/{a['edits_proposed']}")
        accuracy = f"{h['accuracy']:.3f}" + (f" ± {h['accuracy_sd']:.3f}" if "accuracy_sd" in h else "")
        rows.append([arm, accuracy, interval, f"{h['fact_accuracy']:.3f}",
                     f"{h['format_compliance']:.3f}", "" if probe is None else f"{probe:.3f}",
                     _mix_cell(a), edits, f"{a['editor_calls']}/{a['editor_tokens']}",
                     "" if agree is None else f"{agree:.3f}",
                     "" if vs is None else f"{vs:.3f} (n={study.get('single_update_failures')})",
                     f"{a['wall_seconds']:.1f}"])
    return rows


def print_table(console: Any, result: dict[str, Any]) -> None:
    t = result["task"]
    s = result["settings"]
    levels = _shared_levels(result)
    tables.print_table(console, f"nslora compare — {t['name']} ("
                       + (levels if levels else f"held-out n={t['held_out']}")
                       + f", {s['max_steps']} steps, editor {s['editor']})",
                       columns(result), table_rows(result))
    for line in tables.verdict_lines(result):
        console.print(line)
    v = result.get("verdict") or {}
    if v.get("router_label_rule_agreement_all_arms") is not None:
        console.print(f"router labels in all arms agree with the task's rule on "
                      f"{v['router_label_rule_agreement_all_arms']:.3f} of "
                      f"{v['router_failures_all_arms']} labelled failures "
                      f"({v['router_symbolic_failures_all_arms']} of them symbolic by the rule); "
                      "agreement, not accuracy: the rule reads the router's own features")
    for arm, a in result["arms"].items():
        if a.get("editors"):
            console.print(f"{arm} editors: " + "; ".join(
                f"{name} {c['accepted']}/{c['proposed']} accepted, {c['unusable']} unusable"
                for name, c in a["editors"].items()))
        for line in tables.intervention_lines(arm, a):
            console.print(line)
    console.print("pool mix: " + "; ".join(f"{arm} {(a.get('mix') or {}).get('how', '')}"
                                           for arm, a in result["arms"].items() if a.get("mix")))
    if "runs" in result and len(_flat_runs(result["runs"])) > 1:
        for arm, a in result["arms"].items():
            console.print(f"{arm}: held-out accuracy per run (task seed/seed) " + ", ".join(
                f"{r['task_seed']}/{r['seed']} {r['accuracy']:.3f}"
                for r in a["held_out"].get("accuracy_per_run", [])))


def markdown_table(result: dict[str, Any]) -> str:
    """The table of `print_table` as Markdown (for results files)."""
    return tables.markdown_table(columns(result), table_rows(result, base_label="base (untouched)"))


def machine() -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads()}
    from nslora_plugin.trainer.precision import cpu_model_name

    info["cpu"] = cpu_model_name()
    return info


def _command() -> str:
    return " ".join(["nslora", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("nslora", "cli.py") \
        else " ".join(sys.argv)


def _write(result: dict[str, Any], args: argparse.Namespace, output_dir: Path) -> Path:
    path = Path(args.json) if args.json else output_dir / "compare.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(portable_paths(json.dumps(result, indent=2, ensure_ascii=False, default=str)) + "\n")
    return path


def portable_paths(text: str) -> str:
    """Results files are meant to be committed and shared: the model cache, the working folder and
    the home folder are written as `<nslora-cache>`, `.` and `~` instead of this machine's paths."""
    from nslora_plugin.apps.tools.models import default_cache_dir

    for folder, name in ((default_cache_dir(), "<nslora-cache>"), (Path.cwd(), "."), (Path.home(), "~")):
        prefix = str(folder.resolve()) if folder.exists() else str(folder)
        if len(prefix) > 1:
            text = text.replace(prefix + "/", name + "/").replace(f'"{prefix}"', f'"{name}"')
    return text

