"""Built-in reward components: correctness of the final answer and compliance with the answer format.

Both are deterministic (no LLM) so that the router and the validation gate are cheap and
reproducible. `correctness` compares final answers (numbers compare numerically, GSM8K style);
`format` is 1 when the completion matches the configured `answer_format` regex. Two more
symbolic constraints, when configured: `length` (the reply has at most `max_reply_chars`
characters) and `json` (the reply is valid JSON, with `reply_json`); and one more content
component, `exact_match` (the whole reply equals the reference, with `exact_match`), for
short-answer and classification data. The constraint components are
listed in `CONSTRAINT_COMPONENTS`; the editors state each violated one in the system prompt.
"""

from __future__ import annotations

from nslora_plugin.core.answers import (CONSTRAINT_COMPONENTS, answer_in_reply, answers_match, exact_match,
                                         extract_final_answer, format_compliant, is_json)
from nslora_plugin.core.config import NSLoRAConfig
from nslora_plugin.core.hookspecs import hookimpl
from nslora_plugin.core.records import ProbeExample


class BuiltinRewards:
    """Rewards: `correctness` (when the example has an answer), `format`, `length`, `json` and
    `exact_match` when configured. Signal: `answer_present` (when the example has an answer)."""

    @hookimpl
    def nslora_score_probe(self, example: ProbeExample, completion: str,
                           config: NSLoRAConfig) -> dict[str, float] | None:
        scores: dict[str, float] = {}
        if example.answer is not None:
            predicted = extract_final_answer(completion, config.answer_pattern or config.answer_format)
            scores["correctness"] = float(answers_match(predicted, example.answer))
        if config.answer_format:
            scores["format"] = float(format_compliant(completion, config.answer_format))
        if config.max_reply_chars:
            scores["length"] = float(len(completion) <= config.max_reply_chars)
        if config.reply_json:
            scores["json"] = float(is_json(completion))
        if config.exact_match:
            scores["exact_match"] = float(exact_match(completion, example.reference))
        return scores or None

    @hookimpl
    def nslora_probe_signals(self, example: ProbeExample, completion: str) -> dict[str, float] | None:
        """`answer_present`: the right answer appears anywhere in the reply, whatever its form."""
        if example.answer is None:
            return None
        return {"answer_present": float(answer_in_reply(example.answer, completion))}
