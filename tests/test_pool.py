"""A pool for prompts-as-data (`pool_path` / `attach(pool=...)`): after an accepted edit the
training rows come from the pool, and no probe (gate) row is ever trained on."""

from __future__ import annotations

import json

import pytest

from nslora_plugin import NSLoRAConfig
from nslora_plugin.data import make_word_problems
from nslora_plugin.integrations.trl import attach

from tiny import ANSWER_FORMAT, FORMAT_INSTRUCTION, SYSTEM, load_tokenizer, sft_trainer

ROWS = make_word_problems(48, seed=5)


def config(**extra):
    return NSLoRAConfig(system_prompt=SYSTEM, editor="constraint", check_every=2, probe_size=4,
                        probe_max_new_tokens=6, answer_format=ANSWER_FORMAT,
                        format_instruction=FORMAT_INSTRUCTION, style_share_threshold=0.0,
                        gate_tie_break="accept", **extra)


def test_prompts_as_data_trains_on_the_pool_not_the_probe(tmp_path, default_model_dir):
    tok = load_tokenizer(default_model_dir)
    probe, pool = ROWS[32:36], ROWS[36:44]
    pool_path = tmp_path / "pool.jsonl"
    # rows without ids, as users write them: the pool's index ids do not collide with the probe's
    pool_path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "id"}) + "\n"
                                 for r in pool))
    trainer = sft_trainer(tok, tmp_path / "out", ROWS[:32], max_steps=4)
    callback = attach(trainer, config(pool_path=str(pool_path)),
                      probe=[{k: v for k, v in r.items() if k != "id"} for r in probe])
    trainer.train()
    loop = callback.loop
    assert loop.decision_counts["accepted"] >= 1
    sources = {row["source"] for row in loop.augmented}
    ids = {row["example_id"] for row in loop.augmented}
    assert sources == {"pool_reference"}
    assert ids and ids <= set(loop.pool) and not ids & set(loop.examples)


def test_a_pool_row_that_is_also_a_probe_row_is_refused(tmp_path, default_model_dir):
    tok = load_tokenizer(default_model_dir)
    trainer = sft_trainer(tok, tmp_path / "out", ROWS[:32], max_steps=2)
    attach(trainer, config(), probe=ROWS[32:36], pool=ROWS[34:40])
    with pytest.raises(ValueError, match="pool rows must not be probe rows"):
        trainer.train()
