"""NSLoRAConfig: every constructor validates, errors name the key, the value and what is allowed."""

from __future__ import annotations

import argparse
import json

import pytest

from nslora_plugin import NSLoRAConfig, NSLoRAConfigError


def test_defaults_are_valid_and_json_round_trips() -> None:
    cfg = NSLoRAConfig()
    again = NSLoRAConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg


def test_from_dict_accepts_framework_prefixes_and_strings() -> None:
    cfg = NSLoRAConfig.from_dict({"nslora": "true", "nslora_check_every": "7",
                                  "nslora-augment-share": "0.5", "editor": "constraint"})
    assert (cfg.enabled, cfg.check_every, cfg.augment_share, cfg.editor) == (True, 7, 0.5, "constraint")


@pytest.mark.parametrize("data, key, allowed", [
    ({"chek_every": 3}, "chek_every", "Did you mean 'check_every'"),
    ({"check_every": 0}, "check_every=0", "> 0"),
    ({"check_every": "often"}, "check_every='often'", "an integer"),
    ({"editor": "gpt4"}, "editor='gpt4'", "'textgrad', 'constraint', 'demonstrations', 'none'"),
    ({"augment_share": 1.5}, "augment_share=1.5", "between 0 and 1"),
    ({"answer_format": "(unclosed"}, "answer_format='(unclosed'", "valid regular expression"),
    ({"editor_base_url": "localhost:8000"}, "editor_base_url='localhost:8000'", "http(s) URL"),
    ({"editor_api_key_env": "sk-123 secret"}, "editor_api_key_env", "NAME of an environment variable"),
    ({"enabled": "maybe"}, "enabled='maybe'", "true or false"),
])
def test_bad_values_raise_one_clear_error(data: dict, key: str, allowed: str) -> None:
    with pytest.raises(NSLoRAConfigError) as err:
        NSLoRAConfig.from_dict(data)
    assert key in str(err.value) and allowed in str(err.value)


def test_yaml_top_level_or_nested(tmp_path) -> None:
    flat = tmp_path / "flat.yaml"
    flat.write_text("check_every: 5\nformat_instruction: 'Answer: <n>'\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text("model: x\nnslora:\n  check_every: 5\n  format_instruction: 'Answer: <n>'\n")
    assert NSLoRAConfig.from_yaml(flat) == NSLoRAConfig.from_yaml(nested)
    assert NSLoRAConfig.from_yaml(flat).format_instruction == "Answer: <n>"
    bad = tmp_path / "bad.yaml"
    bad.write_text("nslora:\n  probe_sise: 3\n")
    with pytest.raises(NSLoRAConfigError, match="probe_sise.*probe_size"):
        NSLoRAConfig.from_yaml(bad)
    with pytest.raises(NSLoRAConfigError, match="does not exist"):
        NSLoRAConfig.from_yaml(tmp_path / "missing.yaml")


def test_cli_flags_override_yaml(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("check_every: 5\nprobe_size: 4\n")
    cfg = NSLoRAConfig.from_cli(["--nslora_config", str(path), "--nslora_check_every", "9",
                                 "--unrelated", "1"])
    assert (cfg.check_every, cfg.probe_size) == (9, 4)
    parser = argparse.ArgumentParser()
    NSLoRAConfig.add_cli_arguments(parser)
    ns = parser.parse_args(["--nslora_editor", "nonsense"])
    with pytest.raises(NSLoRAConfigError, match="editor='nonsense'"):
        NSLoRAConfig.from_cli_namespace(ns)


def test_core_import_pulls_in_no_framework() -> None:
    import subprocess
    import sys

    code = ("import sys, nslora_plugin, nslora_plugin.core.config, nslora_plugin.core.hookspecs;"
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'textgrad', 'datasets', "
            "'accelerate', 'axolotl', 'llamafactory') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
