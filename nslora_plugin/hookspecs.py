"""The hook specifications: the contract between the loop and its plugins.

The loop only ever calls these hooks; everything it does by default (rewards, the router, the
TextGrad and constraint editors, prompts-as-data) is itself a plugin registered through them, so a
third-party plugin can add to or replace any stage. Register one in your package's metadata::

    [project.entry-points.nslora]
    my_rewards = "my_package.nslora_rewards"

or in code with `attach(trainer, config, plugins=[obj])` (or `NSLoRACallback(..., plugins=[obj])`,
or the `plugins` config key with dotted paths). Hooks are always called with keyword
arguments; an implementation may accept any subset of them (pluggy passes only what it names).
Set `NSLORA_DISABLE_PLUGIN_AUTOLOAD=1` to skip entry-point discovery.

Data flows one way: trainer → monitor (`TrainingSignal`) → probe scoring (`nslora_score_probe`) →
classification (`nslora_classify_failure`) → routing (`nslora_route`) → editor
(`nslora_propose_edit`) or LoRA → prompts as data (`nslora_augment_examples`) → artifacts
(`nslora_on_decision`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import pluggy

if TYPE_CHECKING:
    from .config import NSLoRAConfig
    from .loop import NeurosymbolicLoop
    from .types import (DecisionRecord, EditProposal, FailureLabel, ProbeExample, ProbeReport,
                        ProbeResult, RouteDecision, TrainingSignal)

PROJECT = "nslora"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def nslora_score_probe(example: "ProbeExample", completion: str,
                       config: "NSLoRAConfig") -> "dict[str, float] | None":
    """Score one probe completion.

    Return a mapping of reward component name → value in [0, 1] (for example
    ``{"correctness": 1.0}``), or None when this plugin has nothing to say about the example.
    All implementations are called; their mappings are merged (a later-registered plugin runs
    first, so an earlier one wins on a name clash). The example's reward is the mean of all
    components; it *passes* only when that mean is 1. Must be deterministic and side-effect free:
    the validation gate calls it on candidate prompts too.
    """


@hookspec(firstresult=True)
def nslora_classify_failure(result: "ProbeResult", signal: "TrainingSignal",
                            config: "NSLoRAConfig",
                            loop: "NeurosymbolicLoop") -> "FailureLabel | None":
    """Label one failing probe example as needing a weight update ("factual") or a prompt update
    ("style"). The first non-None answer is used. The label must carry `p_symbolic` (probability
    that the prompt is the right fix) and the features it was computed from, which are logged."""


@hookspec(firstresult=True)
def nslora_route(signal: "TrainingSignal", report: "ProbeReport",
                 labels: "Sequence[FailureLabel]", config: "NSLoRAConfig",
                 loop: "NeurosymbolicLoop") -> "RouteDecision | None":
    """Decide, at one check, whether to keep training LoRA ("numerical") or run a symbolic round
    now ("symbolic"). The first non-None answer is used. The decision must carry a one-line
    `reason` and the scores it was based on; it is written to the decision log as is."""


@hookspec(firstresult=True)
def nslora_propose_edit(prompt: str, failures: "Sequence[ProbeResult]",
                        examples: "dict[str, ProbeExample]", report: "ProbeReport",
                        config: "NSLoRAConfig", tried: "tuple[str, ...]",
                        loop: "NeurosymbolicLoop") -> "EditProposal | None":
    """Propose one new system prompt that should fix `failures` under `prompt`.

    The first non-None answer is used. The loop checks it against the validation gate; if it is
    rejected, the hook is called again with the editor's name added to `tried`, so an editor must
    return None when its own name is in `tried` (this is how fallbacks chain). Faults of an
    external LLM must not escape: log them through `loop.record_fault` and return None.
    """


@hookspec
def nslora_augment_examples(prompt: str, report: "ProbeReport", before: "ProbeReport",
                            examples: "dict[str, ProbeExample]", config: "NSLoRAConfig",
                            loop: "NeurosymbolicLoop") -> "list[dict[str, Any]] | None":
    """Contribute training rows after an accepted edit ("prompts as data").

    `report` is the probe evaluation under the newly accepted `prompt`, `before` the one under the
    previous prompt.
    Return rows in chat form ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``
    (the loop puts the current system prompt in front at batch time), or None. All
    implementations are called and their rows are concatenated, de-duplicated and saved.
    """


@hookspec
def nslora_on_decision(record: "DecisionRecord", loop: "NeurosymbolicLoop") -> None:
    """React to a decision: a routing decision, an edit verdict, an editor fault, or the run's
    start and end. Called on the main process only; use it for logging, dashboards or alerts.
    Must not raise (an exception is logged and the run goes on)."""
