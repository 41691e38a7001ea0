"""A deterministic editor with no LLM: it states each violated constraint in the system prompt.

It is what runs when no editor LLM is configured or reachable, and the fallback when an LLM's
candidates fail the validation gate. Its candidates go through the same gate and history.

The constraints are the ones the reward functions check (`rewards.CONSTRAINT_COMPONENTS`): the
answer format (regex, stated by `format_instruction` or derived from the regex), the reply length
(`max_reply_chars`) and JSON replies (`reply_json`). One candidate covers every constraint that some
failure violates and that the prompt does not state yet.

`format_instruction: ""` (empty, not unset) hides the format rule from every editor: it is not
stated in words nor derived from the regex (`constraint_statements` leaves it out, and the TextGrad
editor reads its constraints from there). With nothing else to state the constraint editor is then
unavailable, and says so (`nslora compare --hide-format-rule`).
"""

from __future__ import annotations

from typing import Sequence

from nslora_plugin.core.config import NSLoRAConfig
from nslora_plugin.core.hookspecs import hookimpl
from nslora_plugin.core.records import EditorStatus, EditProposal, ProbeResult

NAME = "constraint"


HIDDEN_RULE = ("the format rule is hidden from the editors (format_instruction is empty), and "
               "stating the constraints is all the constraint editor does")


def format_hidden(config: NSLoRAConfig) -> bool:
    """`format_instruction: ""`: no editor may be told anything about the format, the regex
    included."""
    return config.format_instruction is not None and not config.format_instruction.strip()


def constraint_statements(config: NSLoRAConfig) -> dict[str, str]:
    """Reward component → the constraint in words, for every configured constraint (in order);
    no format statement when the rule is hidden (`format_hidden`)."""
    out: dict[str, str] = {}
    if config.format_instruction:
        out["format"] = config.format_instruction.strip()
    elif config.answer_format and not format_hidden(config):
        out["format"] = f"Your reply must contain a line matching the pattern {config.answer_format}"
    if config.reply_json:
        out["json"] = "Reply with one valid JSON value and nothing else (no prose, no code fences)."
    if config.max_reply_chars:
        out["length"] = f"Keep every reply under {config.max_reply_chars} characters."
    return out


def violated_constraints(failures: Sequence[ProbeResult], config: NSLoRAConfig) -> dict[str, int]:
    """Constraint component → number of failures that violate it."""
    counts: dict[str, int] = {}
    for component in constraint_statements(config):
        n = sum(1 for f in failures if f.rewards.get(component, 1.0) < 1.0)
        if n:
            counts[component] = n
    return counts


class ConstraintEditor:
    name = NAME

    @staticmethod
    def _status(config: NSLoRAConfig) -> EditorStatus:
        if format_hidden(config) and not constraint_statements(config):
            return EditorStatus(NAME, ready=False, reason=HIDDEN_RULE)
        return EditorStatus(NAME, ready=True)  # no LLM: always able to edit

    @hookimpl
    def nslora_editor_start(self, config: NSLoRAConfig) -> EditorStatus:
        return self._status(config)

    @hookimpl
    def nslora_editor_status(self, config: NSLoRAConfig) -> EditorStatus:
        return self._status(config)

    @hookimpl(trylast=True)
    def nslora_propose_edit(self, prompt: str, failures: Sequence[ProbeResult],
                            config: NSLoRAConfig, tried: tuple[str, ...]) -> EditProposal | None:
        if NAME in tried:
            return None
        statements = constraint_statements(config)
        violated = violated_constraints(failures, config)
        base = (prompt or "").rstrip()
        # restating a constraint the prompt already carries cannot help
        missing = [c for c in statements if c in violated and statements[c] not in base]
        if not missing:
            return None
        candidate = "\n".join([base, *(statements[c] for c in missing)]) if base else \
            "\n".join(statements[c] for c in missing)
        if len(candidate) > config.max_prompt_chars:
            return None
        detail = ", ".join(f"{c} ({violated[c]}/{len(failures)} failures)" for c in missing)
        return EditProposal(editor=NAME, prompt=candidate,
                            rationale=f"state the violated constraints in the system prompt: {detail}",
                            meta={"violations": sum(violated[c] for c in missing),
                                  "constraints": {c: violated[c] for c in missing}})
