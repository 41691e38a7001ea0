"""`--task drift`: a task whose weaknesses appear during training (`nslora compare`, `nslora sweep`).

Facts about fictional countries (`tasks.make_entities`) under a spec of format constraints, every
one an evaluation rule (`student.rules.EVAL_RULES`: its instruction phrasings, `transform` and
`check`). Four mechanisms, each with its knobs (`DriftSettings`):

- **forgetting**: the system prompt states a format from step 0 (`format_rule`, default
  `answer_line`); a share `forget_dose` of the training replies of every phase come without it;
- **side effects**: the prompt states a length cap from step 0 (`length_rule`, default
  `sixty_chars`); from `verbose_onset` on, a share `verbose_ratio` of the training replies are
  verbose, over the cap;
- **a changed spec**: `new_rule` (default `quick_take_prefix`) enters the reward at `spec_onset`;
  no training reply shows it and no prompt states it until an editor does;
- **new facts**: `cohorts` = (first, later) numbers of entities; the later cohort's facts join the
  training rows at `facts_onset`.

`context_share` (default 0) states that share of the facts (seeded) in every question about them,
in every split ("Note: the capital of X is Y."), as the synthetic task's knob does: those rows
need no memorised fact, so a short run can still score the constraints, which is what the schedule
arms differ in; the other facts must be learned.

`spec_at(step)` is the constraints active at a step; the final spec is `spec_at(max_steps)`.

Data schedule. Each training row carries the steps it may be trained at (`from_step`,
`until_step`: one phase). `scheduled_rows` lays out one batch per optimizer step from the rows
eligible at that step (seeded by the training seed, cycling through a phase's rows), and the
trainer reads that list in order (`sft.build_sft_trainer(in_order=True)`, a sequential sampler:
TRL's SFTTrainer keeps row order when `shuffle_dataset` is off), so the update that starts at
global step t trains on the phase in force at t. A row order needs no callback that swaps
datasets mid-run, resumes and interventions read the same rows, and every arm (plain LoRA too)
trains on the same batches at the same steps.

Splits and scoring. Training rows use the first `train_paraphrases` question templates, probe
rows the next, held-out rows the last; held-out facts are none of the probe's or pool's and share
no answer with them. Probe, pool and held-out references are written under the final spec. A probe
taken at step s is scored under `spec_at(s)` (`DriftRewards`): `correctness` (the answer line
names the fact), `format` (every active constraint but the length cap) and `length`. Held-out
rows are scored once, under the final spec: a row passes when the fact is right and every final
constraint holds (the primary metric).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from nslora_plugin.apps.harness.tasks import (ATTRIBUTES, FACTS_SYSTEM_PROMPT, KIND_RULE, N_PARAPHRASES,
                                              Kind, Task, fact_present, fact_stated,
                                              make_entities)
from nslora_plugin.apps.student.rules import EVAL, FormatRule, Plain, get_rule
from nslora_plugin.core.answers import answers_match, extract_final_answer, phrase_in_text
from nslora_plugin.core.hookspecs import hookimpl

__all__ = ["DriftRewards", "DriftSettings", "DriftTask", "ComplianceRecorder", "Onset",
           "add_drift_arguments", "compliance_curve_callback", "load_drift_task", "make_drift_task",
           "plot_compliance", "settings_from_args"]

NAME = "drift"
#: order in which rule transforms compose a reply (a length cap rewrites the text, so it is first)
KIND_ORDER = ("length", "json", "bullets", "casing", "wrapper", "prefix", "units", "marker")
_VERBOSE = ("Old records kept in {e} say the same, and every guide to {e} repeats it at length.",
            "Historians of {e} agree on this point, as do the schoolbooks used all across {e}.",
            "Anyone who has studied {e} for a while will tell you exactly this, in some detail.")


class Onset(NamedTuple):
    """When a mechanism starts: `kind` "spec" (the reward changes) or "data" (the rows change)."""

    mechanism: str
    step: int
    kind: str
    what: str


@dataclass(frozen=True)
class DriftSettings:
    """The generator's knobs (see the module docstring); None onsets take their defaults."""

    max_steps: int = 60
    cohorts: tuple[int, int] = (8, 4)
    facts_onset: int | None = None      # default: max_steps // 3
    forget_dose: float = 0.5
    verbose_ratio: float = 0.5
    verbose_onset: int | None = None    # default: facts_onset
    spec_onset: int | None = None       # default: 2 * max_steps // 3
    format_rule: str = "answer_line"
    length_rule: str | None = "sixty_chars"
    new_rule: str | None = "quick_take_prefix"
    train_paraphrases: int = 2
    probe_size: int = 16
    held_out_size: int | None = None
    pool_size: int = 0
    attributes: tuple[str, ...] = tuple(ATTRIBUTES)
    context_share: float = 0.0

    def resolved(self) -> "DriftSettings":
        """The settings with every default onset filled in, checked."""
        facts = self.max_steps // 3 if self.facts_onset is None else self.facts_onset
        out = dataclasses.replace(
            self, facts_onset=facts,
            verbose_onset=facts if self.verbose_onset is None else self.verbose_onset,
            spec_onset=2 * self.max_steps // 3 if self.spec_onset is None else self.spec_onset,
            length_rule=self.length_rule or None, new_rule=self.new_rule or None)
        out.check()
        return out

    def check(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if len(self.cohorts) != 2 or self.cohorts[0] < 1 or self.cohorts[1] < 0:
            raise ValueError(f"cohorts must be (first >= 1, later >= 0) entities, got {self.cohorts}")
        for name in ("forget_dose", "verbose_ratio", "context_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        for name in ("facts_onset", "verbose_onset", "spec_onset"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be a step >= 0, got {getattr(self, name)}")
        if not 1 <= self.train_paraphrases <= N_PARAPHRASES - 2:
            raise ValueError(f"train_paraphrases must be between 1 and {N_PARAPHRASES - 2}")
        unknown = [a for a in self.attributes if a not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"unknown attributes {unknown}; choose from {sorted(ATTRIBUTES)}")
        names = [n for n in (self.format_rule, self.length_rule, self.new_rule) if n]
        if len(set(names)) != len(names):
            raise ValueError(f"format, length and new rules must differ, got {names}")
        for role, name in (("format_rule", self.format_rule), ("length_rule", self.length_rule),
                           ("new_rule", self.new_rule)):
            if name is None:
                continue
            rule = get_rule(name)
            if rule.family != EVAL:
                raise ValueError(f"{role} {name!r} is a warm-up rule; the drift task draws every "
                                 "constraint from the evaluation family (EVAL_RULES)")
            if role == "format_rule" and not rule.answer_format:
                raise ValueError(f"format_rule {name!r} does not place the answer where it can be "
                                 "read back; choose a marker, an inline wrapper or a unit rule")
            if role == "length_rule" and rule.kind != "length":
                raise ValueError(f"length_rule {name!r} is not a length rule")


@dataclass
class DriftTask(Task):
    """A `Task` with a spec that changes over steps and a data schedule (module docstring)."""

    settings: DriftSettings = field(default_factory=DriftSettings)
    seed: int = 0

    # ---------------------------------------------------------------- the spec
    @property
    def rule_onsets(self) -> dict[str, int]:
        """Constraint → the step it enters the spec."""
        s = self.settings
        out = {s.format_rule: 0}
        if s.length_rule:
            out[s.length_rule] = 0
        if s.new_rule:
            out[s.new_rule] = int(s.spec_onset or 0)
        return out

    def spec_at(self, step: int) -> tuple[str, ...]:
        """The constraints active at `step`."""
        return tuple(name for name, onset in self.rule_onsets.items() if onset <= step)

    @property
    def final_spec(self) -> tuple[str, ...]:
        return self.spec_at(self.settings.max_steps)

    def onsets(self) -> list[Onset]:
        """Every mechanism that is on, with the step it starts (only those within the run)."""
        s = self.settings
        out = []
        if s.forget_dose > 0:
            out.append(Onset("forgetting", 0, "data", f"{s.forget_dose:g} of training replies "
                             f"without {s.format_rule}"))
        if s.cohorts[1] > 0 and (s.facts_onset or 0) < s.max_steps:
            out.append(Onset("new_facts", int(s.facts_onset or 0), "data",
                             f"{s.cohorts[1]} more entities' facts"))
        if s.length_rule and s.verbose_ratio > 0 and (s.verbose_onset or 0) < s.max_steps:
            out.append(Onset("side_effects", int(s.verbose_onset or 0), "data",
                             f"{s.verbose_ratio:g} of training replies over {s.length_rule}"))
        if s.new_rule and (s.spec_onset or 0) <= s.max_steps:
            out.append(Onset("changed_spec", int(s.spec_onset or 0), "spec", s.new_rule))
        return sorted(out, key=lambda o: o.step)

    def prompt_for(self, spec: Sequence[str]) -> str:
        """The persona and each constraint of `spec` in its first phrasing."""
        return "\n".join([FACTS_SYSTEM_PROMPT, *(get_rule(n).instruction(0) for n in spec)])

    def final_prompt(self) -> str:
        """The careful manual fix for the final spec (`lora_instruction_final`)."""
        return self.prompt_for(self.final_spec)

    # ---------------------------------------------------------------- scoring
    def reward(self, completion: str, answer: str | None, step: int) -> dict[str, float]:
        """Reward components under `spec_at(step)`: correctness, format, length."""
        rules = [get_rule(n) for n in self.spec_at(step)]
        out: dict[str, float] = {}
        if answer is not None:
            out["correctness"] = float(answers_match(extract_final_answer(completion, self.answer_pattern),
                                                     answer))
        form = [r for r in rules if r.kind != "length"]
        caps = [r for r in rules if r.kind == "length"]
        if form:
            out["format"] = float(all(r.check(completion) for r in form))
        if caps:
            out["length"] = float(all(r.check(completion) for r in caps))
        return out

    def failure_kind(self, answer: str | None, completion: str) -> Kind | None:
        """The task's rule under the final spec: None (passes), "numerical" (the fact is missing
        or the answer line names another), "symbolic" (the fact is there, a constraint is not)."""
        if answer is None:
            return None
        named = extract_final_answer(completion, self.answer_pattern) \
            if get_rule(self.settings.format_rule).check(completion) else None
        if all(get_rule(n).check(completion) for n in self.final_spec):
            return None if answers_match(named, answer) else "numerical"
        if named is not None and not answers_match(named, answer):
            return "numerical"
        return "symbolic" if fact_present(answer, completion) else "numerical"

    def scoring_plugins(self) -> list[Any]:
        return [DriftRewards(self, step=self.settings.max_steps)]

    def compliance(self, completions: Sequence[str], answers: Sequence[str | None]) -> dict[str, Any]:
        """Share of replies meeting each final constraint, and stating the fact."""
        n = max(len(completions), 1)
        return {"compliance": {name: round(sum(get_rule(name).check(c) for c in completions) / n, 4)
                               for name in self.final_spec},
                "fact": round(sum(bool(a) and phrase_in_text(a, c)
                                  for c, a in zip(completions, answers)) / n, 4)}

    # ---------------------------------------------------------------- the scripted editor's text
    def statements(self, prompt: str, failing: Sequence[str], step: int) -> tuple[str, dict[str, str]] | None:
        """The prompt with each constraint of `spec_at(step)` stated: an unstated one in its first
        phrasing, a stated one that a failing reply breaks once more in a phrasing the prompt does
        not have yet. None when there is nothing to add."""
        lines: list[str] = []
        why: dict[str, str] = {}
        for name in self.spec_at(step):
            rule = get_rule(name)
            fresh = [p for p in rule.phrasings if p not in prompt]
            if len(fresh) == len(rule.phrasings):
                lines.append(fresh[0])
                why[name] = "stated"
                continue
            broken = sum(not rule.check(c) for c in failing)
            if broken and fresh:
                lines.append(fresh[0])
                why[name] = f"restated ({broken}/{len(failing)} failing replies break it)"
        if not lines:
            return None
        base = (prompt or "").rstrip()
        return "\n".join([base, *lines]) if base else "\n".join(lines), why

    # ---------------------------------------------------------------- the data schedule
    def phase_starts(self) -> list[int]:
        """The steps at which the training rows change (0 first)."""
        s = self.settings
        starts = {0}
        if s.cohorts[1] > 0:
            starts.add(int(s.facts_onset or 0))
        if s.verbose_ratio > 0 and s.length_rule:
            starts.add(int(s.verbose_onset or 0))
        return sorted(x for x in starts if x < s.max_steps) or [0]

    def training_rows(self, rows: Sequence[dict[str, Any]], *, max_steps: int, batch_size: int,
                      seed: int) -> tuple[list[dict[str, Any]], bool]:
        return scheduled_rows(rows, max_steps=max_steps, batch_size=batch_size, seed=seed), True

    def rows_at(self, step: int) -> list[dict[str, Any]]:
        """The training rows eligible at `step`."""
        return [r for r in self.train if eligible(r, step)]


def eligible(row: dict[str, Any], step: int) -> bool:
    """May `row` be trained in the update that starts at `step`? Rows without a phase always."""
    until = row.get("until_step")
    return row.get("from_step", 0) <= step and (until is None or step < until)


def scheduled_rows(rows: Sequence[dict[str, Any]], *, max_steps: int, batch_size: int,
                   seed: int) -> list[dict[str, Any]]:
    """`max_steps * batch_size` rows: the batch of the update that starts at step t is rows
    `[t*B, (t+1)*B)`, drawn from the rows eligible at t. Within a set of eligible rows the order
    is a seeded shuffle, reshuffled after each pass (an epoch within the phase)."""
    rng = random.Random(f"nslora-drift-order:{seed}")
    out: list[dict[str, Any]] = []
    queues: dict[tuple[int, ...], list[int]] = {}
    for t in range(max_steps):
        members = tuple(i for i, r in enumerate(rows) if eligible(r, t))
        if not members:
            raise ValueError(f"no training row is eligible at step {t}")
        queue = queues.setdefault(members, [])
        for _ in range(batch_size):
            if not queue:
                queue.extend(members)
                rng.shuffle(queue)
            out.append(dict(rows[queue.pop()]))
    return out


# ------------------------------------------------------------------ the generator
def _plain(question: str, value: str, sentence: str, text: str) -> Plain:
    short = f"{value}."
    return Plain("lookup", question, value, text, short, sentence, (short,))


def compose(rules: Sequence[FormatRule], plain: Plain) -> str:
    """A reply to `plain` obeying every rule in `rules`: their transforms applied in `KIND_ORDER`."""
    text = plain.text
    for rule in sorted(rules, key=lambda r: KIND_ORDER.index(r.kind)):
        text = rule.apply(dataclasses.replace(plain, text=text))
    return text


def make_drift_task(settings: DriftSettings | None = None, *, seed: int = 0) -> DriftTask:
    """The drift task of `settings`, deterministic from `seed` (the generator seed)."""
    s = (settings or DriftSettings()).resolved()
    n1, n2 = s.cohorts
    entities = make_entities(n1 + n2, seed)
    cohort_of = {e["entity"]: 1 if i < n1 else 2 for i, e in enumerate(entities)}
    facts = [(e, a) for e in entities for a in s.attributes]
    probe_t, held_t = s.train_paraphrases, N_PARAPHRASES - 1
    given = {(facts[i][0]["entity"], facts[i][1])
             for i in random.Random(f"nslora-drift:{seed}:context").sample(
                 range(len(facts)), round(s.context_share * len(facts)))}
    fmt = get_rule(s.format_rule)
    cap = get_rule(s.length_rule) if s.length_rule else None
    final = [get_rule(n) for n in (s.format_rule, s.length_rule, s.new_rule) if n]
    task = DriftTask(name=NAME, train=[], probe=[], held_out=[], settings=s, seed=seed,
                     answer_format=fmt.answer_format or "", answer_pattern=fmt.answer_format or "",
                     format_instruction=fmt.instruction(0), fact_match="contains")
    task.system_prompt = task.prompt_for(task.spec_at(0))

    def base(e: dict[str, str], attr: str, t: int) -> tuple[str, str, str]:
        questions, reply = ATTRIBUTES[attr]
        sentence = reply.format(e=e["entity"], v=e[attr])
        question = questions[t].format(e=e["entity"])
        if (e["entity"], attr) in given:
            question = fact_stated(sentence, question)
        return question, e[attr], sentence

    def reference(e: dict[str, str], attr: str, t: int, split: str) -> dict[str, Any]:
        question, value, sentence = base(e, attr, t)
        answer = compose(final, _plain(question, value, sentence, f"{value}."))
        row_id = f"{split}-{e['entity'].lower()}-{attr}-p{t}"
        broken = [r.name for r in final if not r.check(answer)]
        if broken:
            raise ValueError(f"the final spec cannot be met together: the reference of {row_id} "
                             f"({answer!r}) breaks {broken}; choose rules that compose")
        return {"id": row_id, "question": question, "answer": answer, "final_answer": value,
                "entity": e["entity"], "attribute": attr, "paraphrase": t,
                "cohort": cohort_of[e["entity"]], "fact_in_question": (e["entity"], attr) in given,
                "kind_rule": KIND_RULE + " (under the final spec)"}

    starts = task.phase_starts()
    for p, start in enumerate(starts):
        until = starts[p + 1] if p + 1 < len(starts) else None
        scope = [(e, a) for e, a in facts
                 if cohort_of[e["entity"]] == 1 or start >= (s.facts_onset or 0)]
        keys = [(e, a, t) for e, a in scope for t in range(s.train_paraphrases)]
        rng = random.Random(f"nslora-drift:{seed}:phase{p}")
        forgot = set(rng.sample(range(len(keys)), round(s.forget_dose * len(keys))))
        verbose = set(rng.sample(range(len(keys)), round(s.verbose_ratio * len(keys)))) \
            if cap is not None and start >= (s.verbose_onset or 0) else set()
        for i, (e, a, t) in enumerate(keys):
            question, value, sentence = base(e, a, t)
            wordy = i in verbose
            text = f"{sentence} {rng.choice(_VERBOSE).format(e=e['entity'])}" if wordy else f"{value}."
            obeys = [r for r in ((None if i in forgot else fmt), (None if wordy else cap)) if r is not None]
            answer = compose(obeys, _plain(question, value, sentence, text))
            row_id = f"train-ph{p}-{e['entity'].lower()}-{a}-p{t}"
            if not all(r.check(answer) for r in obeys) or (i in forgot and fmt.check(answer)) \
                    or (wordy and cap is not None and cap.check(answer)):
                raise ValueError(f"training row {row_id} ({answer!r}) does not show its mechanism")
            task.train.append({"id": row_id, "question": question, "answer": answer,
                               "final_answer": value, "entity": e["entity"], "attribute": a,
                               "paraphrase": t, "cohort": cohort_of[e["entity"]], "phase": p,
                               "fact_in_question": (e["entity"], a) in given,
                               "from_step": start, "until_step": until,
                               "has_format": i not in forgot, "verbose": wordy})

    rng = random.Random(f"nslora-drift:{seed}:splits")
    probe_facts = rng.sample(facts, min(s.probe_size, len(facts)))
    others = [f for f in facts if f not in probe_facts]
    pool_facts = rng.sample(others, min(s.pool_size, len(others)))
    task.probe = [reference(e, a, probe_t, "probe") for e, a in probe_facts]
    task.pool = [reference(e, a, probe_t, "pool") for e, a in pool_facts]
    quotable = " \n".join(f"{r['question']} \n{r['answer']}" for r in task.probe + task.pool)
    fit = [(e, a) for e, a in others if (e, a) not in pool_facts and not phrase_in_text(e[a], quotable)]
    if not fit:
        raise ValueError(f"no fact is left for the held-out split ({len(facts)} facts, "
                         f"{len(probe_facts)} in the gate, {len(pool_facts)} in the pool)")
    held = fit if s.held_out_size is None else rng.sample(fit, min(s.held_out_size, len(fit)))
    task.held_out = [reference(e, a, held_t, "held") for e, a in held]
    task.meta = {
        "seed": seed, "settings": dataclasses.asdict(s), "facts": len(facts),
        "entities": n1 + n2, "attributes": list(s.attributes),
        "spec_timeline": [{"step": step, "active": list(task.spec_at(step))}
                          for step in sorted({0, *task.rule_onsets.values()}) if step <= s.max_steps],
        "final_spec": list(task.final_spec),
        "onsets": [o._asdict() for o in task.onsets()],
        "phases": [{"from_step": start, "rows": sum(r["phase"] == p for r in task.train),
                    "without_format": sum(r["phase"] == p and not r["has_format"] for r in task.train),
                    "verbose": sum(r["phase"] == p and r["verbose"] for r in task.train),
                    "cohorts": sorted({r["cohort"] for r in task.train if r["phase"] == p})}
                   for p, start in enumerate(starts)],
        "held_out_cohorts": {str(c): sum(r["cohort"] == c for r in task.held_out) for c in (1, 2)},
        "facts_in_question": len(given),
        "held_out_facts_in_question": sum(r["fact_in_question"] for r in task.held_out),
        "scoring": "held-out rows under the final spec: fact right and every final constraint met",
        "references": "probe, pool and held-out references are written under the final spec",
    }
    return task


# ------------------------------------------------------------------ plugins
class DriftRewards:
    """Reward components of a drift task under `spec_at(step)`: a fixed `step`, or the step of
    the run's check in progress (read from the run it is started with)."""

    def __init__(self, task: DriftTask, step: int | None = None) -> None:
        self.task = task
        self.step = step
        self.run: Any = None

    @hookimpl
    def nslora_editor_start(self, run: Any) -> None:
        self.run = run  # the loop's view: `run.step` is the check in progress

    @hookimpl
    def nslora_score_probe(self, example: Any, completion: str) -> dict[str, float]:
        step = self.step if self.step is not None else (self.run.step if self.run is not None else 0)
        return self.task.reward(completion, example.answer, step)


class ComplianceRecorder:
    """Decision listener: the share of probe replies meeting each final constraint at the start,
    at each check, after each accepted edit and at the end (`points`)."""

    def __init__(self, task: DriftTask) -> None:
        self.task = task
        self.points: list[dict[str, Any]] = []

    @hookimpl
    def nslora_on_decision(self, record: Any, run: Any) -> None:
        when = {"start": "start", "route": "check", "edit": "edit", "end": "end"}.get(record.kind)
        if when is None or not run.reports:
            return
        if when == "start" and run.config.check_at_start:  # the check at step 0 records it
            return
        if when == "edit" and not record.payload.get("accepted"):
            return
        report = run.reports[-1]
        answers = [run.examples[r.example_id].answer for r in report.results]
        self.points.append(point(self.task, record.step, when, report.prompt_version,
                                 [r.completion for r in report.results], answers,
                                 sum(r.passed for r in report.results) / max(len(report.results), 1)))


def point(task: DriftTask, step: int, when: str, version: int, completions: Sequence[str],
          answers: Sequence[str | None], passed: float) -> dict[str, Any]:
    return {"step": step, "when": when, "prompt_version": version, "active": list(task.spec_at(step)),
            **task.compliance(completions, answers), "passed": round(passed, 4)}


def compliance_curve_callback(task: DriftTask, tokenizer: Any, config: Any, prompt: str | None,
                              check_every: int) -> Any:
    """A `TrainerCallback` for arms without NSLoRA: the probe under `prompt` at step 0 and every
    `check_every` steps (the checks of the NSLoRA arms), recorded as `ComplianceRecorder` does."""
    from transformers import TrainerCallback

    from nslora_plugin.core.data import load_probe_examples
    from nslora_plugin.core.probe import ProbeEvaluator
    from nslora_plugin.core.registry import make_plugin_manager

    rewards = DriftRewards(task, step=0)
    examples = load_probe_examples(task.probe, limit=config.probe_size, seed=config.seed)
    evaluator = ProbeEvaluator(tokenizer, examples, config, make_plugin_manager(config, [rewards]))

    class ComplianceCurve(TrainerCallback):
        def __init__(self) -> None:
            self.points: list[dict[str, Any]] = []

        def _probe(self, step: int, model: Any) -> None:
            rewards.step = step
            report = evaluator.evaluate(model, prompt, step=step, version=0)
            self.points.append(point(task, step, "check", 0, [r.completion for r in report.results],
                                     [e.answer for e in examples],
                                     sum(r.passed for r in report.results) / max(len(report.results), 1)))

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            self.points = []
            self._probe(0, model)

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if state.global_step % max(check_every, 1) == 0:
                self._probe(state.global_step, model)

    return ComplianceCurve()


# ------------------------------------------------------------------ command line
def add_drift_arguments(p: argparse.ArgumentParser) -> None:
    """The `--drift-*` knobs of `--task drift` (compare and sweep)."""
    g = p.add_argument_group("--task drift (weaknesses that appear during training)")
    g.add_argument("--drift-cohorts", default=None,
                   help="entities in the first and the later cohort, e.g. 8,4 (default: --entities, "
                        "two thirds first)")
    g.add_argument("--drift-facts-onset", type=int, default=None,
                   help="step at which the later cohort's facts join training (default max_steps // 3)")
    g.add_argument("--drift-forget-dose", type=float, default=0.5,
                   help="share of training replies without the format the prompt states (default 0.5)")
    g.add_argument("--drift-verbose-ratio", type=float, default=0.5,
                   help="share of training replies over the length cap from the verbose onset (default 0.5)")
    g.add_argument("--drift-verbose-onset", type=int, default=None,
                   help="step from which training replies can be verbose (default: the facts onset)")
    g.add_argument("--drift-spec-onset", type=int, default=None,
                   help="step at which the new constraint enters the reward (default 2 * max_steps // 3)")
    g.add_argument("--drift-format-rule", default="answer_line",
                   help="evaluation rule the prompt states from step 0 (default answer_line)")
    g.add_argument("--drift-length-rule", default="sixty_chars",
                   help="evaluation length rule stated from step 0, or 'none' (default sixty_chars)")
    g.add_argument("--drift-new-rule", default="quick_take_prefix",
                   help="evaluation rule that enters at the spec onset, or 'none' "
                        "(default quick_take_prefix)")
    g.add_argument("--drift-context-share", type=float, default=0.0,
                   help="share of facts stated in every question about them, in every split: those "
                        "rows need no memorised fact (default 0)")
    g.add_argument("--drift-sweep", choices=("forget_dose", "verbose_ratio"), default="forget_dose",
                   help="nslora sweep --task drift: the knob --mix sets (default forget_dose)")


def _none(text: str | None) -> str | None:
    return None if text is None or text.strip().lower() in ("", "none") else text.strip()


def settings_from_args(args: argparse.Namespace) -> DriftSettings:
    """`DriftSettings` from compare's arguments."""
    cohorts = getattr(args, "drift_cohorts", None)
    if cohorts:
        try:
            first, later = (int(x) for x in str(cohorts).split(","))
        except ValueError:
            raise SystemExit(f"--drift-cohorts {cohorts!r}: expected two integers, e.g. 8,4") from None
    else:
        later = args.entities // 3
        first = args.entities - later
    return DriftSettings(
        max_steps=args.max_steps, cohorts=(first, later),
        facts_onset=getattr(args, "drift_facts_onset", None),
        forget_dose=getattr(args, "drift_forget_dose", 0.5),
        verbose_ratio=getattr(args, "drift_verbose_ratio", 0.5),
        verbose_onset=getattr(args, "drift_verbose_onset", None),
        spec_onset=getattr(args, "drift_spec_onset", None),
        format_rule=getattr(args, "drift_format_rule", "answer_line"),
        length_rule=_none(getattr(args, "drift_length_rule", "sixty_chars")),
        new_rule=_none(getattr(args, "drift_new_rule", "quick_take_prefix")),
        train_paraphrases=args.train_paraphrases, probe_size=args.probe_size,
        held_out_size=args.held_out_size, pool_size=args.pool_size,
        context_share=getattr(args, "drift_context_share", 0.0))


def load_drift_task(args: argparse.Namespace, seed: int) -> DriftTask:
    """The drift task of compare's arguments; a bad knob stops the command, naming it."""
    try:
        return make_drift_task(settings_from_args(args), seed=seed)
    except (ValueError, KeyError) as exc:
        raise SystemExit(f"--task drift: {exc}") from None


# ------------------------------------------------------------------ the plot
def curves(result: dict[str, Any]) -> dict[str, dict[int, dict[str, float]]]:
    """Per arm, per step: the mean over runs of each final constraint's compliance and of the
    fact share, from the checks (and the start) of every run."""
    out: dict[str, dict[int, dict[str, list[float]]]] = {}
    for by_seed in (result.get("runs") or {}).values():
        for arms in by_seed.values():
            for arm, a in arms.items():
                for pt in a.get("compliance") or []:
                    if pt["when"] not in ("start", "check"):
                        continue
                    slot = out.setdefault(arm, {}).setdefault(int(pt["step"]), {})
                    for name, share in {**pt["compliance"], "fact": pt["fact"]}.items():
                        slot.setdefault(name, []).append(share)
    return {arm: {step: {k: sum(v) / len(v) for k, v in values.items()}
                  for step, values in sorted(steps.items())} for arm, steps in out.items()}


def plot_compliance(result: dict[str, Any], path: Path) -> Path | None:
    """Compliance per constraint over steps, one panel per arm; dotted lines at the onsets,
    triangles at the arm's symbolic rounds (first run). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    data = curves(result)
    if not data:
        return None
    onsets = result.get("task", {}).get("onsets", [])
    first_run = next((arms for by_seed in (result.get("runs") or {}).values()
                      for arms in by_seed.values()), {})
    cols = min(len(data), 3)
    rows = -(-len(data) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (arm, steps) in zip(axes.flat, data.items()):
        xs = list(steps)
        names = sorted({k for v in steps.values() for k in v}, key=lambda k: (k == "fact", k))
        for name in names:
            ax.plot(xs, [steps[x].get(name) for x in xs], marker="o", ms=3,
                    linestyle="--" if name == "fact" else "-", label=name)
        for o in onsets:
            ax.axvline(o["step"], color="grey", linestyle=":", linewidth=1)
        rounds = (first_run.get(arm) or {}).get("rounds_at") or []
        if rounds:
            ax.plot(rounds, [1.04] * len(rounds), "v", color="black", ms=5)
        label = (first_run.get(arm) or {}).get("schedule", {}).get("label", "")
        ax.set_title(f"{arm}{' (' + label + ')' if label else ''}", fontsize=9)
        ax.set_ylim(-0.05, 1.1)
        ax.set_xlabel("step")
        ax.set_ylabel("share of probe replies")
    for ax in list(axes.flat)[len(data):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("compliance per constraint (dotted: onsets; triangles: symbolic rounds)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
