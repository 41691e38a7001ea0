"""A pool for prompts-as-data (`pool_path` / `attach(pool=...)`): after an accepted edit the
training rows come from the pool, and no probe (gate) row is ever trained on."""

from __future__ import annotations

import json

import pytest

from nslora_plugin.core.data import make_word_problems
from nslora_plugin.integrations.trl import attach

from tiny import edit_config, load_tokenizer, sft_trainer

ROWS = make_word_problems(48, seed=5)


config = edit_config


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


def test_the_demonstrations_editor_shows_pool_rows_and_the_gate_picks_a_set(tmp_path, default_model_dir):
    from nslora_plugin.builtins.editors.demonstrations import HEADER

    tok = load_tokenizer(default_model_dir)
    probe, pool = ROWS[32:36], ROWS[36:44]
    trainer = sft_trainer(tok, tmp_path / "out", ROWS[:32], max_steps=2)
    cfg = config(editor="demonstrations", editor_fallback="none", demo_examples=2, demo_candidates=2)
    callback = attach(trainer, cfg, probe=probe, pool=pool)
    trainer.train()
    decisions = [json.loads(x) for x in (callback.loop.artifacts_root / "decisions.jsonl").open()]
    edits = [d for d in decisions if d["kind"] == "edit"]
    assert edits and edits[0]["editor"] == "demonstrations:1"
    shown = edits[0]["meta"]["demonstrations"]
    assert len(shown) == 2 and set(shown) <= {r["id"] for r in pool}
    assert HEADER in edits[0]["candidate"]
    for ex_id in shown:  # each demonstration is a pool row's question and reference, verbatim
        row = next(r for r in pool if r["id"] == ex_id)
        assert row["question"] in edits[0]["candidate"] and row["answer"] in edits[0]["candidate"]
    assert all(e["editor"].startswith("demonstrations:") for e in edits)
    assert len(edits) <= 2 * callback.loop.decision_counts["symbolic"]  # at most demo_candidates per round


def test_the_demonstrations_editor_without_a_pool_says_why(tmp_path, default_model_dir):
    tok = load_tokenizer(default_model_dir)
    trainer = sft_trainer(tok, tmp_path / "out", ROWS[:32], max_steps=2)
    callback = attach(trainer, config(editor="demonstrations", editor_fallback="none"), probe=ROWS[32:36])
    trainer.train()
    decisions = [json.loads(x) for x in (callback.loop.artifacts_root / "decisions.jsonl").open()]
    faults = [d for d in decisions if d["kind"] == "fault" and d["where"] == "startup"]
    assert faults and "needs a pool (pool_path)" in faults[0]["message"]
    routes = [d for d in decisions if d["kind"] == "route"]
    assert routes and all(r["action"] == "numerical" for r in routes)
