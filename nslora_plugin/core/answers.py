"""Answer helpers the core needs as much as the reward plugins: find the final answer in a reply,
compare answers, and test a reply against a format regex. Deterministic, no LLM; the built-in
rewards (`builtins/rewards.py`) are one user of them, the loop, the data loader and the router
others, so replacing the rewards plugin leaves them in place."""

from __future__ import annotations

import json
import re

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
