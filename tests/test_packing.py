"""Prompt edits and augmented rows in packed batches: TRL `packing=True` / `padding_free=True`
and Axolotl `sample_packing: true`.

Unit tests splice TRL-style packed rows (`seq_lengths`) with the real tokenizer and run them
through TRL's real collator (position ids per segment); the end-to-end tests train a tiny real
model through the real SFTTrainer with packing on, let the constraint editor's edit be accepted at
the first check, and look at what the model was fed after it. The Axolotl run needs Axolotl's venv
(see tests/test_axolotl.py) and skips without it.
"""

from __future__ import annotations

import math

import pytest

from nslora_plugin import NSLoRAConfig, NSLoRAConfigError, load_artifacts
from nslora_plugin.core.chat import chat_messages, render
from nslora_plugin.core.collator import NSLoRACollator, find_subsequence, prompt_span_ids
from nslora_plugin.core.data import make_word_problems
from nslora_plugin.core.prompt_state import PromptCandidate, PromptState

from tiny import ANSWER_FORMAT, FORMAT_INSTRUCTION, SYSTEM, sft_trainer

NEW = f"{SYSTEM}\n{FORMAT_INSTRUCTION}"
AUGMENTED = {"messages": [{"role": "user", "content": "Augmented question?"},
                          {"role": "assistant", "content": "Answer: 7"}]}


def encode(tok, prompt, question, answer="2 + 3 = 5.\nAnswer: 5"):
    """Ids of a chat and how many of them are the prompt (system + user + assistant header)."""
    text = render(tok, chat_messages(prompt, question, answer), generation_prompt=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prefix = len(tok(render(tok, chat_messages(prompt, question), generation_prompt=True),
                     add_special_tokens=False)["input_ids"])
    return ids, prefix


def segment(tok, prompt, question):
    ids, prefix = encode(tok, prompt, question)
    return ids, [-100] * prefix + ids[prefix:]


def packed_row(tok, questions, prompt=SYSTEM):
    """A row as TRL's bfd packing makes it: input_ids, labels, seq_lengths."""
    segs = [segment(tok, prompt, q) for q in questions]
    return {"input_ids": [t for ids, _ in segs for t in ids],
            "labels": [t for _, labels in segs for t in labels],
            "seq_lengths": [len(ids) for ids, _ in segs]}


def accepted(prompt: str) -> PromptState:
    state = PromptState(SYSTEM)
    state.record(PromptCandidate(version=None, step=1, editor="test", prompt=prompt, accepted=True,
                                 reward_before=0.0, reward_after=1.0, reason="test"))
    return state


def prompt_span(tok, ids):
    """Where the new prompt's tokens are in `ids` (a slice: the splice gives them labels -100)."""
    span = prompt_span_ids(tok, NEW)
    at = find_subsequence(ids, span)
    assert at >= 0, tok.decode(ids)[:120]
    return slice(at, at + len(span))


def split_row(row):
    at, out = 0, []
    for n in row["seq_lengths"]:
        out.append({k: row[k][at:at + n] for k in ("input_ids", "labels")})
        at += n
    return out


# ------------------------------------------------------------------------------------------------
# The splice on packed rows (real tokenizer, TRL's real collator)
# ------------------------------------------------------------------------------------------------


def test_every_segment_of_a_packed_row_gets_the_new_prompt(tokenizer):
    """Each segment becomes exactly what tokenizing its chat under the new prompt gives, labels
    included; seq_lengths follow the new segment lengths and add up to the row."""
    questions = [["What is 1+1?", "What is 2+2?", "What is 3+3?"], ["What is 4+4?", "What is 5+5?"]]
    rows = [packed_row(tokenizer, qs) for qs in questions]
    seen: list = []
    collator = NSLoRACollator(lambda feats: seen.extend(feats) or feats, tokenizer, accepted(NEW),
                              max_length=512)
    collator([dict(r) for r in rows])
    for row, qs in zip(seen, questions):
        assert sum(row["seq_lengths"]) == len(row["input_ids"]) == len(row["labels"])
        for seg, q in zip(split_row(row), qs, strict=True):
            ids, labels = segment(tokenizer, NEW, q)
            assert seg["input_ids"] == ids and seg["labels"] == labels
    assert collator.stats["swapped"] == 5 and collator.stats["packed_rows"] == 2
    assert collator.stats["no_span"] == collator.stats["dropped"] == 0


def test_trl_collator_builds_position_ids_per_spliced_segment(tokenizer):
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    base = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    collator = NSLoRACollator(base, tokenizer, accepted(NEW), max_length=512)
    rows = [packed_row(tokenizer, ["What is 1+1?", "What is 12+30?"]),
            packed_row(tokenizer, ["What is 7+7?"])]
    batch = collator([dict(r) for r in rows])
    ids, labels, pos = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert len(starts) == 3 and batch["cu_seq_lens_q"].tolist() == starts + [len(ids)]
    new_len = [len(segment(tokenizer, NEW, q)[0]) for q in ("What is 1+1?", "What is 12+30?", "What is 7+7?")]
    assert [b - a for a, b in zip(starts, starts[1:] + [len(ids)])] == new_len
    for a, n in zip(starts, new_len):
        assert pos[a:a + n].tolist() == list(range(n))
        text = tokenizer.decode(ids[a:a + n])
        assert text.startswith(f"<|im_start|>system\n{NEW}<|im_end|>")
        seg_labels = labels[a:a + n]
        assert (seg_labels[prompt_span(tokenizer, ids[a:a + n].tolist())] == -100).all()
        reply = seg_labels != -100
        assert reply.any() and torch.equal(seg_labels[reply], ids[a:a + n][reply])


def test_augmented_rows_replace_segments(tokenizer):
    collator = NSLoRACollator(lambda f: f, tokenizer, accepted(NEW), augment_share=0.5, seed=0,
                              max_length=512)
    collator.add_augmented([AUGMENTED], cap=10)
    rows = [packed_row(tokenizer, [f"What is {i}+{j}?" for j in range(3)]) for i in range(2)]
    out = collator([dict(r) for r in rows])
    texts = [tokenizer.decode(seg["input_ids"]) for row in out for seg in split_row(row)]
    assert len(texts) == 6 and sum("Augmented question?" in t for t in texts) == 3
    assert all(f"system\n{NEW}<|im_end|>" in t for t in texts)
    for row in out:
        assert sum(row["seq_lengths"]) == len(row["input_ids"]) == len(row["labels"])
        for seg in split_row(row):
            text = tokenizer.decode(seg["input_ids"])
            trained = tokenizer.decode([t for t in seg["labels"] if t != -100])
            assert trained.startswith("Answer: 7" if "Augmented" in text else "2 + 3 = 5.")
    assert collator.stats["augmented"] == 3


def test_a_longer_prompt_drops_the_segments_that_no_longer_fit(tokenizer):
    """The pack stays within max_length; whole segments are dropped (and counted), never cut."""
    questions = [f"What is {i}+1?" for i in range(4)]
    row = packed_row(tokenizer, questions)
    width = len(row["input_ids"])
    long_prompt = NEW + " Think step by step." * 8
    collator = NSLoRACollator(lambda f: f, tokenizer, accepted(long_prompt), max_length=width)
    out = collator([dict(row)])[0]
    assert len(out["input_ids"]) <= width and sum(out["seq_lengths"]) == len(out["input_ids"])
    kept = split_row(out)
    assert 0 < len(kept) < 4 and collator.stats["dropped"] == 4 - len(kept)
    for seg, q in zip(kept, questions):
        assert seg["input_ids"] == segment(tokenizer, long_prompt, q)[0]  # complete, reply and all


def test_one_segment_longer_than_max_length_is_cut(tokenizer):
    row = packed_row(tokenizer, ["What is 1+1?"])
    width = len(row["input_ids"])
    collator = NSLoRACollator(lambda f: f, tokenizer, accepted(NEW + " Be brief." * 10), max_length=width)
    out = collator([dict(row)])[0]
    assert len(out["input_ids"]) == len(out["labels"]) == width and out["seq_lengths"] == [width]
    assert collator.stats["dropped"] == 0


def test_segments_without_the_prompt_are_left_alone(tokenizer):
    """With packing_strategy='bfd_split' the rest of a split example has no system prompt."""
    row = packed_row(tokenizer, ["What is 1+1?", "What is 2+2?"])
    tail = tokenizer("the rest of a long reply", add_special_tokens=False)["input_ids"]
    row = {"input_ids": row["input_ids"] + tail, "labels": row["labels"] + tail,
           "seq_lengths": row["seq_lengths"] + [len(tail)]}
    collator = NSLoRACollator(lambda f: f, tokenizer, accepted(NEW), max_length=512)
    out = collator([row])[0]
    segs = split_row(out)
    assert segs[2]["input_ids"] == tail and all(NEW in tokenizer.decode(s["input_ids"]) for s in segs[:2])
    assert collator.stats["swapped"] == 2 and collator.stats["no_span"] == 1


def test_axolotl_multipack_lists_are_spliced_pack_by_pack(tokenizer):
    """Axolotl's multipack sampler hands the collator one list of examples per pack."""
    def example(q):
        ids, labels = segment(tokenizer, SYSTEM, q)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
                "position_ids": list(range(len(ids)))}

    packs = [[example("What is 1+1?"), example("What is 2+2?")], [example("What is 3+3?")]]
    seen: list = []
    collator = NSLoRACollator(lambda f: seen.extend(f) or f, tokenizer, accepted(NEW),
                              augment_share=0.34, seed=1)
    collator.add_augmented([AUGMENTED], cap=10)
    collator(packs)
    assert [len(p) for p in seen] == [2, 1] and all(isinstance(p, list) for p in seen)
    for pack in seen:
        for ex in pack:
            n = len(ex["input_ids"])
            assert ex["position_ids"] == list(range(n)) and ex["attention_mask"] == [1] * n
            assert len(ex["labels"]) == n and tokenizer.decode(ex["input_ids"]).startswith(
                f"<|im_start|>system\n{NEW}<|im_end|>")
    assert collator.stats["augmented"] == 1 and collator.stats["packed_rows"] == 2
    assert collator.stats["swapped"] == 3


def test_wrapped_rows_are_reported(tokenizer, caplog):
    ids = packed_row(tokenizer, ["What is 1+1?", "What is 2+2?"])["input_ids"]
    collator = NSLoRACollator(lambda f: f, tokenizer, accepted(NEW))
    with caplog.at_level("WARNING", logger="nslora"):
        collator([{"input_ids": list(ids)}])
    assert any("packing_strategy='wrapped'" in r.message for r in caplog.records)


def test_trl_adapter_refuses_wrapped_packing_only():
    from types import SimpleNamespace

    from nslora_plugin.integrations.trl.args import check_trainer_args

    check_trainer_args(SimpleNamespace(packing=True, packing_strategy="bfd"))
    check_trainer_args(SimpleNamespace(packing=True, packing_strategy="bfd_split"))
    check_trainer_args(SimpleNamespace(packing=False, padding_free=True))
    with pytest.raises(NSLoRAConfigError, match="packing_strategy wrapped.*bfd"):
        check_trainer_args(SimpleNamespace(packing=True, packing_strategy="wrapped"))


# ------------------------------------------------------------------------------------------------
# End to end: the real SFTTrainer with packing, an accepted edit, the batches after it
# ------------------------------------------------------------------------------------------------


def nslora_config() -> NSLoRAConfig:
    return NSLoRAConfig(system_prompt=SYSTEM, editor="constraint", check_every=2, probe_size=4,
                        probe_max_new_tokens=6, answer_format=ANSWER_FORMAT,
                        format_instruction=FORMAT_INSTRUCTION, nll_threshold=100.0,
                        gate_tie_break="accept", max_symbolic_rounds=1, monitor_window=2)


def capture(trainer):
    seen: list = []

    def hook(module, args, kwargs):
        if module.training:
            seen.append((trainer.state.global_step, kwargs["input_ids"][0].tolist(),
                         kwargs["labels"][0].tolist(), kwargs["position_ids"][0].tolist()))

    trainer.model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def segments_of(ids, labels, pos):
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [(ids[a:b], labels[a:b], pos[a:b]) for a, b in zip(starts, starts[1:])]


def run_and_check(tokenizer, tmp_path, **trainer_args):
    from nslora_plugin.integrations.trl import attach
    from nslora_plugin.integrations.trl.args import check_trainer_args

    rows = make_word_problems(72, seed=3)
    trainer = sft_trainer(tokenizer, tmp_path / "run", rows[:64], max_steps=6, batch_size=2,
                          **trainer_args)
    check_trainer_args(trainer.args)  # what maybe_attach (--nslora) checks: accepted now
    seen = capture(trainer)
    callback = attach(trainer, nslora_config(), probe=rows[64:])
    trainer.train()

    arts = load_artifacts(tmp_path / "run")
    edits = [d for d in arts.decisions if d["kind"] == "edit"]
    assert len(edits) == 1 and edits[0]["accepted"] and edits[0]["step"] == 2, edits
    assert arts.system_prompt == NEW == callback.loop.prompt

    # The edit is accepted at the end of step 2; the loader reads one batch ahead, so the batches
    # trained from global step 3 on were collated after it.
    before = [s for s in seen if s[0] < 2]
    after = [s for s in seen if s[0] >= 3]
    assert before and after
    for _, ids, labels, pos in before:
        assert all(FORMAT_INSTRUCTION not in tokenizer.decode(s[0]) for s in segments_of(ids, labels, pos))
    n_segments = 0
    for _, ids, labels, pos in after:
        for seg_ids, seg_labels, seg_pos in segments_of(ids, labels, pos):
            if all(t == tokenizer.pad_token_id for t in seg_ids):
                continue  # padding at the end of a flattened batch
            n_segments += 1
            text = tokenizer.decode(seg_ids)
            assert text.startswith(f"<|im_start|>system\n{NEW}<|im_end|>"), text[:120]
            assert seg_pos == list(range(len(seg_ids)))
            # the spliced prompt trains nothing; everything else trains as TRL labelled it
            assert all(lab == -100 for lab in seg_labels[prompt_span(tokenizer, seg_ids)])
            trained = [(t, lab) for t, lab in zip(seg_ids, seg_labels) if lab != -100]
            assert trained and all(t == lab for t, lab in trained)
            assert "Answer:" in tokenizer.decode([t for t, _ in trained])
    assert n_segments > len(after)  # several examples per packed row
    stats = arts.state["collator"]
    print("collator stats:", stats)
    assert stats["swapped"] >= n_segments and stats["no_span"] == 0, stats
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and h.get("step", 0) >= 4]
    assert losses and all(math.isfinite(x) for x in losses)
    return stats


@pytest.mark.slow
def test_trl_packed_run_trains_on_the_accepted_edit(tokenizer, tmp_path):
    stats = run_and_check(tokenizer, tmp_path, packing=True, max_length=256)
    assert stats["packed_rows"] > 0


@pytest.mark.slow
def test_trl_padding_free_run_trains_on_the_accepted_edit(tokenizer, tmp_path):
    # TRL: padding_free without packing does not enforce max_length, so it wants max_length=None
    stats = run_and_check(tokenizer, tmp_path, padding_free=True, max_length=None)
    assert stats["packed_rows"] == 0  # ordinary examples, flattened by TRL's collator after the splice


# ------------------------------------------------------------------------------------------------
# End to end: `axolotl train` with sample_packing: true (Axolotl's venv, see tests/test_axolotl.py)
# ------------------------------------------------------------------------------------------------

from test_axolotl import axolotl_venv, workdir  # noqa: E402,F401  (fixtures)


@pytest.mark.slow
def test_axolotl_sample_packing_run_trains_on_the_accepted_edit(axolotl_venv, workdir):
    """The committed CPU LoRA recipe, shortened as in test_axolotl.py, with `sample_packing: true`
    (and `pad_to_sequence_len: true`, as Axolotl recommends with it): the multipack sampler packs
    the examples, the first check's edit is accepted, and the packs after it are spliced."""
    import yaml

    from test_axolotl import _axolotl_train, _check_symbolic_run, _short_recipe

    config = _short_recipe(workdir, "smollm2-lora-cpu.yaml", "packed")
    cfg = yaml.safe_load(config.read_text())
    cfg.update(sample_packing=True, pad_to_sequence_len=True)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code, output = _axolotl_train(axolotl_venv, workdir, config)
    assert code == 0, output[-5000:]
    _check_symbolic_run(workdir / "packed", output)
    stats = load_artifacts(workdir / "packed").state["collator"]
    print("collator stats:", stats)
    # the batches were packs of several examples (swapped > 0 is checked above)
    assert stats["packed_rows"] > 0 and stats["examples"] > stats["packed_rows"], stats
