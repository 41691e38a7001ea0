"""How NSLoRA settings are named outside Python: the `nslora` switch, the `nslora_` key prefix, and
the "did you mean" hint for a misspelled key or flag.

The core config, its CLI flags and the TRL / Axolotl / LLaMA-Factory adapters all read settings
spelled this way (`nslora: true`, `nslora_check_every: 20`, `--nslora_check_every 20`, or an
`nslora:` mapping of unprefixed settings); this module is the one place that knows the spelling.
It sits below the config (it imports only `util`), so the config and every adapter can use it.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

from nslora_plugin.core.util import parse_bool

__all__ = ["SWITCH", "PREFIX", "CONFIG_KEY", "NSLoRAConfigError", "clean_key", "normalize_key",
           "is_nslora_key", "flat_key", "parse_switch", "did_you_mean"]

#: The on/off key (`nslora: true`) and flag (`--nslora`); as a mapping it holds unprefixed settings.
SWITCH = "nslora"
#: The prefix of every setting's framework key (`nslora_check_every`) and flag (`--nslora_...`).
PREFIX = "nslora_"
#: The key / flag naming a separate NSLoRA YAML file.
CONFIG_KEY = PREFIX + "config"


class NSLoRAConfigError(ValueError):
    """A bad config key or value. The message names the key, the value and what is allowed;
    `.key` holds the offending field name (without the `nslora_` prefix)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def clean_key(key: Any) -> str:
    """A key as written, tidied: surrounding spaces dropped, dashes read as underscores."""
    return str(key).strip().replace("-", "_")


def normalize_key(key: str) -> str:
    """The config field a key names: `nslora_check_every` / `nslora-check-every` / `check_every`
    -> `check_every`, and the switch `nslora` -> `enabled`."""
    key = clean_key(key)
    if key == SWITCH:
        return "enabled"
    if key.startswith(PREFIX):
        key = key[len(PREFIX):]
    return key


def is_nslora_key(key: Any) -> bool:
    """Whether a framework config key belongs to NSLoRA (the switch or an `nslora_*` key)."""
    k = clean_key(key)
    return k == SWITCH or k.startswith(PREFIX)


def flat_key(name: str) -> str:
    """The framework key of a config field: `check_every` -> `nslora_check_every`."""
    return PREFIX + name


def parse_switch(value: Any) -> bool:
    """The value of the `nslora` switch: a bool, a word such as "true" / "off" (an empty string and
    None mean off), or 0 / 1. Anything else raises `NSLoRAConfigError`."""
    if value is None:
        return False
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    parsed = False if isinstance(value, str) and not value.strip() else parse_bool(value)
    if parsed is None:
        raise NSLoRAConfigError(
            f"Invalid value {SWITCH}={value!r}: expected true, false, or a mapping of NSLoRA "
            f"settings (e.g. '{SWITCH}: {{probe_path: probe.jsonl, check_every: 20}}').")
    return parsed


def did_you_mean(word: str, choices: Iterable[str], *, inline: bool = False) -> str:
    """The hint for a misspelled key or flag: " Did you mean 'check_every'?" naming the closest of
    `choices`, or "" when none is close. `inline=True` gives the clause of a one-line command-line
    error instead: " (did you mean --nslora_check_every?)"."""
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    if not close:
        return ""
    return f" (did you mean {close[0]}?)" if inline else f" Did you mean {close[0]!r}?"
