"""`--nslora` in a TRL script and `nslora-trl sft`: the flag, the recipe, the CLI twin.

- NSLoRAArguments parses in a TrlParser tuple, has a flag per NSLoRAConfig field, validates at
  parse time, and `--nslora_config` / TRL `--config` YAML / flags combine in that order.
- Without `--nslora` the run is exactly plain TRL: `recipes/trl/sft.py` and `sft_plain.py` give
  bit-identical adapters, no callback is added and the collator is not wrapped.
- `recipes/trl/sft.py` differs from `sft_plain.py` by at most 5 diff lines.
- `nslora-trl sft` accepts every `trl sft` flag plus the NSLoRA group, hands the rest to
  accelerate like `trl sft`, and a real 3-step CPU run through `accelerate launch` writes artifacts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import runpy
import sys
from pathlib import Path

import pytest

from nslora_plugin import NSLoRAConfig, NSLoRAConfigError, load_artifacts
from nslora_plugin.core.data import make_word_problems
from nslora_plugin.integrations.trl import NSLoRAArguments, maybe_attach
from nslora_plugin.integrations.trl import cli as trl_cli

from tiny import ANSWER_FORMAT, FORMAT_INSTRUCTION, SYSTEM, sft_trainer, write_trl_workdir

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "trl" / "sft.py"
PLAIN = REPO / "recipes" / "trl" / "sft_plain.py"
CPU_ARGS = ["--use_cpu", "--bf16", "false", "--report_to", "none"]


def parser():
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, NSLoRAArguments))


def parse(args: list[str]):
    return parser().parse_args_and_config(["--output_dir", "out", *CPU_ARGS, *args])[-1]


def nslora_flags(probe: Path) -> list[str]:
    """The settings of tests/test_loop_trl.py's nslora_config, as flags: the first check is symbolic."""
    return ["--nslora", "--nslora_probe_path", str(probe), "--nslora_system_prompt", SYSTEM,
            "--nslora_editor", "constraint", "--nslora_check_every", "3", "--nslora_probe_size", "4",
            "--nslora_probe_max_new_tokens", "8", "--nslora_answer_format", ANSWER_FORMAT,
            "--nslora_format_instruction", FORMAT_INSTRUCTION, "--nslora_nll_threshold", "100",
            "--nslora_gate_tie_break", "accept", "--nslora_max_symbolic_rounds", "1",
            "--nslora_monitor_window", "2"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer):
    """A tiny model folder with the real tokenizer, a dataset folder (train.jsonl, messages rows)
    and a probe file."""
    return write_trl_workdir(tmp_path_factory.mktemp("trl-flag"), tokenizer)


def train_args(workdir: Path, out: Path, steps: int = 3) -> list[str]:
    return ["--model_name_or_path", str(workdir / "tiny"), "--dataset_name", str(workdir / "data"),
            "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "4",
            "--use_peft", "--lora_target_modules", "all-linear", "--lora_dropout", "0",
            "--max_length", "256", "--gradient_checkpointing", "false", "--logging_steps", "1",
            "--save_strategy", "no", "--seed", "0", *CPU_ARGS]


# ------------------------------------------------------------------------------ the flag
def test_one_flag_per_config_field_and_types_parse():
    names = {f.name for f in dataclasses.fields(NSLoRAArguments)}
    expected = {"nslora", "nslora_config"} | {
        "nslora_" + f.name for f in dataclasses.fields(NSLoRAConfig) if f.name != "enabled"}
    assert names == expected
    args = parse(["--nslora", "--nslora_check_every", "7", "--nslora_augment_share", "0.5",
                  "--nslora_system_prompt", "Be brief.", "--nslora_editor_base_url",
                  "http://127.0.0.1:8000/v1", "--nslora_plugins", "a.b.C", "d.e.F",
                  "--nslora-max-symbolic-rounds", "2"])
    cfg = args.to_config()
    assert (cfg.check_every, cfg.augment_share, cfg.system_prompt, cfg.max_symbolic_rounds) == (
        7, 0.5, "Be brief.", 2)
    assert cfg.editor_base_url == "http://127.0.0.1:8000/v1" and cfg.plugins == ["a.b.C", "d.e.F"]
    assert cfg.probe_size == NSLoRAConfig().probe_size  # not given: the core default
    with pytest.raises(SystemExit):  # choices come from the core config
        parse(["--nslora", "--nslora_editor", "gpt4"])


def test_precedence_flags_over_nslora_config_over_trl_config(tmp_path):
    nslora_yaml = tmp_path / "nslora.yaml"
    nslora_yaml.write_text("nslora:\n  check_every: 5\n  probe_size: 4\n  editor: constraint\n")
    trl_yaml = tmp_path / "trl.yaml"
    trl_yaml.write_text(f"output_dir: out\nuse_cpu: true\nbf16: false\nnslora: true\n"
                        f"nslora_config: {nslora_yaml}\nnslora_probe_size: 9\n")
    args = parser().parse_args_and_config(["--config", str(trl_yaml), "--nslora_check_every", "11"])[-1]
    cfg = args.to_config()
    assert (cfg.check_every, cfg.probe_size, cfg.editor) == (11, 9, "constraint")
    # `nslora:` as a mapping in a TRL YAML turns it on with those settings
    mapping_yaml = tmp_path / "mapping.yaml"
    mapping_yaml.write_text("output_dir: out\nuse_cpu: true\nbf16: false\n"
                            "nslora:\n  check_every: 4\n  editor: none\n")
    cfg = parser().parse_args_and_config(["--config", str(mapping_yaml)])[-1].to_config()
    assert (cfg.check_every, cfg.editor) == (4, "none")


def test_bad_values_stop_at_parse_time_and_off_is_off(caplog):
    with pytest.raises(NSLoRAConfigError, match="check_every=0"):
        parse(["--nslora", "--nslora_check_every", "0"])
    with caplog.at_level(logging.WARNING, logger="nslora"):
        args = parse(["--nslora_check_every", "0"])  # not validated, not used: NSLoRA is off
    assert args.to_config() is None
    assert "given without --nslora" in caplog.text
    assert maybe_attach(object(), args) is None  # touches nothing, needs no trainer


def test_maybe_attach_refuses_settings_that_hide_edits(tmp_path, tokenizer):
    rows = make_word_problems(8, seed=1)
    args = parse(["--nslora", "--nslora_system_prompt", SYSTEM])
    trainer = sft_trainer(tokenizer, tmp_path / "run", rows, max_steps=1)
    trainer.args.dataloader_num_workers = 2
    with pytest.raises(NSLoRAConfigError, match="dataloader_num_workers"):
        maybe_attach(trainer, args)


def test_without_the_flag_the_run_is_plain_trl(tmp_path, tokenizer):
    """No callback added, collator not wrapped, no artifacts; with the flag, both happen."""
    from transformers import TrainerCallback

    from nslora_plugin.core.collator import NSLoRACollator

    class CollatorSpy(TrainerCallback):
        collate = None

        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            inner = train_dataloader
            while getattr(inner, "base_dataloader", None) is not None:
                inner = inner.base_dataloader
            self.collate = inner.collate_fn

    rows = make_word_problems(40, seed=3)
    for flag_on in (False, True):
        out = tmp_path / ("on" if flag_on else "off")
        probe = tmp_path / "probe.jsonl"
        probe.write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
        args = parse(nslora_flags(probe) if flag_on else [])  # parse first, as a script does
        trainer = sft_trainer(tokenizer, out, rows[:32], max_steps=3)
        before = list(trainer.callback_handler.callbacks)
        callback = maybe_attach(trainer, args)
        spy = CollatorSpy()
        trainer.add_callback(spy)
        trainer.train()
        if not flag_on:
            assert callback is None
            assert trainer.callback_handler.callbacks[:-1] == before  # only the spy was added
            assert not isinstance(spy.collate, NSLoRACollator)
            assert not (out / "nslora").exists()
            assert not any(k.startswith("nslora/") for log in trainer.state.log_history for k in log)
        else:
            assert trainer.callback_handler.callbacks[0] is callback
            assert isinstance(spy.collate, NSLoRACollator)
            assert load_artifacts(out).prompt_version == 1


def _run_script(path: Path, argv: list[str], monkeypatch) -> dict:
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    return runpy.run_path(str(path), run_name="__main__")


def test_recipe_without_flag_trains_exactly_like_the_plain_script(tmp_path, workdir, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    plain = _run_script(PLAIN, train_args(workdir, tmp_path / "plain", steps=2), monkeypatch)
    ours = _run_script(RECIPE, train_args(workdir, tmp_path / "ours", steps=2), monkeypatch)
    assert ours["nslora_args"].nslora is False
    assert [type(c) for c in ours["trainer"].callback_handler.callbacks] == [
        type(c) for c in plain["trainer"].callback_handler.callbacks]
    a = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not (tmp_path / "ours" / "nslora").exists()


def test_recipe_differs_from_the_plain_script_by_at_most_five_lines():
    plain, ours = PLAIN.read_text().splitlines(), RECIPE.read_text().splitlines()
    changed = [line for line in difflib.unified_diff(plain, ours, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert 0 < len(changed) <= 5, changed
    for call in ("TrlParser(", "ScriptArguments", "SFTConfig", "ModelConfig", "get_quantization_config(",
                 "get_peft_config(", "load_dataset(", "SFTTrainer(", "trainer.train(", "trainer.save_model("):
        assert call in RECIPE.read_text() and call in PLAIN.read_text(), call
    assert any("maybe_attach(trainer, nslora_args)" in line for line in changed)


# ------------------------------------------------------------------------------ nslora-trl sft
def test_cli_help_lists_every_trl_sft_flag_and_the_nslora_group(capsys):
    from trl.scripts.sft import make_parser as trl_make_parser

    with pytest.raises(SystemExit) as exit_:
        trl_cli.main(["sft", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: nslora-trl sft" in text and "NSLoRA:" in text
    for flag in ("--nslora ", "--nslora_config", "--nslora_probe_path", "--nslora_check_every",
                 "--nslora_editor_base_url", "--load_in_4bit", "--use_peft", "--max_length"):
        assert flag in text, flag
    ours = {s for a in trl_cli.make_parser()._actions for s in a.option_strings}
    theirs = {s for a in trl_make_parser()._actions for s in a.option_strings}
    assert theirs <= ours


def test_cli_splits_accelerate_options_like_trl_and_rejects_misspelled_nslora_flags(monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(trl_cli, "launch", lambda la, sa: launched.append((la, sa)) or 0)
    argv = ["--output_dir", "out", *CPU_ARGS, "--num_processes", "1", "--nslora",
            "--nslora_system_prompt", "Hi.", "--mixed_precision", "no"]
    assert trl_cli.main(["sft", *argv]) == 0
    (launch_args, script_args), = launched
    assert launch_args == ["--num_processes", "1", "--mixed_precision", "no"]
    assert script_args == ["--output_dir", "out", *CPU_ARGS, "--nslora", "--nslora_system_prompt", "Hi."]
    launched.clear()
    assert trl_cli.main(["sft", "--output_dir", "out", *CPU_ARGS, "--nslora_chek_every", "3"]) == 2
    assert "did you mean --nslora_check_every" in capsys.readouterr().err
    assert trl_cli.main(["sft", "--output_dir", "out", *CPU_ARGS, "--nslora", "--nslora_probe_size", "0"]) == 2
    assert not launched


def test_cli_real_run_through_accelerate_writes_artifacts(tmp_path, workdir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("NSLORA_TRL_LAUNCHER", raising=False)
    out = tmp_path / "run"
    rc = trl_cli.main(["sft", *train_args(workdir, out), *nslora_flags(workdir / "probe.jsonl")])
    assert rc == 0
    arts = load_artifacts(out)
    assert (out / "adapter_model.safetensors").is_file()
    assert arts.prompt_version == 1 and FORMAT_INSTRUCTION in arts.system_prompt
    assert [d["action"] for d in arts.decisions if d["kind"] == "route"] == ["symbolic"]
    assert arts.summary["steps"] == 3


@pytest.mark.parametrize("name", ["smollm2-qlora-cpu.yaml", "llama3-8b-qlora-24gb.yaml"])
def test_recipe_yamls_parse_with_nslora_on(name):
    parsed = trl_cli.make_parser().parse_args_and_config(
        ["--config", str(REPO / "recipes" / "trl" / name), "--use_cpu", "--bf16", "false"])
    model_args, nslora_args = parsed[2], parsed[-1]
    cfg = nslora_args.to_config()
    assert model_args.load_in_4bit and model_args.use_peft and model_args.lora_target_modules == "all-linear"
    assert cfg is not None and cfg.probe_path and cfg.system_prompt and cfg.answer_format
    assert parsed[1].packing is False and parsed[1].dataloader_num_workers == 0
