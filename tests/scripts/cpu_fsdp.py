"""Let accelerate's FSDP path run on CPU processes (gloo), standing in for GPUs in the tests.

accelerate only turns `distributed_type: FSDP` on for accelerator devices: on CPU processes its
state stays MULTI_CPU and the Trainer wraps the model in DDP. PyTorch's FSDP2 (`fully_shard`,
DTensor parameters, all-gather / reduce-scatter) does run over gloo, so for the tests this shim
promotes a CPU state that was launched with FSDP (`ACCELERATE_USE_FSDP=true`, which `accelerate
launch --use_fsdp` or an FSDP config file sets) to FSDP. Everything after that is accelerate's,
the Trainer's and PyTorch's own code. Import it before the Trainer is built.
"""

from __future__ import annotations

import os

from accelerate import state as _state
from accelerate.utils import DistributedType

_original_init = _state.AcceleratorState.__init__


def _init(self, *args, fsdp_plugin=None, **kwargs):  # type: ignore[no-untyped-def]
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if (fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


def install() -> None:
    _state.AcceleratorState.__init__ = _init  # type: ignore[method-assign]
