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
- **lora**: plain LoRA (no NSLoRA) for `--max-steps` on every labelled row the neurosymbolic arm
  may train on: the training rows plus the pool (`--pool-size`) under the original prompt;
- **lora_instruction**: the careful manual fix — the same rows, with the format instruction
  written by hand into the system prompt of the rows whose replies follow it (the pool's), and
  that prompt at evaluation; **lora_instruction_all** writes it into every row's prompt;
- **fixed**: a fixed schedule in the style of DSPy's BetterTogether — a symbolic round on the
  baseline probe before the first step, then LoRA for the whole budget, prompts as data on;
- **neurosymbolic_questions**: the paper's joint system + question edits — neurosymbolic with
  `edit_questions: true` (an ablation; only the TextGrad editor rewrites questions, so with
  `--editor constraint` it runs as neurosymbolic does).

`--hide-format-rule` gives the NSLoRA arms' editors no `format_instruction`: they see only the
reward's regex and the failing examples (the manual-fix arms still use the task's instruction).

With `--pool-size N` the labelled rows outside training are split in two: the probe is the
**gate split** (scored by the gate and the router, never trained on by any arm) and the **pool**
is what prompts-as-data and every LoRA baseline may train on; held-out rows are never seen. The
splits (sizes and ids) are in the results file. `--seeds 0,1,2` runs every arm once per seed
(the training seed: LoRA init, batch order, probe order; the task's rows stay those of
`--seed`), reports mean ± sd and per-seed values, and the margin of neurosymbolic over the best
other arm with a 95 % paired bootstrap interval over held-out rows and seeds.

Numerical and neurosymbolic share the step budget; symbolic and neurosymbolic share the editor
budget. Each arm starts from a fresh copy of the base model. After each arm the held-out rows are
scored under that arm's final prompt (greedy, same generation settings as the probe).

Measures (per arm): held-out accuracy — the reply is right under the task's rule (correct answer
in the required `Final:` line); fact accuracy — the right answer appears anywhere in the reply;
format compliance; the probe reward at the end; edits proposed / accepted; editor LLM calls and
tokens; wall time. Router accuracy (every arm that logs route decisions; the table shows the
neurosymbolic one): at each check, for every failing probe example, the classifier's label in
`decisions.jsonl` is compared with the task's ground truth (`tasks.failure_kind` on the same
completion, recorded by a decision listener at the moment of the check).
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
from nslora_plugin.apps.harness.tasks import Task, load_task

DEFAULT_ARMS = ("numerical", "symbolic", "neurosymbolic")
ARMS = (*DEFAULT_ARMS, "lora", "lora_instruction", "lora_instruction_all", "fixed",
        "neurosymbolic_questions")
PLAIN_LORA_ARMS = ("lora", "lora_instruction", "lora_instruction_all")
#: The update an action makes, in the labels' vocabulary (one vocabulary: numerical / symbolic).
ACTION_KIND = {"symbolic": "symbolic", "numerical": "numerical"}


# ------------------------------------------------------------------ CLI
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="nslora compare", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="synthetic",
                   help="'synthetic' (fictional facts + a Final: line), 'gsm8k', or a JSONL file "
                        "with question/answer rows (default: synthetic)")
    p.add_argument("--model", default=None,
                   help="local model folder or Hub id (default: embedded SmolLM2-135M-Instruct)")
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
    p.add_argument("--seed", type=int, default=0, help="task seed (and the training seed without --seeds)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated training seeds, e.g. 0,1,2: every arm runs once per seed")
    p.add_argument("--pool-size", type=int, default=0,
                   help="labelled rows outside training that prompts-as-data and the LoRA "
                        "baselines may train on; the probe then is never trained on (default 0)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the interval")
    p.add_argument("--router-start", choices=("prior", "flipped"), default="prior",
                   help="flipped: the NSLoRA arms' router starts from the prior weights with every "
                        "sign flipped (use with --set router=learned to see whether it recovers)")
    p.add_argument("--context-share", type=float, default=0.0,
                   help="synthetic task: share of facts stated in their questions (only the format "
                        "is left to learn for those; the knob of `nslora sweep`)")
    p.add_argument("--hide-format-rule", action="store_true",
                   help="the NSLoRA arms' editors get no format_instruction: only the reward's "
                        "regex and the failing examples (the lora_instruction arms, a user's "
                        "manual fix, still write the task's instruction by hand)")
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
                     run: RunView) -> RouteDecision:
        first = signal.step == 0 and bool(labels) and run.editor.available
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
    """Held-out accuracy split by whether the fact is also asked in the probe set. Prompts as data
    turns probe references into training rows (in the probe's paraphrase), so a fact in the probe
    is seen in one more wording by the arms that accept an edit; the split shows how much of a gain
    comes from that. Empty for tasks without shared facts (JSONL tasks are disjoint)."""
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


def router_accuracy(decisions: Sequence[dict[str, Any]], truth: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per failing probe example at each check: classifier label vs ground truth (`label_accuracy`,
    the headline), and the check's action vs ground truth (`action_accuracy`)."""
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
                          "truth": truth_counts, "label_accuracy": round(c_ok / c_n, 4) if c_n else None})
    return {"failures": n, "label_accuracy": round(label_ok / n, 4) if n else None,
            "action_accuracy": round(action_ok / n, 4) if n else None,
            "confusion_truth_by_label": confusion, "per_check": per_check}


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
    if getattr(args, "hide_format_rule", False):
        settings["format_instruction"] = None
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        settings[key.strip()] = value.strip()
    return NSLoRAConfig.from_dict(settings)


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # logs and CI: room for the whole table
    t_start = time.time()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # unwind like Ctrl-C (stops a server)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise SystemExit(f"--arms: unknown {bad}; choose from {', '.join(ARMS)}")
    seeds = _seeds(args)
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoTokenizer

    from nslora_plugin.apps.tools.models import ensure_default_model

    console.rule("[bold]nslora compare")
    model_path = Path(args.model) if args.model else ensure_default_model(
        log=lambda m: console.print(m, markup=False))
    task = load_task(args.task, seed=args.seed, probe_size=args.probe_size,
                     held_out_size=args.held_out_size, n_train=args.train_size,
                     n_entities=args.entities, train_paraphrases=args.train_paraphrases,
                     gsm8k_path=args.gsm8k_path, pool_size=args.pool_size,
                     context_share=getattr(args, "context_share", 0.0))
    console.print(f"model: {model_path}")
    console.print(f"task: {task.describe()}")
    if not torch.cuda.is_available():
        torch.set_num_threads(max(os.cpu_count() or 1, 1))
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))

    from nslora_plugin.apps.harness.demo import editor_endpoint

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
        held = _examples(task.held_out)
        result = {"task": {"name": task.name, "train": len(task.train), "probe": len(task.probe),
                           "pool": len(task.pool), "held_out": len(task.held_out), **task.meta},
                  "splits": task.splits(),
                  "model": str(model_path), "machine": machine(), "command": _command(),
                  "settings": {"max_steps": args.max_steps, "check_every": config.check_every,
                               "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                               "lora_r": args.lora_r, "max_new_tokens": args.max_new_tokens,
                               "editor": config.editor, "max_symbolic_rounds": config.max_symbolic_rounds,
                               "seed": args.seed, "router_start": args.router_start,
                               "format_rule": "hidden" if getattr(args, "hide_format_rule", False)
                               else "given",
                               "nslora_config": config.to_dict()},
                  "arms": {}}
        if not args.no_baseline:
            t0 = time.time()
            model = _load_model(model_path)
            console.print("held-out score of the untouched model…")
            report = _evaluate(tokenizer, held, config, model, config.system_prompt)
            result["base"] = {**held_out_metrics(report, task, held), "eval_seconds": round(time.time() - t0, 1)}
            del model
        per_seed: dict[str, dict[str, Any]] = {}
        for seed in seeds:
            seed_dir = output_dir if len(seeds) == 1 else output_dir / f"seed-{seed}"
            seed_config = config if seed == config.seed else config.replace(seed=seed)
            seed_args = argparse.Namespace(**{**vars(args), "seed": seed})
            runs = per_seed.setdefault(str(seed), {})
            for arm in arms:
                console.rule(f"arm: {arm}" + (f" · seed {seed}" if len(seeds) > 1 else ""))
                runs[arm] = run_arm(arm, seed_args, task, seed_config, tokenizer, model_path,
                                    seed_dir / arm, console)
                if len(seeds) == 1:
                    result["arms"] = runs
                else:
                    result["per_seed"] = per_seed
                    result["arms"] = aggregate_seeds(per_seed)
                _write(result, args, output_dir)
    if len(seeds) > 1:
        result["settings"]["seeds"] = seeds
    result["verdict"] = verdict(result, per_seed, n_boot=args.bootstrap)
    result["wall_seconds"] = round(time.time() - t_start, 1)
    path = _write(result, args, output_dir)
    print_table(console, result)
    console.print(f"results: {path}")
    try:
        from nslora_plugin.apps.report import compare_report

        console.print(f"report: {compare_report(result, path.with_suffix('.html'))}")
    except Exception as exc:  # the results JSON is written; a page that fails must not lose them
        console.print(f"report: not written ({type(exc).__name__}: {exc})")
    return result


def _seeds(args: argparse.Namespace) -> list[int]:
    if not args.seeds:
        return [args.seed]
    try:
        seeds = [int(x) for x in str(args.seeds).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {args.seeds!r}: expected distinct integers, e.g. 0,1,2")
    return seeds


def run_arm(arm: str, args: argparse.Namespace, task: Task, config: NSLoRAConfig, tokenizer: Any,
            model_path: Path, arm_dir: Path, console: Any) -> dict[str, Any]:
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
    pool = task.pool or None
    t0 = time.time()
    model = _load_model(model_path)
    summary: dict[str, Any] = {}
    if arm in PLAIN_LORA_ARMS:  # no NSLoRA at all: the rows and prompt a careful user would use
        rows, final_prompt = baseline_rows(arm, task, cfg)
        trainer = _trainer(args, task, cfg, tokenizer, model, arm_dir, rows=rows)
        trainer.train()
        final_model, train_steps = trainer.model, trainer.state.global_step
    elif arm == "symbolic":
        from nslora_plugin.core.loop import NeurosymbolicLoop

        probe = load_probe_examples(task.probe, limit=cfg.probe_size, seed=cfg.seed)
        loop = NeurosymbolicLoop(cfg, tokenizer, probe, output_dir=cfg.output_dir,
                                 plugins=[SymbolicOnlyRoute(), recorder], console=console,
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
        trainer.train()
        loop = callback.loop
        summary = callback.summary
        final_model, final_prompt = trainer.model, loop.prompt
        train_steps = trainer.state.global_step
    wall = time.time() - t0
    (arm_dir / "ground_truth.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recorder.rows))

    t1 = time.time()
    held = _examples(task.held_out)
    report = _evaluate(tokenizer, held, cfg, final_model, final_prompt)
    metrics = held_out_metrics(report, task, held)
    (arm_dir / "held_out.jsonl").write_text("".join(
        json.dumps({**r.to_dict(), "kind": task.failure_kind(held[r.example_id].answer, r.completion)},
                   ensure_ascii=False) + "\n" for r in report.results))
    decisions = read_jsonl_tolerant(Path(cfg.output_dir) / "decisions.jsonl") \
        if arm not in PLAIN_LORA_ARMS else []
    edits = [d for d in decisions if d.get("kind") == "edit"]
    usage = summary.get("editor_usage") or {}
    out = {
        "held_out": metrics,
        "held_out_passed": {r.example_id: int(r.passed) for r in report.results},
        "probe_before": summary.get("probe_before"), "probe_after": summary.get("probe_after"),
        "train_steps": train_steps,
        "decisions": summary.get("decisions", {}),
        "edits_proposed": len(edits), "edits_accepted": sum(bool(e.get("accepted")) for e in edits),
        "editors": editor_counts(edits, summary.get("faults", {})),
        "editor_calls": int(usage.get("calls", 0)),
        "editor_tokens": int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0)),
        "augmented_examples": summary.get("augmented_examples", 0),
        "system_prompt": final_prompt,
        "router": router_accuracy(decisions, recorder.rows),
        "faults": summary.get("faults", {}),
        "wall_seconds": round(wall, 1), "held_out_eval_seconds": round(time.time() - t1, 1),
        "artifacts": str(Path(cfg.output_dir)) if arm not in PLAIN_LORA_ARMS else str(arm_dir),
    }
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
    instruction into the prompt of the rows whose replies follow the format, `_all` into every
    row's; both then evaluate under that prompt."""
    rows = [dict(r) for r in [*task.train, *task.pool]]
    if arm == "lora":
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
    # quiet: the loop's own lines say what happens
    return build_sft_trainer(model, tokenizer, task.train if rows is None else rows,
                             cfg.system_prompt, sft_args,
                             lora_r=args.lora_r, quiet=True)


def _load_model(model_path: Path) -> Any:
    from nslora_plugin.apps.harness.sft import load_fp32_model

    return load_fp32_model(model_path)


def _examples(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    from nslora_plugin.core.data import load_probe_examples

    return {e.id: e for e in load_probe_examples(list(rows))}


def _evaluate(tokenizer: Any, examples: dict[str, Any], config: NSLoRAConfig, model: Any,
              prompt: str | None) -> ProbeReport:
    from nslora_plugin.core.registry import make_plugin_manager
    from nslora_plugin.core.probe import ProbeEvaluator

    evaluator = ProbeEvaluator(tokenizer, list(examples.values()), config, make_plugin_manager(config))
    return evaluator.evaluate(model, prompt, step=-1, version=-1)


# ------------------------------------------------------------------ verdict, table, files
def aggregate_seeds(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per arm over seeds: means (and sd, per-seed values) of the table's measures, sums of counts."""
    import statistics

    arms: dict[str, Any] = {}
    for arm in next(iter(per_seed.values())):
        runs = [per_seed[s][arm] for s in per_seed if arm in per_seed[s]]
        held: dict[str, Any] = {}
        for key in ("accuracy", "fact_accuracy", "format_compliance", "reward"):
            values = [r["held_out"][key] for r in runs]
            held[key] = round(statistics.fmean(values), 4)
            held[f"{key}_sd"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
            held[f"{key}_per_seed"] = values
        probes = [(r.get("probe_after") or {}).get("reward") for r in runs]
        labels = [r["router"]["label_accuracy"] for r in runs if r["router"]["label_accuracy"] is not None]
        arms[arm] = {
            "held_out": held,
            "probe_after": {"reward": round(statistics.fmean(probes), 4)} if None not in probes else None,
            "edits_proposed": sum(r["edits_proposed"] for r in runs),
            "edits_accepted": sum(r["edits_accepted"] for r in runs),
            "editors": _sum_editors(r.get("editors", {}) for r in runs),
            "editor_calls": sum(r["editor_calls"] for r in runs),
            "editor_tokens": sum(r["editor_tokens"] for r in runs),
            "router": {"label_accuracy": round(statistics.fmean(labels), 4) if labels else None,
                       "failures": sum(r["router"]["failures"] for r in runs),
                       "confusion_truth_by_label": _sum_confusions(r["router"] for r in runs)},
            "wall_seconds": round(sum(r["wall_seconds"] for r in runs), 1),
            "seeds": len(runs),
        }
    return arms


def _sum_editors(per_run: Any) -> dict[str, dict[str, int]]:
    total: dict[str, dict[str, int]] = {}
    for editors in per_run:
        for name, c in editors.items():
            t = total.setdefault(name, {"proposed": 0, "accepted": 0, "unusable": 0})
            for key in t:
                t[key] += c[key]
    return total


def _sum_confusions(routers: Any) -> dict[str, dict[str, int]]:
    total: dict[str, dict[str, int]] = {k: {"numerical": 0, "symbolic": 0} for k in ("numerical", "symbolic")}
    for r in routers:
        for truth, by_label in (r.get("confusion_truth_by_label") or {}).items():
            for label, n in by_label.items():
                total[truth][label] += n
    return total


def paired_bootstrap(a: Sequence[dict[str, int]], b: Sequence[dict[str, int]], n_boot: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean over seeds of accuracy(a) - accuracy(b), and its 95 % interval: held-out rows are
    resampled with replacement within each seed, the same rows for both arms (paired)."""
    import random

    rng = random.Random(seed)
    pairs = [[(x[i], y[i]) for i in sorted(x)] for x, y in zip(a, b)]

    def diff(rows_per_seed: list[list[tuple[int, int]]]) -> float:
        return sum(sum(p - q for p, q in rows) / len(rows) for rows in rows_per_seed) / len(rows_per_seed)

    point = diff(pairs)
    draws = sorted(diff([[rows[rng.randrange(len(rows))] for _ in rows] for rows in pairs])
                   for _ in range(n_boot))
    return point, draws[int(0.025 * n_boot)], draws[min(int(0.975 * n_boot), n_boot - 1)]


def verdict(result: dict[str, Any], per_seed: dict[str, dict[str, Any]] | None = None,
            n_boot: int = 2000) -> dict[str, Any]:
    """Which arm wins on held-out accuracy and by how much; neurosymbolic's margin over the best
    other arm with a paired bootstrap interval. Measured numbers only: no targets."""
    arms = result.get("arms", {})
    out: dict[str, Any] = {}
    acc = {a: v["held_out"]["accuracy"] for a, v in arms.items()}
    if acc:
        top = max(acc.values())
        best_arms = [a for a in acc if abs(acc[a] - top) < 1e-9]
        out.update(winner=best_arms[0] if len(best_arms) == 1 else None, tied=best_arms
                   if len(best_arms) > 1 else [], winner_accuracy=top)
    if "neurosymbolic" in arms and len(arms) > 1:
        others = {a: v for a, v in acc.items() if a != "neurosymbolic"}
        best = max(others, key=lambda a: others[a])
        out.update(best_other_arm=best,
                   margin_points=round(100 * (acc["neurosymbolic"] - others[best]), 1))
        runs = list((per_seed or {}).values()) or [arms]
        if all("held_out_passed" in r.get(a, {}) for r in runs for a in ("neurosymbolic", best)):
            _, lo, hi = paired_bootstrap([r["neurosymbolic"]["held_out_passed"] for r in runs],
                                         [r[best]["held_out_passed"] for r in runs], n_boot)
            out.update(margin_interval95_points=[round(100 * lo, 1), round(100 * hi, 1)],
                       bootstrap_resamples=n_boot, seeds=len(runs))
        out.update(router_accuracy=arms["neurosymbolic"]["router"]["label_accuracy"])
    # every arm with NSLoRA attached logs the classifier's labels at the same checks (only the
    # neurosymbolic arm acts on them); pooled, they cover failures the neurosymbolic arm never
    # meets (e.g. "style" ones once the weights know the facts but no prompt asks for the format)
    pooled = {"right": 0, "failures": 0, "style": 0}
    for a in arms.values():
        r = a.get("router") or {}
        for truth, by_label in (r.get("confusion_truth_by_label") or {}).items():
            for label, n in by_label.items():
                pooled["failures"] += n
                pooled["right"] += n if label == truth else 0
                pooled["style"] += n if truth == "symbolic" else 0
    if pooled["failures"]:
        out.update(router_accuracy_all_arms=round(pooled["right"] / pooled["failures"], 4),
                   router_failures_all_arms=pooled["failures"],
                   router_style_failures_all_arms=pooled["style"])
    return out


COLUMNS = ("arm", "held-out acc", "fact acc", "format", "probe reward", "edits acc/prop",
           "LLM calls", "LLM tokens", "router acc", "wall s")


def table_rows(result: dict[str, Any], base_label: str = "base") -> list[list[str]]:
    """One row per arm (and the untouched base model, when measured), as `COLUMNS`."""
    rows = []
    base = result.get("base")
    if base:
        rows.append([base_label, f"{base['accuracy']:.3f}", f"{base['fact_accuracy']:.3f}",
                     f"{base['format_compliance']:.3f}", "", "", "", "", "", ""])
    for arm, a in result["arms"].items():
        h = a["held_out"]
        probe = (a.get("probe_after") or {}).get("reward")
        racc = a["router"]["label_accuracy"]
        accuracy = f"{h['accuracy']:.3f}" + (f" ± {h['accuracy_sd']:.3f}" if "accuracy_sd" in h else "")
        rows.append([arm, accuracy, f"{h['fact_accuracy']:.3f}",
                     f"{h['format_compliance']:.3f}", "" if probe is None else f"{probe:.3f}",
                     f"{a['edits_accepted']}/{a['edits_proposed']}", str(a["editor_calls"]),
                     str(a["editor_tokens"]), "" if racc is None else f"{racc:.3f}",
                     f"{a['wall_seconds']:.1f}"])
    return rows


def print_table(console: Any, result: dict[str, Any]) -> None:
    t = result["task"]
    tables.print_table(console, f"nslora compare — {t['name']} (held-out n={t['held_out']}, "
                       f"{result['settings']['max_steps']} steps, editor {result['settings']['editor']})",
                       COLUMNS, table_rows(result))
    for line in tables.verdict_lines(result):
        console.print(line)
    v = result.get("verdict") or {}
    if v.get("router_accuracy_all_arms") is not None:
        console.print(f"router labels in all arms: {v['router_accuracy_all_arms']:.3f} right over "
                      f"{v['router_failures_all_arms']} labelled failures "
                      f"({v['router_style_failures_all_arms']} of them style by construction)")
    other = {arm: a["held_out"].get("accuracy_other_facts") for arm, a in result["arms"].items()}
    for arm, a in result["arms"].items():
        if a.get("editors"):
            console.print(f"{arm} editors: " + "; ".join(
                f"{name} {c['accepted']}/{c['proposed']} accepted, {c['unusable']} unusable"
                for name, c in a["editors"].items()))
    if "per_seed" in result:
        for arm, a in result["arms"].items():
            console.print(f"{arm}: held-out accuracy per seed "
                          + ", ".join(f"{x:.3f}" for x in a["held_out"]["accuracy_per_seed"]))
    if any(x is not None for x in other.values()):
        n_other = next(a["held_out"].get("n_other_facts") for a in result["arms"].values())
        console.print(f"held-out accuracy on the {n_other} facts outside the probe set (probe "
                      "references can become training rows): " + ", ".join(
                          f"{arm} {x:.3f}" for arm, x in other.items() if x is not None))


def markdown_table(result: dict[str, Any]) -> str:
    """The table of `print_table` as Markdown (for results files)."""
    return tables.markdown_table(COLUMNS, table_rows(result, base_label="base (untouched)"))


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

