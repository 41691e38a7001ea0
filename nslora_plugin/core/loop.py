"""The neurosymbolic loop, independent of any training framework.

A framework adapter feeds it three events — `start(model)`, `after_step(step, model)` and
`finish(model)` — plus per-micro-batch losses and per-step gradient norms. At each check it runs
trainer → monitor → probe → router → (editor | LoRA) → artifacts, in that order and only that way.
Every stage is a plugin called through the hooks in `hookspecs.py`; plugins see the run only
through `self.view` (a `RunView`) and keep their state in `self.stash`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from nslora_plugin.core.artifacts import ArtifactStore
from nslora_plugin.core.config import NSLoRAConfig
from nslora_plugin.core.collator import NSLoRACollator, template_default_system_prompt
from nslora_plugin.core.data import fit_to_length
from nslora_plugin.core.monitor import SignalMonitor
from nslora_plugin.core.registry import make_plugin_manager
from nslora_plugin.core.probe import ProbeEvaluator
from nslora_plugin.core.prompt_state import PromptCandidate, PromptState
from nslora_plugin.core.row_prompts import RowPrompts, initial_prompt_from_rows
from nslora_plugin.core.answers import format_compliant
from nslora_plugin.core.run import EditorAvailability, RunView, Stash, editor_down_error, editor_down_message
from nslora_plugin.core.candidates import check_candidate
from nslora_plugin.core.util import install_log_redaction, redact, register_secret, url_secrets
from nslora_plugin.core.records import DecisionRecord, EditOutcome, EditProposal, ProbeExample, ProbeReport, ProbeResult, RouteDecision

log = logging.getLogger("nslora")


class NeurosymbolicLoop:
    def __init__(self, config: NSLoRAConfig, tokenizer: Any, probe: Sequence[ProbeExample], *,
                 output_dir: str | Path, plugins: Sequence[Any] = (), is_main_process: bool = True,
                 console: Any = None, pool: Sequence[ProbeExample] = (),
                 max_length: int | None = None, train_rows: RowPrompts | None = None) -> None:
        if not probe:
            raise ValueError("NSLoRA needs probe examples (set probe_path, pass probe=..., or give "
                             "the trainer an eval_dataset with messages or question/answer rows)")
        self.config = config
        register_secret(*url_secrets(config.editor_base_url))  # scrubbed from files and logs
        install_log_redaction()
        self.tokenizer = tokenizer
        self.is_main = is_main_process
        if max_length:  # rows longer than the trainer's max length are cut, with a warning each
            probe, pool = fit_to_length(probe, tokenizer, max_length), fit_to_length(pool, tokenizer, max_length)
        self.examples = {e.id: e for e in probe[:config.probe_size]}
        self.pool = {e.id: e for e in pool}  # rows prompts-as-data may train on (never probed)
        overlap = sorted(set(self.examples) & set(self.pool))
        if overlap:
            raise ValueError(f"NSLoRA: pool rows must not be probe rows (shared ids: {overlap[:5]}); "
                             "the gate must score rows no update has trained on")
        self.pm = make_plugin_manager(config, plugins)
        self.monitor = SignalMonitor(config)
        self.evaluator = ProbeEvaluator(tokenizer, list(self.examples.values()), config, self.pm)
        # what the training rows carry (`row_prompts.py`): the initial prompt and how many rows
        # an edit can reach; empty when the adapter could not read the rows
        self.train_rows: dict[str, Any] = {}
        if train_rows is not None:
            initial, self.train_rows = initial_prompt_from_rows(config.system_prompt, train_rows, tokenizer)
        else:
            initial = self._initial_prompt(config, tokenizer)
        self.prompt_state = PromptState(initial)
        check_row_system_messages(self.prompt_state.initial, self.examples.values(), pool, config)
        self.artifacts = ArtifactStore(output_dir, on_error=self._disk_fault)
        self.collator: NSLoRACollator | None = None
        self.stash = Stash()
        self.view = RunView(self)
        self.reports: list[ProbeReport] = []
        self.augmented: list[dict[str, Any]] = []
        self.faults: dict[str, int] = {}
        self.decision_counts = {"numerical": 0, "symbolic": 0, "accepted": 0, "rejected": 0}
        self.last_check_step = -1
        self._disk_failing = False
        self._warned_cut = False
        self._collator_state: dict[str, Any] = {}  # restored from a checkpoint, for the collator
        self.trained_batches: int | None = None  # set by the adapter after each optimizer step
        self._model: Any = None
        self._console = console
        self.started = time.time()

    # ---------------------------------------------------------------- setup
    @staticmethod
    def _initial_prompt(config: NSLoRAConfig, tokenizer: Any) -> str:
        """Without the training rows (a loop driven directly, rows that cannot be read ahead of
        training): `system_prompt`, else the chat template's default."""
        if config.system_prompt is not None:
            return config.system_prompt
        default = template_default_system_prompt(tokenizer)
        if default is None:
            raise ValueError(
                "NSLoRA needs an initial system prompt: set system_prompt in the NSLoRA config to "
                "the system message your training rows use (this chat template has no default one)")
        return default

    # ---------------------------------------------------------------- what an adapter reads
    @property
    def prompt(self) -> str:
        """The current system prompt."""
        return self.prompt_state.current

    @property
    def prompt_version(self) -> int:
        return self.prompt_state.version

    @property
    def prompt_history(self) -> list[PromptCandidate]:
        """Every prompt version, the initial one first (accepted and rejected candidates)."""
        return list(self.prompt_state.history)

    @property
    def ranks(self) -> Any:
        """The processes the probe is shared between (`ranks.Ranks`)."""
        return self.evaluator.ranks

    @property
    def rows_answered(self) -> int:
        """Probe rows this process has answered (its share on several ranks)."""
        return self.evaluator.rows_answered

    def generate(self, model: Any, system_prompt: str | None, questions: Sequence[str]) -> list[str]:
        """Greedy replies of `model` under `system_prompt`, with the probe's generation settings."""
        return self.evaluator.generate(model, system_prompt, list(questions))

    @property
    def artifacts_root(self) -> Path:
        return self.artifacts.root

    @property
    def batch_stats(self) -> dict[str, int]:
        """The collator's counts (batches, prompts swapped, augmented rows mixed in, ...)."""
        return dict(self.collator.stats) if self.collator else {}

    def metrics(self) -> dict[str, float]:
        """The `nslora/*` scalars for the trainer's `report_to` loggers."""
        out: dict[str, float] = {
            "nslora/prompt_version": self.prompt_state.version,
            "nslora/symbolic_rounds": self.decision_counts["symbolic"],
            "nslora/augmented_examples": len(self.augmented),
        }
        if self.reports:
            last = self.reports[-1]
            out["nslora/probe_reward"] = round(last.mean_reward, 4)
            for key in sorted({k for r in last.results for k in r.rewards}):  # accuracy, format, ...
                out[f"nslora/probe_{key}"] = round(last.mean(key), 4)
            out["nslora/probe_ref_nll"] = round(last.mean_nll, 4)
        out["nslora/edits_accepted"] = self.decision_counts["accepted"]
        out["nslora/edits_rejected"] = self.decision_counts["rejected"]
        usage = self.usage()
        if usage:
            out["nslora/editor_calls"] = usage.get("calls", 0)
            out["nslora/editor_tokens"] = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
        return out

    # ---------------------------------------------------------------- what an adapter tells it
    def use_ranks(self, ranks: Any) -> None:
        """The processes this run's probe is shared between (`ranks.Ranks`)."""
        self.evaluator.ranks = ranks

    def note_trained_batches(self, batches: int) -> None:
        """Batches trained on so far (after an optimizer step): a checkpoint's collator state
        resumes at the next one."""
        self.trained_batches = batches

    def write_versions(self, fresh: bool) -> None:
        """Record the package versions the run trains with; a fresh run (not a resume) also
        clears an earlier run's end-of-training files from the folder."""
        if not self.is_main:
            return
        from nslora_plugin.core.artifacts import package_versions

        self.artifacts.write_json("versions.json", package_versions())
        if fresh:
            for name in ("train_log.jsonl", "report.html"):
                try:
                    self.artifacts.path(name).unlink(missing_ok=True)
                except OSError:  # a read-only folder is reported by the writes, not here
                    pass

    def save_checkpoint(self, checkpoint: str | Path) -> Path:
        """Save the current state and copy the records into a trainer checkpoint (what the run
        folder could not take goes into the copy from memory)."""
        self.save()
        return self.artifacts.copy_into(checkpoint)

    def copy_artifacts(self, folder: str | Path) -> Path:
        """Copy the records into `folder` (an `output_dir`, an adapter saved elsewhere)."""
        return self.artifacts.copy_into(folder)

    def record_note(self) -> str | None:
        """None when the run folder holds every record; else what it could not take, and where
        the complete record is: the last copy (`copy_artifacts`: the trainer's output_dir at the
        end of a run) when everything reached it, else a new folder in the system's temporary
        directory, written from memory now."""
        if not self.is_main:
            return None
        self.artifacts.flush()  # a last try: the disk may have room again
        missing = self.artifacts.missing
        if not missing:
            return None
        root = self.artifacts.root
        last = self.artifacts.last_copy
        where: Path | None = None
        if last is not None and last[1] and last[0].resolve() != root.resolve():
            where = last[0]
        else:  # no copy took it: anywhere with room
            import tempfile

            try:
                rescue = Path(tempfile.mkdtemp(prefix="nslora-record-"))
            except OSError:
                rescue = None
            if rescue is not None:
                dest = self.artifacts.copy_into(rescue)
                where = dest if self.artifacts.last_copy == (dest, True) else None
        names = ", ".join(name if lines is None else f"{name} ({lines} line{'s' * (lines != 1)})"
                          for name, lines in missing.items())
        error = next((self.artifacts.errors[n] for n in missing if n in self.artifacts.errors), "")
        head = (f"could not write {names} into the run folder {str(root)!r}"
                + (f" ({_short(error)})" if error else ""))
        if where is not None:
            return f"{head}; the complete record is in {str(where)!r}"
        return (f"{head}, nor into any copy: those records are lost; the last checkpoint's "
                f"nslora/ folder holds the record up to its step")

    def say_where_the_record_is(self) -> None:
        """At the end of a run, after the end-of-run copy: if the run folder lacks records, say
        which and where the complete record is (the run's last line)."""
        note = self.record_note()
        if note:
            log.warning("NSLoRA %s", note)

    def close(self) -> None:
        """Release the run folder without finishing (a loop that was started but not run)."""
        self.artifacts.unlock()

    def after_train(self, log_history: Sequence[dict[str, Any]]) -> None:
        """After `finish`: keep the trainer's log and call `nslora_after_train` (the report)."""
        if not self.is_main:
            return
        self.artifacts.write_jsonl("train_log.jsonl", list(log_history))
        try:
            self.pm.hook.nslora_after_train(run=self.view, folder=self.artifacts.root)
        except Exception as exc:  # a listener must never break the end of the run
            self.record_fault("after_train", exc)

    # ---------------------------------------------------------------- editors (through hooks)
    def editor_availability(self) -> EditorAvailability:
        statuses = [s for s in self.pm.hook.nslora_editor_status(config=self.config, run=self.view)
                    if s is not None]
        return EditorAvailability.merge(statuses, self.config)

    def wrap_collator(self, base: Any, max_length: int | None = None) -> NSLoRACollator:
        fmt = self.config.answer_format
        reply_ok = None
        if fmt and self.config.prompt_swap == "compliant":
            def reply_ok(text: str) -> bool:
                return format_compliant(text, fmt)
        self.collator = NSLoRACollator(base, self.tokenizer, self.prompt_state,
                                       augment_share=self.config.augment_share, seed=self.config.seed,
                                       max_length=max_length, reply_ok=reply_ok)
        if self.augmented:
            self.collator.add_augmented(self.augmented, self.config.augment_max_examples)
        if self._collator_state:  # a resumed run mixes batches exactly as the uninterrupted one
            self.collator.load_state(self._collator_state)
        return self.collator

    def start(self, model: Any, *, resumed_step: int | None = None) -> None:
        """Check the editor endpoint, write the config, take the baseline probe (fresh runs) or
        record where a resumed run picks up."""
        self._model = model
        if not self.is_main:
            return
        self.artifacts.lock()
        if resumed_step is None:
            for name in ("decisions.jsonl", "probe_reports.jsonl"):  # a fresh run starts fresh logs
                self.artifacts.path(name).unlink(missing_ok=True)
        self.artifacts.write_json("config.json", self.config.to_dict())
        self.start_editors()
        if resumed_step is not None:
            self.record("resume", resumed_step, {"prompt": self.prompt_state.current,
                                                 "prompt_version": self.prompt_state.version,
                                                 "llm_editor_ready": self.editor_availability().llm_ready})
        else:
            if self.train_rows:
                self._say(f"initial system prompt from {self.train_rows['initial_prompt_from']}: "
                          f"{self.prompt_state.initial!r}, in "
                          f"{self.train_rows['rows_carrying_initial_prompt']} of the "
                          f"{self.train_rows['rows_read']} training rows read")
            report = self.evaluate(model, step=0)
            self.record("start", 0, {"prompt": self.prompt_state.current, "probe": report.summary(),
                                     "training_rows": dict(self.train_rows),
                                     "editor": self.config.editor,
                                     "llm_editor_ready": self.editor_availability().llm_ready})
            if self.config.check_at_start:
                self.check(0, model, report=report)
        self.save()

    def restore(self, checkpoint_artifacts: Path) -> int:
        """Resume from the artifacts a checkpoint carries: prompt and history, router and monitor
        state, usage, augmented rows; the run folder's logs are rolled back to that checkpoint so
        no decision taken after it (and lost with the killed process) is counted twice."""
        import shutil

        from nslora_plugin.core.artifacts import load_artifacts

        if self.is_main:
            self.artifacts.lock()
        arts = load_artifacts(checkpoint_artifacts)
        st = arts.state
        self.prompt_state.load_state({"initial": arts.initial_system_prompt, "current": arts.system_prompt,
                                      "version": arts.prompt_version, "history": arts.prompt_history})
        self.monitor.load_state(st.get("monitor", {}))
        self.decision_counts.update(st.get("decision_counts", {}))
        self.faults = dict(st.get("faults", {}))
        self.last_check_step = int(st.get("last_check_step", -1))
        self.augmented = list(arts.augmented_rows)
        self.pm.hook.nslora_load_state(state=dict(st), run=self.view)
        self._collator_state = dict(st.get("collator_state", {}))
        if self.collator is not None:
            self.collator.replace_augmented(self.augmented)
            self.collator.load_state(self._collator_state)
        if self.is_main and arts.root.resolve() != self.artifacts.root.resolve():
            for name in ("decisions.jsonl", "probe_reports.jsonl", "prompt_history.jsonl",
                         "prompt.json", "augmented.jsonl", "state.json"):
                src = arts.root / name
                if src.is_file():
                    shutil.copyfile(src, self.artifacts.path(name))
            if self.augmented:
                self.artifacts.write_augmented(self.augmented)
        return int(arts.state.get("last_check_step", 0))

    # ---------------------------------------------------------------- several processes
    def shared_state(self) -> dict[str, Any]:
        """What every rank must agree on after a check (sent from the main process)."""
        return {"prompt": self.prompt_state.state(), "augmented": self.augmented,
                "plugins": self.plugin_state(), "last_check_step": self.last_check_step}

    def adopt_shared_state(self, shared: dict[str, Any]) -> None:
        self.prompt_state.load_state(shared["prompt"])
        self.augmented = list(shared["augmented"])
        self.pm.hook.nslora_load_state(state=dict(shared["plugins"]), run=self.view)
        self.last_check_step = shared["last_check_step"]
        if self.collator is not None:
            self.collator.replace_augmented(self.augmented)

    def start_editors(self) -> None:
        """Each editor checks its own backend (endpoint, LiteLLM model, local model); one that
        cannot edit is reported, and stops the run when `on_editor_down="fail"`."""
        started = [s for s in self.pm.hook.nslora_editor_start(config=self.config, run=self.view)
                   if s is not None]
        down = [s for s in started if not s.ready and not s.budget_spent]
        standing_in = [s.editor for s in started if s.ready]
        for status in down:
            reason = redact(status.reason)
            if self.config.on_editor_down == "fail":
                raise editor_down_error(reason, self.config.editor_backend)
            self.record_fault("startup", editor_down_message(reason, standing_in[0] if standing_in
                                                             else None))

    # ---------------------------------------------------------------- per step
    def record_micro_loss(self, loss: float) -> None:
        self.monitor.record_micro_loss(loss)

    def record_grad_norm(self, norm: float | None) -> None:
        if norm is not None:
            self.monitor.record_grad_norm(norm)

    def check_due(self, step: int) -> bool:
        c = self.config
        return step >= max(c.warmup_steps, 1) and step % c.check_every == 0 and step != self.last_check_step

    def after_step(self, step: int, model: Any) -> RouteDecision | None:
        self.monitor.end_step()
        self._model = model
        if not self.is_main or not self.check_due(step):
            return None
        return self.check(step, model)

    # ---------------------------------------------------------------- one check
    def check(self, step: int, model: Any, report: ProbeReport | None = None) -> RouteDecision:
        self.last_check_step = step
        report = report or self.evaluate(model, step=step)
        signal = self.monitor.signal(step)
        labels = [self.pm.hook.nslora_classify_failure(result=r, signal=signal, config=self.config,
                                                        run=self.view) for r in report.failures]
        labels = [lab for lab in labels if lab is not None]
        decision = self.pm.hook.nslora_route(signal=signal, report=report, labels=labels,
                                             config=self.config, run=self.view)
        self.decision_counts[decision.action] += 1
        self.record("route", step, decision.to_dict())
        self.pm.hook.nslora_after_route(decision=decision, report=report, run=self.view)
        self._say(f"step {step}: {decision.action} — {decision.reason}")
        if decision.action == "symbolic":
            self.symbolic_round(step, model, report)
        self.save()
        return decision

    def symbolic_round(self, step: int, model: Any, report: ProbeReport) -> EditOutcome | None:
        tried: tuple[str, ...] = ()
        outcome: EditOutcome | None = None
        while True:
            prompt, version = self.prompt_state.snapshot()
            proposal = self.pm.hook.nslora_propose_edit(
                prompt=prompt, failures=report.failures, examples=self.examples, report=report,
                config=self.config, tried=tried, run=self.view)
            if proposal is None:
                break
            tried += (proposal.editor,)
            outcome = self.gate(step, model, report, proposal)
            if outcome.accepted:
                break
        self.pm.hook.nslora_after_round(step=step, outcome=outcome, run=self.view)
        if not tried:
            self.record_fault("editor", "no editor proposed a prompt for this round")
        return outcome

    def gate(self, step: int, model: Any, before: ProbeReport, proposal: EditProposal) -> EditOutcome:
        """Accept a candidate only if probe reward does not drop (new >= old + margin)."""
        current, version = self.prompt_state.snapshot()
        candidate, problem = self.sanitize(proposal.prompt)
        after: ProbeReport | None = None
        if problem is None and candidate == current:
            problem = "candidate is identical to the current prompt"
        if problem is None:
            after = self.evaluator.evaluate(model, candidate, step=step, version=version + 1)
            accepted, reason = gate_verdict(before, after, self.config)
        else:
            accepted, reason = False, f"rejected: {problem}"
        entry = PromptCandidate(version=None, step=step, editor=proposal.editor,
                                prompt=candidate if candidate is not None else proposal.prompt[:self.config.max_prompt_chars],
                                accepted=accepted, reward_before=before.mean_reward,
                                reward_after=after.mean_reward if after else None, reason=reason,
                                components_after={k: after.mean(k) for k in _keys(after)} if after else {})
        self.prompt_state.record(entry)
        outcome = EditOutcome(step=step, editor=proposal.editor, candidate=entry.prompt,
                              accepted=accepted, reward_before=before.mean_reward,
                              reward_after=after.mean_reward if after else None, reason=reason,
                              prompt_version=self.prompt_state.version,
                              components_after=entry.components_after,
                              meta={"rationale": proposal.rationale, **proposal.meta})
        self.decision_counts["accepted" if accepted else "rejected"] += 1
        if accepted and after is not None:
            self.reports.append(after)  # before the record: listeners read the new report
            self.artifacts.append_jsonl("probe_reports.jsonl", {**after.summary(), "candidate": True})
        self.record("edit", step, outcome.to_dict())
        self._say(f"step {step}: {proposal.editor} candidate {reason}")
        if accepted and after is not None:
            self._augment(candidate, after, before)
        return outcome

    def sanitize(self, text: str) -> tuple[str | None, str | None]:
        """Clean a candidate; return (prompt, None) or (None, why it cannot be used). The one
        check every editor's candidates meet: `core.candidates.check_candidate`."""
        cleaned, problem = check_candidate(text, self.config.max_prompt_chars, self.tokenizer)
        return cleaned, (problem.reason if problem is not None else None)

    def _augment(self, prompt: str, after: ProbeReport, before: ProbeReport) -> None:
        rows: list[dict[str, Any]] = []
        for part in self.pm.hook.nslora_augment_examples(
                prompt=prompt, report=after, before=before, examples=self.examples,
                config=self.config, run=self.view):
            rows.extend(part or [])
        seen = {json.dumps(r["messages"], sort_keys=True) for r in self.augmented}
        new = []
        for row in rows:
            key = json.dumps(row["messages"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                new.append(row)
        self.augmented.extend(new)
        del self.augmented[:-self.config.augment_max_examples]
        if self.collator is not None:
            self.collator.add_augmented(new, self.config.augment_max_examples)
        self.artifacts.write_augmented(self.augmented)

    # ---------------------------------------------------------------- evaluation helpers
    def evaluate(self, model: Any, step: int) -> ProbeReport:
        prompt, version = self.prompt_state.snapshot()
        report = self.evaluator.evaluate(model, prompt, step=step, version=version)
        self.reports.append(report)
        self.artifacts.append_jsonl("probe_reports.jsonl", report.summary())
        cut = sum(r.cut for r in report.results)
        if cut and self.is_main and not self._warned_cut:
            self._warned_cut = True
            auto = " (auto: from the longest probe reference)" if not self.config.probe_max_new_tokens else ""
            log.warning("NSLoRA: %d of %d probe replies at step %d reached the cap of %d new "
                        "tokens%s and were cut; if right replies need more, raise "
                        "probe_max_new_tokens (probe_reports.jsonl counts them as cut_replies)",
                        cut, len(report.results), step, self.evaluator.max_new_tokens, auto)
        return report

    def generate_one(self, system_prompt: str | None, question: str) -> str:
        return self.evaluator.generate(self._model, system_prompt, [question])[0]

    def score(self, example: ProbeExample, completion: str) -> ProbeResult:
        return self.evaluator.score(example, completion, 0.0)

    def artifact_path(self, name: str) -> Path:
        return self.artifacts.path(name)

    # ---------------------------------------------------------------- records
    def record(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        rec = DecisionRecord(kind=kind, step=step, payload=payload)  # type: ignore[arg-type]
        self.artifacts.append_jsonl("decisions.jsonl", {"kind": kind, "step": step,
                                                        "time": time.time(), **payload})
        try:
            self.pm.hook.nslora_on_decision(record=rec, run=self.view)
        except Exception as exc:  # a listener must not stop training
            log.warning("NSLoRA: an nslora_on_decision plugin failed: %s", _short(exc))

    def record_fault(self, where: str, error: Any) -> None:
        """Log an editor fault once per kind (with a count), and write it to the decision log."""
        message = _short(error) if isinstance(error, BaseException) else str(error)
        kind = f"{where}:{type(error).__name__ if isinstance(error, BaseException) else 'message'}"
        self.faults[kind] = self.faults.get(kind, 0) + 1
        if self.faults[kind] == 1:
            log.warning("NSLoRA editor fault (%s): %s — training goes on with the last accepted prompt",
                        where, message)
        self.record("fault", self.last_check_step if self.last_check_step >= 0 else 0,
                    {"where": where, "message": message, "count": self.faults[kind]})

    def _say(self, text: str) -> None:
        if self._console is not None:
            self._console.print(f"nslora: {text}", markup=False, highlight=False)
        log.info("NSLoRA %s", text)

    # ---------------------------------------------------------------- persistence
    def usage(self) -> dict[str, Any]:
        return self.pm.hook.nslora_editor_usage(run=self.view) or {}

    def plugin_state(self) -> dict[str, Any]:
        """What the plugins save for a resume and for the other ranks (`nslora_save_state`)."""
        merged: dict[str, Any] = {}
        for part in reversed(self.pm.hook.nslora_save_state(run=self.view)):
            merged.update(part or {})
        return merged

    def state(self) -> dict[str, Any]:
        return {**self.plugin_state(), "monitor": self.monitor.state(),
                "decision_counts": self.decision_counts, "faults": self.faults,
                "last_check_step": self.last_check_step, "usage": self.usage(),
                "collator": dict(self.collator.stats) if self.collator else {},
                "collator_state": self.collator.state(self.trained_batches) if self.collator else {}}

    def save(self) -> None:
        """Write the prompt, its history and the state, and whatever is still pending (log lines,
        whole files a full disk refused); what still does not fit stays in memory for the next
        save and for every copy (`save_checkpoint`, `copy_artifacts`)."""
        if not self.is_main:
            return
        ps = self.prompt_state
        history = [c.to_dict() for c in ps.history]
        self.artifacts.write_prompt(ps.current, ps.version, ps.initial, history)
        self.artifacts.write_json("state.json", self.state())
        self.artifacts.flush()
        if self._disk_failing and not self.artifacts.missing:
            self._disk_failing = False
            log.warning("NSLoRA: the run folder %s can be written again; every pending record is "
                        "in place", self.artifacts.root)

    def _disk_fault(self, name: str, exc: BaseException) -> None:
        """A write in the run folder failed: count it, say it once per kind, keep training (the
        next save retries). Not a decision record: that would be one more write to the same disk."""
        kind = f"disk:{type(exc).__name__}"
        self.faults[kind] = self.faults.get(kind, 0) + 1
        self._disk_failing = True
        if self.faults[kind] == 1:
            log.warning("NSLoRA could not write %s (%s); training goes on and NSLoRA writes it "
                        "again at the next check or save", name, _short(exc))

    def prompt_reach(self) -> dict[str, Any]:
        """How many training rows carried the prompt: what the rows held at train start (read by
        the adapter, `row_prompts.py`; every edit replaces the initial prompt in those rows) and
        what the collator put into the batches under the final prompt."""
        out: dict[str, Any] = dict(self.train_rows)
        stats = self.collator.stats if self.collator else {}
        if stats:
            out["examples_collated"] = stats.get("examples", 0)
            if stats.get("current_version") == self.prompt_state.version:
                out["examples_with_final_prompt"] = stats.get("with_current", 0)
        out["final_prompt_version"] = self.prompt_state.version
        return out

    def reach_line(self) -> str | None:
        """The summary's `training_rows` in words (None when the rows were not read)."""
        reach = self.prompt_reach()
        if "rows_carrying_initial_prompt" not in reach:
            return None
        rows = (f"{reach['rows_carrying_initial_prompt']} of the {reach['rows_read']} training rows"
                + (f" read (of {reach['rows']})" if reach["rows_read"] < reach["rows"] else ""))
        version = reach["final_prompt_version"]
        if version:
            line = f"the final prompt (version {version}) replaced the initial one in {rows}"
        else:
            line = f"no edit accepted: the initial prompt stayed as it is in {rows}"
        if "examples_with_final_prompt" in reach:
            line += (f"; {reach['examples_with_final_prompt']} examples collated "
                     f"{'since it took effect ' if version else ''}carried it "
                     f"({reach['examples_collated']} collated in the run)")
        return line

    def finish(self, model: Any, step: int) -> dict[str, Any]:
        """Final probe under the final prompt, summary, and everything saved."""
        if not self.is_main:
            return {}
        before = self.reports[0] if self.reports else None
        last = self.reports[-1] if self.reports else None
        if last is not None and last.step == step and last.prompt_version == self.prompt_state.version:
            after = last  # a check at the last step already scored these weights under this prompt
        else:
            after = self.evaluate(model, step=step)
        summary = {
            "steps": step,
            "probe_before": before.summary() if before else None,
            "probe_after": after.summary(),
            "decisions": dict(self.decision_counts),
            "system_prompt_before": self.prompt_state.initial,
            "system_prompt_after": self.prompt_state.current,
            "prompt_version": self.prompt_state.version,
            "augmented_examples": len(self.augmented),
            "editor_usage": self.usage(),
            "faults": dict(self.faults),
            "batches": dict(self.collator.stats) if self.collator else {},
            "training_rows": self.prompt_reach(),
            "artifacts": str(self.artifacts.root),
            "wall_seconds": round(time.time() - self.started, 1),
        }
        self.record("end", step, {"summary": summary})
        self.artifacts.write_json("summary.json", summary)
        reach = self.reach_line()
        if reach:
            self._say(reach)
        self.save()
        self.artifacts.unlock()
        return summary


def cadence_problem(config: NSLoRAConfig, max_steps: int | None) -> str | None:
    """Why no check can run in a run of `max_steps` optimizer steps (checks run at the multiples
    of `check_every` from `warmup_steps` on), naming the settings and what to set; None when at
    least one check is due, or when the number of steps is not known."""
    if not max_steps or max_steps <= 0:
        return None
    every, warmup = config.check_every, config.warmup_steps
    first = -(-max(warmup, 1) // every) * every  # the first multiple of check_every >= warmup
    if first <= max_steps:
        return None
    if every > max_steps:
        why = f"check_every={every} is more than the run's {max_steps} optimizer steps"
        fix = f"set check_every to at most {max_steps} (e.g. check_every={max(max_steps // 3, 1)})"
    else:
        why = (f"with warmup_steps={warmup} and check_every={every} the first check would be at "
               f"step {first}, after the run's {max_steps} optimizer steps")
        fix = (f"set warmup_steps below {max_steps}, or a check_every that divides a step up to "
               f"{max_steps}")
    what = ("only the check before the first step runs (check_at_start=true)" if config.check_at_start
            else "NSLoRA probes before and after training only and never routes or edits")
    return (f"{why} (max_steps={max_steps}), so no check runs during training: {what}; {fix}, "
            "or train for more steps")


def check_row_system_messages(prompt: str, probe: Any, pool: Any, config: NSLoRAConfig) -> None:
    """Refuse probe / pool rows that carry a system message other than the run's prompt: every
    row is probed (and trained on, as prompts-as-data) under the run's prompt, so that message
    would be dropped without a word and the scores would not be the ones the row asks for."""
    for examples, kind, setting in ((probe, "probe", "probe_path"), (pool, "pool", "pool_path")):
        for ex in examples:
            if ex.system is None or ex.system.strip() == prompt.strip():
                continue
            source = getattr(config, setting)
            where = f" of {setting}={source!r}" if source else ""
            raise ValueError(
                f"NSLoRA: {kind} row {ex.id}{where} carries its own system message "
                f"({_clip(ex.system)!r}), which differs from the run's system prompt "
                f"({_clip(prompt)!r}). NSLoRA probes every row under the run's prompt, so that "
                "message would be ignored: remove the system message from the row (or make it the "
                "run's prompt), or set system_prompt to it if every row shares it.")


def _clip(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def gate_verdict(before: ProbeReport, after: ProbeReport, config: NSLoRAConfig) -> tuple[bool, str]:
    """The validation gate: reward must not drop; an exact tie is broken by `gate_tie_break`."""
    gain = after.mean_reward - before.mean_reward
    text = f"probe reward {before.mean_reward:.3f} -> {after.mean_reward:.3f}"
    if abs(gain) > 1e-9 or config.acceptance_margin > 0:
        ok = gain >= config.acceptance_margin - 1e-9
        return ok, f"{text} ({'accepted' if ok else 'rejected'}: needs >= {config.acceptance_margin:+.3f})"
    if config.gate_tie_break == "nll":
        ok = after.mean_nll < before.mean_nll
        return ok, (f"{text}, tie broken by reference NLL {before.mean_nll:.3f} -> {after.mean_nll:.3f} "
                    f"({'accepted' if ok else 'rejected'})")
    ok = config.gate_tie_break == "accept"
    return ok, f"{text}, tie ({'accepted' if ok else 'rejected'} by gate_tie_break={config.gate_tie_break})"


def _keys(report: ProbeReport | None) -> list[str]:
    return sorted({k for r in report.results for k in r.rewards}) if report else []


def _short(exc: BaseException | str, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
    text = " ".join(text.split())
    return redact(text[:limit])
