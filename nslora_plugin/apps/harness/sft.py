"""One place that builds the trainers NSLoRA's own harnesses run (demo, compare, benchmarks): fp32
on a CPU (see `trainer/precision.py` for why), TRL's defaults on an accelerator.

Heavy imports (torch, trl, peft, datasets) happen inside the functions.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from nslora_plugin.trainer.precision import runs_on_cpu

log = logging.getLogger("nslora")


def cpu_training_overrides() -> dict[str, Any]:
    """`SFTConfig` keyword arguments for NSLoRA's harnesses: fp32 on a CPU, the TRL defaults on an
    accelerator."""
    import torch

    if torch.cuda.is_available():
        return {}
    return {"use_cpu": True, "bf16": False, "fp16": False}


def sft_config(output_dir: str | Path, *, max_steps: int, batch_size: int, learning_rate: float,
               seed: int = 0, max_length: int = 256, logging_steps: int | None = None,
               save_steps: int | None = None, **extra: Any) -> Any:
    """The `SFTConfig` the demo, `nslora compare` and the benchmarks train with: constant learning
    rate, no gradient checkpointing (small models), no workers (edits must reach the collator),
    fp32 on a CPU. `extra` overrides any field."""
    from trl import SFTConfig

    settings: dict[str, Any] = dict(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=logging_steps or max(max_steps // 6, 1), report_to=[],
        max_length=max_length, seed=seed, dataloader_num_workers=0)
    # transformers 5.2x renamed gradient checkpointing to activation checkpointing (the old name
    # warns); older releases, as LLaMA-Factory pins, know only the old one
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    settings["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = False
    if save_steps:
        settings.update(save_steps=save_steps, save_total_limit=2)
    else:
        settings["save_strategy"] = "no"
    settings.update(cpu_training_overrides())
    settings.update(extra)
    return SFTConfig(**settings)


def lora_config(r: int) -> Any:
    """LoRA on every linear layer, alpha = 2r, no dropout (deterministic)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


@functools.lru_cache(maxsize=1)
def full_logits_sft_trainer_class() -> type:
    """`SFTTrainer` whose training loss comes from the model's full logits, as `Trainer` computes it.

    TRL >= 1.16 patches a fused, chunked LM head into the model (`trl/kernels/chunked_logprob.py`)
    so that GPUs never hold the `(batch, seq, vocab)` logits. Without Triton (every CPU) its tiles
    are folded by a dozen torch element-wise passes, every position is scored (padding included),
    and the backward recomputes each tile, which is slower on a CPU than the full logits
    (`tests/benchmarks/bench_step.py` measures both; figures in docs/timings.md). On a CPU the logits fit
    in memory, so NSLoRA's harnesses take the same loss the plain way; TRL's `entropy` and
    `mean_token_accuracy` log entries are not computed then. Users' own trainers are left alone.
    """
    from transformers import Trainer
    from trl import SFTTrainer

    class FullLogitsSFTTrainer(SFTTrainer):
        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return FullLogitsSFTTrainer


def build_sft_trainer(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], system_prompt: str | None,
                      args: Any, *, lora_r: int, quiet: bool = False, in_order: bool = False) -> Any:
    """`SFTTrainer` + LoRA on question/answer rows rendered as chats under `system_prompt`
    (on a CPU, the full-logits loss of `full_logits_sft_trainer_class`); `in_order`: the rows are
    read in the order given (a data schedule), never shuffled."""
    from datasets import Dataset
    from trl import SFTTrainer

    from nslora_plugin.core.data import chat_rows

    cls = full_logits_sft_trainer_class() if runs_on_cpu(args) else SFTTrainer
    trainer = cls(model=model, args=args,
                         train_dataset=Dataset.from_list(chat_rows(rows, system_prompt)),
                         processing_class=tokenizer, peft_config=lora_config(lora_r))
    if quiet:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    if in_order:
        read_in_order(trainer)
    return trainer


def read_in_order(trainer: Any) -> None:
    """Make `trainer` read its training rows in their order: a sequential sampler in place of the
    random one (TRL's `shuffle_dataset` is off by default, so the rows keep the order given)."""
    from torch.utils.data import SequentialSampler

    def sampler(dataset: Any = None) -> Any:
        return SequentialSampler(trainer.train_dataset if dataset is None else dataset)

    trainer._get_train_sampler = sampler


def load_fp32_model(model_path: str | Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)


def format_duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def step_progress(console: Any, every: int) -> Any:
    """A `TrainerCallback` that prints `step N/M · s/step · ETA` every `every` steps (and at the
    last), as plain lines: a log file shows progress as a terminal does (tqdm's bar does not)."""
    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        def __init__(self) -> None:
            self.t_start = 0.0
            self.t_last = 0.0
            self.step_last = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t_start = self.t_last = time.perf_counter()
            self.step_last = state.global_step

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step, total = state.global_step, state.max_steps
            if step % max(every, 1) and step != total:
                return
            now = time.perf_counter()
            per_step = (now - self.t_last) / max(step - self.step_last, 1)
            self.t_last, self.step_last = now, step
            console.print(f"step {step}/{total} · {per_step:.2f} s/step · elapsed "
                          f"{format_duration(now - self.t_start)} · ETA "
                          f"{format_duration(per_step * (total - step))}", markup=False, highlight=False)

    return StepProgress()
