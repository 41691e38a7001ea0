"""Config edges (issue 15, case 7) and what NSLoRA writes to disk (case 8): every bad value is a
clear `NSLoRAConfigError` naming the key or file, found before any model is loaded."""

from __future__ import annotations

import os
import stat

import pytest

from nslora_plugin import NSLoRAConfig, NSLoRAConfigError
from nslora_plugin.core.artifacts import ArtifactStore


@pytest.mark.parametrize("value", [None, "none", "null", "~"])
def test_null_for_a_field_that_cannot_be_null_names_the_key(value):
    if value == "~":
        with pytest.raises(NSLoRAConfigError, match="check_every"):
            NSLoRAConfig.from_dict(__import__("yaml").safe_load("check_every: ~"))
        return
    with pytest.raises(NSLoRAConfigError, match=r"check_every=.*null / none is not allowed.*default, 20"):
        NSLoRAConfig(check_every=value)


def test_null_stays_allowed_where_the_field_is_optional_and_none_is_an_editor():
    assert NSLoRAConfig(probe_path="none").probe_path is None
    assert NSLoRAConfig(editor="none").editor == "none"


@pytest.mark.parametrize("value", [float("nan"), "nan", float("inf"), "-inf"])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(NSLoRAConfigError, match="nll_threshold=.*a finite number"):
        NSLoRAConfig(nll_threshold=value)


def test_cli_none_and_misspelt_flags_are_errors():
    with pytest.raises(NSLoRAConfigError, match="check_every='none'"):
        NSLoRAConfig.from_cli(["--nslora_check_every", "none"])
    with pytest.raises(NSLoRAConfigError, match="'--nslora_chek_every'.*'--nslora_check_every'"):
        NSLoRAConfig.from_cli(["--nslora_chek_every", "5", "--other", "x"])
    assert NSLoRAConfig.from_cli(["--nslora_check_every", "5", "--other", "x"]).check_every == 5


def test_yaml_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("nslora:\n  check_every: [1, 2\n")
    with pytest.raises(NSLoRAConfigError, match=r"broken.yaml' is not valid YAML at line \d+"):
        NSLoRAConfig.from_yaml(broken)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("system_prompt: caf\xe9\n".encode("latin-1"))
    with pytest.raises(NSLoRAConfigError, match="latin.yaml' is not UTF-8"):
        NSLoRAConfig.from_yaml(latin)
    stray = tmp_path / "stray.yaml"
    stray.write_text("model: x\ncheck_every: 5\nnslora:\n  probe_size: 4\n")
    with pytest.raises(NSLoRAConfigError, match="NSLoRA keys next to its 'nslora:' block \\(check_every\\)"):
        NSLoRAConfig.from_yaml(stray)


def test_a_missing_probe_file_is_reported_before_training(tmp_path):
    from nslora_plugin.trainer.callback import NSLoRACallback

    with pytest.raises(NSLoRAConfigError, match="probe_path=.*no such file"):
        NSLoRACallback({"probe_path": str(tmp_path / "nope.jsonl")})
    with pytest.raises(NSLoRAConfigError, match="pool_path=.*no such file"):
        NSLoRACallback({"probe_path": None, "pool_path": str(tmp_path / "nope.jsonl")}, probe=[])


def test_artifact_files_get_the_mode_a_plain_open_gives(tmp_path):
    mask = os.umask(0o022)
    try:
        store = ArtifactStore(tmp_path / "run")
        store.write_json("state.json", {"a": 1})
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(mask)
    mode = stat.S_IMODE((tmp_path / "run" / "state.json").stat().st_mode)
    assert mode == stat.S_IMODE(plain.stat().st_mode) == 0o644
