"""NSLoRA for Axolotl: a plugin named in the YAML recipe.

    plugins:
      - nslora_plugin.integrations.axolotl.NSLoRAPlugin
    nslora: true
    nslora_probe_path: data/probe.jsonl

What each hook does (all of them return at once unless `nslora: true`):
- register (raw config, before validation): sets `dataloader_num_workers: 0` when it is unset —
  Axolotl would otherwise collate in a worker process, which never sees prompt edits.
- get_input_args: the `nslora` / `nslora_*` keys (`args.NSLoRAArgs`), validated by `NSLoRAConfig`.
- add_callbacks_post_trainer: builds `NSLoRACallback` for the trainer Axolotl just built and
  returns it; Axolotl adds it to the trainer.
- post_trainer_create: puts that callback FIRST in the trainer's callback list, so the `nslora/*`
  metrics it adds to each log reach `report_to`. An Axolotl without `add_callbacks_post_trainer`
  never called it: the callback is built and inserted here instead.
- get_collator_cls_and_kwargs is not used: the first collator class a plugin returns replaces the
  one Axolotl would pick (packing's batch-sampler collators, a model's own, ...), and NSLoRA wraps
  whichever that is. At train begin the callback wraps the train dataloader's collator: from then
  on the current system prompt is spliced into every batch and augmented rows join the mix.
- post_train (Axolotl calls it twice): makes sure `<output_dir>/nslora/` is complete and logs a
  one-line summary, once.

Nothing is registered as an `axolotl.plugins` entry point: the plugin runs only when a recipe
lists it. Importing this module without Axolotl installed works; instantiating the plugin then
raises an ImportError that says how to install it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .args import NSLoRAArgs, config_from_axolotl, nslora_enabled

__all__ = ["NSLoRAPlugin", "NSLoRAArgs", "INPUT_ARGS", "PLUGIN_PATH"]

# Axolotl's console shows INFO only for `axolotl.*` loggers, so the plugin logs under that name.
log = logging.getLogger("axolotl.integrations.nslora")

#: What a recipe lists under `plugins:`.
PLUGIN_PATH = "nslora_plugin.integrations.axolotl.NSLoRAPlugin"
#: What `get_input_args` returns (Axolotl imports it by dotted path).
INPUT_ARGS = "nslora_plugin.integrations.axolotl.args.NSLoRAArgs"

try:
    from axolotl.integrations.base import BasePlugin as _Base

    _AXOLOTL_ERROR: ImportError | None = None
except ImportError as _exc:  # the adapter is an optional extra
    _Base = object  # type: ignore[assignment,misc]
    _AXOLOTL_ERROR = _exc


class NSLoRAPlugin(_Base):  # type: ignore[misc,valid-type]
    """Axolotl plugin that runs the NSLoRA loop during LoRA / QLoRA training."""

    def __init__(self) -> None:
        if _AXOLOTL_ERROR is not None:
            raise ImportError(
                "NSLoRAPlugin needs Axolotl (pip install axolotl; see "
                ".ci/venvs/axolotl.sh for a tested set of versions): "
                f"{_AXOLOTL_ERROR}") from _AXOLOTL_ERROR
        super().__init__()
        self.callback: Any = None
        self._reported = False
        self._hooked = False  # add_callbacks_post_trainer built the callback for the next trainer

    # ---------------------------------------------------------------- config
    def get_input_args(self) -> str:
        return INPUT_ARGS

    def register(self, cfg: dict) -> None:
        if not nslora_enabled(cfg):
            return
        if cfg.get("dataloader_num_workers") is None:
            # Axolotl's default (one worker per GPU, prefetch 256) would collate batches in
            # another process, out of reach of prompt edits.
            cfg["dataloader_num_workers"] = 0
            log.info("NSLoRA: dataloader_num_workers set to 0 so prompt edits reach the batches")

    # ---------------------------------------------------------------- trainer
    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list[Any]:
        """NSLoRA's callback for the trainer Axolotl just built ([] when NSLoRA is off)."""
        config = config_from_axolotl(cfg)
        if config is None:
            return []
        self.callback = _new_callback(config, trainer)
        self._reported = False
        self._hooked = True
        return [self.callback]

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        config = config_from_axolotl(cfg)
        if config is None:
            return
        from nslora_plugin.trainer.callback import NSLoRACallback

        callbacks = trainer.callback_handler.callbacks
        via_hook = self._hooked and any(cb is self.callback for cb in callbacks)
        if not via_hook:  # an Axolotl that has no add_callbacks_post_trainer hook
            self.callback = _new_callback(config, trainer)
            self._reported = False
        # Idempotent: a second call (or a reused PluginManager) replaces, never duplicates.
        callbacks[:] = [cb for cb in callbacks if not isinstance(cb, NSLoRACallback)]
        callbacks.insert(0, self.callback)
        self._hooked = False
        log.info("NSLoRA: callback attached first, %s (check every %d steps, editor=%s, probe=%s)",
                 "added through add_callbacks_post_trainer" if via_hook else "in post_trainer_create",
                 config.check_every, config.editor, config.probe_path)

    def post_train(self, cfg: Any, model: Any) -> None:
        callback = self.callback
        if callback is None or callback.loop is None or not nslora_enabled(cfg):
            return
        loop = callback.loop
        if loop.is_main and cfg.get("output_dir"):
            loop.copy_artifacts(Path(cfg["output_dir"]))  # no-op when already there
        if self._reported:
            return
        self._reported = True
        summary = callback.summary or {}
        log.info("NSLoRA: done — prompt version %s, decisions %s, artifacts in %s",
                 summary.get("prompt_version", loop.prompt_version),
                 summary.get("decisions", loop.decision_counts), loop.artifacts_root)
        loop.say_where_the_record_is()  # the last line: records the run folder lacks, if any


def _new_callback(config: Any, trainer: Any) -> Any:
    from nslora_plugin.trainer.callback import NSLoRACallback

    tokenizer = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    world = int(getattr(getattr(trainer, "args", None), "world_size", 1) or 1)
    if world > 1:
        log.info("NSLoRA: %d processes — every rank probes its share of the rows, rank 0 "
                 "decides and calls the editor; every rank adopts its prompt and augmented "
                 "rows at the same step", world)
    return NSLoRACallback(config, tokenizer=tokenizer, console=_AxolotlConsole())


class _AxolotlConsole:
    """What the loop prints (`step 20: symbolic — ...`) goes to Axolotl's log, not to stdout."""

    def print(self, text: str, *args: Any, **kwargs: Any) -> None:
        log.info("%s", text)
