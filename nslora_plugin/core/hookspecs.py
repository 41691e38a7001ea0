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

Data flows one way: trainer → monitor (`TrainingSignal`) → probe scoring (`nslora_score_probe`,
`nslora_probe_signals`) → classification (`nslora_classify_failure`) → routing (`nslora_route`,
then `nslora_after_route`) → editor (`nslora_propose_edit`, then `nslora_after_round`) or LoRA →
prompts as data (`nslora_augment_examples`) → artifacts (`nslora_on_decision`).

Hooks that need the run get `run`, a `nslora_plugin.core.run.RunView`: the step, config, probe
examples and reports, `run.editor` (can an editor edit now?), `record`/`record_fault`,
`generate`/`score`, and `run.stash`, where a plugin keeps its own state under its own
`StashKey`. A plugin whose state must survive a resume (and reach every rank) saves it with
`nslora_save_state` and reads it back in `nslora_load_state`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    from nslora_plugin.core.config import NSLoRAConfig
    from nslora_plugin.core.run import RunView
    from nslora_plugin.core.records import DecisionRecord, EditOutcome, EditProposal, EditorStatus, FailureLabel, ProbeExample, ProbeReport, ProbeResult, RouteDecision, TrainingSignal

PROJECT = "nslora"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def nslora_score_probe(example: "ProbeExample", completion: str,
                       config: "NSLoRAConfig") -> "dict[str, float] | None":
    """Score one probe completion.

    Return a mapping of reward component name → value in [0, 1] (for example
    ``{"correctness": 1.0}``), or None when this plugin has nothing to say about the example.
    All implementations are called; their mappings are merged, and on a name clash the value of
    the later-registered plugin wins (a third-party plugin overrides a built-in component). The example's reward is the mean of all
    components; it *passes* only when that mean is 1. Must be deterministic and side-effect free:
    the validation gate calls it on candidate prompts too.
    """


@hookspec
def nslora_probe_signals(example: "ProbeExample", completion: str,
                         config: "NSLoRAConfig") -> "dict[str, float] | None":
    """Diagnostics of one probe completion that are *not* reward components: they never change the
    reward or the gate, but classifiers read them (`ProbeResult.signals`). The built-in one is
    `answer_present` (the right answer appears anywhere in the reply, whatever its form).
    All implementations are called and merged like `nslora_score_probe`."""


@hookspec(firstresult=True)
def nslora_classify_failure(result: "ProbeResult", signal: "TrainingSignal",
                            config: "NSLoRAConfig",
                            run: "RunView") -> "FailureLabel | None":
    """Label one failing probe example as needing a weight update ("numerical") or a prompt update
    ("symbolic"). The first non-None answer is used. The label must carry `p_symbolic` (probability
    that the prompt is the right fix) and the features it was computed from, which are logged."""


@hookspec(firstresult=True)
def nslora_route(signal: "TrainingSignal", report: "ProbeReport",
                 labels: "Sequence[FailureLabel]", config: "NSLoRAConfig",
                 run: "RunView") -> "RouteDecision | None":
    """Decide, at one check, whether to keep training LoRA ("numerical") or run a symbolic round
    now ("symbolic"). The first non-None answer is used. The decision must carry a one-line
    `reason` and the scores it was based on; it is written to the decision log as is."""


@hookspec(firstresult=True)
def nslora_propose_edit(prompt: str, failures: "Sequence[ProbeResult]",
                        examples: "dict[str, ProbeExample]", report: "ProbeReport",
                        config: "NSLoRAConfig", tried: "tuple[str, ...]",
                        run: "RunView") -> "EditProposal | None":
    """Propose one new system prompt that should fix `failures` under `prompt`.

    The first non-None answer is used. The loop checks it against the validation gate; if it is
    rejected, the hook is called again with the editor's name added to `tried`, so an editor must
    return None when its own name is in `tried` (this is how fallbacks chain). Faults of an
    external LLM must not escape: log them through `run.record_fault` and return None.
    """


@hookspec
def nslora_after_route(decision: "RouteDecision", report: "ProbeReport", run: "RunView") -> None:
    """Called after every check's routing decision is logged, before its symbolic round (if any).
    A learning router updates itself here from the report of this check."""


@hookspec
def nslora_after_round(step: int, outcome: "EditOutcome | None", run: "RunView") -> None:
    """Called after every symbolic round with the gate's verdict on its last candidate (None when
    no editor proposed one). `outcome.accepted` tells whether the prompt changed. Routers count
    rounds, stalls and cool-downs from it."""


@hookspec
def nslora_editor_start(config: "NSLoRAConfig", run: "RunView") -> "EditorStatus | None":
    """Start an editor once, when the run starts or resumes: check its endpoint or model, and
    answer whether it can edit. The loop reports an editor that cannot (a `startup` fault naming
    the editor that stands in, if any) and stops the run when `on_editor_down="fail"`. All
    implementations are called; an editor not configured for this run returns None."""


@hookspec
def nslora_editor_status(config: "NSLoRAConfig", run: "RunView") -> "EditorStatus | None":
    """Whether this editor can edit now (asked before each symbolic round, through
    `run.editor`). A symbolic round runs when some editor is ready and none reports its run budget
    spent. All implementations are called; an editor not configured for this run returns None."""


@hookspec(firstresult=True)
def nslora_editor_usage(run: "RunView") -> "dict[str, Any] | None":
    """The editor LLM's usage so far (calls, tokens, seconds, budget), for the trainer's logs, the
    summary and `state.json`. The first non-None answer is used."""


@hookspec
def nslora_save_state(run: "RunView") -> "dict[str, Any] | None":
    """A plugin's own state for `state.json` and for the other ranks, as a JSON-able mapping
    under a key of its own (the built-in router uses "router"). All answers are merged."""


@hookspec
def nslora_load_state(state: "dict[str, Any]", run: "RunView") -> None:
    """Take back what `nslora_save_state` saved, on resume from a checkpoint and on every
    non-main rank after a check. `state` is the whole saved mapping; read only your own key."""


@hookspec
def nslora_augment_examples(prompt: str, report: "ProbeReport", before: "ProbeReport",
                            examples: "dict[str, ProbeExample]", config: "NSLoRAConfig",
                            run: "RunView") -> "list[dict[str, Any]] | None":
    """Contribute training rows after an accepted edit ("prompts as data").

    `report` is the probe evaluation under the newly accepted `prompt`, `before` the one under the
    previous prompt.
    Return rows in chat form ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``
    (the loop puts the current system prompt in front at batch time), or None. All
    implementations are called and their rows are concatenated, de-duplicated and saved.
    """


@hookspec
def nslora_after_train(run: "RunView", folder: "Path") -> None:
    """The run has ended and its final records are in `folder` (the run's artifacts folder):
    write what is derived from them (the built-in `nslora.report` writes report.html), upload,
    notify. Called once, on the main process only, after the final probe and summary. Must not
    raise (an exception is recorded as a fault and the run ends as it would have)."""


@hookspec
def nslora_on_decision(record: "DecisionRecord", run: "RunView") -> None:
    """React to a decision: a routing decision, an edit verdict, an editor fault, or the run's
    start and end. Called on the main process only; use it for logging, dashboards or alerts.
    Must not raise (an exception is logged and the run goes on)."""
