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

What it costs at the cadence users run (`--cadence default`): the recipes' cadence, which is the
config's defaults (a check every 20 steps, 16 probe rows, the automatic token cap and probe batch),
over 200 steps of 4 rows on the embedded model (`--model tiny` for a smoke run). Plain LoRA and
LoRA + NSLoRA train in two threads of one process and hand a baton over every `--chunk` steps
(default: each check), so only one runs at a time and both see the same machine load; each one's
time is the time it held the baton. It prints NSLoRA's own time per stage (probe generation,
reference NLL, gate, editor, artifacts, collator, callback and loop) as a share of plain
training time, the training tokens the method adds (a longer prompt, prompts-as-data rows) on
their own line, and last `wall-time ratio nslora/plain: X.XX`; `--out` writes the numbers as JSON:

    python tests/benchmarks/bench_overhead.py --cadence default --out overhead-default.json
    python tests/benchmarks/bench_overhead.py --cadence default --model tiny --steps 40   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

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
    from nslora_plugin.apps.harness.demo import DEMO_SYSTEM_PROMPT, build_demo_trainer, build_parser, demo_config
    from nslora_plugin.apps.harness.endpoint import editor_endpoint
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


# ------------------------------------------------------------------ the recipes' cadence (one process)
class Baton:
    """Two trainers in two threads, one running at a time: each hands the baton over after every
    chunk of steps, so machine-load drift hits both alike; the time each held it is its own."""

    def __init__(self, names: Sequence[str]) -> None:
        import threading

        self.names = list(names)
        self.turn = self.names[0]
        self.held = {n: 0.0 for n in self.names}
        self.finished: set[str] = set()
        self.failed = False
        self._cond = threading.Condition()
        self._since = 0.0

    def take(self, name: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.turn == name or self.failed)
            if self.failed:
                raise RuntimeError("the other variant failed")
            self._since = time.perf_counter()

    def give(self, name: str, *, done: bool = False, failed: bool = False) -> None:
        with self._cond:
            if self.turn == name:
                self.held[name] += time.perf_counter() - self._since
            if done:
                self.finished.add(name)
            self.failed = self.failed or failed
            waiting = [n for n in self.names if n != name and n not in self.finished]
            self.turn = waiting[0] if waiting else name
            self._cond.notify_all()


class TokenTally:
    """Training tokens NSLoRA's collator adds to each batch: the prompt swapped into each row
    (the accepted prompt is longer or shorter than the initial one) and the prompts-as-data rows
    mixed in (each replacing a row)."""

    def __init__(self) -> None:
        self.prompt = 0
        self.augmented = 0

    def install(self) -> None:
        from nslora_plugin.core.collator import NSLoRACollator

        swap, mix, tally = NSLoRACollator._swap_one, NSLoRACollator._mix, self

        def swap_one(collator: Any, feature: dict[str, Any], *a: Any, **k: Any) -> Any:
            out = swap(collator, feature, *a, **k)
            tally.prompt += len(out["input_ids"]) - len(feature["input_ids"])
            return out

        def mixed(collator: Any, features: list[dict[str, Any]], *a: Any, **k: Any) -> Any:
            before = sum(len(f["input_ids"]) for f in features)
            out = mix(collator, features, *a, **k)
            tally.augmented += sum(len(f["input_ids"]) for f in out) - before
            return out
        NSLoRACollator._swap_one, NSLoRACollator._mix = swap_one, mixed


#: the stages of NSLoRA's own time, in print order
STAGES = ("probe generation", "reference NLL", "gate", "editor", "artifacts", "collator",
          "callback and loop")


def default_cadence(args: argparse.Namespace) -> None:
    """Plain LoRA and LoRA + NSLoRA at the recipes' cadence (the config's defaults), interleaved
    chunk by chunk in two threads of one process."""
    import tempfile
    import threading

    import torch
    from rich.console import Console
    from transformers import AutoTokenizer, TrainerCallback

    from nslora_plugin import NSLoRAConfig
    from nslora_plugin.apps.harness import sft
    from nslora_plugin.apps.tools.models import ensure_default_model
    from nslora_plugin.core.artifacts import ArtifactStore
    from nslora_plugin.core.collator import NSLoRACollator
    from nslora_plugin.core.data import make_word_problems
    from nslora_plugin.core.loop import NeurosymbolicLoop
    from nslora_plugin.core.probe import ProbeEvaluator
    from nslora_plugin.trainer.callback import NSLoRACallback, attach

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nslora-bench-default-"))
    model_dir = ensure_default_model(args.cache, prefer_hub=False)
    if args.model == "tiny":
        from tiny import save_tiny_model

        model_dir = save_tiny_model(model_dir, workdir / "tiny-model")
    elif args.model != "default":
        model_dir = Path(args.model)

    book = Breakdown()
    for name in ("generate_and_score", "generate"):
        book.wrap(ProbeEvaluator, name, "probe generation")
    for name in ("_nll_on_cache", "reference_nll"):
        book.wrap(ProbeEvaluator, name, "reference NLL")
    book.wrap(NeurosymbolicLoop, "gate", "gate")
    for module, cls in (("constraint", "ConstraintEditor"), ("textgrad", "TextGradEditor"),
                        ("demonstrations", "DemonstrationsEditor")):
        editor = getattr(__import__(f"nslora_plugin.builtins.editors.{module}", fromlist=[cls]), cls)
        book.wrap(editor, "nslora_propose_edit", "editor")
    for method in ("append_jsonl", "write_json", "write_jsonl", "write_prompt", "write_augmented",
                   "copy_into", "flush"):
        book.wrap(ArtifactStore, method, "artifacts")
    for method in ("_swap_one", "_mix"):
        book.wrap(NSLoRACollator, method, "collator")
    for method in ("on_train_begin", "on_step_end", "on_pre_optimizer_step", "_capture_loss",
                   "on_log", "on_save", "on_train_end"):
        book.wrap(NSLoRACallback, method, "callback and loop")
    tally = TokenTally()
    tally.install()

    system = "You are a helpful assistant."
    rows = make_word_problems(16 + args.steps * args.batch_size, seed=1)
    probe_rows, train_rows = rows[:16], rows[16:]
    config = NSLoRAConfig(system_prompt=system, answer_format=r"^Answer: (-?\d+)\s*$",
                          format_instruction="End your reply with a final line of the form "
                                             "'Answer: <number>'.",
                          editor=args.editor, editor_base_url=args.editor_base_url,
                          editor_model=args.editor_model, output_dir=str(workdir / "nslora" / "nslora"),
                          seed=0)
    if args.probe_batch_size is not None:  # "auto" is 0, set past the config's check for > 0
        config.probe_batch_size = 0 if args.probe_batch_size == "auto" else int(args.probe_batch_size)
    chunk = args.chunk or config.check_every
    names = ("plain", "nslora")
    baton = Baton(names)
    tokens = {n: 0 for n in names}
    errors: dict[str, BaseException] = {}
    trainers: dict[str, Any] = {}
    callback = None
    for name in names:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))  # each its own (NSLoRA edits its template)
        torch.manual_seed(0)
        sft_args = sft.sft_config(workdir / name, max_steps=args.steps, batch_size=args.batch_size,
                                  learning_rate=args.learning_rate, seed=0, max_length=256,
                                  logging_steps=chunk, disable_tqdm=True)
        trainer = sft.build_sft_trainer(sft.load_fp32_model(model_dir), tokenizer, train_rows, system,
                                        sft_args, lora_r=args.lora_r, quiet=True)
        if name == "nslora":
            callback = attach(trainer, config, probe=probe_rows, console=Console(quiet=True))

        def count(module: Any, a: Any, k: Any, name: str = name) -> None:
            if module.training and k.get("attention_mask") is not None:
                tokens[name] += int(k["attention_mask"].sum())
        trainer.model.register_forward_pre_hook(count, with_kwargs=True)

        class Handover(TrainerCallback):
            def on_step_end(self, a: Any, state: Any, control: Any, name: str = name, **k: Any) -> None:
                if state.global_step % chunk == 0 and state.global_step < state.max_steps:
                    baton.give(name)
                    if name == names[-1]:
                        print(f"step {state.global_step:4d}/{args.steps}: " + ", ".join(
                            f"{n} {baton.held[n]:.1f} s" for n in names), flush=True)
                    baton.take(name)
        trainer.add_callback(Handover())  # after NSLoRA's callback: a chunk ends after its check
        trainers[name] = trainer

    def train(name: str) -> None:
        try:
            baton.take(name)
            trainers[name].train()
            baton.give(name, done=True)
        except BaseException as exc:  # the other thread must not wait forever
            errors[name] = exc
            baton.give(name, done=True, failed=True)

    threads = [threading.Thread(target=train, args=(n,), name=f"bench-{n}") for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        name, exc = next(iter(errors.items()))
        raise RuntimeError(f"the {name} run failed") from exc

    plain, nslora = baton.held["plain"], baton.held["nslora"]
    spent = {stage: book.seconds.get(stage, 0.0) for stage in STAGES}
    own = sum(spent.values())
    loop = callback.loop
    decisions = callback.summary.get("decisions", {})
    probe_setting = config.probe_batch_size or "auto"
    extra = tokens["nslora"] - tokens["plain"]
    print(f"\n{device_line()}; {args.threads} threads; the recipes' cadence: {args.steps} steps of "
          f"{args.batch_size} rows, check every {config.check_every}"
          f"{' + one at start' if config.check_at_start else ''}, {config.probe_size} probe rows, cap "
          f"{'auto' if not config.probe_max_new_tokens else config.probe_max_new_tokens} "
          f"({loop.evaluator.max_new_tokens} tokens), probe batch {probe_setting}, editor {args.editor}; "
          f"interleaved in chunks of {chunk} steps; model {args.model}; decisions {decisions}")
    print(f"plain LoRA              {plain:8.1f} s")
    print(f"LoRA + NSLoRA           {nslora:8.1f} s  ({nslora / plain:.3f} of plain), of which:")
    print(f"  training              {nslora - own:8.1f} s  ({(nslora - own) / plain:.3f} of plain)")
    for stage in STAGES:
        print(f"  {stage:<21} {spent[stage]:8.1f} s  ({spent[stage] / plain:.3f} of plain; "
              f"{book.calls.get(stage, 0)} calls)")
    print(f"  (the gate's candidate probes: {book.inclusive.get('gate', 0.0):.1f} s inclusive, counted "
          f"above as generation and NLL)")
    share = extra / max(tokens["plain"], 1)
    print(f"extra training tokens: {extra:+,} = {share:+.2%} of plain's {tokens['plain']:,} (longer "
          f"prompt {tally.prompt:+,}, prompts-as-data rows {tally.augmented:+,}; "
          f"{loop.batch_stats.get('augmented', 0)} rows mixed in)")
    result = {"device": device_line(), "threads": args.threads, "model": args.model, "steps": args.steps,
              "batch_size": args.batch_size, "chunk": chunk, "editor": args.editor,
              "check_every": config.check_every, "probe_size": config.probe_size,
              "probe_max_new_tokens": loop.evaluator.max_new_tokens, "probe_batch_size": probe_setting,
              "plain_seconds": round(plain, 3), "nslora_seconds": round(nslora, 3),
              "ratio": round(nslora / plain, 4), "training_seconds": round(nslora - own, 3),
              "stages_seconds": {k: round(v, 3) for k, v in spent.items()},
              "stages_share_of_plain": {k: round(v / plain, 4) for k, v in spent.items()},
              "stage_calls": {k: book.calls.get(k, 0) for k in STAGES},
              "gate_inclusive_seconds": round(book.inclusive.get("gate", 0.0), 3),
              "tokens": tokens, "extra_tokens": extra, "extra_token_share": round(share, 4),
              "extra_tokens_prompt": tally.prompt, "extra_tokens_augmented": tally.augmented,
              "decisions": decisions}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wall-time ratio nslora/plain: {nslora / plain:.2f}")


@contextlib.contextmanager
def editor_endpoint(args: argparse.Namespace) -> Iterator[None]:
    """With `--editor textgrad` and no `--editor-base-url`: the embedded editor LLM, served on
    loopback for the run (sets `args.editor_base_url` / `args.editor_model`)."""
    if args.editor != "textgrad" or args.editor_base_url:
        yield
        return
    import tempfile

    from nslora_plugin.apps.tools.models import ensure_default_model
    from nslora_plugin.apps.tools.serve import EditorServer

    model_dir = ensure_default_model(args.cache, prefer_hub=False)
    server = EditorServer(model_dir, log_path=Path(tempfile.mkdtemp(prefix="nslora-editor-")) / "server.log")
    try:
        server.start()
        args.editor_base_url, args.editor_model = server.base_url, server.model
        yield
    finally:
        server.stop()


def device_line() -> str:
    import torch

    from nslora_plugin.trainer.precision import cpu_model_name

    return (f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
            else f"CPU: {cpu_model_name()}")


# ------------------------------------------------------------------ the comparison (parent)
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M), 'mid', 'tiny' (--cadence default), or a folder")
    p.add_argument("--reps", type=int, default=3, help="repetitions per variant (interleaved)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the timing")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=max(os.cpu_count() or 1, 1))
    p.add_argument("--cache", default=os.environ.get("NSLORA_CACHE", str(REPO / ".cache" / "nslora-test")))
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", "--out", dest="json", default=None, help="also write the numbers here (JSON)")
    p.add_argument("--cadence", choices=("none", "demo", "default"), default="none",
                   help="demo: the whole overhead at the demo's own cadence; default: at the recipes' "
                        "cadence, the config's defaults (see the docstring)")
    p.add_argument("--editor", choices=("constraint", "textgrad"), default="constraint",
                   help="with --cadence demo/default: the editor (textgrad starts the embedded editor "
                        "LLM unless --editor-base-url is given)")
    p.add_argument("--editor-base-url", default=None, help="with --cadence default: the editor's endpoint")
    p.add_argument("--editor-model", default=None, help="with --cadence default: the editor's model")
    p.add_argument("--chunk", type=int, default=0,
                   help="with --cadence default: steps each variant runs before handing over "
                        "(default: check_every)")
    p.add_argument("--lora-r", type=int, default=16, help="with --cadence default")
    p.add_argument("--probe-batch-size", default=None,
                   help="with --cadence default: a number or 'auto' (the memory estimate's batch); "
                        "default: the config's default")
    p.add_argument("--learning-rate", type=float, default=2e-4, help="with --cadence default")
    p.add_argument("--worker", dest="variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cadence == "default":
        if args.model == "mid":
            p.error("--cadence default: --model is 'default', 'tiny' or a model folder")
        if "--steps" not in sys.argv:
            args.steps = 200
        if "--batch-size" not in sys.argv:
            args.batch_size = 4  # the CPU recipes'
        with editor_endpoint(args):
            default_cadence(args)
        return
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
