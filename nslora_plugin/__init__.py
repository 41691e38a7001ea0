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

from .artifacts import NSLoRAArtifacts, load_artifacts
from .config import NSLoRAConfig, NSLoRAConfigError

__version__ = "0.1.0"
__all__ = ["NSLoRAConfig", "NSLoRAConfigError", "NSLoRACallback", "attach", "load_artifacts",
           "NSLoRAArtifacts", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "NSLoRACallback":
        from .callback import NSLoRACallback

        return NSLoRACallback
    if name == "attach":
        from .callback import attach

        return attach
    raise AttributeError(f"module 'nslora_plugin' has no attribute {name!r}")
