"""The TextGrad editor: optimize the system prompt through an editor LLM, fed with failing probes.

One round with batch B (the first failures by example id, as many as `editor_batch_size` and the
budget allow):
- forward: the student's replies are the ones the probe already generated under the current prompt
  (the local model exposed as a TextGrad engine, so no editor call is spent on them);
- per example, independently: loss (the editor critiques the reply against its reference and the
  constraints, 1 call), backward to the reply and on to the system prompt (2 calls) — these B
  sub-graphs run concurrently, `editor_concurrency` at a time;
- update: the B gradients, in batch order, go to one `TextualGradientDescent` step (1 call)
  → at most 3B+1 calls (TextGrad's own loop spends 4B+1), plus one repair call when the tags are
  missing. With `edit_questions` each example's question also gets a gradient and an update
  (2 more calls per example); a rewritten question becomes a training row only after the model,
  under the current prompt, answers it correctly (see `nslora_augment_examples`).

TextGrad's sharp edges, handled here: lazy import with its logs under the run folder; no global
backward engine is read, set or cleared (engines are passed explicitly and the backward pass is
run here, so a user's `set_backward_engine` stays as it was); gradients in batch order, so the
optimizer prompt is identical across runs whatever order concurrent calls finish in; the optimizer
sees the whole prompt (TextGrad shows it only its first and last 10 words); a missing
`<IMPROVED_VARIABLE>` tag gets one repair call and otherwise the old prompt stays; a candidate
the gate would refuse (`core.candidates`: chat-template tokens, over `max_prompt_chars`, a secret)
is dropped before it reaches the gate; every
fault is reported once through `run.record_fault` and never raised into the trainer.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from nslora_plugin.core.candidates import check_candidate
from nslora_plugin.core.chat import chat_messages, control_tokens
from nslora_plugin.core.config import NSLoRAConfig
from nslora_plugin.core.hookspecs import hookimpl
from nslora_plugin.core.run import RunView
from nslora_plugin.core.records import EditorStatus, EditProposal, ProbeExample, ProbeReport, ProbeResult
from nslora_plugin.builtins.editors.budget import Budget, Usage
from nslora_plugin.builtins.editors.errors import (TRANSPORT_FAULTS, EditorBudgetSpent, EditorError, EditorNoTags,
                                                  EditorOverlongCandidate, EditorUnsafeCandidate)
from nslora_plugin.builtins.editors.cache import ReplyCache
from nslora_plugin.builtins.editors.llm_editor import LLMEditor
from nslora_plugin.builtins.editors.constraint import constraint_statements
from nslora_plugin.builtins.editors.clients import EditorClient, make_engine, make_lookup_engine
from nslora_plugin.builtins.editors.structured import TAGS, parse_candidate
from nslora_plugin.builtins.editors.textgrad_env import import_textgrad

log = logging.getLogger("nslora")

NAME = "textgrad"

ROLE_SYSTEM_PROMPT = ("system prompt given to a small assistant model before every user question; "
                      "it should make the assistant answer correctly and in the required format")
ROLE_QUESTION = "question the assistant has to answer"
ROLE_REPLY = "reply of the assistant to the question"

CRITIQUE_TEMPLATE = (
    "You review one reply of a small assistant model.\n"
    "Question it answered: {question}\n"
    "Reference reply: {reference}\n"
    "{constraint_lines}"
    "Point out, in at most three short sentences, how the reply differs from the reference in "
    "its final result and in its form. Do not write a new reply."
)

REPAIR_TEMPLATE = (
    "Your previous message did not contain the improved text between the tags {start} and {end}.\n"
    "Here is the text that was being improved:\n{old}\n\n"
    "Here is your previous message:\n{reply}\n\n"
    "Write only the improved text, starting with {start} and ending with {end}."
)

_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_tagged(text: str) -> str | None:
    """The proposed text of an update reply, found leniently (`structured.parse_candidate`), or
    None (TextGrad would raise IndexError)."""
    return parse_candidate(text)[0]


def show_whole(variable: Any) -> Any:
    """Make TextGrad show the optimizer the whole variable, not its first and last 10 words."""
    variable.get_short_value = lambda n_words_offset=10: variable.value
    return variable


def backward(root: Any, engine: Any) -> None:
    """TextGrad's backward pass with an explicit engine and no global-engine check or use.

    Same topological order and gradient reduction as `Variable.backward`; predecessors are visited
    in a stable order (by role, then value) instead of set order."""
    from textgrad import variable as tg_variable

    reduce = getattr(tg_variable, "_check_and_reduce_gradients", lambda v, e: v.gradients)
    order: list[Any] = []
    seen: set[int] = set()

    def visit(v: Any) -> None:
        if id(v) in seen:
            return
        seen.add(id(v))
        for p in sorted(v.predecessors, key=lambda p: (str(p.get_role_description()), str(p.value))):
            visit(p)
        order.append(v)

    visit(root)
    root.gradients = set()
    for v in reversed(order):
        if v.requires_grad:
            v.gradients = reduce(v, engine)
            if v.get_grad_fn() is not None:
                v.grad_fn(backward_engine=engine)


@dataclass
class _ExampleGrads:
    example_id: str
    system_grads: list[tuple[Any, Any]]          # (gradient variable, its context)
    question: Any = None                         # the question variable (edit_questions)
    error: EditorError | None = None


class TextGradEditor(LLMEditor):
    name = NAME

    def __init__(self) -> None:
        super().__init__()
        self.pending_questions: dict[str, dict[str, Any]] = {}

    def startup_problem(self, config: NSLoRAConfig, run: RunView) -> str | None:
        """Health check at the start of a run: None when the editor LLM can be used, else why not."""
        return self.endpoint_problem(config, run)  # a resumed run may have spent its budget

    def calls_per_example(self, config: NSLoRAConfig) -> int:
        return 3 + (2 if config.edit_questions else 0)

    def round_calls(self, config: NSLoRAConfig) -> int:
        """Calls the smallest round needs: one example's calls and the rewrite."""
        return self.calls_per_example(config) + 1

    # ---------------------------------------------------------------- the hook
    @hookimpl(tryfirst=True)
    def nslora_propose_edit(self, prompt: str, failures: Sequence[ProbeResult],
                            examples: dict[str, ProbeExample], report: ProbeReport,
                            config: NSLoRAConfig, tried: tuple[str, ...],
                            run: RunView) -> EditProposal | None:
        if NAME in tried or not failures or not self.ready:
            return None
        self.pending_questions = {}
        client = self.connect(config, run)
        assert self.budget is not None
        tg = import_textgrad(run.path("editor_logs"))  # before the clock starts
        before = self.usage_mark()
        self.budget.start_round()
        proposal: EditProposal | None = None
        fault: EditorError | None = None
        try:
            proposal = self._round(tg, prompt, failures, examples, config, run, client)
        except EditorError as exc:  # an editor fault must never reach the trainer
            fault = exc
            self._suspect = isinstance(exc, TRANSPORT_FAULTS)
            run.record_fault(NAME, exc)
        except Exception as exc:  # not an LLM fault (TextGrad, a plugin): reported the same way
            text = " ".join(f"unexpected {type(exc).__name__} in the editor round: {exc}".split())
            run.record_fault(NAME, EditorError(client.redact(text)[:300]))
        finally:
            seconds = self.budget.end_round()
            spent = self.spent_since(before, seconds, run.step)
            log.info("NSLoRA editor round at step %s: %d calls (%d cached, %d failed), %d tokens, "
                     "%.1f s; run: %d calls, %d tokens, %.1f s", spent["step"], spent["calls"],
                     spent["cached"], spent["failed"], spent["tokens"], seconds, self.usage.calls,
                     self.usage.tokens_used(), self.usage.wall_seconds)
            self._check_run_budget(config, run, fault)
        if proposal is not None:
            proposal.meta["usage"] = spent
        return proposal

    # ---------------------------------------------------------------- one round
    def _round(self, tg: Any, prompt: str, failures: Sequence[ProbeResult],
               examples: dict[str, ProbeExample], config: NSLoRAConfig, run: RunView,
               client: EditorClient) -> EditProposal | None:
        assert self.budget is not None
        if self._suspect:  # the endpoint failed last round: a cheap check before spending calls
            client.health()
            self._suspect = False
        per_example = self.calls_per_example(config)
        size = self.budget.plan_batch(config.editor_batch_size, per_example, extra_calls=1)
        if size < 1:
            raise EditorBudgetSpent(f"the calls left this round cannot pay for one example "
                                    f"({per_example} calls + 1 update)", "round")
        batch = sorted(failures, key=lambda r: r.example_id)[:size]
        answers = {(prompt, examples[r.example_id].question): r.completion for r in batch}
        student = make_lookup_engine(answers, run.generate)
        statements = list(constraint_statements(config).values())
        constraint_lines = "".join(f"Required form of every reply: {s}\n" for s in statements)
        workers = 1 if client.sequential else max(1, min(config.editor_concurrency, len(batch)))

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nslora-editor") as pool:
            futures = [pool.submit(self._example, tg, client, student, prompt, examples[r.example_id],
                                   config, constraint_lines) for r in batch]
            results = [f.result() for f in futures]  # batch order, whatever finished first
            done = [r for r in results if r.error is None]
            errors = [r.error for r in results if r.error is not None]
            budget_error = next((e for e in errors if isinstance(e, EditorBudgetSpent)), None)
            if budget_error is not None or not done:
                raise budget_error or errors[0]  # type: ignore[misc]
            if errors:  # a partial batch still makes a step; the fault is on record
                run.record_fault(NAME, errors[0])

            system = show_whole(tg.Variable(prompt, requires_grad=True,
                                            role_description=ROLE_SYSTEM_PROMPT))
            system.gradients = [g for r in done for g, _ in r.system_grads]
            system.gradients_context = defaultdict(lambda: None, {g: c for r in done for g, c in r.system_grads})
            constraints = [f"The text must stay under {config.max_prompt_chars} characters.",
                           "The text must be a system prompt addressed to the assistant, not an "
                           "answer to any particular question.",
                           "The text must not contain chat-template tokens such as <|im_start|>."]
            constraints += [f"The text must tell the assistant: {s}" for s in statements]
            question_futures = []
            if config.edit_questions:
                question_futures = [(r, pool.submit(self._question_step, tg, client, r, examples))
                                    for r in done if r.question is not None]
            candidate, repaired, sent, parsed_as = self._step(tg, client, system, prompt, constraints)
            question_meta = self._collect_questions(question_futures, examples, run)

        problem = candidate_problem(candidate, config, run.tokenizer)
        if problem is not None:
            for request in sent:  # do not replay the unusable replies from the cache
                client.forget(*request)
            raise problem
        meta: dict[str, Any] = {"repaired": repaired, "batch": [r.example_id for r in done],
                                "parsed_as": parsed_as, "structured": client.structured_request()}
        if errors:
            meta["failed_examples"] = len(errors)
        if question_meta:
            meta["question_edits"] = question_meta
        return EditProposal(editor=NAME, prompt=candidate,
                            rationale=f"TextGrad step on {len(done)} failing probe examples", meta=meta)

    def _example(self, tg: Any, client: EditorClient, student: Any, prompt: str, ex: ProbeExample,
                 config: NSLoRAConfig, constraint_lines: str) -> _ExampleGrads:
        """Loss and backward for one example on its own sub-graph (safe to run in a thread)."""
        try:
            engine = make_engine(client)
            system = show_whole(tg.Variable(prompt, requires_grad=True, role_description=ROLE_SYSTEM_PROMPT))
            question = tg.Variable(ex.question, requires_grad=config.edit_questions,
                                   role_description=ROLE_QUESTION)
            reply = tg.autograd.LLMCall(student, system_prompt=system)(
                question, response_role_description=ROLE_REPLY)
            critique = CRITIQUE_TEMPLATE.format(question=ex.question, reference=ex.reference,
                                                constraint_lines=constraint_lines)
            loss = tg.TextLoss(critique, engine=engine)(reply)
            backward(loss, engine)
            grads = [(g, system.gradients_context[g]) for g in
                     sorted(system.gradients, key=lambda g: str(g.value))]
            return _ExampleGrads(ex.id, grads, question if config.edit_questions else None)
        except EditorError as exc:
            return _ExampleGrads(ex.id, [], error=exc)

    def _step(self, tg: Any, client: EditorClient, variable: Any, old: str,
              constraints: list[str]) -> tuple[str | None, bool, list[tuple[str, str | None, bool]], str]:
        """One TGD update of `variable`; a reply with no candidate gets one repair request.
        Returns the new text (None if both replies are unusable), whether it was repaired, the
        requests sent, and how the candidate was found ("tags", "json", "lenient" or "none")."""
        engine = make_engine(client, update=True)  # its own engine: last_response is this step's
        optimizer = tg.TGD(parameters=[variable], engine=engine, constraints=constraints)
        try:
            optimizer.step()
            value = str(variable.value).strip()
            if value:
                return value, False, engine.sent, engine.parsed_as
        except IndexError:
            pass
        reply = engine.last_response or ""
        repair = REPAIR_TEMPLATE.format(start=TAGS[0], end=TAGS[1], old=old, reply=reply[:2000])
        value = parse_tagged(engine(repair))
        return value, True, engine.sent, engine.parsed_as

    # ---------------------------------------------------------------- question edits
    def _question_step(self, tg: Any, client: EditorClient, grads: _ExampleGrads,
                       examples: dict[str, ProbeExample]) -> str | None:
        original = examples[grads.example_id].question
        q = show_whole(grads.question)
        constraints = ["Keep every number, name and quantity of the original question.",
                       "The text must still ask for exactly the same result.",
                       f"The text must stay under {max(3 * len(original), 400)} characters."]
        value, _, sent, _ = self._step(tg, client, q, original, constraints)
        if question_problem(original, value, None) is not None:
            for request in sent:
                client.forget(*request)
        return value

    def _collect_questions(self, futures: list[tuple[_ExampleGrads, Any]],
                           examples: dict[str, ProbeExample], run: RunView) -> dict[str, str]:
        """Keep the rewrites that pass the cheap symbolic checks; the model check comes later."""
        verdicts: dict[str, str] = {}
        for grads, fut in futures:
            original = examples[grads.example_id].question
            try:
                new = fut.result()
            except EditorError as exc:
                run.record_fault(f"{NAME}.question", exc)
                verdicts[grads.example_id] = f"no rewrite ({type(exc).__name__})"
                continue
            problem = question_problem(original, new, run.tokenizer)
            if problem:
                verdicts[grads.example_id] = f"rejected: {problem}"
                continue
            self.pending_questions[grads.example_id] = {"question": new, "original": original,
                                                        "step": run.step}
            verdicts[grads.example_id] = "pending the model check"
        return verdicts

    @hookimpl
    def nslora_augment_examples(self, prompt: str, report: ProbeReport, before: ProbeReport,
                                examples: dict[str, ProbeExample], config: NSLoRAConfig,
                                run: RunView) -> list[dict[str, Any]] | None:
        """Rewritten questions enter the training data only if, under the prompt now in force,
        the model's reply to the rewrite still earns correctness 1."""
        if not config.edit_questions or not self.pending_questions:
            return None
        pending, self.pending_questions = self.pending_questions, {}
        return verify_question_edits(pending, prompt, report.prompt_version, examples, config, run)


def candidate_problem(candidate: str | None, config: NSLoRAConfig, tokenizer: Any = None) -> EditorError | None:
    """Why a proposed system prompt cannot go to the gate (as the fault to report), or None: the
    gate's own check (`core.candidates.check_candidate`), run here so that an unusable reply is
    this editor's fault and is not replayed from its cache."""
    if candidate is None:
        return EditorNoTags("editor reply had no <IMPROVED_VARIABLE> tags, even after a repair "
                            "request; keeping the current prompt")
    _, problem = check_candidate(candidate, config.max_prompt_chars, tokenizer)
    if problem is None:
        return None
    if problem.kind == "too_long":
        return EditorOverlongCandidate(f"editor proposed a prompt of {len(candidate)} characters "
                                       f"(max_prompt_chars={config.max_prompt_chars}); dropped, "
                                       "keeping the current prompt")
    if problem.kind == "empty":
        return EditorNoTags("editor proposed an empty prompt; keeping the current prompt")
    return EditorUnsafeCandidate(f"editor proposed an unusable prompt: {problem}; dropped, keeping "
                                 "the current prompt")


def question_problem(original: str, new: str | None, tokenizer: Any = None) -> str | None:
    """Why a rewritten question cannot be used, or None."""
    if not new or not new.strip():
        return "empty rewrite"
    if new.strip() == original.strip():
        return "identical to the original"
    found = control_tokens(new, tokenizer)
    if found:
        return f"chat-template tokens ({', '.join(found[:3])})"
    if len(new) > max(3 * len(original), 400):
        return f"too long ({len(new)} characters)"
    missing = sorted(set(_NUMBER.findall(original)) - set(_NUMBER.findall(new)))
    if missing:
        return f"drops numbers of the original ({', '.join(missing[:5])})"
    return None


def verify_question_edits(pending: dict[str, dict[str, Any]], prompt: str, prompt_version: int,
                          examples: dict[str, ProbeExample], config: NSLoRAConfig,
                          run: RunView) -> list[dict[str, Any]]:
    from nslora_plugin.core.answers import format_compliant

    rows: list[dict[str, Any]] = []
    verdicts: dict[str, str] = {}
    for example_id in sorted(pending):
        item = pending[example_id]
        ex = examples.get(example_id)
        if ex is None or ex.answer is None:
            verdicts[example_id] = "rejected: no reference answer to check against"
            continue
        rewritten = ProbeExample(id=ex.id, question=item["question"], reference=ex.reference,
                                 answer=ex.answer)
        reply = run.generate(prompt, rewritten.question)
        result = run.score(rewritten, reply)
        if result.rewards.get("correctness", 0.0) < 1.0:
            verdicts[example_id] = "rejected: the model's reply to it misses the reference answer"
            continue
        targets = []
        if not config.answer_format or format_compliant(ex.reference, config.answer_format):
            targets.append(("question_edit", ex.reference))
        if result.passed:
            targets.append(("question_edit_self", reply))
        for source, target in targets:
            rows.append({"messages": chat_messages(None, rewritten.question, target),
                         "source": source, "example_id": ex.id, "original_question": ex.question,
                         "prompt_version": prompt_version})
        verdicts[example_id] = "accepted" if targets else "rejected: no reply that meets the constraints"
    accepted = sum(v == "accepted" for v in verdicts.values())
    log.info("NSLoRA question edits: %d/%d rewritten questions verified under the current prompt "
             "and added to the training data", accepted, len(verdicts))
    run.record("question_edits", {"verdicts": verdicts, "rows": len(rows), "prompt_version": prompt_version})
    return rows
