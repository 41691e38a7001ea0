"""A deterministic editor with no LLM: it states the violated constraint in the system prompt.

It is what runs when no editor LLM is configured or reachable, and the fallback when an LLM's
candidates fail the validation gate. Its candidates go through the same gate and history.
"""

from __future__ import annotations

from typing import Sequence

from ..config import NSLoRAConfig
from ..hookspecs import hookimpl
from ..types import EditProposal, ProbeResult

NAME = "constraint"


def constraint_statement(config: NSLoRAConfig) -> str | None:
    """The constraint in words: the configured instruction, else one derived from the regex."""
    if config.format_instruction:
        return config.format_instruction.strip()
    if config.answer_format:
        return f"Your reply must contain a line matching the pattern {config.answer_format}"
    return None


class ConstraintEditor:
    name = NAME

    @hookimpl(trylast=True)
    def nslora_propose_edit(self, prompt: str, failures: Sequence[ProbeResult],
                            config: NSLoRAConfig, tried: tuple[str, ...]) -> EditProposal | None:
        if NAME in tried:
            return None
        statement = constraint_statement(config)
        violated = [f for f in failures if f.rewards.get("format", 1.0) < 1.0]
        if statement is None or not violated:
            return None
        if statement in (prompt or ""):
            return None  # already stated; restating it cannot help
        base = (prompt or "").rstrip()
        candidate = f"{base}\n{statement}" if base else statement
        if len(candidate) > config.max_prompt_chars:
            return None
        return EditProposal(editor=NAME, prompt=candidate,
                            rationale=f"{len(violated)}/{len(failures)} failures violate the format "
                                      "constraint; state it in the system prompt",
                            meta={"violations": len(violated)})
