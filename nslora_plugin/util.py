"""Small helpers that several stages share, written once: boolean words, environment switches,
secret redaction, chat-template control tokens, a free loopback port and a tolerant JSONL reader.
No framework is imported here."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit

TRUE_WORDS = frozenset({"1", "true", "yes", "y", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "n", "off"})

#: Chat-template control tokens of common model families: a system prompt must contain none of them.
ROLE_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|begin_of_text|>", "[INST]", "[/INST]", "<s>", "</s>",
                "<start_of_turn>", "<end_of_turn>")
#: Any `<|...|>` marker, the shape most chat templates use for their control tokens.
GENERIC_MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>")

#: Environment variables whose names contain one of these hold secrets (their values are redacted).
_SECRET_NAME_PARTS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def parse_bool(value: Any) -> bool | None:
    """True/False for a bool or one of the words in TRUE_WORDS / FALSE_WORDS; None otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    return None


def env_flag(name: str) -> bool:
    """Whether the environment switch `name` is on (1/true/yes/on, any case)."""
    return parse_bool(os.environ.get(name, "")) is True


def secret_values(extra: Iterable[str | None] = ()) -> list[str]:
    """The secrets to scrub: values of secret-named environment variables (8+ characters) and any
    `extra` values (4+ characters), longest first so a longer secret is replaced whole."""
    found = {value for name, value in os.environ.items()
             if value and len(value) >= 8 and any(p in name.upper() for p in _SECRET_NAME_PARTS)}
    found |= {value for value in extra if value and len(value) >= 4}
    return sorted(found, key=len, reverse=True)


def url_password(url: str | None) -> str | None:
    """The password part of `http://user:password@host/...`, or None."""
    if not url:
        return None
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def redact(text: str, extra: Iterable[str | None] = ()) -> str:
    """`text` with every secret (see `secret_values`) replaced by `***`."""
    for value in secret_values(extra):
        text = text.replace(value, "***")
    return text


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the OS for a currently unused TCP port on ``host``.

    The port is released before returning, so another process could take it in between; on a
    loopback interface used by one test run that race is negligible.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def read_jsonl_tolerant(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL log NSLoRA wrote; [] when the file is missing, and a torn last line (after
    a hard kill) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
