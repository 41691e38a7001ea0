"""Axolotl config keys of the NSLoRA plugin, as the pydantic model Axolotl merges into its schema.

Axolotl builds its config class by inheriting from every plugin's `get_input_args()` model, so the
fields below become top-level YAML keys. Two spellings are accepted:

    nslora: true                      # flat: the switch plus one `nslora_<field>` key per setting
    nslora_probe_path: data/probe.jsonl
    nslora_check_every: 20

    nslora:                           # mapping: the same settings without the prefix
      probe_path: data/probe.jsonl    # (`enabled: false` inside turns it off)
      check_every: 20

A before-validator turns the mapping into the flat keys, validates every setting with
`NSLoRAConfig` (so the rules and messages are the core's, re-worded to name the YAML key), rejects
misspelled `nslora_*` keys (Axolotl itself drops unknown keys silently) and the Axolotl settings
NSLoRA cannot work with (collation in worker processes, RL trainers).

This module itself imports pydantic and the core config only, so it can be used and tested
without Axolotl installed (the package `__init__` then defines a plugin that explains how to
install Axolotl when instantiated).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, create_model, model_validator

from nslora_plugin.core.artifacts import folder_problem
from nslora_plugin.core.config import FieldSpec, NSLoRAConfig, NSLoRAConfigError, config_fields
from nslora_plugin.core.data import data_file_problem
from nslora_plugin.core.keys import PREFIX, SWITCH, did_you_mean, flat_key, normalize_key, parse_switch

__all__ = ["NSLoRAArgs", "PREFIX", "SWITCH", "collect_settings", "config_from_axolotl",
           "normalize_axolotl_cfg", "nslora_enabled"]

log = logging.getLogger("nslora")

# `nslora_enabled` is the flat spelling of the switch; everything else maps to one config field.
_FIELDS = {f.name: f for f in dataclasses.fields(NSLoRAConfig)}
_FLAT_KEYS = {flat_key(name): name for name in _FIELDS}


# ------------------------------------------------------------------------------------------------
# Reading the settings out of an Axolotl config (raw YAML dict or validated DictDefault)
# ------------------------------------------------------------------------------------------------


def _yaml_key(name: str, mapping_form: bool) -> str:
    return f"{SWITCH}.{name}" if mapping_form else flat_key(name)


def _unknown(key: str, mapping_form: bool) -> NSLoRAConfigError:
    name = key[len(PREFIX):] if not mapping_form else key
    choices = sorted(_FIELDS) if mapping_form else sorted(_FLAT_KEYS)
    where = f"under '{SWITCH}:'" if mapping_form else "at the top level"
    return NSLoRAConfigError(
        f"Unknown NSLoRA key {_yaml_key(name, mapping_form)!r} {where}."
        f"{did_you_mean(key, choices)} Allowed: " + ", ".join(choices))


def collect_settings(cfg: Mapping[str, Any], *, keep_null: bool = False,
                     ) -> tuple[bool, dict[str, Any], dict[str, str]]:
    """Return (enabled, settings without prefix, setting -> YAML key it came from).

    Only explicitly set (non-None) values are collected, unless `keep_null`: the raw YAML, where a
    key written as `null` is a value the config must judge (it refuses None for a setting that
    needs one), not "not given". Enabling needs `nslora: true`, `nslora_enabled: true` or an
    `nslora:` mapping; `nslora_*` keys alone do not switch it on.
    """
    settings: dict[str, Any] = {}
    origin: dict[str, str] = {}
    enabled = False
    switch = cfg.get(SWITCH)
    if isinstance(switch, Mapping):
        enabled = True
        for raw_key, value in switch.items():
            key = normalize_key(str(raw_key))
            if key not in _FIELDS:
                raise _unknown(key, mapping_form=True)
            if value is not None or keep_null:
                settings[key] = value
                origin[key] = _yaml_key(key, mapping_form=True)
    elif switch is not None:
        enabled = parse_switch(switch)

    for raw_key, value in cfg.items():
        key = str(raw_key)
        if not key.startswith(PREFIX) or (value is None and not keep_null):
            continue
        if key not in _FLAT_KEYS:
            raise _unknown(key, mapping_form=False)
        name = _FLAT_KEYS[key]
        if name in settings and settings[name] != value:
            raise NSLoRAConfigError(
                f"NSLoRA setting {name!r} is given twice with different values: "
                f"{origin[name]}={settings[name]!r} and {key}={value!r}; keep one of them.")
        settings[name] = value
        origin.setdefault(name, key)

    if "enabled" in settings:
        flag = parse_switch(settings["enabled"])
        if switch is not None and not isinstance(switch, Mapping) and flag != enabled:
            raise NSLoRAConfigError(
                f"{SWITCH}={switch!r} and {origin['enabled']}={settings['enabled']!r} disagree; "
                f"keep only '{SWITCH}: true' or '{SWITCH}: false'.")
        enabled = flag
        settings["enabled"] = flag
    return enabled, settings, origin


def nslora_enabled(cfg: Mapping[str, Any]) -> bool:
    """True when the config switches NSLoRA on (never raises: bad values are reported by the
    validator)."""
    try:
        return collect_settings(cfg)[0]
    except NSLoRAConfigError:
        return False


_VALUE_NAME = re.compile(r"value (\w+)=")


def _build(settings: dict[str, Any], origin: dict[str, str]) -> NSLoRAConfig:
    try:
        return NSLoRAConfig.from_dict(settings)
    except NSLoRAConfigError as exc:
        # The core names the field (`check_every`); say which YAML key that is.
        match = _VALUE_NAME.search(str(exc))
        name = match.group(1) if match else None
        key = origin.get(name or "", flat_key(name) if name else None)
        if key is None:
            raise
        raise NSLoRAConfigError(f"{key}: {exc}") from None


def config_from_axolotl(cfg: Mapping[str, Any]) -> NSLoRAConfig | None:
    """The `NSLoRAConfig` of an Axolotl config, or None when NSLoRA is not switched on."""
    enabled, settings, origin = collect_settings(cfg)
    if not enabled:
        return None
    settings["enabled"] = True
    return _build(settings, origin)


def normalize_axolotl_cfg(data: dict[str, Any]) -> dict[str, Any]:
    """Validate the NSLoRA part of a raw Axolotl config and rewrite it in the flat form.

    Raises `NSLoRAConfigError` (a ValueError, so pydantic reports it) naming the offending key.
    """
    enabled, settings, origin = collect_settings(data, keep_null=True)
    if not settings and SWITCH not in data:
        return data
    config = _build({**settings, "enabled": enabled}, origin)
    if not enabled and SWITCH not in data:
        log.warning("NSLoRA: %s are set but '%s: true' is not, so NSLoRA is off",
                    ", ".join(sorted(origin.values())), SWITCH)
    # Flat form with the coerced values, so the typed fields below accept them as they are.
    data = dict(data)
    data[SWITCH] = enabled
    for name in settings:
        if name != "enabled":
            data[flat_key(name)] = getattr(config, name)
    data.pop(flat_key("enabled"), None)
    if enabled:
        _check_axolotl_settings(data, config, origin)
    return data


def _check_axolotl_settings(data: Mapping[str, Any], config: NSLoRAConfig,
                            origin: dict[str, str]) -> None:
    if config.probe_path is None:
        raise NSLoRAConfigError(
            f"{PREFIX}probe_path is required when {SWITCH}: true — a JSONL file of held-out "
            "examples (rows with `messages`, or `question`/`answer`) that NSLoRA scores at each check")
    for name in ("probe_path", "pool_path"):
        path = getattr(config, name)
        problem = data_file_problem(path) if path is not None else None
        if problem:
            raise NSLoRAConfigError(f"{origin.get(name, flat_key(name))}: {path!r}: {problem}",
                                    key=name)
    problem = folder_problem(config.output_dir) if config.output_dir is not None else None
    if problem:
        key = origin.get("output_dir", flat_key("output_dir"))
        raise NSLoRAConfigError(f"{key}: {config.output_dir!r}: {problem}, so the NSLoRA folder "
                                f"cannot be made there; set {key} to a folder path", key="output_dir")
    # sample_packing: true is fine: the multipack sampler hands the collator one list of examples
    # per pack, and NSLoRA splices each of them before Axolotl's collator concatenates the pack.
    workers = data.get("dataloader_num_workers")
    if workers not in (None, 0):
        raise NSLoRAConfigError(
            f"dataloader_num_workers: {workers} cannot be combined with nslora: true — batches "
            "collated in worker processes never see prompt edits; set dataloader_num_workers: 0 "
            "(or leave it unset: the plugin sets 0)")
    if data.get("rl"):
        raise NSLoRAConfigError(
            f"rl: {data.get('rl')} is not supported with nslora: true — NSLoRA edits the system "
            "prompt of supervised (SFT) examples; remove rl: or set nslora: false")


# ------------------------------------------------------------------------------------------------
# The pydantic model Axolotl merges into its config schema
# ------------------------------------------------------------------------------------------------


class _NSLoRAArgsBase(BaseModel):
    """Validation shared by every NSLoRA key (see the module docstring)."""

    @model_validator(mode="before")
    @classmethod
    def _nslora_settings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return normalize_axolotl_cfg(data)
        return data


def _annotation(spec: FieldSpec) -> Any:
    if spec.choices is not None:
        return Optional[Literal[spec.choices]]  # type: ignore[valid-type]
    if spec.kind == "list":
        return list[str] | str | None
    return Optional[{"bool": bool, "int": int, "float": float, "str": str}[spec.kind]]


_field_definitions: dict[str, Any] = {
    SWITCH: (bool | None, Field(default=None, description=(
        "Switch NSLoRA on (true) or off (false); an `nslora:` mapping of settings (without the "
        "prefix) also switches it on. Off, every plugin hook is a no-op."))),
}
for _spec in config_fields():
    if _spec.name == "enabled":
        continue
    _field_definitions[flat_key(_spec.name)] = (_annotation(_spec), Field(
        default=None, description=_spec.help_with_default()))

#: Axolotl input args: `plugins: [nslora_plugin.integrations.axolotl.NSLoRAPlugin]` merges these
#: fields into the config schema. Generated from `NSLoRAConfig`, so every core setting has a key.
NSLoRAArgs = create_model("NSLoRAArgs", __base__=_NSLoRAArgsBase, __module__=__name__,
                          **_field_definitions)
NSLoRAArgs.__doc__ = "Input args of the NSLoRA Axolotl plugin (`nslora` plus `nslora_<setting>`)."
