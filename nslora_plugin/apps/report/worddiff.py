"""A word-level diff of two prompts as HTML (`<del>` / `<ins>`): prompts are edited a sentence
at a time, and a line diff would mark a whole paragraph for one changed word."""

from __future__ import annotations

import difflib
import html
import re

from nslora_plugin.core.util import redact

_TOKENS = re.compile(r"\s+|\w+|[^\w\s]")


def tokens(text: str) -> list[str]:
    """Words, runs of whitespace and single punctuation marks: joined back, they are `text`."""
    return _TOKENS.findall(text)


def word_diff(old: str, new: str) -> str:
    """HTML of `new` against `old`: removed words in `<del>`, added ones in `<ins>`, everything
    escaped. Whitespace is kept (show it in a `white-space: pre-wrap` block)."""
    a, b = tokens(redact(old)), tokens(redact(new))
    out: list[str] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(html.escape("".join(a[i1:i2])))
            continue
        if op in ("delete", "replace"):
            out.append(f"<del>{html.escape(''.join(a[i1:i2]))}</del>")
        if op in ("insert", "replace"):
            out.append(f"<ins>{html.escape(''.join(b[j1:j2]))}</ins>")
    return "".join(out)
