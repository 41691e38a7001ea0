"""Small helpers that several stages share, written once: boolean words, environment switches,
secret redaction, chat-template control tokens, a free loopback port and a tolerant JSONL reader.
No framework is imported here."""

from __future__ import annotations

import base64
import json
import logging
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


_REGISTERED: set[str] = set()


def register_secret(*values: str | None) -> None:
    """Scrub these values (an editor key, a URL's password) from everything `redact` sees, for
    the rest of the process: artifacts, state, logs, error messages."""
    _REGISTERED.update(v for v in values if v and len(v) >= 4)


def secret_values(extra: Iterable[str | None] = ()) -> list[str]:
    """The secrets to scrub, longest first so a longer one is replaced whole: values of
    secret-named environment variables (8+ characters), registered ones, any `extra` values
    (4+ characters), and of every secret of 12+ characters its last 8 (servers quote keys as
    `sk-...1234`-style fragments)."""
    found = {value for name, value in os.environ.items()
             if value and len(value) >= 8 and any(p in name.upper() for p in _SECRET_NAME_PARTS)}
    found |= _REGISTERED
    found |= {value for value in extra if value and len(value) >= 4}
    found |= {value[-8:] for value in list(found) if len(value) >= 12}
    return sorted(found, key=len, reverse=True)


def url_secrets(url: str | None) -> list[str]:
    """What a URL with credentials (`http://user:pw@host`) can leak: the password and the Basic
    authorization token built from it."""
    password = url_password(url)
    if not password:
        return []
    user = urlsplit(url or "").username or ""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return [password, token, token.rstrip("=")]


def url_password(url: str | None) -> str | None:
    """The password part of `http://user:password@host/...`, or None."""
    if not url:
        return None
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def redact(text: str, extra: Iterable[str | None] = ()) -> str:
    """`text` with every secret (see `secret_values`) replaced by `***`, and masked quotes of
    one (`sk-...wxyz`, `sk-****wxyz`: a mask, then the secret's last 4 characters) too."""
    for value in secret_values(extra):
        text = text.replace(value, "***")
        if len(value) >= 12:
            text = re.sub(r"(?:\.{3}|…|\*{2,})" + re.escape(value[-4:]) + r"(?![A-Za-z0-9])", "***", text)
    return text


_LOG_REDACTION = False


def install_log_redaction() -> None:
    """Scrub secrets from every log record of every logger in this process (HTTP clients log
    request URLs, which may carry a password), by wrapping the record factory once."""
    global _LOG_REDACTION
    if _LOG_REDACTION:
        return
    _LOG_REDACTION = True
    make_record = logging.getLogRecordFactory()

    def redacting_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's problem, not ours
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return record

    logging.setLogRecordFactory(redacting_record)


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
