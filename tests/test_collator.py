"""NSLoRACollator on real tokenizers and TRL's real collator: span swap, splicing, mixing."""

from __future__ import annotations

import pytest

from nslora_plugin.core.collator import (NSLoRACollator, find_subsequence, prompt_span_ids,
                                    template_default_system_prompt)
from nslora_plugin.core.chat import chat_messages, render
from nslora_plugin.core.prompt_state import PromptCandidate, PromptState

from tiny import SYSTEM, load_tokenizer

NEW = "You are a careful math tutor.\nEnd your reply with a final line 'Answer: <number>'."


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return load_tokenizer(default_model_dir)


def encode(tok, prompt, question="What is 2+3?", answer="2 + 3 = 5.\nAnswer: 5"):
    text = render(tok, chat_messages(prompt, question, answer), generation_prompt=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prefix = len(tok(render(tok, chat_messages(prompt, question), generation_prompt=True),
                     add_special_tokens=False)["input_ids"])
    return ids, prefix


def accept(state: PromptState, prompt: str) -> None:
    state.record(PromptCandidate(version=None, step=1, editor="test", prompt=prompt, accepted=True,
                                 reward_before=0.0, reward_after=1.0, reason="test"))


def test_template_default_prompt_is_detected(tok):
    assert template_default_system_prompt(tok) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_span_ids_match_the_full_tokenization(tok):
    ids, _ = encode(tok, SYSTEM)
    span = prompt_span_ids(tok, SYSTEM)
    assert span and find_subsequence(ids, span) > 0
    assert tok.decode(span) == SYSTEM


def test_swap_splices_every_per_token_field(tok):
    ids, prefix = encode(tok, SYSTEM)
    labels = [-100] * prefix + ids[prefix:]
    feature = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
               "position_ids": list(range(len(ids))), "assistant_masks": [0] * prefix + [1] * (len(ids) - prefix),
               "meta": "kept"}
    state = PromptState(SYSTEM)
    accept(state, NEW)
    seen = []
    collator = NSLoRACollator(lambda feats: seen.extend(feats) or feats, tok, state)
    collator([feature])
    out = seen[0]
    expected_ids, expected_prefix = encode(tok, NEW)
    assert out["input_ids"] == expected_ids  # identical to tokenizing a chat with the new prompt
    assert out["labels"] == [-100] * expected_prefix + expected_ids[expected_prefix:]
    assert out["attention_mask"] == [1] * len(expected_ids)
    assert out["position_ids"] == list(range(len(expected_ids)))
    assert out["assistant_masks"] == [0] * expected_prefix + [1] * (len(expected_ids) - expected_prefix)
    assert out["meta"] == "kept"
    assert collator.stats["swapped"] == 1 and collator.stats["no_span"] == 0


def test_swap_and_mix_through_trl_collator(tok):
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    base = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)
    state = PromptState(SYSTEM)
    collator = NSLoRACollator(base, tok, state, augment_share=0.5, seed=0)
    features = [{"input_ids": encode(tok, SYSTEM, question=f"What is {i}+1?")[0]} for i in range(4)]
    batch = collator([dict(f) for f in features])
    assert all(SYSTEM in tok.decode(row) for row in batch["input_ids"])

    accept(state, NEW)
    collator.add_augmented([{"messages": [{"role": "user", "content": "Augmented question?"},
                                          {"role": "assistant", "content": "Answer: 7"}]}], cap=10)
    batch = collator([dict(f) for f in features])
    texts = [tok.decode(row) for row in batch["input_ids"]]
    assert all(f"system\n{NEW}<|im_end|>" in t for t in texts)
    augmented = [t for t in texts if "Augmented question?" in t]
    assert len(augmented) == 2  # augment_share 0.5 of 4
    assert isinstance(batch["labels"], torch.Tensor) and batch["labels"].shape == batch["input_ids"].shape


def test_rows_without_the_initial_prompt_are_left_alone_and_counted(tok, caplog):
    ids, _ = encode(tok, "Some other system prompt entirely.")
    state = PromptState(SYSTEM)
    accept(state, NEW)
    collator = NSLoRACollator(lambda f: f, tok, state)
    with caplog.at_level("WARNING", logger="nslora"):
        out = collator([{"input_ids": list(ids)}, {"input_ids": list(ids)}])
    assert out[0]["input_ids"] == ids
    assert collator.stats["no_span"] == 2
    assert sum("initial system prompt" in r.message for r in caplog.records) == 1


def test_spliced_examples_respect_the_trainers_max_length(tok):
    ids, _ = encode(tok, SYSTEM)
    state = PromptState(SYSTEM)
    accept(state, NEW + " " + "Think step by step. " * 20)
    collator = NSLoRACollator(lambda f: f, tok, state, max_length=len(ids))
    out = collator([{"input_ids": list(ids), "labels": list(ids), "meta": 1}])
    assert len(out[0]["input_ids"]) == len(out[0]["labels"]) == len(ids)
    assert tok.decode(out[0]["input_ids"]).count("Think step by step.") >= 1


def test_rows_that_break_the_format_keep_the_initial_prompt(tok):
    """With a `reply_ok` check (prompt_swap: compliant), a reply that ignores the format the
    edited prompt asks for is not paired with that prompt; a compliant one is."""
    from nslora_plugin.core.answers import format_compliant

    compliant, _ = encode(tok, SYSTEM, answer="2 + 3 = 5.\nAnswer: 5")
    plain, _ = encode(tok, SYSTEM, answer="2 + 3 = 5.")
    state = PromptState(SYSTEM)
    accept(state, NEW)
    collator = NSLoRACollator(lambda f: f, tok, state,
                              reply_ok=lambda text: format_compliant(text, r"^Answer: *(-?\d+)\s*$"))
    out = collator([{"input_ids": list(compliant)}, {"input_ids": list(plain)}])
    assert out[0]["input_ids"] == encode(tok, NEW, answer="2 + 3 = 5.\nAnswer: 5")[0]
    assert out[1]["input_ids"] == plain
    assert collator.stats["swapped"] == 1 and collator.stats["kept_initial"] == 1
    # without the check (prompt_swap: all) both get the edited prompt
    collator_all = NSLoRACollator(lambda f: f, tok, state)
    out = collator_all([{"input_ids": list(compliant)}, {"input_ids": list(plain)}])
    assert out[1]["input_ids"] == encode(tok, NEW, answer="2 + 3 = 5.")[0]


def test_the_length_cap_is_read_under_each_frameworks_name():
    """TRL names it `max_length`, Axolotl's training args `max_seq_length` (its YAML
    `sequence_len`): rows an edit made longer are cut back to whichever the trainer has."""
    from types import SimpleNamespace

    from nslora_plugin.trainer.callback import length_limit

    assert length_limit(SimpleNamespace(max_length=512)) == 512
    assert length_limit(SimpleNamespace(max_length=None, max_seq_length=2048)) == 2048
    assert length_limit(SimpleNamespace(sequence_len=1024)) == 1024
    assert length_limit(SimpleNamespace(max_length=None)) is None
