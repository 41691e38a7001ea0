"""The router against interventions: which update actually fixes each failure at a check.

At every check of an NSLoRA arm (`nslora compare`, the arms whose name starts with
"neurosymbolic"), after the router has labelled the failures and before its decision is carried
out, `InterventionStudy` branches from that very state — the same LoRA weights, optimizer state
and prompt — three ways, and scores every failing probe row in each branch:

- (a) **prompt**: the candidate prompt alone, no training;
- (b) **weights**: `k` LoRA steps (the trainer's own optimizer, loss and batches: the training
  rows under the prompt in force, with prompts-as-data rows mixed in as the real run mixes them),
  scored under the old prompt;
- (c) **both**: the weights of (b) scored under the candidate prompt.

Then everything is put back (weights, optimizer state, the monitor's pending losses, torch's
random state); the run goes on as if nothing happened, and the branch's batches are drawn with
their own seeded generator, never the run's.

A failure's true kind is the branch that fixes it (the row passes there): "symbolic" if the
prompt alone does and the weights alone do not, "numerical" for the reverse, "either" if both
alone do, "both" if only (c) does, "neither" if none does. The router's label is right when it
names the true kind or the truth is "either"; "both" and "neither" failures have no single-update
answer and are counted apart.

The candidate prompt: the first candidate the arm's own editor would offer at this check when
that editor is deterministic and free (the constraint statements; the demonstrations editor's
first seeded set), so (a) is the very prompt the gate would try. An LLM editor's candidate is not
drawn here (it would spend the arm's editor budget and change the run); the stand-in is the
prompt with the task's format instruction added — the careful manual fix — and the record says
so (`candidate_source`). Without either (the prompt already states the instruction), (a) and (c)
are not run, the truth is not known, and the check's failures are counted apart
(`failures_without_a_prompt_candidate`), outside the confusion matrix.

Each check costs `k` optimizer steps and three scorings of the failing rows.
"""

from __future__ import annotations

import copy
import random
import time
from typing import Any, Sequence

from nslora_plugin.core.hookspecs import hookimpl
from nslora_plugin.core.records import ProbeReport, ProbeResult, RouteDecision
from nslora_plugin.core.run import RunView

TRUTHS = ("symbolic", "numerical", "either", "both", "neither")
LABELS = ("numerical", "symbolic")


def true_kind(prompt_fixes: bool | None, weights_fix: bool, both_fix: bool | None) -> str:
    """The truth of one failure from the branches that fix it (None: branch not run)."""
    if prompt_fixes and weights_fix:
        return "either"
    if prompt_fixes:
        return "symbolic"
    if weights_fix:
        return "numerical"
    return "both" if both_fix else "neither"


class InterventionStudy:
    """A plugin for one NSLoRA arm: call `bind(trainer, callback)` once the trainer exists."""

    def __init__(self, steps: int, *, manual_instruction: str | None = None, seed: int = 0,
                 editor: Any = None, scoring_plugins: Sequence[Any] = (), in_order: bool = False) -> None:
        self.steps = steps
        self.manual_instruction = manual_instruction
        self.seed = seed
        #: a deterministic editor plugin whose first candidate is the prompt branch's (first choice)
        self.editor = editor
        #: reward plugins the run scores with besides the built-ins (a drift task's rewards)
        self.scoring_plugins = list(scoring_plugins)
        #: the trainer reads its rows in order (a data schedule): the weights branch trains on the
        #: batches the run trains on next, not on random rows
        self.in_order = in_order
        self.trainer: Any = None
        self.callback: Any = None
        self.checks: list[dict[str, Any]] = []

    def bind(self, trainer: Any, callback: Any) -> None:
        self.trainer, self.callback = trainer, callback

    # ---------------------------------------------------------------- the candidate
    def candidate(self, prompt: str, failures: Sequence[ProbeResult], run: RunView) -> tuple[str | None, str]:
        config = run.config
        if self.editor is not None:
            proposal = self.editor.nslora_propose_edit(prompt=prompt, failures=failures,
                                                       config=config, tried=(), run=run)
            name = getattr(self.editor, "name", type(self.editor).__name__)
            return (proposal.prompt, f"{name} editor (its first candidate)") if proposal is not None \
                else (None, "none")
        if config.editor == "constraint":
            from nslora_plugin.builtins.editors.constraint import ConstraintEditor

            proposal = ConstraintEditor().nslora_propose_edit(prompt=prompt, failures=failures,
                                                              config=config, tried=())
            if proposal is not None:
                return proposal.prompt, "constraint editor (its first candidate)"
        if config.editor == "demonstrations":
            from nslora_plugin.builtins.editors.demonstrations import DemonstrationsEditor

            proposal = DemonstrationsEditor().nslora_propose_edit(prompt=prompt, failures=failures,
                                                                  config=config, tried=(), run=run)
            if proposal is not None:
                return proposal.prompt, "demonstrations editor (its first candidate)"
        instruction = (self.manual_instruction or "").strip()
        if instruction and instruction not in (prompt or ""):
            return ("\n".join(p for p in (prompt, instruction) if p),
                    f"manual instruction (stand-in for the {config.editor} editor's candidate)")
        return None, "none"

    # ---------------------------------------------------------------- the branches
    @hookimpl
    def nslora_after_route(self, decision: RouteDecision, report: ProbeReport, run: RunView) -> None:
        if self.steps <= 0 or self.trainer is None or self.callback is None or not report.failures:
            return
        loop = self.callback.loop
        if loop is None or loop.collator is None:  # the check before the first step: no batches yet
            if decision.step == 0:
                self.checks.append({"step": 0, "skipped": "no training batches before the first "
                                                          "step; the branch starts at the next check"})
            return
        t0 = time.time()
        failures = list(report.failures)
        prompt = loop.prompt
        candidate, source = self.candidate(prompt, failures, run)
        labels = {lab.example_id: lab.label for lab in decision.labels}
        model = self.trainer.model
        examples = [run.examples[r.example_id] for r in failures]
        evaluator = _evaluator(run, examples, self.scoring_plugins)
        prompt_alone = evaluator.evaluate(model, candidate, step=decision.step, version=-1) \
            if candidate is not None else None
        with _restored(self.trainer, self.callback):
            self._train(loop, prompt, decision.step)
            weights_alone = evaluator.evaluate(model, prompt, step=decision.step, version=-1)
            both = evaluator.evaluate(model, candidate, step=decision.step, version=-1) \
                if candidate is not None else None
        passed = lambda rep: {r.example_id: r.passed for r in rep.results} if rep else {}  # noqa: E731
        a, b, c = passed(prompt_alone), passed(weights_alone), passed(both)
        rows = []
        for r in failures:
            eid = r.example_id
            truth = true_kind(a.get(eid) if candidate is not None else None, bool(b.get(eid)),
                              c.get(eid) if candidate is not None else None)
            rows.append({"example_id": eid, "label": labels.get(eid), "truth": truth,
                         "prompt_fixes": a.get(eid), "weights_fix": b.get(eid), "both_fix": c.get(eid)})
        self.checks.append({"step": decision.step, "action": decision.action, "k": self.steps,
                            "candidate_source": source, "candidate": candidate,
                            "prompt_tried": candidate is not None, "failures": rows,
                            "seconds": round(time.time() - t0, 2)})

    def _train(self, loop: Any, prompt: str | None, step: int) -> None:
        """`k` optimizer steps on batches the run's collator would build now: the rows of the
        run's next `k` batches when it reads them in order, else drawn by the branch's own
        generator."""
        import torch

        from nslora_plugin.core.collator import NSLoRACollator
        from nslora_plugin.core.prompt_state import PromptState

        trainer = self.trainer
        live = loop.collator
        state = PromptState(loop.prompt_state.initial)
        state.current = prompt
        collate = NSLoRACollator(live.base, live.tokenizer, state, augment_share=live.augment_share,
                                 seed=self.seed * 100_003 + step, max_length=live.max_length,
                                 reply_ok=live.reply_ok)
        collate.add_augmented(list(live.augmented), max(len(live.augmented), 1))
        dataset = trainer.train_dataset
        remove = getattr(trainer, "_remove_unused_columns", None)
        if callable(remove):
            dataset = remove(dataset, description="training")
        rng = random.Random(f"{self.seed}:{step}:interventions")
        batch_size = trainer.args.per_device_train_batch_size
        model = trainer.model
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        batches = len(dataset) // batch_size
        first = max(min(step, batches - self.steps), 0)
        for k in range(self.steps):
            idx = (list(range((first + k) * batch_size, (first + k + 1) * batch_size))
                   if self.in_order and first + k < batches
                   else [rng.randrange(len(dataset)) for _ in range(batch_size)])
            batch = collate([dataset[i] for i in idx])
            batch = trainer._prepare_inputs(batch)
            from transformers import Trainer

            loss = Trainer.compute_loss(trainer, model, batch)
            loss.backward()
            if trainer.args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, trainer.args.max_grad_norm)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

    # ---------------------------------------------------------------- the summary
    def summary(self) -> dict[str, Any]:
        return summarize(self.checks, self.steps)


def _evaluator(run: RunView, examples: Sequence[Any], plugins: Sequence[Any] = ()) -> Any:
    from nslora_plugin.core.probe import ProbeEvaluator
    from nslora_plugin.core.registry import make_plugin_manager

    return ProbeEvaluator(run.tokenizer, list(examples), run.config,
                          make_plugin_manager(run.config, plugins))


class _restored:
    """Put the weights, optimizer state, monitor's pending losses, torch's random state and the
    model's mode back as they were."""

    def __init__(self, trainer: Any, callback: Any) -> None:
        self.trainer, self.callback = trainer, callback

    def __enter__(self) -> None:
        import torch

        model = self.trainer.model
        self.training = model.training
        self.params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.optimizer = copy.deepcopy(self.trainer.optimizer.state_dict())
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.pending = len(getattr(self.callback, "_pending_losses", []))

    def __exit__(self, *exc: Any) -> None:
        import torch

        model = self.trainer.model
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self.params:
                    p.copy_(self.params[n])
        self.trainer.optimizer.load_state_dict(self.optimizer)
        self.trainer.optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        pending = getattr(self.callback, "_pending_losses", None)
        if pending is not None:
            del pending[self.pending:]  # the branch's losses never reach the monitor
        model.train(self.training)


def summarize(checks: Sequence[dict[str, Any]], steps: int) -> dict[str, Any]:
    """The router's confusion matrix against the interventions' truth, over every check."""
    confusion = {t: {lab: 0 for lab in LABELS} for t in TRUTHS}
    action = {t: {lab: 0 for lab in LABELS} for t in TRUTHS}
    n = right = decisive = untried = 0
    for check in checks:
        if not check.get("prompt_tried", True):  # no prompt branch: the truth is not known
            untried += len(check.get("failures", []))
            continue
        for row in check.get("failures", []):
            truth, label = row["truth"], row.get("label")
            n += 1
            if check.get("action") in LABELS:
                action[truth][check["action"]] += 1
            if label not in LABELS:
                continue
            confusion[truth][label] += 1
            if truth in ("symbolic", "numerical", "either"):
                decisive += 1
                right += truth in (label, "either")
    return {"k_steps": steps, "checks": sum(1 for c in checks if c.get("prompt_tried")),
            "failures": n, "single_update_failures": decisive,
            "failures_without_a_prompt_candidate": untried,
            "seconds": round(sum(c.get("seconds", 0.0) for c in checks), 1),
            "label_right": right, "label_accuracy_vs_interventions": round(right / decisive, 4) if decisive else None,
            "confusion_truth_by_label": confusion, "confusion_truth_by_action": action,
            "truth_counts": {t: sum(confusion[t].values()) for t in TRUTHS},
            "candidate_sources": sorted({c["candidate_source"] for c in checks if "candidate_source" in c}),
            "skipped": [c for c in checks if "skipped" in c]}
