"""nslora-plugin: neurosymbolic LoRA for the fine-tuning frameworks you already use.

During LoRA/QLoRA training NSLoRA watches a unified signal (loss change `C1`, gradient norm `C2`,
per-example rewards and reference NLL on a probe set) and routes each weakness either to the
weights (keep training LoRA) or to the prompt (a TextGrad rewrite through an external LLM, checked
by a validation gate). Accepted prompts reach the training batches and become training data.

Importing this package imports no framework; `NSLoRACallback` and the adapters pull in
transformers when first used.
"""

from __future__ import annotations

from typing import Any

from nslora_plugin.core.artifacts import NSLoRAArtifacts, load_artifacts
from nslora_plugin.core.config import NSLoRAConfig, NSLoRAConfigError
from nslora_plugin.core.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["NSLoRAConfig", "NSLoRAConfigError", "NSLoRACallback", "attach", "load_artifacts",
           "NSLoRAArtifacts", "hookimpl", "load_for_inference", "generate", "__version__"]

#: Public names whose modules import transformers: loaded on first use.
_LAZY = {
    "NSLoRACallback": "nslora_plugin.trainer.callback",
    "attach": "nslora_plugin.trainer.callback",
    "load_for_inference": "nslora_plugin.apps.tools.inference",
    "generate": "nslora_plugin.apps.tools.inference",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nslora_plugin' has no attribute {name!r}")
