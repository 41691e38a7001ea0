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

from pathlib import Path
from typing import Any, Sequence

from nslora_plugin.config import NSLoRAConfig

from .args import NSLoRAArguments, maybe_attach

__all__ = ["attach", "NSLoRACallback", "save_artifacts", "NSLoRAArguments", "maybe_attach"]


def __getattr__(name: str) -> Any:
    if name == "NSLoRACallback":
        from nslora_plugin.callback import NSLoRACallback

        return NSLoRACallback
    raise AttributeError(name)


def attach(trainer: Any, config: NSLoRAConfig | dict | str | None = None, *, probe: Any = None,
           plugins: Sequence[Any] = (), console: Any = None) -> Any:
    """Add NSLoRA to an already-built trainer and return its callback.

    The callback is put first in the trainer's callback list so that the `nslora/*` metrics it
    adds to each log reach the `report_to` integrations. If `probe` is None and the config has no
    `probe_path`, the trainer's raw eval dataset is used when it still has text columns.
    """
    from nslora_plugin.callback import NSLoRACallback

    cfg = config if isinstance(config, NSLoRAConfig) else (
        NSLoRAConfig.from_yaml(config) if isinstance(config, (str, Path))
        else NSLoRAConfig.from_dict(config or {}))
    if probe is None and cfg.probe_path is None:
        probe = _raw_eval_rows(trainer)
    callback = NSLoRACallback(cfg, probe=probe, tokenizer=getattr(trainer, "processing_class", None),
                              plugins=plugins, console=console)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def save_artifacts(callback: Any, folder: str | Path) -> Path:
    """Copy the run's artifacts next to an adapter saved elsewhere (`trainer.save_model(folder)`)."""
    if callback.loop is None:
        raise RuntimeError("NSLoRA has not run yet: call trainer.train() first")
    return callback.loop.artifacts.copy_into(folder)


def _raw_eval_rows(trainer: Any) -> Any:
    data = getattr(trainer, "eval_dataset", None)
    if data is None or not hasattr(data, "column_names"):
        return None
    columns = set(data.column_names)
    if {"messages"} <= columns or {"question", "answer"} <= columns or {"prompt", "completion"} <= columns:
        return data
    return None
