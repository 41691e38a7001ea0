"""The GEPA editor (`editor: gepa`): reflective prompt evolution with a Pareto pool, on the probe.

One symbolic round runs one `gepa.optimize` over the system prompt (one text component,
"system_prompt"), through GEPA's public adapter interface:

- the example set: the probe rows of this check — the failing rows are GEPA's training set (the
  minibatches its reflection model reads, `editor_batch_size` rows each), every probe row, failing
  and passing, is its validation set (the per-row scores its Pareto pool is built on, so a prompt
  that fixes some failures but breaks passing rows is not preferred);
- the student: each candidate prompt is scored by the run's own model and rewards,
  `run.generate` then `run.score` (a row's score is its reward, the mean of the reward
  components); the replies the probe already generated under the current prompt are reused, and a
  candidate the gate would refuse (`core.candidates`: chat-template tokens, over
  `max_prompt_chars`, a secret) scores 0 without any generation;
- per-row text feedback: which reward components a reply failed and why, in words (the wrong or
  missing final answer next to the expected one, the constraint it broke as the editors state it,
  a reply cut at the token cap); with `format_instruction: ""` the format rule is not told, only
  that the reply's form differs from the reference reply;
- the reflection model: the configured editor (`editor_backend`, `editor_base_url`,
  `editor_model`), called through this package's own clients (`clients.py`), so sampling settings,
  budgets, usage accounting, timeouts, retries, the reply cache and secret redaction are the same
  as for the TextGrad editor; the reflection prompt is this module's own, and its reply is read
  leniently (`structured.py`: tags, a JSON object, an opening tag alone; or a fenced block); a
  reply with none of these gives no candidate (GEPA's parser would take the whole reply, and a
  small model's rambling would cost student generations);
- the result: the candidates of GEPA's Pareto pool (best on at least one probe row) whose mean
  score over the probe is at least the current prompt's (plus `acceptance_margin`), best first,
  at most `MAX_CANDIDATES`, are proposed one by one as "gepa:1", "gepa:2", ...; each goes through
  NSLoRA's own gate (the loop gates; this editor only proposes), the next one only when the
  previous was rejected, and the fallback editor after the last.

Budgets (`editor_max_*`) and GEPA's `max_metric_calls` (`plan_round`): one GEPA iteration costs
one reflection call (an editor LLM call) and 2m metric calls (the parent and the child scored on a
minibatch of m = min(editor_batch_size, failing rows) rows), plus n more (the n probe rows) when
the child enters the pool. A round may make R reflection calls:

    R = the calls the round may still start (editor_max_calls_per_round, and what
        editor_max_calls_per_run leaves), or DEFAULT_REFLECTIONS when neither is capped,
        then at most the tokens left (per round and per run) / the estimated tokens of one call
    max_metric_calls = n + R * (2m + n)       (n: the seed prompt's own scores, reused)

GEPA stops at whichever comes first: R reflection calls, `max_metric_calls`, the round's or run's
seconds budget (the round clock counts the student's generations too), an editor fault, or a
candidate that scores 1 on every probe row. The caps stay hard besides: a call that could pass one
is never started (`budget.py`). A metric call is one (prompt, row) score as GEPA counts it; the
student generates fewer replies (the current prompt's come from the probe, and a prompt is never
run twice on a row).

Faults behave as for the TextGrad editor: the start-up check (the `gepa` package importable, the
endpoint or model answering) makes the editor not ready and the fallback stands in; during a round
an unreachable endpoint, a bad reply or a spent budget stops GEPA, is reported through
`run.record_fault` and never raised into the trainer; candidates GEPA had already found still go
to the gate. A round whose every reflection gave an unusable prompt reports it as TextGrad does
(`EditorNoTags`, `EditorUnsafeCandidate`, `EditorOverlongCandidate`), and those replies are
dropped from the reply cache. GEPA's run folder (its state and log) is
`<artifacts>/editor_logs/gepa/step-NNNNNN/` (never the working directory, never copied into
checkpoints); GEPA's logger writes there, so it never replaces sys.stdout.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from nslora_plugin.core.answers import extract_final_answer
from nslora_plugin.core.candidates import check_candidate, clean_candidate
from nslora_plugin.core.config import NSLoRAConfig
from nslora_plugin.core.hookspecs import hookimpl
from nslora_plugin.core.records import EditorStatus, EditProposal, ProbeExample, ProbeReport, ProbeResult
from nslora_plugin.core.run import RunView
from nslora_plugin.builtins.editors.budget import Budget, Usage, estimate_tokens
from nslora_plugin.builtins.editors.cache import ReplyCache
from nslora_plugin.builtins.editors.llm_editor import LLMEditor
from nslora_plugin.builtins.editors.clients import EditorClient
from nslora_plugin.builtins.editors.constraint import constraint_statements, format_hidden
from nslora_plugin.builtins.editors.errors import (TRANSPORT_FAULTS, EditorBadReply, EditorBudgetSpent,
                                                  EditorError, EditorNoTags, EditorOverlongCandidate,
                                                  EditorUnsafeCandidate)
from nslora_plugin.builtins.editors.structured import TAGS, parse_candidate

log = logging.getLogger("nslora")

_FENCED = re.compile(r"```[^\n`]*\n(.*?)```", flags=re.S)

NAME = "gepa"
COMPONENT = "system_prompt"
#: reflection calls a round may make when no calls budget caps it
DEFAULT_REFLECTIONS = 4
#: candidates of one round's Pareto pool offered to the gate, best first
MAX_CANDIDATES = 3
#: characters of a reply / reference shown to the reflection model per row
SHOWN_CHARS = 600
INSTALL_HINT = "pip install 'nslora-plugin[gepa]'"
NO_PROMPT = "no new prompt in the reply"
#: why a reflection's prompt could not be used → the fault a round with only such replies reports
UNUSABLE_FAULTS: dict[str, type[EditorError]] = {
    NO_PROMPT: EditorNoTags,
    "candidate contains chat-template tokens": EditorUnsafeCandidate,
    "candidate contains a secret": EditorUnsafeCandidate,
}

REFLECTION_TEMPLATE = (
    "You revise the system prompt that a small assistant model reads before every user "
    "question.\n\n"
    "The system prompt it read:\n-----\n<curr_param>\n-----\n\n"
    "Some questions it answered under that system prompt, with its reply, the reference reply "
    "and what was right or wrong about the reply:\n\n<side_info>\n\n"
    "Write a better system prompt: one that makes the assistant reply like the reference "
    "replies. The new system prompt must:\n{rules}\n"
    "Answer with the complete new system prompt and nothing else, starting with {start} and "
    "ending with {end}."
)


# ------------------------------------------------------------------------------------------------
# Budgets → GEPA's metric calls
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundPlan:
    """What one round may spend: R reflection calls and GEPA's `max_metric_calls`."""

    reflections: int
    minibatch: int
    valset: int
    max_metric_calls: int
    limited_by: str  # the budget that set `reflections` ("default" when none did)

    def to_dict(self) -> dict[str, Any]:
        return {"reflections": self.reflections, "minibatch": self.minibatch,
                "valset": self.valset, "max_metric_calls": self.max_metric_calls,
                "limited_by": self.limited_by}


def metric_calls_for(reflections: int, minibatch: int, valset: int) -> int:
    """GEPA metric calls of a round of `reflections` iterations: the seed prompt on the valset,
    then per iteration the parent and the child on a minibatch, and the child on the valset."""
    return valset + reflections * (2 * minibatch + valset)


def plan_round(budget: Budget, config: NSLoRAConfig, valset: int, failing: int,
               tokens_per_call: int) -> RoundPlan:
    """Map the editor budgets onto this round's reflection calls and GEPA's `max_metric_calls`
    (see the module docstring); raise `EditorBudgetSpent` when not one reflection call fits."""
    minibatch = max(1, min(config.editor_batch_size, failing))
    limits: list[tuple[float, str]] = []
    round_calls = budget.calls_round - budget.round_calls
    run_calls = budget.calls_run - budget.run_calls()
    limits.append((round_calls, "editor_max_calls_per_round"))
    limits.append((run_calls, "editor_max_calls_per_run"))
    per_call = max(1, tokens_per_call)
    round_tokens = budget.tokens_round - budget.round_tokens - budget.reserved
    run_tokens = budget.tokens_run - budget.usage.tokens_used() - budget.reserved
    limits.append((round_tokens / per_call, "editor_max_tokens_per_round"))
    limits.append((run_tokens / per_call, "editor_max_tokens_per_run"))
    cap, by = min(limits, key=lambda item: item[0])
    if math.isinf(cap):
        reflections, by = DEFAULT_REFLECTIONS, "default"
    else:
        reflections = int(cap)
    if reflections < 1:
        scope = "round" if by.endswith("_per_round") else "run"
        raise EditorBudgetSpent(f"{by} leaves less than one GEPA reflection call this round "
                                f"(about {per_call} tokens each)", scope)
    return RoundPlan(reflections, minibatch, valset, metric_calls_for(reflections, minibatch, valset), by)


# ------------------------------------------------------------------------------------------------
# Per-row feedback from the reward components
# ------------------------------------------------------------------------------------------------


def _shown(text: str, limit: int = SHOWN_CHARS) -> str:
    text = str(text or "").strip()
    return text if len(text) <= limit else text[:limit] + " […]"


def row_feedback(example: ProbeExample, result: ProbeResult, config: NSLoRAConfig) -> str:
    """What was right or wrong about one reply, in words, from its reward components."""
    statements = constraint_statements(config)
    notes: list[str] = []
    for name in sorted(result.rewards):
        value = result.rewards[name]
        if value >= 1.0 - 1e-9:
            continue
        if name == "correctness":
            found = extract_final_answer(result.completion, config.answer_pattern or config.answer_format)
            notes.append(f"Wrong final answer: the expected answer is {example.answer}; the reply's "
                         f"final answer is {found if found is not None else 'missing'}.")
        elif name == "format":
            notes.append("The reply's form differs from the reference reply." if format_hidden(config)
                         or "format" not in statements
                         else f"The reply breaks the required form: {statements['format']}")
        elif name == "length":
            notes.append(f"The reply is {len(result.completion)} characters long: "
                         f"{statements.get('length', 'it is too long.')}")
        elif name == "json":
            notes.append(f"The reply is not valid JSON: {statements.get('json', '')}".strip())
        elif name == "exact_match":
            notes.append("The reply must be exactly the reference reply.")
        else:
            notes.append(f"Reward component '{name}' scored {value:.2f} (1 is required).")
    if result.cut:
        notes.append("The reply was cut at the token limit before it ended; it should be shorter.")
    if not notes:
        return "Good: the reply earns every reward component."
    return " ".join(notes)


# ------------------------------------------------------------------------------------------------
# GEPA's adapter, reflection model, stopper and logger
# ------------------------------------------------------------------------------------------------


class _StudentAdapter:
    """GEPA's `GEPAAdapter` over the run's model: evaluate a prompt on probe rows, and turn the
    traces into the reflection model's rows."""

    propose_new_texts = None  # GEPA's reflection proposes, with this module's template

    def __init__(self, run: RunView, config: NSLoRAConfig, seed_prompt: str,
                 seed_results: Sequence[ProbeResult]) -> None:
        self.run = run
        self.config = config
        self.seed_prompt = seed_prompt
        self.results: dict[tuple[str, str], ProbeResult] = {
            (seed_prompt, r.example_id): r for r in seed_results}
        self.generations = 0
        self.unusable: Counter[str] = Counter()  # why a proposed prompt could not be used
        self.unusable_texts: set[str] = set()
        self.usable_texts: set[str] = set()  # proposed prompts the student was scored under

    def _prompt(self, text: str) -> tuple[str | None, str | None]:
        if text == self.seed_prompt:
            return text, None
        cleaned, problem = check_candidate(text, self.config.max_prompt_chars, self.run.tokenizer)
        return cleaned, (problem.reason if problem is not None else None)

    def _result(self, prompt: str, example: ProbeExample) -> ProbeResult:
        key = (prompt, example.id)
        if key not in self.results:
            reply = self.run.generate(prompt or None, example.question)
            self.results[key] = self.run.score(example, reply)
            self.generations += 1
        return self.results[key]

    def evaluate(self, batch: list[ProbeExample], candidate: dict[str, str],
                 capture_traces: bool = False) -> Any:
        from gepa import EvaluationBatch

        text = candidate[COMPONENT]
        prompt, problem = self._prompt(text)
        if problem is not None or prompt is None:  # the gate would refuse it: no generation spent
            if text not in self.unusable_texts:
                self.unusable_texts.add(text)
                self.unusable[NO_PROMPT if not text.strip() else str(problem).split(" (")[0]] += 1
            traces = [{"example": ex, "result": None, "problem": problem} for ex in batch]
            return EvaluationBatch(outputs=["" for _ in batch], scores=[0.0 for _ in batch],
                                   trajectories=traces if capture_traces else None,
                                   num_metric_calls=0)
        if text != self.seed_prompt:
            self.usable_texts.add(prompt)
        results = [self._result(prompt, ex) for ex in batch]
        traces = [{"example": ex, "result": r, "problem": None} for ex, r in zip(batch, results)]
        return EvaluationBatch(outputs=[r.completion for r in results],
                               scores=[float(r.reward) for r in results],
                               trajectories=traces if capture_traces else None)

    def make_reflective_dataset(self, candidate: dict[str, str], eval_batch: Any,
                                components_to_update: list[str]) -> dict[str, list[dict[str, Any]]]:
        rows: list[dict[str, Any]] = []
        for trace in eval_batch.trajectories or []:
            ex, result = trace["example"], trace["result"]
            if result is None:
                feedback = f"The system prompt could not be used: {trace['problem']}."
                reply = ""
            else:
                feedback = row_feedback(ex, result, self.config)
                reply = result.completion
            rows.append({"Question": _shown(ex.question), "Assistant's reply": _shown(reply) or "(none)",
                         "Reference reply": _shown(ex.reference), "Feedback": feedback})
        return {name: rows for name in components_to_update}


class _Reflector:
    """GEPA's reflection model: one editor call through our client per reflection. The first
    editor fault is kept (GEPA would only log it and go on) and stops the round."""

    def __init__(self, client: EditorClient) -> None:
        self.client = client
        self.calls = 0
        self.fault: EditorError | None = None
        self.sent: dict[str, list[str]] = {}  # proposed text -> the requests that produced it
        self.parsed: Counter[str] = Counter()

    def __call__(self, prompt: Any) -> str:
        if self.fault is not None:
            raise self.fault
        if not isinstance(prompt, str):  # a messages list (GEPA sends one for images only)
            parts = prompt if isinstance(prompt, list) else [prompt]
            prompt = "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in parts)
        self.calls += 1
        try:
            reply = self.client.chat(prompt, structured=True)
        except EditorError as exc:
            self.fault = exc
            raise
        value, how = parse_candidate(reply)
        fenced = _FENCED.search(reply) if value is None else None
        if fenced and fenced.group(1).strip():  # a fenced block, as GEPA's own prompt asks for
            value, how = fenced.group(1).strip(), "fenced"
        self.parsed[how] += 1
        if value is None:
            # no prompt found in the reply (a small model rambling on): an empty candidate, scored
            # 0 without a generation, rather than the whole reply as GEPA's parser would take it
            self.sent.setdefault("", []).append(prompt)
            return ""
        for key in {value, clean_candidate(value)}:
            self.sent.setdefault(key, []).append(prompt)
        # fenced, so GEPA's own parser returns exactly the text found here
        return f"```\n{value}\n```"


class _Stopper:
    """Stop GEPA after R reflection calls, at an editor fault, when the seconds budgets of the
    round or the run are spent (the round clock counts the student's generations too), or once a
    candidate is perfect on every probe row (nothing left to improve)."""

    def __init__(self, reflector: _Reflector, plan: RoundPlan, budget: Budget) -> None:
        self.reflector = reflector
        self.plan = plan
        self.budget = budget
        self.t0 = time.monotonic()
        self.reason = ""

    def __call__(self, state: Any) -> bool:
        elapsed = time.monotonic() - self.t0
        if self.reflector.fault is not None:
            self.reason = f"editor fault ({type(self.reflector.fault).__name__})"
        elif self.reflector.calls >= self.plan.reflections:
            self.reason = f"{self.plan.reflections} reflection calls made ({self.plan.limited_by})"
        elif elapsed >= self.budget.seconds_round:
            self.reason = f"editor_max_seconds_per_round={self.budget.seconds_round:g} reached"
        elif self.budget.usage.wall_seconds + elapsed >= self.budget.seconds_run:
            self.reason = f"editor_max_seconds_per_run={self.budget.seconds_run:g} reached"
        elif getattr(state, "total_num_evals", 0) >= self.plan.max_metric_calls:
            self.reason = f"max_metric_calls={self.plan.max_metric_calls} reached"
        elif any(s >= 1.0 - 1e-9 for s in list(getattr(state, "program_full_scores_val_set", []))[1:]):
            self.reason = "a candidate scores 1 on every probe row"
        return bool(self.reason)


class _FileLog:
    """GEPA's logger: its lines go to a file in its run folder (redacted), never to stdout."""

    def __init__(self, path: Path, redact: Any) -> None:
        self.path = path
        self.redact = redact

    def log(self, message: Any, *args: Any, **kwargs: Any) -> None:
        text = " ".join(str(m) for m in (message, *args))
        try:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(self.redact(text) + "\n")
        except OSError:  # a full disk must not stop the editor
            pass


def import_gepa() -> Any:
    """The `gepa` package (imported on first use only)."""
    import gepa

    if not hasattr(gepa, "optimize") or not hasattr(gepa, "EvaluationBatch"):
        raise ImportError(f"this gepa ({getattr(gepa, '__version__', '?')}) has no optimize / "
                          "EvaluationBatch; gepa>=0.1.4 is needed")
    return gepa


def _round_folder(root: Path, step: int) -> Path:
    """A new folder for this round's GEPA run (GEPA resumes from a folder that holds a state)."""
    base = root / f"step-{step:06d}"
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    folder.mkdir(parents=True)
    return folder


def unusable_fault(unusable: Counter[str], calls: int, config: NSLoRAConfig) -> EditorError:
    """The fault of a round whose every reflection gave a prompt that could not be used."""
    kind = unusable.most_common(1)[0][0]
    cls = UNUSABLE_FAULTS.get(kind, EditorOverlongCandidate if "max_prompt_chars" in kind else EditorBadReply)
    detail = ", ".join(f"{n} x {why}" for why, n in unusable.most_common())
    return cls(f"GEPA's {calls} reflection call(s) gave no usable system prompt ({detail}; "
               f"max_prompt_chars={config.max_prompt_chars}); keeping the current prompt")


def pool_candidates(result: Any, current: str, config: NSLoRAConfig,
                    tokenizer: Any = None) -> list[dict[str, Any]]:
    """The candidates of GEPA's Pareto pool worth a gate evaluation, best first: best on at
    least one probe row, a mean score at least the current prompt's (+ acceptance_margin), usable
    (`check_candidate`) and different from the current prompt and from each other."""
    scores = list(result.val_aggregate_scores)
    wins: Counter[int] = Counter(i for front in result.per_val_instance_best_candidates.values()
                                 for i in front)
    floor = scores[0] + config.acceptance_margin - 1e-9
    seen = {clean_candidate(current or "")}
    out: list[dict[str, Any]] = []
    for idx in sorted(wins, key=lambda i: (-scores[i], -wins[i], i)):
        if idx == 0 or scores[idx] < floor:
            continue
        cleaned, problem = check_candidate(result.candidates[idx][COMPONENT], config.max_prompt_chars,
                                           tokenizer)
        if problem is not None or cleaned is None or cleaned in seen:
            continue
        seen.add(cleaned)
        out.append({"prompt": cleaned, "index": idx, "val_score": round(scores[idx], 4),
                    "seed_val_score": round(scores[0], 4), "pareto_rows": wins[idx],
                    "parents": [p for p in result.parents[idx] if p is not None]})
    return out[:MAX_CANDIDATES]


# ------------------------------------------------------------------------------------------------
# The editor
# ------------------------------------------------------------------------------------------------


class GEPAEditor(LLMEditor):
    name = NAME

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[EditProposal] = []  # this round's pool, after the first proposal
        self._round_key: tuple[Any, ...] | None = None  # (step, report, prompt) of the last round

    def startup_problem(self, config: NSLoRAConfig, run: RunView | None) -> str | None:
        """None when GEPA and the reflection model can be used, else why not."""
        try:
            import_gepa()
        except ImportError as exc:
            return f"the gepa package is not available ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
        return self.endpoint_problem(config, run)

    # ---------------------------------------------------------------- the hook
    @hookimpl(tryfirst=True)
    def nslora_propose_edit(self, prompt: str, failures: Sequence[ProbeResult],
                            examples: dict[str, ProbeExample], report: ProbeReport,
                            config: NSLoRAConfig, tried: tuple[str, ...],
                            run: RunView) -> EditProposal | None:
        this_round = (run.step, id(report), prompt)
        if this_round == self._round_key:  # called again in the same symbolic round (the gate
            # refused a candidate): the next of this round's pool, never a second GEPA run
            return self.pending.pop(0) if self.pending else None
        self._round_key, self.pending = this_round, []
        if NAME in tried or not failures or not self.ready:
            return None
        client = self.connect(config, run)
        assert self.budget is not None
        before = self.usage_mark()
        self.budget.start_round()
        proposals: list[EditProposal] = []
        fault: EditorError | None = None
        stats: dict[str, Any] = {}
        try:
            proposals, fault, stats = self._round(prompt or "", failures, examples, report, config,
                                                  run, client)
        except EditorError as exc:
            fault = exc
            run.record_fault(NAME, exc)
        except Exception as exc:  # GEPA or the student failed: reported the same way
            text = " ".join(f"unexpected {type(exc).__name__} in the GEPA round: {exc}".split())
            run.record_fault(NAME, EditorError(client.redact(text)[:300]))
        finally:
            seconds = self.budget.end_round()
            spent = self.spent_since(before, seconds, run.step)
            spent.update(metric_calls=stats.get("metric_calls", 0), generations=stats.get("generations", 0))
            log.info("NSLoRA GEPA round at step %s: %d reflection calls (%d cached, %d failed), "
                     "%d tokens, %d metric calls (%d generations), %.1f s; %d candidate(s) for the "
                     "gate", spent["step"], spent["calls"], spent["cached"], spent["failed"],
                     spent["tokens"], spent["metric_calls"], spent["generations"], seconds,
                     len(proposals))
            self._suspect = isinstance(fault, TRANSPORT_FAULTS)
            self._check_run_budget(config, run, fault)
        if stats:
            run.record("gepa", {**stats, "usage": spent, "candidates": len(proposals),
                                "fault": type(fault).__name__ if fault else None})
        for proposal in proposals:
            proposal.meta["usage"] = spent
        if not proposals:
            return None
        first, self.pending = proposals[0], proposals[1:]
        return first

    # ---------------------------------------------------------------- one round
    def _round(self, prompt: str, failures: Sequence[ProbeResult], examples: dict[str, ProbeExample],
               report: ProbeReport, config: NSLoRAConfig, run: RunView,
               client: EditorClient) -> tuple[list[EditProposal], EditorError | None, dict[str, Any]]:
        assert self.budget is not None
        gepa = import_gepa()
        if self._suspect:  # the endpoint failed last round: a cheap check before spending
            client.health()
            self._suspect = False
        valset = [examples[r.example_id] for r in report.results if r.example_id in examples]
        trainset = [examples[r.example_id] for r in sorted(failures, key=lambda r: r.example_id)
                    if r.example_id in examples]
        if not trainset:
            return [], None, {}
        template = self.template(config)
        m = max(1, min(config.editor_batch_size, len(trainset)))
        by_id = {r.example_id: r for r in report.results}
        row_chars = sum(len(_shown(ex.question)) + len(_shown(by_id[ex.id].completion)) +
                        len(_shown(ex.reference)) + 250 for ex in trainset) / len(trainset)
        per_call = estimate_tokens(template + prompt + "x" * int(m * row_chars)) + config.editor_max_tokens
        plan = plan_round(self.budget, config, len(valset), len(trainset), per_call)

        folder = _round_folder(run.path("editor_logs") / NAME, run.step)
        adapter = _StudentAdapter(run, config, prompt, report.results)
        reflector = _Reflector(client)
        stopper = _Stopper(reflector, plan, self.budget)
        result = gepa.optimize(
            seed_candidate={COMPONENT: prompt}, trainset=trainset, valset=valset, adapter=adapter,
            reflection_lm=reflector, reflection_prompt_template=template,
            candidate_selection_strategy="pareto", reflection_minibatch_size=m,
            perfect_score=1.0, skip_perfect_score=True, max_metric_calls=plan.max_metric_calls,
            stop_callbacks=[stopper], logger=_FileLog(folder / "gepa_log.txt", client.redact),
            run_dir=str(folder), track_best_outputs=False, display_progress_bar=False,
            seed=int(config.seed) + int(run.step), raise_on_exception=True)

        # replies GEPA could not use must not be replayed from the cache
        for text in adapter.unusable_texts:
            for request in reflector.sent.get(text, []):
                client.forget(request, None, structured=True)
        fault = reflector.fault
        if fault is None and reflector.calls and not adapter.usable_texts and adapter.unusable:
            fault = unusable_fault(adapter.unusable, reflector.calls, config)
        if fault is not None:
            run.record_fault(NAME, fault)
        found = pool_candidates(result, prompt, config, run.tokenizer)
        relative = folder.relative_to(run.path("editor_logs").parent).as_posix()
        stats = {"plan": plan.to_dict(), "metric_calls": int(result.total_metric_calls or 0),
                 "generations": adapter.generations, "reflections": reflector.calls,
                 "pool": len(result.candidates), "stopped": stopper.reason or "gepa finished",
                 "seed_val_score": round(result.val_aggregate_scores[0], 4),
                 "best_val_score": round(max(result.val_aggregate_scores), 4),
                 "unusable": dict(adapter.unusable), "parsed_as": dict(reflector.parsed),
                 "run_dir": relative}
        if not found and fault is None:
            log.info("NSLoRA GEPA: no candidate of the pool (%d) scores at least the current prompt "
                     "(%.3f) on the probe; %s", len(result.candidates), result.val_aggregate_scores[0],
                     "its reflections were unusable: " + ", ".join(adapter.unusable)
                     if adapter.unusable else "nothing for the gate this round")
        proposals = [EditProposal(editor=f"{NAME}:{k}", prompt=c["prompt"],
                                  rationale=(f"GEPA Pareto pool, candidate {k} of {len(found)}: mean "
                                             f"probe score {c['val_score']} (current prompt "
                                             f"{c['seed_val_score']}), best on {c['pareto_rows']} "
                                             f"of {len(valset)} rows"),
                                  meta={"gepa": {**c, "metric_calls": stats["metric_calls"],
                                                 "max_metric_calls": plan.max_metric_calls,
                                                 "reflections": reflector.calls, "pool": stats["pool"],
                                                 "run_dir": relative}})
                     for k, c in enumerate(found, start=1)]
        return proposals, fault, stats

    @staticmethod
    def template(config: NSLoRAConfig) -> str:
        """The reflection prompt (GEPA fills in <curr_param> and <side_info>)."""
        rules = ["address the assistant directly and not answer any particular question",
                 f"stay under {config.max_prompt_chars} characters",
                 "contain no chat-template tokens such as <|im_start|>"]
        rules += [f"tell the assistant: {s}" for s in constraint_statements(config).values()]
        return REFLECTION_TEMPLATE.format(rules="\n".join(f"- {r}" for r in rules),
                                          start=TAGS[0], end=TAGS[1])
