"""Step time of one LoRA training step, side by side in one run, on the same batches and seed:

  raw-hf     transformers `Trainer` + PEFT `get_peft_model`, a plain causal-LM collator
  trl        TRL `SFTTrainer` exactly as `nslora demo` configures it (`nslora_plugin.apps.harness.sft`)
  nslora     `trl` with NSLoRA attached and no check due inside the timed steps
  trl-bf16   (with --with-bf16) `trl` with TRL's own CPU default, `bf16=True` (autocast)

Every variant trains the embedded SmolLM2-135M-Instruct (fp32, LoRA r=8 on all linear layers,
batch 8 of the demo's word problems, no gradient checkpointing) in its own fresh process; the
variants are interleaved (raw-hf, trl, nslora, raw-hf, ...) so that drift in machine load hits all
alike. The first `--warmup` steps of each run are not timed. Not a test: nothing is asserted.

    python tests/benchmarks/bench_step.py                     # 3 reps x 8 steps
    python tests/benchmarks/bench_step.py --with-bf16 --json out.json

The last line is `step-time ratio nslora-trl/raw-hf: X.XX` (target on CPU: <= 1.20).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _worker import run_worker  # noqa: E402

SYSTEM = "You are a helpful assistant."
VARIANTS = ("raw-hf", "trl", "nslora")


def _rows(n: int) -> list[dict[str, Any]]:
    from nslora_plugin.core.data import make_word_problems

    return make_word_problems(n, seed=1)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from nslora_plugin.apps.harness import sft as training
    from nslora_plugin.apps.tools.models import ensure_default_model

    torch.set_num_threads(args.threads)
    model_dir = ensure_default_model(args.cache, prefer_hub=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(0)
    model = training.load_fp32_model(model_dir)
    rows = _rows(args.steps * args.batch_size + 16)
    probe, train = rows[:16], rows[16:]
    out_dir = Path(args.workdir) / f"{args.variant}-{os.getpid()}"

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            if not self.marks:  # start of step 1, after on_train_begin (and NSLoRA's baseline probe)
                self.marks.append(time.perf_counter())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.marks.append(time.perf_counter())

    if args.variant == "raw-hf":
        trainer = _raw_trainer(model, tokenizer, train, out_dir, args)
    else:
        extra: dict[str, Any] = {"disable_tqdm": True}
        if args.variant == "trl-bf16":
            extra.update(bf16=True)  # TRL's SFTConfig default; autocast on a CPU
        sft_args = training.sft_config(out_dir, max_steps=args.steps, batch_size=args.batch_size,
                                       learning_rate=1e-4, seed=0, logging_steps=args.steps, **extra)
        trainer = training.build_sft_trainer(model, tokenizer, train, SYSTEM, sft_args, lora_r=8)
        if args.variant == "nslora":
            from nslora_plugin import NSLoRAConfig
            from nslora_plugin.integrations.trl import attach

            attach(trainer, NSLoRAConfig(system_prompt=SYSTEM, editor="constraint",
                                         check_every=args.steps * 10, probe_size=4,
                                         probe_max_new_tokens=8, output_dir=str(out_dir / "nslora"),
                                         answer_format=r"^Answer: (-?\d+)\s*$"), probe=probe)
    trainer.remove_callback(PrinterCallback)
    timer = Timer()
    trainer.add_callback(timer)  # last: NSLoRA's own on_step_end work falls inside the step
    trainer.train()
    steps = [b - a for a, b in zip(timer.marks, timer.marks[1:])][args.warmup:]
    return {"variant": args.variant, "step_seconds": steps, "median_step": statistics.median(steps),
            "bf16": bool(getattr(trainer.args, "bf16", False))}


def _raw_trainer(model: Any, tokenizer: Any, rows: list[dict[str, Any]], out_dir: Path,
                 args: argparse.Namespace) -> Any:
    """The reference: what a user writes with transformers + PEFT alone."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from nslora_plugin.apps.harness import sft as training
    from nslora_plugin.core.data import chat_rows

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
        if ids and ids[-1] != tokenizer.eos_token_id:  # as TRL's tokenization does
            ids = list(ids) + [tokenizer.eos_token_id]
        return {"input_ids": list(ids)[:256]}

    data = Dataset.from_list(chat_rows(rows, SYSTEM)).map(encode, remove_columns=["messages"])
    pad = tokenizer.pad_token_id

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, :len(f["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    peft_model = get_peft_model(model, training.lora_config(8))
    targs = TrainingArguments(output_dir=str(out_dir), max_steps=args.steps,
                              per_device_train_batch_size=args.batch_size, learning_rate=1e-4,
                              lr_scheduler_type="constant", logging_steps=args.steps, save_strategy="no",
                              report_to=[], seed=0, dataloader_num_workers=0, disable_tqdm=True,
                              remove_unused_columns=False, **training.cpu_training_overrides())
    return Trainer(model=peft_model, args=targs, train_dataset=data, data_collator=collate)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="repetitions per variant (interleaved)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the timing")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=max(os.cpu_count() or 1, 1))
    p.add_argument("--with-bf16", action="store_true",
                   help="also time TRL's CPU default (bf16 autocast); minutes per step without native bf16")
    p.add_argument("--cache", default=os.environ.get("NSLORA_CACHE", str(REPO / ".cache" / "nslora-test")))
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.add_argument("--worker", dest="variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.variant:
        print(json.dumps(worker(args)))
        return

    import tempfile

    from nslora_plugin.trainer.precision import cpu_has_native_bf16, cpu_model_name

    workdir = args.workdir or tempfile.mkdtemp(prefix="nslora-bench-step-")
    variants = VARIANTS + (("trl-bf16",) if args.with_bf16 else ())
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    print(f"CPU: {cpu_model_name()} ({os.cpu_count()} cores, native bf16: {cpu_has_native_bf16()}); "
          f"{args.reps} reps x {args.steps} steps (first {args.warmup} untimed), batch {args.batch_size}",
          flush=True)
    for rep in range(args.reps):
        for variant in variants:
            r = run_worker(__file__, variant, [
                "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                "--threads", str(args.threads), "--cache", args.cache, "--workdir", workdir])
            results[variant].append(r)
            print(f"rep {rep + 1} {variant:8s}: median step {r['median_step']:.3f} s "
                  f"(steps {', '.join(f'{s:.2f}' for s in r['step_seconds'])})", flush=True)

    med = {v: statistics.median(s for r in results[v] for s in r["step_seconds"]) for v in variants}
    summary = {"cpu": cpu_model_name(), "native_bf16": cpu_has_native_bf16(), "reps": args.reps,
               "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
               "threads": args.threads, "median_step_seconds": {v: round(m, 4) for v, m in med.items()},
               "ratio_trl_raw": round(med["trl"] / med["raw-hf"], 4),
               "ratio_nslora_trl": round(med["nslora"] / med["trl"], 4),
               "ratio_nslora_raw": round(med["nslora"] / med["raw-hf"], 4), "runs": results}
    if "trl-bf16" in med:
        summary["ratio_trl_bf16_raw"] = round(med["trl-bf16"] / med["raw-hf"], 4)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print()
    for v in variants:
        print(f"median step {v:8s} {med[v]:.3f} s")
    print(f"step-time ratio trl/raw-hf: {summary['ratio_trl_raw']:.2f}")
    print(f"step-time ratio nslora-trl/trl: {summary['ratio_nslora_trl']:.2f}")
    if "trl-bf16" in med:
        print(f"step-time ratio trl-bf16/raw-hf: {summary['ratio_trl_bf16_raw']:.2f}")
    print(f"step-time ratio nslora-trl/raw-hf: {summary['ratio_nslora_raw']:.2f}")


if __name__ == "__main__":
    main()
