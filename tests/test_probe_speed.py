"""The probe's two speed-ups keep its numbers: the batched, left-padded reference NLL that projects
only the reference positions equals each row scored alone, and stopping a reply at its first
complete answer line gives a prefix of the reply generation would have produced anyway."""

from __future__ import annotations

import torch

from nslora_plugin import NSLoRAConfig
from nslora_plugin.core.data import load_probe_examples, make_word_problems
from nslora_plugin.core.registry import make_plugin_manager
from nslora_plugin.core.probe import ProbeEvaluator, answer_stop_pattern
from tiny import ANSWER_FORMAT, SYSTEM, tiny_model


def _evaluator(tokenizer, config):
    examples = load_probe_examples(make_word_problems(6, seed=5))
    return ProbeEvaluator(tokenizer, examples, config, make_plugin_manager(config)), examples


def test_batched_reference_nll_equals_each_row_alone(tokenizer):
    model = tiny_model(tokenizer, seed=1)
    batched_cfg = NSLoRAConfig(probe_batch_size=6)
    alone_cfg = NSLoRAConfig(probe_batch_size=1)
    batched, examples = _evaluator(tokenizer, batched_cfg)
    alone, _ = _evaluator(tokenizer, alone_cfg)
    together = batched.reference_nll(model, SYSTEM, examples)
    one_by_one = alone.reference_nll(model, SYSTEM, examples)
    assert len(together) == 6 and all(v > 0 for v in together)
    assert torch.allclose(torch.tensor(together), torch.tensor(one_by_one), atol=1e-4), (together, one_by_one)


def test_reference_nll_matches_the_plain_full_logits_loss(tokenizer):
    model = tiny_model(tokenizer, seed=2)
    ev, examples = _evaluator(tokenizer, NSLoRAConfig(probe_batch_size=4))
    got = ev.reference_nll(model, SYSTEM, examples[:1])[0]
    e = examples[0]
    from nslora_plugin.core.chat import chat_messages, render

    prefix = render(tokenizer, chat_messages(SYSTEM, e.question), generation_prompt=True)
    full = render(tokenizer, chat_messages(SYSTEM, e.question, e.reference), generation_prompt=False)
    ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
    start = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    labels = ids.clone()
    labels[:, :start] = -100
    with torch.no_grad():
        expected = float(model(input_ids=ids, labels=labels).loss)
    assert abs(got - expected) < 1e-4


def test_stop_at_answer_line_only_when_no_reward_needs_the_whole_reply():
    assert answer_stop_pattern(NSLoRAConfig(answer_format=ANSWER_FORMAT)) is not None
    assert answer_stop_pattern(NSLoRAConfig()) is None
    assert answer_stop_pattern(NSLoRAConfig(answer_format=ANSWER_FORMAT, probe_stop_at_answer=False)) is None
    assert answer_stop_pattern(NSLoRAConfig(answer_format=ANSWER_FORMAT, max_reply_chars=200)) is None
    assert answer_stop_pattern(NSLoRAConfig(answer_format=ANSWER_FORMAT, reply_json=True)) is None


def test_stopped_replies_are_prefixes_and_end_at_the_answer_line(tokenizer):
    """A tiny model trained for a few steps to say 'Answer: 7' and go on: the stopped reply is the
    unstopped one cut right after its first complete answer line."""
    from nslora_plugin.core.probe import answer_stopping_criteria

    model = tiny_model(tokenizer, seed=3)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}], tokenize=False, add_generation_prompt=True)
    target = "Answer: 7\nmore words after the answer line and more"
    ids = tokenizer(text + target, add_special_tokens=False, return_tensors="pt")["input_ids"]
    prompt_len = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    prompt = ids[:, :prompt_len]
    cfg = NSLoRAConfig(answer_format=ANSWER_FORMAT)
    with torch.no_grad():
        plain = model.generate(prompt, max_new_tokens=14, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
        stopped = model.generate(prompt, max_new_tokens=14, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id,
                                 stopping_criteria=answer_stopping_criteria(tokenizer, cfg, prompt_len))
    plain_text = tokenizer.decode(plain[0, prompt_len:], skip_special_tokens=True)
    stopped_text = tokenizer.decode(stopped[0, prompt_len:], skip_special_tokens=True)
    assert plain_text.startswith("Answer: 7\nmore"), plain_text
    assert plain_text.startswith(stopped_text)
    assert stopped_text.rstrip() == "Answer: 7" and len(stopped_text) < len(plain_text)


def test_nll_scored_on_the_generation_cache_equals_a_separate_pass(tokenizer):
    """The probe scores references on the KV cache generation built: same numbers as a full pass."""
    model = tiny_model(tokenizer, seed=4)
    cfg = NSLoRAConfig(probe_batch_size=4, probe_max_new_tokens=6)
    ev, examples = _evaluator(tokenizer, cfg)

    def no_fallback(*args, **kwargs):
        raise AssertionError("the cache path fell back to a separate full pass")

    ev.reference_nll = no_fallback
    replies, shared = ev.generate_and_score(model, SYSTEM, examples)
    del ev.reference_nll
    separate = ev.reference_nll(model, SYSTEM, examples)
    assert replies == ev.generate(model, SYSTEM, [e.question for e in examples])
    assert len(shared) == 6
    assert torch.allclose(torch.tensor(shared), torch.tensor(separate), atol=1e-4), (shared, separate)
