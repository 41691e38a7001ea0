"""`nslora demo`: the whole neurosymbolic loop on an embedded default, on a laptop CPU, offline.

- model: SmolLM2-135M-Instruct, warmed up to follow a format its system prompt states (`nslora
  student`; `--student raw` for the model as it is), built once and cached;
- data (`--task facts`, the default): questions about fictional countries — facts only the weights
  can learn — whose training replies are one plain sentence, while a right reply must also end
  with a `Final: <answer>` line that no training reply shows: the case NSLoRA exists for (facts by
  LoRA, the format by the prompt). `--task word-problems` (replies ending `Answer: <n>`) or
  `--data` (a JSONL of `question`/`answer`, e.g. GSM8K) instead;
- three arms on the same rows, steps and seed: plain LoRA, the careful manual fix (the format
  instruction written by hand into the prompt of the rows whose replies follow it:
  `lora_instruction` of `nslora compare`) and NSLoRA, with paired intervals of NSLoRA's margins;
- editor LLM: `transformers serve` on a free loopback port, started here and stopped at the end,
  unless `--editor-base-url` points at one (any OpenAI-compatible endpoint);
- TRL `SFTTrainer` + LoRA, with NSLoRA attached by one call.
It prints progress, and ends with a before/after table and where the artifacts are.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from nslora_plugin.apps.harness.endpoint import editor_endpoint
from nslora_plugin.core.config import NSLoRAConfig

DEMO_SYSTEM_PROMPT = "You are a helpful assistant."
DEMO_ANSWER_FORMAT = r"^Answer: (-?\d+)\s*$"
DEMO_FORMAT_INSTRUCTION = "End your reply with a final line of the form 'Answer: <number>'."
DEMO_TASKS = ("facts", "word-problems")
#: the demo's two reference arms (names as in `nslora compare`) and their columns
REFERENCES = (("lora", "plain_lora", "plain LoRA"), ("lora_instruction", "manual_fix", "manual fix"))


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from nslora_plugin.apps.student.choose import add_student_argument

    p = parser or argparse.ArgumentParser(prog="nslora demo", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="nslora-demo", help="run folder (default: ./nslora-demo)")
    p.add_argument("--model", default=None, help="local model folder or Hub id (default: embedded SmolLM2-135M-Instruct)")
    add_student_argument(p)
    p.add_argument("--task", choices=DEMO_TASKS, default="facts",
                   help="facts: fictional facts + a Final: line no training reply shows (default); "
                        "word-problems: generated arithmetic whose replies end 'Answer: <n>'")
    p.add_argument("--data", default=None,
                   help="JSONL with question/answer rows (replaces --task; e.g. GSM8K)")
    p.add_argument("--entities", type=int, default=10, help="fictional countries (--task facts)")
    p.add_argument("--pool-size", type=int, default=8,
                   help="labelled rows outside training that prompts-as-data and the reference "
                        "arms train on (--task facts)")
    p.add_argument("--train-size", type=int, default=480, help="training rows (word problems, --data)")
    p.add_argument("--probe-size", type=int, default=8)
    p.add_argument("--eval-size", type=int, default=32, help="held-out examples for the before/after numbers")
    p.add_argument("--max-steps", type=int, default=20,
                   help="training steps of each arm (default 20: the format is the demo's point; "
                        "no arm learns the facts in 20 or 40 steps on a CPU)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--editor-base-url", default=None,
                   help="OpenAI-compatible endpoint for the editor (default: start `transformers serve` on the demo model)")
    p.add_argument("--editor-model", default=None)
    p.add_argument("--no-editor-llm", action="store_true", help="only the deterministic constraint editor")
    p.add_argument("--config", default=None, help="YAML with NSLoRA settings that override the demo's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-reference", action="store_true",
                   help="skip the two reference runs, plain LoRA and the manual fix (their columns)")
    return p


#: Reply budget of the editor the demo starts itself (the embedded 135M model): it writes no
#: TextGrad tags whatever its budget, and the constraint editor then stands in, so a long reply
#: only costs time. An endpoint the user names keeps `EDITOR_MAX_TOKENS`.
OWN_EDITOR_MAX_TOKENS = 96
EDITOR_MAX_TOKENS = 200


def demo_config(args: argparse.Namespace, output_dir: Path, task: Any = None, *,
                own_editor: bool = False) -> NSLoRAConfig:
    """The NSLoRA settings of the demo's run; `own_editor`: the editor is the server the demo
    started on the embedded model (a shorter reply budget, `OWN_EDITOR_MAX_TOKENS`)."""
    task = task or demo_task(args)
    # Checks at the start, half way and at the end: the one symbolic round happens at the start.
    check_every = max(args.max_steps // 2, 1)
    settings: dict[str, Any] = dict(
        **task.config_overrides(), check_every=check_every, check_at_start=True,
        monitor_window=max(check_every // 2, 2), probe_size=args.probe_size,
        probe_max_new_tokens=48, probe_batch_size=16, editor_batch_size=1,
        editor_max_tokens=OWN_EDITOR_MAX_TOKENS if own_editor else EDITOR_MAX_TOKENS,
        editor_timeout=90.0, max_symbolic_rounds=1, output_dir=str(output_dir / "nslora"),
        seed=args.seed, editor="constraint" if args.no_editor_llm else "textgrad",
        editor_base_url=args.editor_base_url, editor_model=args.editor_model)
    if args.config:
        return NSLoRAConfig.from_yaml(args.config, **{k: v for k, v in settings.items()
                                                      if k in ("output_dir",)})
    return NSLoRAConfig(**settings)


def demo_task(args: argparse.Namespace) -> Any:
    """The demo's rows and format rule as a `harness.tasks.Task`: the facts task (with its pool),
    or word problems / `--data` rows split into probe, held-out and training rows."""
    from nslora_plugin.apps.harness.tasks import Task, make_facts_task

    if not args.data and getattr(args, "task", "facts") == "facts":
        return make_facts_task(args.entities, seed=args.seed, probe_size=args.probe_size,
                               held_out_size=args.eval_size, pool_size=args.pool_size)
    train, probe, held_out = _word_problem_rows(args)
    return Task(name="data" if args.data else "word-problems", train=train, probe=probe,
                held_out=held_out, system_prompt=DEMO_SYSTEM_PROMPT, answer_format=DEMO_ANSWER_FORMAT,
                format_instruction=DEMO_FORMAT_INSTRUCTION, answer_pattern=DEMO_ANSWER_FORMAT,
                fact_match="number")


def load_rows(args: argparse.Namespace) -> tuple[list[dict], list[dict], list[dict]]:
    """Training, probe and held-out rows of the demo's task."""
    task = demo_task(args)
    return task.train, task.probe, task.held_out


def _word_problem_rows(args: argparse.Namespace) -> tuple[list[dict], list[dict], list[dict]]:
    from nslora_plugin.core.data import gsm8k_reference, make_word_problems, read_jsonl, split_gsm8k

    n = args.train_size + args.probe_size + args.eval_size
    if args.data:
        rows = read_jsonl(args.data)
        import random

        random.Random(args.seed).shuffle(rows)
        rows = rows[:n]
        for r in rows:
            if "####" in str(r.get("answer", "")):
                final = split_gsm8k(str(r["answer"]))[1]
                r["answer"] = gsm8k_reference(str(r["answer"]))
                r["final_answer"] = final.replace(",", "")
    else:
        rows = make_word_problems(n, seed=args.seed)
    if len(rows) < args.probe_size + args.eval_size + 8:
        raise SystemExit(f"--data has {len(rows)} rows; need at least {args.probe_size + args.eval_size + 8}")
    probe = rows[:args.probe_size]
    held_out = rows[args.probe_size:args.probe_size + args.eval_size]
    train = rows[args.probe_size + args.eval_size:]
    return train, probe, held_out


def build_demo_trainer(args: argparse.Namespace, model_path: Path, tokenizer: Any,
                       rows: list[dict], prompt: str | None, folder: Path, *, save: bool,
                       console: Any = None) -> Any:
    """The demo's `SFTTrainer` (fresh fp32 model, LoRA, the demo's schedule), for the demo's two
    runs and for the overhead benchmark that times them; with `console`, progress lines."""
    import torch

    from nslora_plugin.apps.harness import sft
    from nslora_plugin.trainer.precision import cpu_model_name

    torch.manual_seed(args.seed)
    sft_args = sft.sft_config(
        folder, max_steps=args.max_steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, seed=args.seed, max_length=256,
        logging_steps=max(args.max_steps // 12, 1),
        save_steps=max(args.max_steps // 2, 1) if save else None, disable_tqdm=True)
    trainer = sft.build_sft_trainer(sft.load_fp32_model(model_path), tokenizer, rows,
                                         prompt, sft_args, lora_r=args.lora_r, quiet=True)
    if console is not None:
        trainer.add_callback(sft.step_progress(console, every=max(args.max_steps // 12, 1)))
    return trainer


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.console import Console

    console = Console()
    t0 = time.time()
    # SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C, so the editor server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoTokenizer

    from nslora_plugin.apps.harness import sft
    from nslora_plugin.trainer.precision import cpu_model_name
    from nslora_plugin.core.data import load_probe_examples
    from nslora_plugin.trainer.callback import attach, save_artifacts
    from nslora_plugin.apps.student.choose import choose_student
    from nslora_plugin.core.registry import make_plugin_manager
    from nslora_plugin.core.probe import ProbeEvaluator
    from nslora_plugin.apps.harness.compare import baseline_rows
    from nslora_plugin.apps.harness.tasks import check_no_answer_in_prompt

    console.rule("[bold]nslora demo")
    model_path, student = choose_student(args, log=lambda m: console.print(m, markup=False), console=console)
    console.print(f"model: {model_path} ({student} student)")
    console.print(f"CPU: {cpu_model_name()}" if not torch.cuda.is_available()
                  else f"GPU: {torch.cuda.get_device_name(0)}")
    task = demo_task(args)
    console.print(f"data: {task.describe()} ({'file ' + args.data if args.data else task.name})")

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if not torch.cuda.is_available():
        torch.set_num_threads(max(os.cpu_count() or 1, 1))

    def new_trainer(folder: Path, rows: list[dict], prompt: str | None, save: bool) -> Any:
        return build_demo_trainer(args, model_path, tokenizer, rows, prompt, folder,
                                  save=save, console=console)

    own_editor = not (args.no_editor_llm or args.editor_base_url)
    with editor_endpoint(args, model_path, output_dir, console) as (base_url, editor_model):
        args.editor_base_url, args.editor_model = base_url, editor_model
        config = demo_config(args, output_dir, task, own_editor=own_editor)
        evaluator = ProbeEvaluator(tokenizer, load_probe_examples(task.held_out), config,
                                   make_plugin_manager(config))
        check_no_answer_in_prompt(task.held_out, config.system_prompt, "the initial system prompt",
                                  fact_match=task.fact_match)
        console.print("held-out evaluation before training…")
        held_before = evaluator.evaluate(sft.load_fp32_model(model_path), config.system_prompt,
                                         step=0, version=0)

        references: dict[str, dict[str, Any]] = {}
        held_refs: dict[str, Any] = {}
        for arm, key, title in ([] if args.no_reference else REFERENCES):
            rows, prompt = baseline_rows(arm, task, config)
            console.rule(f"{title} (reference: same rows, steps and seed, no NSLoRA)")
            t_ref = time.time()
            ref = new_trainer(output_dir / key.replace("_", "-"), rows, config.system_prompt, save=False)
            ref.train()
            train_seconds = time.time() - t_ref
            console.print(f"held-out evaluation of {title}…")
            check_no_answer_in_prompt(task.held_out, prompt, f"the {title} prompt",
                                      fact_match=task.fact_match)
            held_refs[key] = evaluator.evaluate(ref.model, prompt, step=args.max_steps, version=0)
            references[key] = {"arm": arm, "system_prompt": prompt,
                               "held_out": held_refs[key].summary(),
                               "train_seconds": round(train_seconds, 1),
                               "wall_seconds": round(time.time() - t_ref, 1)}
            del ref

        console.rule("NSLoRA")
        t_ns = time.time()
        trainer = new_trainer(output_dir, task.train, config.system_prompt, save=True)
        callback = attach(trainer, config, probe=task.probe, pool=task.pool or None, console=console)
        console.print(f"training {args.max_steps} steps; NSLoRA checks every {config.check_every} steps")
        trainer.train()
        ns_train_seconds = time.time() - t_ns
        final_dir = output_dir / "final"
        trainer.save_model(str(final_dir))
        save_artifacts(callback, final_dir)

        console.print("held-out evaluation after training…")
        final_prompt = callback.loop.prompt
        check_no_answer_in_prompt(task.held_out, final_prompt, "NSLoRA's final system prompt",
                                  fact_match=task.fact_match)
        held_after = evaluator.evaluate(trainer.model, final_prompt, step=args.max_steps,
                                        version=callback.loop.prompt_version)
        ns_wall = time.time() - t_ns

    summary = dict(callback.summary)
    summary["held_out_before"] = held_before.summary()
    summary["held_out_after"] = held_after.summary()
    summary["task"] = task.name
    summary["plain_lora"] = references.get("plain_lora")
    summary["manual_fix"] = references.get("manual_fix")
    if "plain_lora" in held_refs:
        summary["comparison"] = compare_held_out(held_after, held_refs["plain_lora"], seed=args.seed)
    if "manual_fix" in held_refs:
        summary["comparison_manual_fix"] = compare_held_out(
            held_after, held_refs["manual_fix"], seed=args.seed, other="the manual fix")
    summary["nslora_train_seconds"] = round(ns_train_seconds, 1)
    summary["nslora_wall_seconds"] = round(ns_wall, 1)
    summary["final_adapter"] = str(final_dir)
    summary["cpu"] = cpu_model_name()
    summary["student"] = student
    summary["demo_wall_seconds"] = round(time.time() - t0, 1)
    (output_dir / "nslora" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (final_dir / "nslora" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    from nslora_plugin.trainer.card import write_card_section
    from nslora_plugin.apps.report import try_write_report

    write_card_section(final_dir)  # the card's numbers now include the held-out split
    report = try_write_report(output_dir / "nslora")
    print_summary(console, summary)
    if report is not None:
        console.print(f"[bold]report:[/] {report}  (open it in a browser; it needs no network)")
    return summary


def compare_held_out(nslora: Any, plain: Any, *, seed: int = 0, n_boot: int = 2000,
                     other: str = "plain LoRA") -> dict[str, Any]:
    """NSLoRA's held-out accuracy minus `other`'s (plain LoRA's), row by row (the same rows, paired), with
    the hierarchical bootstrap's interval (`bootstrap.py`): one task instance and one training
    seed, so only the held-out rows are resampled. `call` is "tie" when the interval contains 0
    — what n rows and one seed usually give."""
    from nslora_plugin.apps.harness.bootstrap import hierarchical_bootstrap, nest

    def correct(report: Any) -> dict[str, float]:
        return {r.example_id: float(r.rewards.get("correctness", float(r.passed))) for r in report.results}

    iv = hierarchical_bootstrap(nest(correct(nslora), seed, seed), nest(correct(plain), seed, seed), n_boot)
    call = "tie" if iv.contains(0.0) else ("NSLoRA ahead" if iv.point > 0 else f"{other} ahead")
    return {"measure": f"held-out accuracy, NSLoRA − {other}", "difference": round(iv.point, 4),
            "interval95": [round(iv.low, 4), round(iv.high, 4)], "levels": iv.levels,
            "items": iv.items[0], "call": call, "resamples": iv.resamples}


def comparison_line(c: dict[str, Any]) -> str:
    lo, hi = c["interval95"]
    line = (f"{c['measure']}: {c['difference']:+.3f}, 95 % interval [{lo:+.3f}, {hi:+.3f}] "
            f"({c['levels']})")
    if c["call"] == "tie":
        return (line + f" — a tie: {c['items']} held-out rows and one seed cannot separate the "
                "arms (run `nslora compare` with several --seeds and --task-seeds for that)")
    return (line + f" — {c['call']} (one seed and one task instance: the training seed's own "
            "variance is not in this interval)")


def print_summary(console: Any, s: dict[str, Any]) -> None:
    from nslora_plugin.apps.harness.tables import print_table

    refs = [(key, title) for _, key, title in REFERENCES if s.get(key)]
    columns = ["measure", "before", *(title for _, title in refs), "NSLoRA"]
    rows = []

    def cell(d: dict[str, Any] | None, key: str, digits: int = 2) -> str:
        return "–" if not d or key not in d else f"{d[key]:.{digits}f}"

    for label, key in (("probe", "probe"), ("held-out", "held_out")):
        b, a = s.get(f"{key}_before") or {}, s.get(f"{key}_after") or {}
        for metric, name, digits in (("correctness", "accuracy", 2), ("format", "format compliance", 2),
                                     ("ref_nll", "reference NLL", 3)):
            if metric in b or metric in a:
                row = [f"{label} {name}" + (f" (n={a.get('n', b.get('n'))})" if metric != "ref_nll" else ""),
                       cell(b, metric, digits)]
                for ref, _ in refs:
                    row.append(cell(s[ref]["held_out"], metric, digits) if key == "held_out" else "–")
                row.append(cell(a, metric, digits))
                rows.append(row)
    if refs:
        rows.append(["training wall time (s)", "–", *(f"{s[ref]['train_seconds']:.0f}" for ref, _ in refs),
                     f"{s.get('nslora_train_seconds', float('nan')):.0f}"])
    print_table(console, "NSLoRA demo: before → after", columns, rows)
    if refs:
        console.print("The reference columns train on the same rows, steps and seed without NSLoRA "
                      "(the manual fix: the format instruction written by hand into the prompt of "
                      "the rows whose replies follow it); the NSLoRA column adds its probes, "
                      "routing, prompt edits and prompts-as-data rows.")
    for key in ("comparison", "comparison_manual_fix"):
        if s.get(key):
            console.print(comparison_line(s[key]), markup=False, highlight=False, soft_wrap=True)
    d = s.get("decisions", {})
    console.print(f"decisions: {d.get('numerical', 0)} numerical, {d.get('symbolic', 0)} symbolic; "
                  f"edits accepted {d.get('accepted', 0)}, rejected {d.get('rejected', 0)}; "
                  f"augmented examples {s.get('augmented_examples', 0)}")
    usage = s.get("editor_usage") or {}
    if usage:
        console.print(f"editor LLM: {usage.get('calls', 0)} calls, "
                      f"{usage.get('prompt_tokens', 0) + usage.get('completion_tokens', 0)} tokens, "
                      f"{usage.get('failed_calls', 0)} failed")
    if s.get("faults"):
        console.print(f"editor faults (training went on): {s['faults']}")
    console.print(f"[bold]system prompt before:[/] {s.get('system_prompt_before')!r}")
    console.print(f"[bold]system prompt after:[/]  {s.get('system_prompt_after')!r}")
    console.print(f"artifacts: {s.get('artifacts')}  (adapter + prompt: {s.get('final_adapter')})")
    console.print(f"wall time: {s.get('demo_wall_seconds')} s")
