"""One config schema: every `NSLoRAConfig` field carries help, a group and its allowed values, and
the TRL flags, the Axolotl pydantic model, the LLaMA-Factory keys and the README table all agree
with it."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from nslora_plugin.core.config import CHECKS, NSLoRAConfig, NSLoRAConfigError, config_fields

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_field_has_help_a_group_and_a_known_check():
    specs = config_fields()
    assert [s.name for s in specs] == [f.name for f in dataclasses.fields(NSLoRAConfig)]
    for spec in specs:
        assert len(spec.help) > 15 and spec.help.endswith("."), spec.name
        assert spec.group, spec.name
        assert spec.check in (None, *CHECKS), spec.name
        assert spec.kind in ("bool", "int", "float", "str", "list"), spec.name
        assert spec.default == getattr(NSLoRAConfig(), spec.name), spec.name


def test_allowed_values_come_from_the_literal_types_and_are_enforced():
    choices = {s.name: s.choices for s in config_fields() if s.choices}
    assert choices == {"router": ("prior", "learned"),
                       "editor": ("textgrad", "constraint", "demonstrations", "none", "gepa"),
                       "editor_fallback": ("constraint", "none"),
                       "on_editor_down": ("numerical", "fail"),
                       "gate_tie_break": ("nll", "accept", "reject"),
                       "editor_backend": ("openai", "litellm", "local"),
                       "editor_structured_output": ("auto", "off"),
                       "prompt_swap": ("compliant", "all")}
    for name, allowed in choices.items():
        with pytest.raises(NSLoRAConfigError, match=f"{name}='nope'.*one of " + re.escape(repr(allowed[0]))):
            NSLoRAConfig(**{name: "nope"})


@pytest.mark.parametrize("check,value", [("positive", 0), ("non_negative", -1), ("unit", 1.5)])
def test_ranges_come_from_the_metadata(check, value):
    spec = next(s for s in config_fields() if s.check == check)
    with pytest.raises(NSLoRAConfigError, match=re.escape(f"{spec.name}={value!r}: expected {CHECKS[check]}")):
        NSLoRAConfig(**{spec.name: value})


def test_trl_flags_are_the_schema():
    from nslora_plugin.integrations.trl import NSLoRAArguments

    flags = {f.name: f for f in dataclasses.fields(NSLoRAArguments)}
    specs = {f"nslora_{s.name}": s for s in config_fields() if s.name != "enabled"}
    assert set(flags) == set(specs) | {"nslora", "nslora_config"}
    for key, spec in specs.items():
        meta = flags[key].metadata
        assert meta["help"].startswith(spec.help.replace("%", "%%")), key
        assert meta.get("choices") == (list(spec.choices) if spec.choices else None), key


def test_axolotl_model_is_the_schema():
    from nslora_plugin.integrations.axolotl.args import NSLoRAArgs

    props = NSLoRAArgs.model_json_schema()["properties"]
    specs = {f"nslora_{s.name}": s for s in config_fields() if s.name != "enabled"}
    assert set(props) == set(specs) | {"nslora"}
    for key, spec in specs.items():
        assert props[key]["description"].startswith(spec.help), key
        enums = [branch["enum"] for branch in props[key].get("anyOf", []) if "enum" in branch]
        assert enums == ([list(spec.choices)] if spec.choices else []), key


def test_llamafactory_keys_and_cli_flags_are_the_schema():
    from nslora_plugin.integrations.llamafactory.args import nslora_keys

    rows = {key: text for key, _, text in nslora_keys()}
    for spec in config_fields():
        if spec.name != "enabled":
            assert rows[f"nslora_{spec.name}"].startswith(spec.help), spec.name
    parser = argparse.ArgumentParser()
    NSLoRAConfig.add_cli_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    for spec in config_fields():
        action = actions[f"nslora_{spec.name}"]
        assert action.help.startswith(spec.help.replace("%", "%%")), spec.name
        if spec.choices:  # listed in the help; the config itself rejects others, naming the key
            assert "One of: " + ", ".join(spec.choices) in action.help, spec.name


def test_readme_configuration_table_names_every_field():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Configuration"):]
    section = section[:section.index("\n## ", 5)]
    missing = [s.name for s in config_fields() if f"`{s.name}`" not in section]
    assert missing == []
