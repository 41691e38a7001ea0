"""The TextGrad editor: optimize the system prompt through an external LLM, fed with failing probes.

One round with batch B (the first `editor_batch_size` failures, in a fixed order):
- forward: the student's replies are the ones the probe already generated under the current prompt
  (the local model exposed as a TextGrad engine, so no editor call is spent on them);
- loss: the editor LLM critiques each reply against its reference answer and the constraints (B calls);
- backward: feedback on the reply, then on the system prompt (2B calls);
- update: one `TextualGradientDescent` step (1 call) → at most 3B+1 calls, fewer than TextGrad's 4B+1.

Sharp edges handled here (see docs): lazy import with logs under the run folder; no global backward
engine (engines are passed explicitly and a user's global engine is set aside for the round);
gradients sorted so the optimizer prompt is identical across runs; a missing `<IMPROVED_VARIABLE>`
tag gets one repair call and otherwise the old prompt stays; every fault is caught and reported
through `loop.record_fault`, never raised into the trainer.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Sequence

from ..config import NSLoRAConfig
from ..hookspecs import hookimpl
from ..types import EditProposal, ProbeExample, ProbeReport, ProbeResult
from .constraint_editor import constraint_statement
from .engine import OpenAICompatibleClient, Usage, make_engine, make_lookup_engine
from .textgrad_env import import_textgrad

if TYPE_CHECKING:
    from ..loop import NeurosymbolicLoop

NAME = "textgrad"
TAGS = ("<IMPROVED_VARIABLE>", "</IMPROVED_VARIABLE>")

ROLE_SYSTEM_PROMPT = ("system prompt given to a small assistant model before every user question; "
                      "it should make the assistant answer correctly and in the required format")
ROLE_QUESTION = "question the assistant has to answer"
ROLE_REPLY = "reply of the assistant to the question"

CRITIQUE_TEMPLATE = (
    "You review one reply of a small assistant model.\n"
    "Question it answered: {question}\n"
    "Reference reply: {reference}\n"
    "{constraint_line}"
    "Point out, in at most three short sentences, how the reply differs from the reference in "
    "its final result and in its form. Do not write a new reply."
)

REPAIR_TEMPLATE = (
    "Your previous message did not contain the improved text between the tags {start} and {end}.\n"
    "Here is the text that was being improved:\n{old}\n\n"
    "Here is your previous message:\n{reply}\n\n"
    "Write only the improved text, starting with {start} and ending with {end}."
)


def parse_tagged(text: str) -> str | None:
    """The text between the improved-variable tags, or None (TextGrad would raise IndexError)."""
    m = re.search(re.escape(TAGS[0]) + r"(.*?)(?:" + re.escape(TAGS[1]) + r"|$)", text, flags=re.S)
    if not m:
        return None
    value = m.group(1).strip()
    return value or None


class TextGradEditor:
    name = NAME

    def __init__(self) -> None:
        self.client: OpenAICompatibleClient | None = None
        self.usage = Usage()

    # ---------------------------------------------------------------- lifecycle
    def connect(self, config: NSLoRAConfig) -> OpenAICompatibleClient:
        if self.client is None:
            self.client = OpenAICompatibleClient(config, self.usage)
        return self.client

    @hookimpl(tryfirst=True)
    def nslora_propose_edit(self, prompt: str, failures: Sequence[ProbeResult],
                            examples: dict[str, ProbeExample], report: ProbeReport,
                            config: NSLoRAConfig, tried: tuple[str, ...],
                            loop: "NeurosymbolicLoop") -> EditProposal | None:
        if NAME in tried or not failures or not loop.llm_editor_ready:
            return None
        try:
            return self._round(prompt, failures, examples, config, loop)
        except Exception as exc:  # an editor fault must never reach the trainer
            loop.record_fault(NAME, exc)
            return None

    # ---------------------------------------------------------------- one round
    def _round(self, prompt: str, failures: Sequence[ProbeResult],
               examples: dict[str, ProbeExample], config: NSLoRAConfig,
               loop: "NeurosymbolicLoop") -> EditProposal | None:
        tg = import_textgrad(loop.artifacts.path("editor_logs"))
        from textgrad.config import SingletonBackwardEngine

        client = self.connect(config)
        editor_engine = make_engine(client)
        batch = sorted(failures, key=lambda r: r.example_id)[:config.editor_batch_size]
        answers = {(prompt, examples[r.example_id].question): r.completion for r in batch}
        student = make_lookup_engine(answers, loop.generate_one)
        calls_before = self.usage.calls

        singleton = SingletonBackwardEngine()
        saved_global, singleton.engine = singleton.engine, None
        try:
            system = tg.Variable(prompt, requires_grad=True, role_description=ROLE_SYSTEM_PROMPT)
            forward = tg.autograd.LLMCall(student, system_prompt=system)
            statement = constraint_statement(config)
            constraint_line = f"Required form of every reply: {statement}\n" if statement else ""
            losses = []
            for r in batch:
                ex = examples[r.example_id]
                question = tg.Variable(ex.question, requires_grad=False, role_description=ROLE_QUESTION)
                reply = forward(question, response_role_description=ROLE_REPLY)
                critique = CRITIQUE_TEMPLATE.format(question=ex.question, reference=ex.reference,
                                                    constraint_line=constraint_line)
                losses.append(tg.TextLoss(critique, engine=editor_engine)(reply))
            total = tg.sum(losses) if len(losses) > 1 else losses[0]
            total.backward(engine=editor_engine)
            # TextGrad keeps gradients in a set ordered by object id: sort for a stable prompt.
            system.gradients = sorted(system.gradients, key=lambda g: g.value)  # type: ignore[assignment]
            constraints = [f"The text must stay under {config.max_prompt_chars} characters.",
                           "The text must be a system prompt addressed to the assistant, not an "
                           "answer to any particular question."]
            if statement:
                constraints.append(f"The text must tell the assistant: {statement}")
            optimizer = tg.TGD(parameters=[system], engine=editor_engine, constraints=constraints)
            candidate, repaired = self._step(optimizer, system, prompt, editor_engine)
        finally:
            singleton.engine = saved_global
        calls = self.usage.calls - calls_before
        if candidate is None:
            loop.record_fault(NAME, "editor reply had no <IMPROVED_VARIABLE> tags, even after a repair "
                              "request; keeping the current prompt")
            return None
        return EditProposal(editor=NAME, prompt=candidate,
                            rationale=f"TextGrad step on {len(batch)} failing probe examples",
                            meta={"calls": calls, "repaired": repaired,
                                  "batch": [r.example_id for r in batch]})

    def _step(self, optimizer: Any, system: Any, old: str, engine: Any) -> tuple[str | None, bool]:
        try:
            optimizer.step()
            return system.value.strip() or None, False
        except IndexError:
            reply = engine.last_response or ""
        salvaged = parse_tagged(reply)  # an opening tag without the closing one
        if salvaged:
            return salvaged, True
        repair = REPAIR_TEMPLATE.format(start=TAGS[0], end=TAGS[1], old=old, reply=reply[:2000])
        return parse_tagged(engine(repair)), True
