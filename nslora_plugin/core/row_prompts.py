"""The system message the training rows really carry, read once at train start.

NSLoRA reaches training through the collator, which finds the token span of the *initial* system
prompt in every example and swaps in the current one (`collator.py`). An initial prompt that the
rows do not carry makes every accepted edit a dead letter: the probe scores it, the gate accepts
it, and no training row ever sees it. So, before the first probe:

- with `system_prompt` unset, the initial prompt is the system message the training rows carry
  (every row, or a sample of `SAMPLE_ROWS` for bigger sets), read from their tokens as the chat
  template writes a system turn (or from raw `messages` rows when the dataset has no tokens);
  rows carrying several different ones are refused, naming two of them and `system_prompt`;
- a `system_prompt` that no training row carries is refused;
- rows with no system message at all (Axolotl's alpaca and other instruction formats, templates
  that write no default one) are refused, saying what to set. NSLoRA does not insert a system turn
  into tokenized rows: a template-specific splice would be a guess. (The LLaMA-Factory adapter
  does insert one, through LLaMA-Factory's own `default_system`, before tokenization.)

`read_row_prompts` reads; `initial_prompt_from_rows` decides or raises `NSLoRAConfigError` with
`key="system_prompt"`.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from nslora_plugin.core.chat import chat_messages, render
from nslora_plugin.core.collator import find_subsequence, prompt_span_ids, template_default_system_prompt
from nslora_plugin.core.keys import NSLoRAConfigError

log = logging.getLogger("nslora")

#: Rows read at most (a seeded sample beyond that): enough to see a second system message that
#: one row in a thousand carries, and a fraction of a second on the CPU.
SAMPLE_ROWS = 2048

#: How the setting is spelled in each place a user writes it.
SETTING = ("system_prompt (nslora_system_prompt in an Axolotl or LLaMA-Factory YAML, "
           "--nslora_system_prompt for TRL scripts)")

_SYSTEM_SENTINEL = "\ue004nslora-row-system\ue004"
_USER_SENTINEL = "\ue005nslora-row-user\ue005"


@dataclass
class RowPrompts:
    """What the training rows read carry. `messages`: system message -> rows carrying it;
    `without`: rows with no system message; `unreadable`: rows whose system turn was found but
    could not be cut out. Packed rows count each packed example."""

    total: int
    read: int
    source: str  # "tokens" (decoded input_ids) or "messages" (raw chat rows)
    messages: Counter = field(default_factory=Counter)
    without: int = 0
    unreadable: int = 0
    token_rows: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def sampled(self) -> bool:
        return self.read < self.total

    def carrying(self, tokenizer: Any, prompt: str) -> int:
        """Rows read that carry `prompt` where the collator looks for it: the prompt's token span
        in the row's tokens (for raw `messages` rows, the system message itself)."""
        if self.source == "messages":
            return sum(n for text, n in self.messages.items() if text.strip() == prompt.strip())
        try:
            span = prompt_span_ids(tokenizer, prompt)
        except ValueError:
            return 0
        return sum(1 for ids in self.token_rows if find_subsequence(ids, span) >= 0)

    def describe(self, limit: int = 2) -> str:
        """'"A" (12 rows), "B" (3 rows) and 5 rows with no system message', for messages."""
        parts = [f"{_clip(text)!r} ({n} row{'s' if n != 1 else ''})"
                 for text, n in self.messages.most_common(limit)]
        more = len(self.messages) - limit
        if more > 0:
            parts.append(f"{more} other system message{'s' if more != 1 else ''}")
        if self.without:
            parts.append(f"{self.without} row{'s' if self.without != 1 else ''} with no system message")
        if self.unreadable:
            parts.append(f"{self.unreadable} row{'s' if self.unreadable != 1 else ''} whose system "
                         "message could not be read")
        return ", ".join(parts) if parts else "nothing"

    def of_rows(self) -> str:
        return (f"{self.read} training rows" if not self.sampled
                else f"{self.read} training rows sampled of {self.total}")


# ------------------------------------------------------------------------------------- reading
def read_row_prompts(tokenizer: Any, dataset: Any, *, limit: int = SAMPLE_ROWS,
                     seed: int = 0) -> RowPrompts | None:
    """The system messages of `dataset`'s rows (a map-style dataset: an HF `Dataset`, a list, a
    torch `Dataset`): every row, or a seeded sample of `limit`. Rows with `input_ids` are read
    from their tokens (TRL's packed rows split at `seq_lengths`), rows with `messages` only from
    the messages. None when the rows cannot be read ahead of training (an iterable dataset, rows
    with neither)."""
    try:
        total = len(dataset)
    except TypeError:
        return None
    if total == 0:
        return None
    indices = list(range(total)) if total <= limit else sorted(random.Random(seed).sample(range(total), limit))
    rows = _fetch(dataset, indices)
    if not rows:
        return None
    if all("input_ids" in row for row in rows):
        return _from_tokens(tokenizer, rows, total)
    if all("messages" in row for row in rows):
        return _from_messages(tokenizer, rows, total)
    return None


def _fetch(dataset: Any, indices: list[int]) -> list[dict[str, Any]] | None:
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, (list, tuple)) and hasattr(dataset, "select_columns"):
        wanted = [c for c in ("input_ids", "seq_lengths", "messages") if c in columns]
        if not wanted:
            return None
        batch = dataset.select_columns(wanted)[indices]  # one read of the columns needed
        return [dict(zip(batch, values)) for values in zip(*batch.values())]
    try:
        rows = [dataset[i] for i in indices]
    except Exception:  # noqa: BLE001 - a dataset that cannot be indexed ahead of training
        return None
    return rows if all(isinstance(r, dict) for r in rows) else None


def _from_tokens(tokenizer: Any, rows: Sequence[dict[str, Any]], total: int) -> RowPrompts:
    segments: list[list[int]] = []
    for row in rows:
        ids = _as_list(row["input_ids"])
        lengths = row.get("seq_lengths")
        if lengths is not None and len(_as_list(lengths)) > 0:  # TRL's packed rows
            at = 0
            for n in _as_list(lengths):
                segments.append(ids[at:at + int(n)])
                at += int(n)
        else:
            segments.append(ids)
    out = RowPrompts(total=total if len(segments) == len(rows) else len(segments) * total // len(rows),
                     read=len(segments), source="tokens", token_rows=segments)
    marks = system_turn_marks(tokenizer)
    special = sorted((t for t in getattr(tokenizer, "all_special_tokens", None) or [] if t), key=len,
                     reverse=True)
    texts = tokenizer.batch_decode(segments, skip_special_tokens=False)
    for text in texts:
        found = _system_in(text, marks, special) if marks else None
        if found is None:
            out.without += 1
        elif found is False:
            out.unreadable += 1
        else:
            out.messages[found] += 1
    return out


def _from_messages(tokenizer: Any, rows: Sequence[dict[str, Any]], total: int) -> RowPrompts:
    out = RowPrompts(total=total, read=len(rows), source="messages")
    default = template_default_system_prompt(tokenizer)
    for row in rows:
        messages = row.get("messages") or []
        first = messages[0] if messages and isinstance(messages[0], dict) else {}
        text = _text(first.get("content")) if first.get("role") == "system" else default
        if text is None or not text.strip():
            out.without += 1
        else:
            out.messages[text] += 1
    return out


def system_turn_marks(tokenizer: Any) -> tuple[str, str] | None:
    """(text before a system message's content, text between it and the user turn) as the chat
    template writes them; None when the template writes no recognisable system turn."""
    try:
        text = render(tokenizer, chat_messages(_SYSTEM_SENTINEL, _USER_SENTINEL), generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template without a system role
        return None
    i, j = text.find(_SYSTEM_SENTINEL), text.find(_USER_SENTINEL)
    if i < 0 or j < i:
        return None
    head, bridge = text[:i], text[i + len(_SYSTEM_SENTINEL):j]
    if not head.strip() or not bridge.strip():
        return None  # e.g. a system message folded into the user turn: not a turn of its own
    return head, bridge


def _system_in(text: str, marks: tuple[str, str], special: list[str]) -> str | bool | None:
    """The system message of one decoded example: its text, None when it has none, False when
    the turn starts but does not end as the template writes it."""
    head, bridge = marks
    at = text.find(head)
    if at < 0:  # a framework that writes the BOS token apart from the template (or not at all)
        bare = head
        for token in special:
            if bare.startswith(token):
                bare = bare[len(token):]
        at = text.find(bare) if bare != head and bare.strip() else -1
        if at < 0:
            return None
        head = bare
    before = text[:at]
    for token in special:
        before = before.replace(token, "")
    if before.strip():  # the system turn must open the example
        return None
    start = at + len(head)
    end = text.find(bridge, start)
    if end < 0:
        return False
    content = text[start:end]
    return content if content.strip() else None


# ------------------------------------------------------------------------------------- deciding
def initial_prompt_from_rows(configured: str | None, rows: RowPrompts, tokenizer: Any) -> tuple[str, dict[str, Any]]:
    """The initial system prompt and what the rows say about it (for the summary), or
    `NSLoRAConfigError(key="system_prompt")` when no training row could carry an edit."""
    if configured is not None:
        prompt, origin = configured, "system_prompt"
    else:
        prompt, origin = _from_data(rows), "training rows"
    carrying = rows.carrying(tokenizer, prompt)
    if carrying == 0:
        raise NSLoRAConfigError(_not_carried(prompt, origin, rows), key="system_prompt")
    if carrying < rows.read:
        log.warning("NSLoRA: the initial system prompt %r is in %d of the %s (the others carry: %s); "
                    "prompt edits reach only those %d", _clip(prompt), carrying, rows.of_rows(),
                    _others(rows, prompt), carrying)
    info = {"initial_prompt_from": origin, "rows": rows.total, "rows_read": rows.read,
            "rows_carrying_initial_prompt": carrying,
            "rows_with_other_system_message": sum(n for t, n in rows.messages.items()
                                                  if t.strip() != prompt.strip()),
            "rows_without_system_message": rows.without, "read_from": rows.source}
    return prompt, info


def _from_data(rows: RowPrompts) -> str:
    if len(rows.messages) >= 2:
        (a, na), (b, nb) = rows.messages.most_common(2)
        raise NSLoRAConfigError(
            f"NSLoRA: the training rows carry {len(rows.messages)} different system messages, e.g. "
            f"{_clip(a)!r} ({na} rows) and {_clip(b)!r} ({nb} rows), of the {rows.of_rows()}. NSLoRA "
            f"edits one system prompt: set {SETTING} to the one it should start from and edit (rows "
            "carrying another keep theirs and never see an edit), or give every row the same one.",
            key="system_prompt")
    if rows.messages:
        return next(iter(rows.messages))
    if rows.unreadable:
        raise NSLoRAConfigError(
            f"NSLoRA could not read the system message of the training rows ({rows.describe()}): "
            f"set {SETTING} to the system message they carry.", key="system_prompt")
    raise NSLoRAConfigError(
        f"NSLoRA: none of the {rows.of_rows()} carries a system message (as the tokenizer's chat "
        "template writes one), so no prompt edit could reach training: an accepted edit would "
        "change the probe's prompt only. Give every training row a system message (a chat "
        "dataset whose rows start with one; with Axolotl a `type: chat_template` dataset, not "
        "alpaca-style instruction rows; with LLaMA-Factory `default_system`) and set "
        f"{SETTING} to it, or run without NSLoRA.", key="system_prompt")


def _not_carried(prompt: str, origin: str, rows: RowPrompts) -> str:
    what = (f"{SETTING.split(' ', 1)[0]}={_clip(prompt)!r}" if origin == "system_prompt"
            else f"the system message read from the training rows ({_clip(prompt)!r})")
    if origin == "system_prompt":
        fix = (f"set {SETTING} to the system message the rows carry, or leave it unset to take it "
               "from the rows" if rows.messages else
               "give every training row that system message (a chat dataset whose rows start with "
               "it; with Axolotl a `type: chat_template` dataset, not alpaca-style instruction "
               "rows; with LLaMA-Factory `default_system`), or run without NSLoRA")
    else:  # decoded, but its tokens as the template renders them are not the rows' tokens
        fix = (f"set {SETTING} to it as the rows were rendered (the chat template that tokenized "
               "them may not be the tokenizer's own)")
    return (f"NSLoRA: {what} is in none of the {rows.of_rows()} (they carry: {rows.describe()}), "
            "so an accepted edit would reach no training row: the collator swaps that prompt's "
            f"tokens in each row. {fix[0].upper()}{fix[1:]}.")


def _others(rows: RowPrompts, prompt: str) -> str:
    others = RowPrompts(total=rows.total, read=rows.read, source=rows.source,
                        messages=Counter({t: n for t, n in rows.messages.items()
                                          if t.strip() != prompt.strip()}),
                        without=rows.without, unreadable=rows.unreadable)
    return others.describe()


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "".join(parts) if parts else None
    return None


def _as_list(value: Any) -> list[int]:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _clip(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
