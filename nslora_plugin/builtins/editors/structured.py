"""Getting a usable prompt out of the editor's update reply, from large and small models alike.

TextGrad's optimizer asks for the new text between `<IMPROVED_VARIABLE>` tags and raises
`IndexError` when the opening tag is missing. Small and local models often miss it, so the update
call is helped three ways (`editor_structured_output: auto`):

- OpenAI-compatible and LiteLLM endpoints get a JSON-schema `response_format` (one string field,
  `improved_variable`); servers that implement it (OpenAI, vLLM, llama.cpp server, Ollama) then
  answer with that object. `transformers serve` accepts the field and ignores it (it logs
  "Ignoring unsupported fields"), so the embedded editor's replies are plain text and only the
  lenient parse below helps them. A server that refuses the field (HTTP 400/422) gets the call
  again without it, and no schema for the rest of the run.
- The `local` backend starts the reply with the opening tag itself (a prefilled assistant turn),
  so the model can only write the text that follows it.
- Every reply is parsed leniently: the exact tags; a JSON object (bare, fenced or embedded) with
  the field; tags in another case or spacing, or an opening tag with no closing one.

The parsed value goes back to TextGrad wrapped in the exact tags, so its own parser takes it.
"""

from __future__ import annotations

import json
import re
from typing import Any

TAGS = ("<IMPROVED_VARIABLE>", "</IMPROVED_VARIABLE>")
FIELD = "improved_variable"

RESPONSE_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": FIELD,
        "strict": True,
        "schema": {"type": "object",
                   "properties": {FIELD: {"type": "string", "description": "the improved text, in full"}},
                   "required": [FIELD], "additionalProperties": False},
    },
}

_EXACT = re.compile(re.escape(TAGS[0]) + r"(.*?)(?:" + re.escape(TAGS[1]) + r"|$)", flags=re.S)
_LOOSE_OPEN = re.compile(r"<\s*improved[\s_-]*variable\s*>", flags=re.I)
_LOOSE_CLOSE = re.compile(r"<\s*/\s*improved[\s_-]*variable\s*>", flags=re.I)
_FENCE = re.compile(r"```(?:json|text)?\s*(.*?)```", flags=re.S | re.I)
_OBJECT = re.compile(r"\{.*\}", flags=re.S)


def _clean(value: str) -> str | None:
    value = value.strip()
    fenced = _FENCE.fullmatch(value)
    if fenced:
        value = fenced.group(1).strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1].strip()
    return value or None


def _from_json(text: str) -> str | None:
    candidates = [text.strip()] + [m.group(1) for m in _FENCE.finditer(text)]
    embedded = _OBJECT.search(text)
    if embedded:
        candidates.append(embedded.group(0))
    for raw in candidates:
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, ValueError):
            continue
        if not isinstance(obj, dict):
            continue
        by_lower = {str(k).lower(): v for k, v in obj.items()}
        value = by_lower.get(FIELD)
        if value is None:  # another name for the one field a schema-less model chose
            strings = [v for v in obj.values() if isinstance(v, str)]
            value = strings[0] if len(obj) == 1 and strings else None
        if isinstance(value, str):
            inner = parse_candidate(value)[0] if _LOOSE_OPEN.search(value) else _clean(value)
            if inner:
                return inner
    return None


def parse_candidate(text: str | None) -> tuple[str | None, str]:
    """(the proposed text, how it was found) — how: "tags", "json", "lenient" or "none"."""
    text = text or ""
    m = _EXACT.search(text)
    if m:
        value = _clean(m.group(1))
        if value:
            return value, "tags"
    value = _from_json(text)
    if value:
        return value, "json"
    opening = _LOOSE_OPEN.search(text)
    if opening:
        rest = text[opening.end():]
        closing = _LOOSE_CLOSE.search(rest)
        value = _clean(rest[:closing.start()] if closing else rest)
        if value:
            return value, "lenient"
    return None, "none"


def as_tagged(text: str | None) -> tuple[str, str]:
    """`text` rewritten so TextGrad's strict parser finds the candidate, and how it was found;
    a reply with no candidate is returned unchanged."""
    value, how = parse_candidate(text)
    if value is None:
        return text or "", how
    return f"{TAGS[0]}{value}{TAGS[1]}", how
