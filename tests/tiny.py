"""Helpers for tests: tiny real models built from a config, and word-problem data.

The tiny model shares the real SmolLM2 tokenizer (so chat templates, special tokens and span
matching are the real thing) but has two layers of width 64, so a training step takes
milliseconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nslora_plugin.core.hookspecs import hookimpl

SYSTEM = "You are a helpful assistant."
ANSWER_FORMAT = r"^Answer: (-?\d+)\s*$"
FORMAT_INSTRUCTION = "End your reply with a final line 'Answer: <number>'."


def edit_config(**extra: Any) -> Any:
    """An NSLoRA config whose checks edit at once: the constraint editor, every failure counted as
    a prompt's job (style_share_threshold=0), ties accepted; `extra` overrides any of it."""
    from nslora_plugin import NSLoRAConfig

    settings = dict(system_prompt=SYSTEM, editor="constraint", check_every=2, probe_size=4,
                    probe_max_new_tokens=6, answer_format=ANSWER_FORMAT,
                    format_instruction=FORMAT_INSTRUCTION, style_share_threshold=0.0,
                    gate_tie_break="accept")
    return NSLoRAConfig(**{**settings, **extra})


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def save_tiny_model(model_dir: Path, folder: Path) -> Path:
    """A 2-layer, width-64 model with the real SmolLM2 tokenizer, saved as a model folder."""
    tokenizer = load_tokenizer(model_dir)
    tiny_model(tokenizer).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def tiny_model(tokenizer: Any, seed: int = 0) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg)


def sft_trainer(tokenizer: Any, output_dir: Path, rows: list[dict], *, max_steps: int,
                save_steps: int = 1000, batch_size: int = 4, model: Any = None, **extra: Any) -> Any:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from nslora_plugin.core.data import chat_rows

    # fp32 on the CPU: TRL's default bf16=True is emulated (and ~20x slower) on CPUs without native
    # bf16. The real SFTTrainer, with its own fused LM head, is what these tests exercise.
    settings = dict(output_dir=str(output_dir), max_steps=max_steps,
                    per_device_train_batch_size=batch_size, learning_rate=1e-3, logging_steps=1,
                    save_steps=save_steps, report_to=[], gradient_checkpointing=False,
                    max_length=256, use_cpu=True, bf16=False, seed=0)
    settings.update(extra)
    args = SFTConfig(**settings)
    return SFTTrainer(model=model if model is not None else tiny_model(tokenizer), args=args,
                      train_dataset=Dataset.from_list(chat_rows(rows, SYSTEM)),
                      processing_class=tokenizer,
                      peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def capture_training_batches(trainer: Any, tokenizer: Any) -> list[tuple[int, str]]:
    """Decode the first sequence of every training forward, tagged with the step it ran in:
    this is what the weights actually train on."""
    seen: list[tuple[int, str]] = []

    def hook(module: Any, args: Any, kwargs: Any) -> None:
        if module.training:
            ids = kwargs.get("input_ids", args[0] if args else None)
            for row in ids:
                seen.append((trainer.state.global_step, tokenizer.decode(row)))

    trainer.model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def write_trl_workdir(root: Path, tokenizer: Any) -> Path:
    """What a TRL recipe run reads: a tiny model folder with the real tokenizer (`tiny/`), a
    dataset folder of `messages` rows (`data/train.jsonl`, 32 word problems under SYSTEM) and a
    probe file (`probe.jsonl`, 8 more)."""
    import json

    from nslora_plugin.core.data import chat_rows, make_word_problems

    tiny_model(tokenizer).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    rows = make_word_problems(40, seed=3)
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in chat_rows(rows[:32], SYSTEM)))
    (root / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
    return root


def run_from_base_folder(tokenizer: Any, root: Path, *, max_steps: int, save_steps: int,
                         check_every: int) -> tuple[Any, Any]:
    """A real NSLoRA run from a base model saved as a folder, as users have (so the adapter's
    `adapter_config.json` names it), whose first check accepts a constraint edit. Returns the
    trained (trainer, callback)."""
    from transformers import AutoModelForCausalLM

    from nslora_plugin import NSLoRAConfig
    from nslora_plugin.core.data import make_word_problems
    from nslora_plugin.integrations.trl import attach

    rows = make_word_problems(40, seed=3)
    tiny_model(tokenizer).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(str(root / "base"))
    trainer = sft_trainer(tokenizer, root / "run", rows[:32], max_steps=max_steps,
                          save_steps=save_steps, model=base)
    config = NSLoRAConfig(system_prompt=SYSTEM, editor="constraint", check_every=check_every,
                          probe_size=4, probe_max_new_tokens=8, answer_format=ANSWER_FORMAT,
                          format_instruction=FORMAT_INSTRUCTION, nll_threshold=100.0,
                          gate_tie_break="accept", max_symbolic_rounds=1, monitor_window=2)
    callback = attach(trainer, config, probe=rows[32:])
    trainer.train()
    return trainer, callback


def fill_disk(path: Path) -> None:
    """Fill the disk under `path` (a file of that name) to the last byte."""
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass


class DiskFiller:
    """An NSLoRA plugin that, at the route record of step `fill_at`, fills the disk under `mount`
    to the last byte and, at the route record of `free_at` (None: never), frees it again."""

    def __init__(self, mount: Path, fill_at: int, free_at: int | None = None) -> None:
        self.mount, self.fill_at, self.free_at = mount, fill_at, free_at
        self.filler = mount / "filler.bin"

    @hookimpl
    def nslora_on_decision(self, record: Any, run: Any) -> None:
        if record.kind != "route":
            return
        if record.step == self.fill_at:
            fill_disk(self.filler)
        elif record.step == self.free_at:
            self.filler.unlink(missing_ok=True)
