"""`probe_max_new_tokens: auto` (the default): the probe's generation cap follows its own reference
replies, an explicit number still wins, and a reply that reaches the cap is counted as cut (in the
result, the report summary and a warning), so a user sees when the cap is too tight."""

from __future__ import annotations

import logging

import pytest

from nslora_plugin import NSLoRAConfig, NSLoRAConfigError
from nslora_plugin.core.data import load_probe_examples
from nslora_plugin.core.loop import NeurosymbolicLoop
from nslora_plugin.core.probe import ProbeEvaluator, auto_token_cap
from nslora_plugin.core.registry import make_plugin_manager
from tiny import SYSTEM, tiny_model


def _rows(reference_words: int) -> list[dict]:
    return [{"question": f"Say something about item {i}.",
             "answer": " ".join(["word"] * (reference_words + i))} for i in range(3)]


def _evaluator(tokenizer, rows, **settings) -> ProbeEvaluator:
    config = NSLoRAConfig(system_prompt=SYSTEM, **settings)
    return ProbeEvaluator(tokenizer, load_probe_examples(rows), config, make_plugin_manager(config))


def test_the_default_cap_follows_the_references(tokenizer):
    short = _evaluator(tokenizer, _rows(3))
    long = _evaluator(tokenizer, _rows(120))
    longest_short = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in _rows(3))
    longest_long = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in _rows(120))
    assert NSLoRAConfig().probe_max_new_tokens == 0  # auto is the default
    assert short.max_new_tokens == longest_short + 16
    assert long.max_new_tokens == longest_long + longest_long // 4
    assert short.max_new_tokens < long.max_new_tokens
    assert auto_token_cap(tokenizer, []) == 16


def test_an_explicit_cap_wins_and_auto_is_accepted_as_a_word(tokenizer):
    assert _evaluator(tokenizer, _rows(120), probe_max_new_tokens=5).max_new_tokens == 5
    assert NSLoRAConfig(probe_max_new_tokens="auto").probe_max_new_tokens == 0
    assert NSLoRAConfig.from_dict({"probe_max_new_tokens": "AUTO"}).probe_max_new_tokens == 0
    with pytest.raises(NSLoRAConfigError, match="probe_max_new_tokens"):
        NSLoRAConfig(probe_max_new_tokens=-1)
    with pytest.raises(NSLoRAConfigError, match="probe_max_new_tokens"):
        NSLoRAConfig(probe_max_new_tokens="lots")


def test_a_reply_cut_at_the_cap_is_counted_and_reported(tokenizer, tmp_path, caplog):
    """A random tiny model never ends a reply within 4 tokens: every reply is cut, and the result,
    the report's summary and one warning say so; with room to spare nothing is counted."""
    model = tiny_model(tokenizer, seed=3)
    rows = _rows(3)
    config = NSLoRAConfig(system_prompt=SYSTEM, probe_max_new_tokens=4, editor="none",
                          probe_stop_at_answer=False)
    loop = NeurosymbolicLoop(config, tokenizer, load_probe_examples(rows), output_dir=tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="nslora"):
        report = loop.evaluate(model, step=0)
        loop.evaluate(model, step=1)
    assert [r.cut for r in report.results] == [True, True, True]
    assert report.summary()["cut_replies"] == 3
    warnings = [r.getMessage() for r in caplog.records if "reached the cap" in r.getMessage()]
    assert len(warnings) == 1 and "cap of 4 new tokens" in warnings[0]
    assert "probe_max_new_tokens" in warnings[0]
    assert all(type(r.completion) is str for r in report.results)  # plain text in the records

    # a model that ends its turn at once: nothing reaches the cap, nothing is counted
    eos = tokenizer.eos_token_id
    model.generation_config.sequence_bias = {(eos,): 100.0}
    ended = loop.evaluate(model, step=2)
    assert [r.cut for r in ended.results] == [False, False, False]
    assert "cut_replies" not in ended.summary()
