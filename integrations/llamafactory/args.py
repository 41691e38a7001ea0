"""Reading a LLaMA-Factory config and taking the NSLoRA part out of it.

`llamafactory-cli train cfg.yaml a=1 b.c=x` reads its config with OmegaConf (`read_args` in
`llamafactory/hparams/parser.py`, 0.9.5): `OmegaConf.load(yaml)` (or `OmegaConf.create(json)`)
merged with `OmegaConf.from_cli(overrides)`, then `to_container`. `read_config` does exactly that,
so a YAML and its `key=value` overrides mean the same thing under `nslora-lf train`.

The NSLoRA part is every top-level key named `nslora` or starting with `nslora_`:

    nslora: true                      # on (false: plain LLaMA-Factory, no callback)
    nslora_probe_path: probe.jsonl    # any NSLoRAConfig field, with the `nslora_` prefix
    nslora_config: nslora.yaml        # optional: a separate NSLoRA YAML (keys here win over it)

`nslora:` may also be a mapping of unprefixed fields (`nslora: {probe_path: ..., editor: ...}`).
LLaMA-Factory itself rejects keys it does not know, so the NSLoRA keys must be removed before
the rest goes to `run_exp` — which is what `split_config` does.

Nothing here imports LLaMA-Factory, transformers or torch: a bad `nslora_*` key or value is
reported in well under a second, before any model is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from nslora_plugin.core.artifacts import folder_problem
from nslora_plugin.core.config import NSLoRAConfig, NSLoRAConfigError, config_fields
from nslora_plugin.core.data import data_file_problem
from nslora_plugin.core.keys import (CONFIG_KEY, PREFIX, SWITCH, clean_key, flat_key, is_nslora_key,
                                     parse_switch)
from nslora_plugin.core.util import parse_bool

__all__ = ["LlamaFactoryNSLoRAArgs", "read_config", "split_config", "prepare", "check_lf_settings",
           "NSLORA_CONFIG_KEY", "nslora_keys"]

#: Key naming a separate NSLoRA YAML file (its settings are overridden by `nslora_*` keys).
NSLORA_CONFIG_KEY = CONFIG_KEY


def nslora_keys() -> list[tuple[str, str, str]]:
    """(YAML key, type, help with allowed values and default) for every NSLoRA key a
    LLaMA-Factory config may carry, generated from `NSLoRAConfig` (`nslora-lf keys` prints it)."""
    rows = [(SWITCH, "bool", "Switch NSLoRA on (true) or off (false); an `nslora:` mapping of "
             "unprefixed settings also switches it on."),
            (NSLORA_CONFIG_KEY, "str", "A separate NSLoRA YAML file; nslora_* keys override it.")]
    for spec in config_fields():
        if spec.name != "enabled":
            kind = spec.kind + (" or null" if spec.optional else "")
            rows.append((flat_key(spec.name), kind, spec.help_with_default()))
    return rows


@dataclass
class LlamaFactoryNSLoRAArgs:
    """The result of `prepare`: what goes to `run_exp` and what goes to `NSLoRACallback`."""

    lf_args: dict[str, Any]                     # the LLaMA-Factory config, NSLoRA keys removed
    nslora: NSLoRAConfig                        # validated NSLoRA settings
    nslora_keys: dict[str, Any] = field(default_factory=dict)  # the raw keys as written
    notes: list[str] = field(default_factory=list)             # adjustments made, for the log


# ------------------------------------------------------------------------------------- reading
def read_config(path: str | os.PathLike[str], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The config as `llamafactory-cli train PATH OVERRIDES...` reads it (YAML or JSON file,
    `key=value` / `a.b=value` overrides merged on top, values typed like YAML)."""
    path = Path(path)
    if not path.is_file():
        raise NSLoRAConfigError(f"config file {str(path)!r} does not exist")
    overrides = list(overrides)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        raise NSLoRAConfigError(
            f"command-line overrides must look like key=value (as for llamafactory-cli), got {bad}")
    try:
        from omegaconf import OmegaConf
    except ImportError:  # LLaMA-Factory depends on omegaconf; this fallback only serves tooling
        return _read_config_without_omegaconf(path, overrides)
    if path.suffix.lower() == ".json":
        base = OmegaConf.create(json.loads(path.read_text(encoding="utf-8")))
    else:
        base = OmegaConf.load(path.absolute())
    merged = OmegaConf.merge(base, OmegaConf.from_cli(overrides))
    data = OmegaConf.to_container(merged)
    if not isinstance(data, dict):
        raise NSLoRAConfigError(f"{path} must hold a mapping of key: value at top level")
    return data


def _read_config_without_omegaconf(path: Path, overrides: list[str]) -> dict[str, Any]:
    import yaml

    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix.lower() == ".json" else (yaml.safe_load(text) or {})
    if not isinstance(data, dict):
        raise NSLoRAConfigError(f"{path} must hold a mapping of key: value at top level")
    for item in overrides:
        key, _, raw = item.partition("=")
        value = yaml.safe_load(raw) if raw else None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


# ------------------------------------------------------------------------------------- splitting
def split_config(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(LLaMA-Factory args, NSLoRA keys), top-level order kept."""
    lf, ns = {}, {}
    for key, value in cfg.items():
        (ns if is_nslora_key(key) else lf)[key] = value
    return lf, ns


def nslora_config_from_keys(keys: Mapping[str, Any], base_dir: Path | None = None) -> NSLoRAConfig:
    """Validate the NSLoRA keys of a LLaMA-Factory config. Raises `NSLoRAConfigError` naming the
    key (as written, with its `nslora_` prefix) and what is allowed."""
    flat: dict[str, Any] = {}
    file_path: str | None = None
    for key, value in keys.items():
        norm = clean_key(key)
        if norm == SWITCH and isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                if str(sub_key) == "config":
                    file_path = str(sub_value)
                else:
                    flat[str(sub_key)] = sub_value
            flat.setdefault("enabled", True)
        elif norm == NSLORA_CONFIG_KEY:
            if not isinstance(value, str) or not value:
                raise NSLoRAConfigError(
                    f"Invalid NSLoRA config value {NSLORA_CONFIG_KEY}={value!r}: expected the path "
                    "of a YAML file with NSLoRA settings.")
            file_path = value
        elif norm == SWITCH:
            flat["enabled"] = parse_switch(value)
        else:
            flat[norm] = value
    try:
        if file_path is not None:
            path = Path(file_path)
            if base_dir is not None and not path.is_absolute() and not path.exists():
                path = base_dir / path
            return NSLoRAConfig.from_yaml(path, **flat)
        return NSLoRAConfig.from_dict(flat)
    except NSLoRAConfigError as exc:
        raise NSLoRAConfigError(_with_prefix(str(exc)), key=getattr(exc, "key", None)) from None


def _with_prefix(message: str) -> str:
    """Name keys the way the user wrote them in the LLaMA-Factory YAML (`nslora_<field>`)."""
    import re

    message = re.sub(r"Unknown NSLoRA config key '([A-Za-z0-9_]+)'",
                     lambda m: f"Unknown NSLoRA key '{flat_key(m.group(1))}'", message)
    message = re.sub(r"Did you mean '([A-Za-z0-9_]+)'\?",
                     lambda m: f"Did you mean '{flat_key(m.group(1))}'?", message)
    message = re.sub(r"Invalid NSLoRA config value ([A-Za-z0-9_]+)=",
                     lambda m: f"Invalid NSLoRA value {flat_key(m.group(1))}=", message)
    message = message.replace("Allowed keys: ", f"Allowed keys (each with the {PREFIX} prefix): ")
    return message


# ------------------------------------------------------------------------------------- checks
def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return parse_bool(value) is True
    return bool(value)


def check_lf_settings(lf: Mapping[str, Any]) -> None:
    """Reject LLaMA-Factory settings under which prompt edits cannot reach training — before
    any model loads. Defaults are LLaMA-Factory 0.9.5's."""
    stage = lf.get("stage", "sft")
    if stage != "sft":
        raise NSLoRAConfigError(
            f"NSLoRA supports LLaMA-Factory's supervised stage only (stage: sft), got stage: {stage}. "
            "Set nslora: false to run this config without NSLoRA.")
    if not _truthy(lf.get("do_train", False)):
        raise NSLoRAConfigError(
            "NSLoRA runs during training: set do_train: true (or nslora: false for eval/predict).")
    for key in ("packing", "neat_packing"):
        if _truthy(lf.get(key, False)):
            raise NSLoRAConfigError(
                f"{key}: true packs several examples into one sequence, and NSLoRA cannot splice "
                f"prompt edits into packed rows. Set {key}: false.")
    workers = lf.get("dataloader_num_workers", 0) or 0
    if int(workers) != 0:
        raise NSLoRAConfigError(
            f"dataloader_num_workers: {workers} collates batches in worker processes that never see "
            "prompt edits. Set dataloader_num_workers: 0 (preprocessing_num_workers is fine).")
    if lf.get("finetuning_type", "lora") not in ("lora", "oft", "freeze", "full"):
        raise NSLoRAConfigError(f"unknown finetuning_type: {lf.get('finetuning_type')}")


def lf_default_system(lf: Mapping[str, Any]) -> str | None:
    """The system prompt LLaMA-Factory gives rows that have none: `default_system`, else the
    template's own default (looked up in LLaMA-Factory's template registry)."""
    if lf.get("default_system"):
        return str(lf["default_system"])
    name = lf.get("template")
    if not name:
        return None
    try:
        from llamafactory.data.template import TEMPLATES
    except Exception:  # noqa: BLE001 - not installed (tooling) or import trouble: no default
        return None
    template = TEMPLATES.get(str(name))
    return getattr(template, "default_system", None) or None


# ------------------------------------------------------------------------------------- all of it
def prepare(cfg: Mapping[str, Any], *, base_dir: Path | None = None,
            lookup_template_default: bool = True) -> LlamaFactoryNSLoRAArgs:
    """Split, validate, and line the two configs up:

    - the NSLoRA keys are validated (`NSLoRAConfigError` names the bad key);
    - LLaMA-Factory settings that would stop edits from reaching training are rejected;
    - with `nslora_system_prompt` set, LLaMA-Factory's `default_system` is set to it (unless
      given), so rows without a system message carry it too; unset, the initial prompt is read
      from the tokenized rows at train start (`core/row_prompts.py`);
    - `nslora_probe_path` is required (the probe set is how NSLoRA decides anything).
    """
    lf, keys = split_config(cfg)
    if not keys:
        raise NSLoRAConfigError(
            "this config has no nslora_* keys. Add at least nslora_probe_path: <probe.jsonl> "
            "(see recipes/llamafactory/), or run it with llamafactory-cli.")
    nslora = nslora_config_from_keys(keys, base_dir=base_dir)
    out = LlamaFactoryNSLoRAArgs(lf_args=dict(lf), nslora=nslora, nslora_keys=dict(keys))
    if not nslora.enabled:
        out.notes.append("nslora: false — running plain LLaMA-Factory, no NSLoRA callback")
        return out
    check_lf_settings(lf)
    if nslora.probe_path is None:
        raise NSLoRAConfigError(
            "nslora_probe_path is required: a JSONL file of held-out examples (rows with messages, "
            "question/answer or prompt/completion) that NSLoRA scores at every check.", key="probe_path")
    for name in ("probe_path", "pool_path"):
        path = getattr(nslora, name)
        problem = data_file_problem(path) if path is not None else None
        if problem:
            raise NSLoRAConfigError(f"Invalid NSLoRA value nslora_{name}={path!r}: {problem}.",
                                    key=name)
    problem = folder_problem(nslora.output_dir) if nslora.output_dir is not None else None
    if problem:
        raise NSLoRAConfigError(
            f"Invalid NSLoRA value nslora_output_dir={nslora.output_dir!r}: {problem}, so the "
            "NSLoRA folder cannot be made there; set nslora_output_dir to a folder path",
            key="output_dir")

    default_system = lf.get("default_system")
    if nslora.system_prompt is not None:
        if default_system is None:
            out.lf_args["default_system"] = nslora.system_prompt
            out.notes.append("default_system set to nslora_system_prompt, so rows without a system "
                             "message carry the prompt NSLoRA edits")
        elif str(default_system) != nslora.system_prompt:
            out.notes.append("WARNING: default_system differs from nslora_system_prompt; rows without "
                             "a system message get default_system and prompt edits cannot reach them")
    else:  # the rows as LLaMA-Factory tokenized them say which prompt they carry (read at train start)
        default = lf_default_system(lf) if lookup_template_default else (
            str(default_system) if default_system else None)
        out.notes.append("initial system prompt: the system message the training rows carry, read "
                         "at train start" + (f" (rows without one get LLaMA-Factory's default system "
                                             f"prompt {default!r})" if default else ""))
    return out
