"""NSLoRA for TRL (and any `transformers.Trainer`): one call on an existing trainer.

    from nslora_plugin.integrations.trl import attach
    trainer = SFTTrainer(model=..., args=..., train_dataset=..., peft_config=...)
    attach(trainer, {"probe_path": "probe.jsonl", "editor_base_url": "http://localhost:8000/v1"})
    trainer.train()

or, equivalently, `SFTTrainer(..., callbacks=[NSLoRACallback(config)])`. In a `TrlParser` script,
add `NSLoRAArguments` to the dataclass tuple and call `maybe_attach(trainer, nslora_args)`: it does
nothing unless `--nslora` was given (see `args.py`, and `nslora-trl sft` in `cli.py`).
"""

from __future__ import annotations

from typing import Any

from .args import NSLoRAArguments, maybe_attach

__all__ = ["attach", "NSLoRACallback", "save_artifacts", "NSLoRAArguments", "maybe_attach"]


def __getattr__(name: str) -> Any:
    # `attach`, `save_artifacts` and the callback live in the core (`nslora_plugin.trainer.callback`),
    # which imports transformers: loaded on first use so importing this module stays cheap.
    if name in ("attach", "save_artifacts", "NSLoRACallback"):
        from nslora_plugin.trainer import callback

        return getattr(callback, name)
    raise AttributeError(name)
