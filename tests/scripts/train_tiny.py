"""A tiny NSLoRA training run for subprocess tests (resume after SIGKILL, several processes).

    python train_tiny.py OUT TOKENIZER_DIR [--kill-at-step N] [--resume CKPT] [--max-steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers import TrainerCallback  # noqa: E402

from nslora_plugin import NSLoRAConfig  # noqa: E402
from nslora_plugin.core.data import make_word_problems  # noqa: E402
from nslora_plugin.core.hookspecs import hookimpl  # noqa: E402
from nslora_plugin.integrations.trl import attach  # noqa: E402
from tiny import ANSWER_FORMAT, FORMAT_INSTRUCTION, SYSTEM, load_tokenizer, sft_trainer  # noqa: E402


class FailingRouter:
    """A router plugin that raises at one check (rank 0 decides; the other ranks must not hang)."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl(tryfirst=True)
    def nslora_route(self, signal, report, labels, config, run):
        if run.step == self.step:
            raise RuntimeError(f"router failed on purpose at step {self.step}")


class KillAt(TrainerCallback):
    """SIGKILL this process at the end of a step: no cleanup, no atexit, like an OOM kill."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        import cpu_fsdp

        cpu_fsdp.install()
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("tokenizer")
    p.add_argument("--kill-at-step", type=int, default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--save-steps", type=int, default=3)
    p.add_argument("--fail-at-check", type=int, default=None)
    a = p.parse_args()
    tok = load_tokenizer(Path(a.tokenizer))
    rows = make_word_problems(70, seed=11)
    trainer = sft_trainer(tok, Path(a.out), rows[:64], max_steps=a.max_steps, save_steps=a.save_steps,
                          batch_size=2)
    cfg = NSLoRAConfig(system_prompt=SYSTEM, editor="constraint", check_every=2, probe_size=4,
                       probe_max_new_tokens=6, answer_format=ANSWER_FORMAT,
                       format_instruction=FORMAT_INSTRUCTION, nll_threshold=100.0,
                       gate_tie_break="accept", max_symbolic_rounds=1, monitor_window=2)
    plugins = [FailingRouter(a.fail_at_check)] if a.fail_at_check is not None else []
    cb = attach(trainer, cfg, probe=rows[64:], plugins=plugins)
    if a.kill_at_step is not None:
        trainer.add_callback(KillAt(a.kill_at_step))
    trainer.train(resume_from_checkpoint=a.resume)
    result = {"rank": int(os.environ.get("RANK", 0)), "prompt": cb.loop.prompt,
              "version": cb.loop.prompt_version, "steps": trainer.state.global_step,
              "collator": dict(cb.loop.batch_stats), "main": cb.loop.is_main,
              "sharding": cb.loop.ranks.sharding,
              "world_size": cb.loop.ranks.world_size,
              "rows_answered": cb.loop.rows_answered,
              "dtensor_params": sum(type(p).__name__ == "DTensor" for p in trainer.model.parameters())}
    print("NSLORA_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
