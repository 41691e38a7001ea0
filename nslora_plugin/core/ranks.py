"""Several processes: every rank probes its share of the rows, rank 0 decides, all follow.

Why every rank takes part: with sharded parameters (FSDP2, DeepSpeed ZeRO-3) a forward pass is a
collective — each layer's weights are all-gathered from every rank — so rank 0 cannot generate on
its own (it would wait forever for the others). Under DDP every rank holds the full weights, and
splitting the probe rows across ranks makes a probe about N times cheaper.

The protocol, one check at a time (a check is the baseline probe at the start, a due check, the
final probe at the end):

- rank 0 (the world's process zero, `is_world_process_zero`) runs the check as a single process
  would: probe, router, editor, gate. Each time it needs the model — a probe, a gate's candidate
  probe, a plugin's `run.generate` — it broadcasts a request, and every rank (rank 0 too) answers
  its contiguous share of the rows (`accelerate`'s `split_between_processes`); the answers are
  gathered (`gather_object`) in row order.
- every other rank serves those requests (`ProbeEvaluator.serve`) until rank 0 broadcasts "done"
  with what all must agree on (prompt, augmented rows, plugin state), which each rank adopts at
  the same step; or "abort" when rank 0's check raised, so no rank waits forever.

The editor LLM is called from rank 0 only, and only rank 0 writes artifacts. With sharded
parameters every rank must run the same number of forward passes: shares are padded to equal
size (the padding rows' answers are dropped), generation runs with `synced_gpus=True`, and the
reference NLL takes one plain forward per batch.

Heavy imports (torch, accelerate) happen inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger("nslora")

#: The opt-in for DeepSpeed ZeRO-3 until a device run has passed (see `sharding_problem`).
ZERO3_OPT_IN = "NSLORA_ALLOW_ZERO3"


class RankAbort(RuntimeError):
    """Raised on the other ranks when rank 0's check failed (rank 0 raises the original error)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the world, and how the model's parameters are laid out."""

    world_size: int = 1
    rank: int = 0
    #: "fsdp2", "fsdp1", "zero3", or None (each rank holds the full parameters: DDP, one process)
    sharding: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        return self.sharding is not None

    @classmethod
    def detect(cls, model: Any = None) -> "Ranks":
        """The running world (torch.distributed, when initialized) and the model's sharding."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(world_size=dist.get_world_size(), rank=dist.get_rank(),
                   sharding=model_sharding(model) if model is not None else None)

    # ---------------------------------------------------------------- collectives
    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (the others pass None)."""
        if not self.several:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share(self, count: int) -> list[int]:
        """The row indices this rank answers: a contiguous share; padded to the same length on
        every rank when the parameters are sharded (every rank must run as many forwards)."""
        if not self.several:
            return list(range(count))
        from accelerate import PartialState

        with PartialState().split_between_processes(list(range(count)),
                                                    apply_padding=self.sharded) as mine:
            return list(mine)

    def gather(self, items: Sequence[Any]) -> list[Any]:
        """Every rank's `items`, concatenated in rank order, on every rank."""
        if not self.several:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))


def model_sharding(model: Any) -> str | None:
    """How `model`'s parameters are split across ranks: "fsdp2" (`fully_shard`, DTensor
    parameters), "fsdp1" (`FullyShardedDataParallel`), "zero3" (DeepSpeed ZeRO-3), or None."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    if isinstance(model, FullyShardedDataParallel):
        return "fsdp1"
    modules = model.modules() if hasattr(model, "modules") else ()
    for module in modules:
        if isinstance(module, FSDPModule):
            return "fsdp2"
        if isinstance(module, FullyShardedDataParallel):
            return "fsdp1"
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return None
    return "zero3" if is_deepspeed_zero3_enabled() else None


def sharding_problem(ranks: Ranks) -> str | None:
    """Why NSLoRA refuses this sharding, or None. FSDP2 is tested (two CPU processes over gloo).
    FSDP1 is not supported (the probe would need `summon_full_params` on every rank; use FSDP2).
    ZeRO-3 has a written code path (DeepSpeed's own per-layer gathering, `synced_gpus`) that has
    not passed a device run yet, so it needs the opt-in `NSLORA_ALLOW_ZERO3=1`."""
    if ranks.sharding == "fsdp1":
        return ("FSDP version 1 is not supported: the probe generates on every rank, which NSLoRA "
                "does through FSDP2's own per-layer all-gathers; set fsdp_version: 2 (accelerate "
                "config `fsdp_version: 2`, Axolotl `fsdp_version: 2`)")
    if ranks.sharding == "zero3" and os.environ.get(ZERO3_OPT_IN, "") != "1":
        return ("DeepSpeed ZeRO-3 is not verified yet: the sharded probe's ZeRO-3 path has not passed "
                "a GPU run. Use FSDP2 (recipes/accelerate/fsdp2.yaml), ZeRO-1/2, or set "
                f"{ZERO3_OPT_IN}=1 to try it")
    return None


@contextlib.contextmanager
def generation_ready(model: Any, ranks: Ranks) -> Iterator[dict[str, Any]]:
    """Make a sharded `model` able to generate on every rank at once; yields extra `generate`
    kwargs (nothing changes when each rank holds the full weights).

    - gradient checkpointing off while generating (it is a training-time recomputation, and
      transformers turns the KV cache off under it), back on afterwards;
    - FSDP2: the root module's own parameters (embeddings, final norm, LM head) are all-gathered
      for the duration — `generate` calls the inner model, so the root's forward hook, which would
      gather them, never runs; the decoder layers gather themselves layer by layer;
    - sharded parameters: `synced_gpus=True`, so a rank whose rows are finished keeps running
      forwards until every rank is done.
    """
    if not (ranks.sharded and ranks.several):  # full weights on this rank: nothing to arrange
        yield {}
        return
    checkpointing = _checkpointing(model)
    if checkpointing:
        _call_first(model, "activation_checkpointing_disable", "gradient_checkpointing_disable")
    unsharded = None
    if ranks.sharding == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            model.unshard()
            unsharded = model
    try:
        yield {"synced_gpus": True}
    finally:
        if unsharded is not None:
            unsharded.reshard()
        if checkpointing:
            _call_first(model, "activation_checkpointing_enable", "gradient_checkpointing_enable")


def _checkpointing(model: Any) -> bool:
    """Whether activation (gradient) checkpointing is on, by the name this transformers has:
    `is_activation_checkpointing` since 5.2x, `is_gradient_checkpointing` before (reading the old
    name on a new release raises a deprecation warning)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or hasattr(model, name):
            return bool(getattr(model, name))
    return False


def _call_first(model: Any, *names: str) -> None:
    for name in names:
        method = getattr(model, name, None)
        if method is not None:
            method()
            return


def lead(ranks: Ranks, work: Callable[[], Any], shared: Callable[[], Any]) -> Any:
    """On rank 0: run `work` (which may send probe requests), then broadcast "done" with
    `shared()`; if `work` raises, broadcast "abort" first so the other ranks stop too."""
    try:
        result = work()
    except BaseException as exc:
        if ranks.several:
            ranks.broadcast(("abort", f"{type(exc).__name__}: {exc}"[:500]))
        raise
    if ranks.several:
        ranks.broadcast(("done", shared()))
    return result


def run_together(evaluator: Any, model: Any, work: Callable[[], Any], shared: Callable[[], Any],
                 adopt: Callable[[Any], None]) -> Any:
    """Run `work` (a start, a due check, the end of training) on every rank of
    `evaluator.ranks` together: rank 0 runs it with its evaluator leading (its probes become
    requests every rank answers), the others run it too (the loop does nothing there but keep
    its monitor window), then serve rank 0's requests and `adopt` what it shares when done."""
    ranks = evaluator.ranks
    if not ranks.several:
        return work()
    if ranks.is_main:
        evaluator.leading = True
        try:
            return lead(ranks, work, shared)
        finally:
            evaluator.leading = False
    result = work()
    adopt(evaluator.serve(model))
    return result
