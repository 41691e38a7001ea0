"""The unified monitoring signal: windowed loss, its relative change `C1`, and gradient norm `C2`.

`C1 = (L_t - L_{t-1}) / L_{t-1}` where `L_t` is the mean loss of the last `window` optimizer steps
and `L_{t-1}` the mean of the `window` steps before; `C2` is the mean gradient norm over the last
window. Per-example signals (reference NLL, rewards) come from `probe.ProbeEvaluator`.

Losses are recorded per micro-batch by a forward hook (callbacks never see the loss) and folded
into one value per optimizer step, so gradient accumulation does not distort the window.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from nslora_plugin.core.config import NSLoRAConfig
from nslora_plugin.core.records import TrainingSignal


class SignalMonitor:
    def __init__(self, config: NSLoRAConfig) -> None:
        self.config = config
        self.window = config.monitor_window
        self.losses: deque[float] = deque(maxlen=2 * self.window)
        self.grad_norms: deque[float] = deque(maxlen=self.window)
        self._pending: list[float] = []

    # ---------------------------------------------------------------- recording
    def record_micro_loss(self, loss: float) -> None:
        if math.isfinite(loss):
            self._pending.append(loss)

    def record_grad_norm(self, norm: float) -> None:
        if math.isfinite(norm):
            self.grad_norms.append(norm)

    def end_step(self) -> None:
        """Close one optimizer step: its loss is the mean over its micro-batches."""
        if self._pending:
            self.losses.append(sum(self._pending) / len(self._pending))
            self._pending.clear()

    # ---------------------------------------------------------------- reading
    def c1(self) -> float | None:
        if len(self.losses) < 2 * self.window:
            return None
        values = list(self.losses)
        previous = sum(values[: self.window]) / self.window
        current = sum(values[self.window:]) / self.window
        return (current - previous) / previous if previous else None

    def c2(self) -> float | None:
        return sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else None

    def signal(self, step: int) -> TrainingSignal:
        """The signal at a check (the router counts saturated checks itself)."""
        c1, c2 = self.c1(), self.c2()
        loss_flat = c1 is not None and abs(c1) < self.config.loss_change_threshold
        grad_small = c2 is not None and c2 < self.config.grad_norm_threshold
        recent = list(self.losses)[-self.window:]
        window_loss = sum(recent) / len(recent) if recent else None
        return TrainingSignal(step=step, loss=window_loss, c1=c1, c2=c2,
                              loss_flat=loss_flat, grad_small=grad_small)

    # ---------------------------------------------------------------- resume
    def state(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.losses.extend(state.get("losses", []))
        self.grad_norms.extend(state.get("grad_norms", []))


def trainable_grad_norm(model: Any) -> float | None:
    """L2 norm of the gradients of trainable parameters (LoRA weights), read before the optimizer
    step. Cheap: only adapter parameters carry gradients."""
    import torch

    total = None
    for p in model.parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad.detach()
            sq = g.float().pow(2).sum()
            total = sq if total is None else total + sq
    if total is None:
        return None
    return float(torch.sqrt(total).item())
