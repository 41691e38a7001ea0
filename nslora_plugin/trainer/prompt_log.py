"""Prompt versions as text for the trainer's `report_to` loggers: each accepted prompt (and the
initial one) with a word diff against the version before it.

- TensorBoard: `add_text` on the writer of the trainer's own `TensorBoardCallback`, at the step
  the version was accepted (tags `nslora/prompt` and `nslora/prompt_diff`).
- Weights & Biases: a `wandb.Table` (step, version, prompt, diff) logged as `nslora/prompts` on
  the run the W&B callback started, every row so far each time.

Neither library is imported here: the TensorBoard writer comes from the trainer's callback, and
`wandb` only from `sys.modules`, where the W&B callback put it. A logger not in `report_to` gets
nothing.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass
from typing import Any, Sequence

TEXT_TAG = "nslora/prompt"
DIFF_TAG = "nslora/prompt_diff"
TABLE_KEY = "nslora/prompts"
COLUMNS = ["step", "version", "prompt", "diff"]
LOGGERS = ("tensorboard", "wandb")


@dataclass(frozen=True)
class PromptEntry:
    step: int
    version: int
    prompt: str
    diff: str


def word_diff(old: str, new: str) -> str:
    """`new` against `old` word by word, whitespace kept: `[-removed-]{+added+}`."""
    a, b = _tokens(old), _tokens(new)
    out: list[str] = [new[:len(new) - len(new.lstrip())]]
    matcher = difflib.SequenceMatcher(None, [w for w, _ in a], [w for w, _ in b], autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            out.extend(w + s for w, s in b[j1:j2])
            continue
        removed, added = _join(a[i1:i2]), _join(b[j1:j2])
        if out[-1] and not out[-1][-1:].isspace():
            out.append(" ")
        if removed[0]:
            out.append(f"[-{removed[0]}-]")
        if added[0]:
            out.append(f"{{+{added[0]}+}}")
        out.append(added[1] if added[0] else removed[1])
    return "".join(out).rstrip() if not new[-1:].isspace() else "".join(out)


def _tokens(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(r"(\S+)(\s*)", text)]


def _join(tokens: list[tuple[str, str]]) -> tuple[str, str]:
    """(the words with the whitespace between them, the whitespace after the last one)."""
    text = "".join(w + s for w, s in tokens)
    core = text.rstrip()
    return core, text[len(core):]


def prompt_entries(history: Sequence[Any], since: int = 0) -> list[PromptEntry]:
    """The accepted versions from `since` on, each with its diff against the version before."""
    accepted = sorted((c for c in history if c.accepted and c.version is not None),
                      key=lambda c: c.version)
    prompts = {c.version: c.prompt for c in accepted}
    return [PromptEntry(step=int(c.step), version=int(c.version), prompt=c.prompt,
                        diff=word_diff(prompts.get(c.version - 1, ""), c.prompt))
            for c in accepted if c.version >= since]


def requested(report_to: Any) -> list[str]:
    """The loggers among `LOGGERS` that the trainer's `report_to` names."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [name for name in LOGGERS if name in names]


class PromptLog:
    """Sends each prompt version once to every requested logger that is active."""

    def __init__(self, report_to: Any, first_version: int = 0) -> None:
        self.pending: dict[str, int] = {name: first_version for name in requested(report_to)}
        self.rows: list[list[Any]] = []

    def flush(self, history: Sequence[Any], version: int, callbacks: Sequence[Any],
              global_step: int) -> None:
        """Log the versions up to `version` that a logger has not had yet."""
        for name, since in self.pending.items():
            if since > version:
                continue
            entries = prompt_entries(history, since)
            if not entries:
                continue
            sent = (_to_tensorboard(callbacks, entries) if name == "tensorboard"
                    else self._to_wandb(entries, global_step))
            if sent:
                self.pending[name] = entries[-1].version + 1

    def _to_wandb(self, entries: list[PromptEntry], global_step: int) -> bool:
        wandb = sys.modules.get("wandb")
        run = getattr(wandb, "run", None) if wandb is not None else None
        if run is None:
            return False
        self.rows.extend([e.step, e.version, e.prompt, e.diff] for e in entries)
        # a logged Table is frozen: a new one with every row so far, under the trainer's step
        run.log({TABLE_KEY: wandb.Table(columns=COLUMNS, data=[list(r) for r in self.rows]),
                 "train/global_step": global_step})
        return True


def _to_tensorboard(callbacks: Sequence[Any], entries: list[PromptEntry]) -> bool:
    from transformers.integrations import TensorBoardCallback

    writer = next((cb.tb_writer for cb in callbacks
                   if isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None), None)
    if writer is None:
        return False
    for e in entries:
        writer.add_text(TEXT_TAG, _code_block(e.prompt), global_step=e.step)
        writer.add_text(DIFF_TAG, _code_block(e.diff), global_step=e.step)
    writer.flush()
    return True


def _code_block(text: str) -> str:
    """TensorBoard renders text as Markdown: a fence keeps newlines and `<...>` as written."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"
