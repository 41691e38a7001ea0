"""The loop end to end on TRL's real SFTTrainer with a tiny real model.

The tiny model cannot answer anything, so every probe example fails; with `nll_threshold` set
high its format violations count as style problems, which makes the first check symbolic and the
later ones numerical once the symbolic budget is spent — both decisions in one short run.
"""

from __future__ import annotations

import json

import pytest

from nslora_plugin import NSLoRAConfig, load_artifacts
from nslora_plugin.core.data import make_word_problems
from nslora_plugin.integrations.trl import attach, save_artifacts

from tiny import (ANSWER_FORMAT, FORMAT_INSTRUCTION, SYSTEM, capture_training_batches,
                  sft_trainer)


@pytest.fixture(scope="module")
def rows():
    return make_word_problems(72, seed=3)


def nslora_config(**overrides) -> NSLoRAConfig:
    base = dict(system_prompt=SYSTEM, editor="constraint", check_every=3, probe_size=6,
                probe_max_new_tokens=8, answer_format=ANSWER_FORMAT,
                format_instruction=FORMAT_INSTRUCTION, nll_threshold=100.0, gate_tie_break="accept",
                max_symbolic_rounds=1, monitor_window=2)
    base.update(overrides)
    return NSLoRAConfig(**base)


def test_numerical_and_symbolic_decisions_and_prompt_reaches_batches(tmp_path, tokenizer, rows):
    trainer = sft_trainer(tokenizer, tmp_path / "run", rows[:64], max_steps=9, save_steps=6)
    batches = capture_training_batches(trainer, tokenizer)
    callback = attach(trainer, nslora_config(), probe=rows[64:])
    trainer.train()

    arts = load_artifacts(tmp_path / "run")
    routes = [d for d in arts.decisions if d["kind"] == "route"]
    assert [d["step"] for d in routes] == [3, 6, 9]
    assert routes[0]["action"] == "symbolic"
    assert "constraint" in routes[0]["reason"]
    assert all(d["action"] == "numerical" for d in routes[1:])
    assert "symbolic budget spent" in routes[1]["reason"]
    for d in routes:  # every decision carries its inputs, scores and a reason
        assert d["scores"]["failures"] == 6 and d["labels"] and d["signal"]["step"] == d["step"]
        assert all(0.0 <= lab["p_symbolic"] <= 1.0 for lab in d["labels"])

    edits = [d for d in arts.decisions if d["kind"] == "edit"]
    assert len(edits) == 1 and edits[0]["editor"] == "constraint" and edits[0]["accepted"]
    new_prompt = f"{SYSTEM}\n{FORMAT_INSTRUCTION}"
    assert arts.system_prompt == new_prompt and arts.prompt_version == 1
    assert callback.loop.prompt == new_prompt

    # What the weights trained on: the old prompt up to the edit at the end of step 3, the new one
    # after it. accelerate's loader reads one batch ahead, so the batch of step 4 was collated
    # before the edit: the new prompt trains from step 5 on.
    before = [text for step, text in batches if step < 3]
    after = [text for step, text in batches if step >= 4]
    assert before and after
    assert all(SYSTEM in t and FORMAT_INSTRUCTION not in t for t in before)
    assert all(f"system\n{new_prompt}<|im_end|>" in t for t in after)
    stats = arts.state["collator"]
    assert stats["swapped"] >= len(after) and stats["no_span"] == 0


def test_artifacts_travel_with_checkpoints_and_adapter(tmp_path, tokenizer, rows):
    trainer = sft_trainer(tokenizer, tmp_path / "run", rows[:64], max_steps=6, save_steps=3)
    callback = attach(trainer, nslora_config(), probe=rows[64:])
    trainer.train()
    final = tmp_path / "adapter"
    trainer.save_model(str(final))
    save_artifacts(callback, final)

    run = load_artifacts(tmp_path / "run")
    ckpt3 = load_artifacts(tmp_path / "run" / "checkpoint-3")
    ckpt6 = load_artifacts(tmp_path / "run" / "checkpoint-6")
    adapter = load_artifacts(final)
    assert (final / "adapter_model.safetensors").is_file()
    assert run.system_prompt == ckpt3.system_prompt == ckpt6.system_prompt == adapter.system_prompt
    assert run.initial_system_prompt == SYSTEM
    # checkpoint-3 was written right after the edit at step 3; the history has both versions
    assert [c["editor"] for c in ckpt3.prompt_history] == ["initial", "constraint"]
    cand = run.prompt_history[1]
    assert cand["accepted"] and cand["reward_before"] is not None and "format" in cand["components_after"]
    assert run.summary["probe_before"]["n"] == 6 and run.summary["system_prompt_after"] == run.system_prompt
    assert run.config["check_every"] == 3 and "editor_api_key_env" in run.config
    assert json.loads((tmp_path / "run" / "nslora" / "prompt.json").read_text())["version"] == 1
    assert len(ckpt6.decisions) > len(ckpt3.decisions)


def test_no_edit_when_failures_are_factual_and_no_constraint_is_broken(tmp_path, tokenizer, rows):
    """Wrong answers with no format rule to break: the answer is missing from every reply, the
    failures are factual, and only LoRA trains."""
    trainer = sft_trainer(tokenizer, tmp_path / "run", rows[:64], max_steps=6)
    attach(trainer, nslora_config(nll_threshold=1.5, answer_format=None, format_instruction=None),
           probe=rows[64:])
    trainer.train()
    arts = load_artifacts(tmp_path / "run")
    routes = [d for d in arts.decisions if d["kind"] == "route"]
    assert routes and all(d["action"] == "numerical" for d in routes)
    assert all(lab["label"] == "numerical" for d in routes for lab in d["labels"])
    assert arts.system_prompt == SYSTEM and arts.prompt_version == 0
