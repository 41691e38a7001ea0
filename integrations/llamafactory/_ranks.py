"""What the other ranks did, in the log (multi-GPU runs).

Under torchrun every rank probes its share of the rows, the world's process zero decides each
check and broadcasts the accepted prompt to the other ranks, which splice it into their own batches
(`nslora_plugin/core/ranks.py` has the protocol); only rank 0 writes artifacts,
so `nslora/state.json` counts rank 0's batches only. This callback logs, at the end of training,
each other rank's prompt version and collator counts — the evidence that the edit reached every
rank's batches. On a single process it does nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger("nslora")


class RankSummary(TrainerCallback):
    def __init__(self, nslora_callback: Any) -> None:
        self.nslora = nslora_callback

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loop = getattr(self.nslora, "loop", None)
        if loop is None or not loop.batch_stats or state.is_world_process_zero:
            return
        log.info("NSLoRA rank %s: prompt version %d, collator %s", args.process_index,
                 loop.prompt_version, loop.batch_stats)
