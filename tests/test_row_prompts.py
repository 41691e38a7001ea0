"""The run starts from the system prompt the training rows really carry (issue 27, point 1).

With `system_prompt` unset, the initial prompt is read from the rows the trainer built; rows
carrying several different system messages, a `system_prompt` no row carries, and rows with no
system message at all are refused at train start, before the first step (an edit accepted then
would reach no training row). The summary and the report say how many rows carried the prompt.

TRL runs use the tiny model of tests/tiny.py through the real SFTTrainer; the Axolotl run (alpaca
rows, sample packing) and the LLaMA-Factory run need their venvs and skip without them, like
tests/test_axolotl.py and tests/test_llamafactory.py.
"""

from __future__ import annotations

import json

import pytest

from nslora_plugin import NSLoRAConfigError, load_artifacts
from nslora_plugin.core.data import make_word_problems
from nslora_plugin.core.row_prompts import initial_prompt_from_rows, read_row_prompts
from nslora_plugin.integrations.trl import attach
from tiny import FORMAT_INSTRUCTION, SYSTEM, edit_config, load_tokenizer, sft_trainer

ROWS = make_word_problems(40, seed=3)
PIRATE = "You are a pirate. Speak like one."
SMOLLM_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _with_system(rows, prompt):
    return [{**r, "system_prompt": prompt} for r in rows]


def _trainer(tmp_path, default_model_dir, rows, **extra):
    tokenizer = load_tokenizer(default_model_dir)  # its own: the end of training edits its template
    return tokenizer, sft_trainer(tokenizer, tmp_path / "run", rows, max_steps=4, **extra)


# ------------------------------------------------------------------------------------------------
# Reading rows (no training)
# ------------------------------------------------------------------------------------------------


def test_rows_without_a_system_turn_are_refused_whatever_is_set(tokenizer):
    """Alpaca-style rows (no chat template, no system turn): nothing to start from, and a set
    system_prompt is carried by none of them."""
    alpaca = ("Below is an instruction that describes a task. Write a response that appropriately "
              "completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n5")
    rows = read_row_prompts(tokenizer, [{"input_ids": tokenizer(alpaca)["input_ids"]}] * 3)
    assert (rows.read, rows.without, dict(rows.messages)) == (3, 3, {})
    with pytest.raises(NSLoRAConfigError, match="none of the 3 training rows carries a system message") as info:
        initial_prompt_from_rows(None, rows, tokenizer)
    assert info.value.key == "system_prompt" and "nslora_system_prompt" in str(info.value)
    with pytest.raises(NSLoRAConfigError, match="system_prompt='You are a helpful assistant.' is in none") as info:
        initial_prompt_from_rows(SYSTEM, rows, tokenizer)
    assert "3 rows with no system message" in str(info.value)


def test_raw_messages_rows_and_a_large_set_is_sampled(tokenizer):
    chat = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]}]
    bare = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    rows = read_row_prompts(tokenizer, chat * 3000 + bare * 10, limit=500, seed=1)
    assert rows.source == "messages" and rows.read == 500 and rows.total == 3010
    # a row without a system message carries what the template writes for it (SmolLM2: a default)
    assert set(rows.messages) <= {SYSTEM, SMOLLM_DEFAULT} and rows.messages[SYSTEM] > 450
    assert read_row_prompts(tokenizer, iter(chat)) is None  # not readable ahead of training


# ------------------------------------------------------------------------------------------------
# TRL, through the real SFTTrainer
# ------------------------------------------------------------------------------------------------


def test_trl_unset_system_prompt_is_taken_from_the_rows(tmp_path, default_model_dir):
    """Rows under "You are a helpful assistant.", system_prompt unset: the run starts from it (not
    from the template's SmolLM default), the edit of step 2 reaches the batches, and the summary,
    the start record and the report say how many rows carried it."""
    from nslora_plugin.apps.report import write_report

    tokenizer, trainer = _trainer(tmp_path, default_model_dir, ROWS[:32])
    callback = attach(trainer, edit_config(system_prompt=None, max_symbolic_rounds=1, report=False),
                      probe=ROWS[32:])
    trainer.train()
    arts = load_artifacts(callback.loop.artifacts_root)
    assert arts.initial_system_prompt == SYSTEM
    assert arts.prompt_version == 1 and FORMAT_INSTRUCTION in arts.system_prompt
    reach = arts.summary["training_rows"]
    assert reach["initial_prompt_from"] == "training rows" and reach["read_from"] == "tokens"
    assert (reach["rows"], reach["rows_read"], reach["rows_carrying_initial_prompt"]) == (32, 32, 32)
    assert reach["rows_without_system_message"] == reach["rows_with_other_system_message"] == 0
    assert reach["final_prompt_version"] == 1 and reach["examples_with_final_prompt"] > 0
    stats = arts.summary["batches"]
    assert stats["swapped"] > 0 and stats["no_span"] == 0
    assert reach["examples_with_final_prompt"] == stats["with_current"] <= stats["swapped"]
    start = next(d for d in arts.decisions if d["kind"] == "start")
    assert start["training_rows"]["rows_carrying_initial_prompt"] == 32
    page = write_report(callback.loop.artifacts_root).read_text()
    assert "training rows carrying the prompt" in page and "32 of 32 rows read" in page


def test_trl_rows_without_a_system_message_carry_the_templates_default(tmp_path, default_model_dir):
    """SmolLM2's template writes its default system prompt into rows that have none: that is
    what the rows carry, so that is where an unset run starts (counted from the tokens)."""
    tokenizer, trainer = _trainer(tmp_path, default_model_dir, _with_system(ROWS[:8], None),
                                  batch_size=2)
    callback = attach(trainer, edit_config(system_prompt=None, check_every=100), probe=ROWS[32:])
    trainer.train()
    assert callback.loop.prompt_state.initial == SMOLLM_DEFAULT
    reach = callback.summary["training_rows"]
    assert reach["rows_carrying_initial_prompt"] == 8 and reach["final_prompt_version"] == 0
    assert reach["examples_with_final_prompt"] == reach["examples_collated"] > 0


def test_trl_rows_with_two_system_messages_are_refused_naming_both(tmp_path, default_model_dir):
    rows = _with_system(ROWS[:20], SYSTEM) + _with_system(ROWS[20:32], PIRATE)
    tokenizer, trainer = _trainer(tmp_path, default_model_dir, rows)
    attach(trainer, edit_config(system_prompt=None), probe=ROWS[32:])
    with pytest.raises(NSLoRAConfigError) as info:
        trainer.train()
    message = str(info.value)
    assert "2 different system messages" in message
    assert f"{SYSTEM!r} (20 rows)" in message and f"{PIRATE!r} (12 rows)" in message
    assert "set system_prompt" in message and info.value.key == "system_prompt"
    assert trainer.state.global_step == 0  # refused at train start, before any step


def test_trl_system_prompt_no_row_carries_is_refused_at_start(tmp_path, default_model_dir):
    tokenizer, trainer = _trainer(tmp_path, default_model_dir, ROWS[:32])
    callback = attach(trainer, edit_config(system_prompt=PIRATE), probe=ROWS[32:])
    with pytest.raises(NSLoRAConfigError) as info:
        trainer.train()
    message = str(info.value)
    assert f"system_prompt={PIRATE!r} is in none of the 32 training rows" in message
    assert f"{SYSTEM!r} (32 rows)" in message and "leave it unset" in message
    assert trainer.state.global_step == 0 and callback.loop is None  # no probe, no edit


def test_trl_packed_rows_are_read_per_example(tmp_path, default_model_dir):
    """TRL's bfd packing: each packed example is a row (split at seq_lengths)."""
    rows = _with_system(ROWS[:24], SYSTEM) + _with_system(ROWS[24:32], PIRATE)
    tokenizer, trainer = _trainer(tmp_path, default_model_dir, rows, packing=True)
    callback = attach(trainer, edit_config(system_prompt=SYSTEM, check_every=100), probe=ROWS[32:])
    trainer.train()
    reach = callback.summary["training_rows"]
    assert (reach["rows_read"], reach["rows_carrying_initial_prompt"],
            reach["rows_with_other_system_message"]) == (32, 24, 8)


# ------------------------------------------------------------------------------------------------
# Axolotl: alpaca rows with sample packing (Axolotl's venv, see tests/test_axolotl.py)
# ------------------------------------------------------------------------------------------------

from test_axolotl import axolotl_venv, workdir  # noqa: E402,F401  (fixtures)


@pytest.mark.slow
def test_axolotl_alpaca_rows_with_packing_are_refused_at_start(axolotl_venv, workdir):
    """Axolotl's alpaca format writes no system turn: with `sample_packing: true` and
    nslora_system_prompt unset, the run stops at train start saying what to set, instead of
    accepting edits that reach none of the rows."""
    import yaml

    from test_axolotl import _axolotl_train, _short_recipe

    data = workdir / "data" / "alpaca.jsonl"
    data.write_text("".join(json.dumps({"instruction": r["question"], "input": "",
                                        "output": r["answer"]}) + "\n" for r in ROWS[:32]))
    config = _short_recipe(workdir, "smollm2-lora-cpu.yaml", "alpaca")
    cfg = yaml.safe_load(config.read_text())
    cfg.pop("nslora_system_prompt")
    cfg.update(sample_packing=True, pad_to_sequence_len=True,
               datasets=[{"path": "./data/alpaca.jsonl", "ds_type": "json", "type": "alpaca"}])
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code, output = _axolotl_train(axolotl_venv, workdir, config)
    assert code != 0, output[-3000:]
    print(next((line for line in output.splitlines() if "carries a system message" in line), ""))
    assert "carries a system message" in output and "nslora_system_prompt" in output, output[-3000:]
    assert "alpaca-style" in output
    assert not (workdir / "alpaca" / "nslora" / "probe_reports.jsonl").exists()  # no probe ran


# ------------------------------------------------------------------------------------------------
# LLaMA-Factory: unset, the prompt is read from the rows LLaMA-Factory tokenized
# ------------------------------------------------------------------------------------------------

from test_llamafactory import LORA, MODULE, lf, run_lf, tiny_overrides  # noqa: E402,F401


@pytest.mark.slow
def test_llamafactory_unset_system_prompt_is_read_from_the_rows(lf, tmp_path, default_model_dir):
    from test_llamafactory import assert_symbolic_round_reached_training

    python, env, data = lf
    run_dir = tmp_path / "run"
    out = run_lf(python, env, ["-m", MODULE, "train", str(LORA),
                               *tiny_overrides(default_model_dir, data, run_dir),
                               "nslora_system_prompt=null"])
    assert out.returncode == 0
    assert_symbolic_round_reached_training(run_dir)  # initial prompt: the rows' SYSTEM
    reach = load_artifacts(run_dir).summary["training_rows"]
    assert reach["initial_prompt_from"] == "training rows"
    assert reach["rows_carrying_initial_prompt"] == reach["rows_read"] == 64
