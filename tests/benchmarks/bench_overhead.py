"""What NSLoRA costs while it only watches: step time and peak memory, NSLoRA attached vs plain TRL.

Both variants train the same model on the same rows with the same `SFTConfig`; the NSLoRA one has
the callback attached with `check_every` larger than the run, so no check falls inside the
measured steps: what is measured is the monitoring itself (the loss forward hook, the gradient
norm before each optimizer step, the wrapped collator, the per-step bookkeeping). The baseline
probe that `attach` takes when training begins and the final one at the end fall outside the
timed steps (they are reported separately as `start_seconds`).

Each repetition runs in its own fresh Python process so that peak RSS (`ru_maxrss`) belongs to
that repetition alone, and the variants are interleaved (plain, nslora, plain, nslora, ...) so
that drift in machine load hits both alike.

    python tests/benchmarks/bench_overhead.py                   # embedded SmolLM2-135M
    python tests/benchmarks/bench_overhead.py --model mid        # 4-layer width-256 model
    python tests/benchmarks/bench_overhead.py --reps 3 --steps 12 --json out.json

Targets (issue 4): time ratio <= 1.03, memory ratio <= 1.05. Not a test: nothing is asserted.

The whole overhead, at the demo's own cadence (`--cadence demo`): in one process, plain
`SFTTrainer` and the same trainer with NSLoRA attached, configured exactly as `nslora demo`
configures them (`demo.demo_config`: a check every steps/4, one before the first step, 16 probe
rows x 48 new tokens, the gate, the editor and the artifacts all included), on the same rows,
steps and seed. It prints where NSLoRA's time went (training, probe generation, reference NLL,
editor calls, gate evaluations, artifacts) and, last, `wall-time ratio nslora/plain: X.XX`:

    python tests/benchmarks/bench_overhead.py --cadence demo                     # constraint editor
    python tests/benchmarks/bench_overhead.py --cadence demo --editor textgrad    # + the 135M editor LLM
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _worker import run_worker  # noqa: E402


# ------------------------------------------------------------------ one repetition (child process)
def worker(args: argparse.Namespace) -> dict[str, Any]:
    import resource

    import psutil
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from nslora_plugin import NSLoRAConfig
    from nslora_plugin.core.data import chat_rows, make_word_problems
    from nslora_plugin.apps.tools.models import ensure_default_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    default_dir = ensure_default_model(args.cache, prefer_hub=False)
    tokenizer = AutoTokenizer.from_pretrained(str(default_dir))
    if args.model == "default":
        model = AutoModelForCausalLM.from_pretrained(str(default_dir), dtype=torch.float32)
    elif args.model == "mid":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=1024, tie_word_embeddings=True,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
        model = LlamaForCausalLM(cfg)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    system = "You are a helpful assistant."
    rows = make_word_problems(args.steps * args.batch_size + 16, seed=1)
    process = psutil.Process()

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.cpu: list[float] = []
            self.rss: list[int] = []

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            if not self.ends:  # start of step 1 (after on_train_begin and its baseline probe)
                self.ends.append(time.perf_counter())
                self.cpu.append(time.process_time())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())
            self.rss.append(process.memory_info().rss)

    # NSLoRA's own time inside the steps, measured directly: every callback event it handles
    # during training, its loss hook, and its collator minus the framework collator it wraps.
    own = {"seconds": 0.0}

    def timed(fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                own["seconds"] += time.perf_counter() - t
        return wrapper

    if args.variant == "nslora":
        from nslora_plugin.trainer import callback as cb_mod
        from nslora_plugin.core import collator as col_mod

        for name in ("on_pre_optimizer_step", "on_step_end", "on_log", "_capture_loss",
                     "on_step_begin", "on_substep_end"):
            if hasattr(cb_mod.NSLoRACallback, name):
                setattr(cb_mod.NSLoRACallback, name, timed(getattr(cb_mod.NSLoRACallback, name)))
        original_call = col_mod.NSLoRACollator.__call__

        def collate(self: Any, features: Any) -> Any:
            base = self.base
            spent = {"base": 0.0}

            def base_timed(f: Any) -> Any:
                t = time.perf_counter()
                try:
                    return base(f)
                finally:
                    spent["base"] += time.perf_counter() - t
            self.base = base_timed
            t = time.perf_counter()
            try:
                return original_call(self, features)
            finally:
                self.base = base
                own["seconds"] += time.perf_counter() - t - spent["base"]
        col_mod.NSLoRACollator.__call__ = collate

    out_dir = Path(args.workdir) / f"{args.variant}-{os.getpid()}"
    sft = SFTConfig(output_dir=str(out_dir), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                    learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=args.steps,
                    save_strategy="no", report_to=[], gradient_checkpointing=False, max_length=256,
                    use_cpu=not torch.cuda.is_available(), seed=0, dataloader_num_workers=0,
                    disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=sft,
                         train_dataset=Dataset.from_list(chat_rows(rows[16:], system)),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    trainer.remove_callback(PrinterCallback)
    timer = Timer()
    trainer.add_callback(timer)  # after NSLoRA's callback: its on_step_end work is inside the step
    if args.variant == "nslora":
        from nslora_plugin.integrations.trl import attach

        attach(trainer, NSLoRAConfig(system_prompt=system, editor="constraint",
                                     check_every=args.steps * 10, probe_size=4,
                                     probe_max_new_tokens=8, output_dir=str(out_dir / "nslora"),
                                     answer_format=r"^Answer: (-?\d+)\s*$"),
               probe=rows[:16])
    rss_before = process.memory_info().rss
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    steps = [b - a for a, b in zip(timer.ends, timer.ends[1:])][args.warmup:]
    cpu = [b - a for a, b in zip(timer.cpu, timer.cpu[1:])][args.warmup:]
    return {"variant": args.variant, "step_seconds": steps, "cpu_step_seconds": cpu,
            "median_step": statistics.median(steps), "mean_step": statistics.fmean(steps),
            "median_cpu_step": statistics.median(cpu),
            "own_seconds_per_step": own["seconds"] / max(len(timer.ends) - 1, 1),
            "start_seconds": round(timer.ends[0] - t0, 3) if timer.ends else None,
            "train_seconds": round(total, 3),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_steps_mb": max(timer.rss) / 2**20, "rss_before_train_mb": rss_before / 2**20}


# ------------------------------------------------------------------ the demo's cadence (one process)
class Breakdown:
    """Wall time per NSLoRA stage, exclusive: a stage entered inside another is charged to the
    inner one and taken out of the outer one (the gate's own bookkeeping vs the probe it runs), so
    the parts add up to NSLoRA's total without double counting. `inclusive` keeps the totals."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.inclusive: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list[float]] = []  # per active stage: [time spent in nested stages]

    def wrap(self, owner: Any, name: str, stage: str) -> None:
        import functools

        original = getattr(owner, name)
        book = self

        @functools.wraps(original)  # keeps pluggy's hookimpl marker and the signature
        def timed(*a: Any, **k: Any) -> Any:
            book._stack.append([0.0])
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                elapsed = time.perf_counter() - t
                nested = book._stack.pop()[0]
                if book._stack:
                    book._stack[-1][0] += elapsed
                book.seconds[stage] = book.seconds.get(stage, 0.0) + elapsed - nested
                book.inclusive[stage] = book.inclusive.get(stage, 0.0) + elapsed
                book.calls[stage] = book.calls.get(stage, 0) + 1
        setattr(owner, name, timed)


def cadence(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer

    from nslora_plugin.apps.harness import sft as training
    from nslora_plugin.trainer.precision import cpu_model_name
    from nslora_plugin.core.artifacts import ArtifactStore
    from nslora_plugin.apps.harness.demo import (DEMO_SYSTEM_PROMPT, build_demo_trainer, build_parser,
                                             demo_config, editor_endpoint)
    from nslora_plugin.integrations.trl import attach
    from nslora_plugin.core.loop import NeurosymbolicLoop
    from nslora_plugin.apps.tools.models import ensure_default_model
    from nslora_plugin.core.probe import ProbeEvaluator
    from rich.console import Console

    torch.set_num_threads(args.threads)
    model_dir = ensure_default_model(args.cache, prefer_hub=False)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    demo_args = build_parser().parse_args(["--max-steps", str(args.steps)]
                                          + ([] if args.editor == "textgrad" else ["--no-editor-llm"]))
    from nslora_plugin.apps.harness.demo import load_rows

    train_rows, probe_rows, _ = load_rows(demo_args)
    import tempfile

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nslora-bench-cadence-"))
    console = Console(quiet=True)
    book = Breakdown()
    book.wrap(ProbeEvaluator, "generate_and_score", "probe generation")
    book.wrap(ProbeEvaluator, "generate", "probe generation")
    book.wrap(ProbeEvaluator, "_nll_on_cache", "reference NLL")
    book.wrap(ProbeEvaluator, "reference_nll", "reference NLL")
    book.wrap(NeurosymbolicLoop, "gate", "gate")
    from nslora_plugin.builtins.editors.constraint import ConstraintEditor
    from nslora_plugin.builtins.editors.textgrad import TextGradEditor

    for editor in (ConstraintEditor, TextGradEditor):
        book.wrap(editor, "nslora_propose_edit", "editor calls")
    for method in ("append_jsonl", "write_json", "write_prompt", "write_augmented", "copy_into"):
        book.wrap(ArtifactStore, method, "artifacts")

    tokens: dict[str, list[int]] = {"plain": [], "nslora": []}

    def run(variant: str, base_url: str | None, editor_model: str | None) -> tuple[float, Any]:
        folder = workdir / f"{variant}-{time.time_ns()}"
        trainer = build_demo_trainer(demo_args, model_dir, tokenizer, train_rows, DEMO_SYSTEM_PROMPT,
                                     folder, save=False)
        callback = None
        if variant == "nslora":
            demo_args.editor_base_url, demo_args.editor_model = base_url, editor_model
            callback = attach(trainer, demo_config(demo_args, folder), probe=probe_rows, console=console)

        def count(module: Any, a: Any, k: Any) -> None:
            if module.training and k.get("input_ids") is not None:
                tokens[variant].append(int(k["attention_mask"].sum()) if k.get("attention_mask") is not None
                                       else int(k["input_ids"].numel()))
        trainer.model.register_forward_pre_hook(count, with_kwargs=True)
        t = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t, callback

    with editor_endpoint(demo_args, model_dir, workdir, console) as (base_url, editor_model):
        walls: dict[str, list[float]] = {"plain": [], "nslora": []}
        summaries = []
        for rep in range(args.reps):
            for variant in ("plain", "nslora"):
                before = dict(book.seconds)
                wall, callback = run(variant, base_url, editor_model)
                walls[variant].append(wall)
                if callback is not None:
                    spent = {k: v - before.get(k, 0.0) for k, v in book.seconds.items()}
                    summaries.append((wall, spent, callback.summary.get("decisions", {})))
                print(f"rep {rep + 1} {variant:6s}: {wall:.1f} s", flush=True)
    plain = statistics.median(walls["plain"])
    wall, spent, decisions = summaries[len(summaries) // 2]
    nslora = statistics.median(walls["nslora"])
    own = sum(spent.values())
    every = demo_config(demo_args, workdir).check_every
    print(f"\nCPU: {cpu_model_name()}; demo cadence: {demo_args.max_steps} steps, check every "
          f"{every} + one at start, editor {args.editor}; decisions {decisions}")
    print(f"plain SFTTrainer       {plain:8.1f} s")
    print(f"SFTTrainer + NSLoRA    {nslora:8.1f} s, of which:")
    tok_ratio = (sum(tokens["nslora"]) / max(len(tokens["nslora"]), 1)) / \
        max(sum(tokens["plain"]) / max(len(tokens["plain"]), 1), 1)
    print(f"  training             {wall - own:8.1f} s  ({(wall - own) / plain:.3f} of plain; its batches "
          f"carry {tok_ratio:.3f}x the tokens: the accepted prompt and prompts-as-data rows)")
    for stage in ("probe generation", "reference NLL", "editor calls", "gate", "artifacts"):
        print(f"  {stage:<20} {spent.get(stage, 0.0):8.1f} s  ({book.calls.get(stage, 0) // max(args.reps, 1)} calls)")
    print(f"  (the gate's candidate probes inside: {book.inclusive.get('gate', 0.0) / max(args.reps, 1):.1f} s "
          f"inclusive, counted above as generation and NLL)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "cpu": cpu_model_name(), "steps": demo_args.max_steps, "editor": args.editor,
            "plain_seconds": walls["plain"], "nslora_seconds": walls["nslora"], "breakdown": spent,
            "tokens_per_batch_ratio": round(tok_ratio, 4),
            "decisions": decisions, "ratio": round(nslora / plain, 4)}, indent=2) + "\n")
    print(f"wall-time ratio nslora/plain: {nslora / plain:.2f}")


# ------------------------------------------------------------------ the comparison (parent)
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M), 'mid', or a folder")
    p.add_argument("--reps", type=int, default=3, help="repetitions per variant (interleaved)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the timing")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=max(os.cpu_count() or 1, 1))
    p.add_argument("--cache", default=os.environ.get("NSLORA_CACHE", str(REPO / ".cache" / "nslora-test")))
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.add_argument("--cadence", choices=("none", "demo"), default="none",
                   help="demo: the whole overhead at the demo's own cadence (see the docstring)")
    p.add_argument("--editor", choices=("constraint", "textgrad"), default="constraint",
                   help="with --cadence demo: the editor (textgrad starts the embedded editor LLM)")
    p.add_argument("--worker", dest="variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cadence == "demo":
        if "--steps" not in sys.argv:
            args.steps = 48  # the demo's default
        if "--reps" not in sys.argv:
            args.reps = 1
        cadence(args)
        return

    if args.variant:
        print(json.dumps(worker(args)))
        return

    import tempfile

    workdir = args.workdir or tempfile.mkdtemp(prefix="nslora-bench-")
    results: dict[str, list[dict[str, Any]]] = {"plain": [], "nslora": []}
    for rep in range(args.reps):
        for variant in ("plain", "nslora"):
            r = run_worker(__file__, variant, [
                "--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
                "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                "--cache", args.cache, "--workdir", workdir])
            results[variant].append(r)
            print(f"rep {rep + 1} {variant:6s}: median step {r['median_step']:.3f} s wall, "
                  f"{r['median_cpu_step']:.3f} s CPU; peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"(during steps {r['peak_rss_steps_mb']:.0f} MB); start {r['start_seconds']} s"
                  + (f"; NSLoRA's own time {1000 * r['own_seconds_per_step']:.2f} ms/step"
                     if variant == "nslora" else ""), flush=True)

    def agg(variant: str, key: str) -> float:
        return statistics.fmean(r[key] for r in results[variant])

    keys = ("median_step", "mean_step", "median_cpu_step", "peak_rss_mb", "peak_rss_steps_mb")
    summary: dict[str, Any] = {
        "model": args.model, "reps": args.reps, "steps": args.steps, "warmup": args.warmup,
        "batch_size": args.batch_size, "threads": args.threads, "cpu_count": os.cpu_count(),
        "plain": {k: round(agg("plain", k), 4) for k in keys},
        "nslora": {k: round(agg("nslora", k), 4) for k in keys + ("own_seconds_per_step",)},
    }
    summary["time_ratio"] = round(summary["nslora"]["median_step"] / summary["plain"]["median_step"], 4)
    summary["time_ratio_mean"] = round(summary["nslora"]["mean_step"] / summary["plain"]["mean_step"], 4)
    summary["cpu_time_ratio"] = round(summary["nslora"]["median_cpu_step"] / summary["plain"]["median_cpu_step"], 4)
    summary["own_time_ratio"] = round(1 + summary["nslora"]["own_seconds_per_step"] / summary["plain"]["median_step"], 4)
    spread = [statistics.median(r["step_seconds"]) for r in results["plain"]]
    summary["plain_step_spread"] = [round(min(spread), 4), round(max(spread), 4)]
    summary["memory_ratio"] = round(summary["nslora"]["peak_rss_mb"] / summary["plain"]["peak_rss_mb"], 4)
    summary["memory_ratio_steps"] = round(summary["nslora"]["peak_rss_steps_mb"] / summary["plain"]["peak_rss_steps_mb"], 4)
    summary["runs"] = results
    print(f"\nmodel {args.model}, {args.reps} reps x {args.steps} steps (first {args.warmup} untimed), "
          f"batch {args.batch_size}, {args.threads} threads")
    print(f"step time   plain {summary['plain']['median_step']:.3f} s   nslora {summary['nslora']['median_step']:.3f} s"
          f"   ratio {summary['time_ratio']:.3f} (mean-based {summary['time_ratio_mean']:.3f}; target <= 1.03;"
          f" plain runs ranged {summary['plain_step_spread'][0]:.3f}-{summary['plain_step_spread'][1]:.3f} s)")
    print(f"CPU time    plain {summary['plain']['median_cpu_step']:.3f} s   nslora "
          f"{summary['nslora']['median_cpu_step']:.3f} s   ratio {summary['cpu_time_ratio']:.3f}")
    print(f"NSLoRA's own work {1000 * summary['nslora']['own_seconds_per_step']:.2f} ms/step = ratio "
          f"{summary['own_time_ratio']:.4f} of the plain step (direct, load-independent)")
    print(f"peak RSS    plain {summary['plain']['peak_rss_mb']:.0f} MB   nslora {summary['nslora']['peak_rss_mb']:.0f} MB"
          f"   ratio {summary['memory_ratio']:.3f} (target <= 1.05)")
    print(f"RSS in steps plain {summary['plain']['peak_rss_steps_mb']:.0f} MB   nslora "
          f"{summary['nslora']['peak_rss_steps_mb']:.0f} MB   ratio {summary['memory_ratio_steps']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
