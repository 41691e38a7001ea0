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

import json
import re

from .config import NSLoRAConfig
from .hookspecs import hookimpl
from .types import ProbeExample

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)


def extract_final_answer(text: str, pattern: str | None = None) -> str | None:
    """The final answer in `text`: `pattern`'s first group (or whole match) when it matches, else
    the GSM8K `#### n` marker, else the last number."""
    if pattern:
        matches = list(re.finditer(pattern, text, flags=re.MULTILINE))
        if matches:
            m = matches[-1]
            return (m.group(1) if m.groups() else m.group(0)).strip()
    m = _GSM8K_FINAL.search(text)
    if m:
        return m.group(1).strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str | None) -> str | None:
    """Canonical form for comparison: numbers without commas / trailing zeros, else casefolded."""
    if answer is None:
        return None
    s = answer.strip().rstrip(".").replace("$", "").strip()
    number = s.replace(",", "")
    try:
        value = float(number)
    except ValueError:
        return " ".join(s.casefold().split())
    return str(int(value)) if value.is_integer() else repr(value)


def answers_match(predicted: str | None, reference: str | None) -> bool:
    p, r = normalize_answer(predicted), normalize_answer(reference)
    return p is not None and r is not None and p == r


def answer_in_reply(answer: str | None, completion: str) -> bool:
    """Does the reply state the right answer *anywhere*, whatever its form? A number matches any
    number in the reply numerically; text matches as a whole word or phrase, case-insensitive.

    This is the content half of a failure, separated from its form: a reply that has the right
    answer but breaks the format needs a prompt, one without the answer needs the weights. The
    router reads it as a feature (`answer_missing`); it is not a reward component.
    """
    target = normalize_answer(answer)
    if not target:
        return False
    if re.fullmatch(r"-?\d+(?:\.\d+)?", target) or re.fullmatch(r"-?\d+\.\d+e[+-]?\d+", target):
        return any(normalize_answer(n) == target for n in _NUMBER.findall(completion))
    return phrase_in_text(answer, completion)


def phrase_in_text(phrase: str | None, text: str) -> bool:
    """`phrase` (normalized like an answer) occurs in `text` as a whole word or phrase,
    case-insensitive, whitespace runs collapsed."""
    target = normalize_answer(phrase)
    if not target:
        return False
    flat = " ".join(text.casefold().split())
    return re.search(r"(?<!\w)" + re.escape(target) + r"(?!\w)", flat) is not None


def exact_match(completion: str, reference: str) -> bool:
    """The whole reply equals the reference, ignoring case and runs of whitespace."""
    def norm(s: str) -> str:
        return " ".join(s.casefold().split())
    return norm(completion) == norm(reference)


def format_compliant(completion: str, answer_format: str) -> bool:
    return re.search(answer_format, completion, flags=re.MULTILINE) is not None


#: Reward components that are symbolic constraints on the form of a reply (not its content).
CONSTRAINT_COMPONENTS = ("format", "length", "json")


def is_json(completion: str) -> bool:
    try:
        json.loads(completion.strip())
    except ValueError:
        return False
    return True


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
