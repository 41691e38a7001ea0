"""The optimized prompt travels in the saved chat template: a plain
`AutoTokenizer.from_pretrained(folder).apply_chat_template(...)`, with no nslora import, renders it
as the system message of a conversation that has none — in every checkpoint, in `output_dir` after
`trainer.save_model()`, and in a folder given to `save_artifacts`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nslora_plugin import NSLoRAConfig
from nslora_plugin.core.data import make_word_problems
from nslora_plugin.integrations.trl import attach, save_artifacts
from nslora_plugin.trainer.template import strip_default_prompt, wrap_chat_template
from tiny import ANSWER_FORMAT, FORMAT_INSTRUCTION, SYSTEM, load_tokenizer, sft_trainer

NEW_PROMPT = f"{SYSTEM}\n{FORMAT_INSTRUCTION}"


def render_without_nslora(folder, messages) -> str:
    """Render in a fresh interpreter that never imports nslora_plugin (as a server would)."""
    code = ("import json, sys\nfrom transformers import AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained({str(folder)!r})\n"
            f"text = tok.apply_chat_template(json.loads({json.dumps(messages)!r}), tokenize=False,"
            " add_generation_prompt=True)\n"
            "assert 'nslora_plugin' not in sys.modules\nprint(json.dumps(text))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("prompt", [NEW_PROMPT, 'Quote "this", {{ not a variable }} and %} too.\nÜber.'])
def test_the_preamble_renders_any_prompt_and_replaces_itself(tokenizer, prompt):
    original = tokenizer.chat_template
    template = wrap_chat_template(wrap_chat_template(original, "an older prompt"), prompt)
    assert strip_default_prompt(template) == original and template.count("nslora: default") == 1
    user = [{"role": "user", "content": "What is 2 + 3?"}]
    rendered = tokenizer.apply_chat_template(user, chat_template=template, tokenize=False)
    assert f"<|im_start|>system\n{prompt}<|im_end|>" in rendered
    own = [{"role": "system", "content": "Be terse."}] + user
    assert tokenizer.apply_chat_template(own, chat_template=template, tokenize=False) == \
        tokenizer.apply_chat_template(own, chat_template=original, tokenize=False)


def test_checkpoints_output_dir_and_saved_folders_serve_the_prompt(tmp_path, default_model_dir):
    tokenizer = load_tokenizer(default_model_dir)  # its own: the end of training sets its template
    rows = make_word_problems(40, seed=3)
    out = tmp_path / "run"
    trainer = sft_trainer(tokenizer, out, rows[:32], max_steps=3, save_steps=3)
    config = NSLoRAConfig(system_prompt=SYSTEM, editor="constraint", check_every=3, probe_size=4,
                          probe_max_new_tokens=8, answer_format=ANSWER_FORMAT,
                          format_instruction=FORMAT_INSTRUCTION, nll_threshold=100.0,
                          gate_tie_break="accept", max_symbolic_rounds=1, monitor_window=2)
    callback = attach(trainer, config, probe=rows[32:])
    trainer.train()
    assert callback.loop.prompt == NEW_PROMPT  # the edit was accepted at step 3, before its save
    assert NEW_PROMPT in tokenizer.apply_chat_template(  # the in-memory tokenizer save_model writes
        [{"role": "user", "content": "Hi"}], tokenize=False)
    trainer.save_model(str(out))
    elsewhere = tmp_path / "adapter"
    trainer.save_model(str(elsewhere))
    save_artifacts(callback, elsewhere)

    user = [{"role": "user", "content": "What is 2 + 3?"}]
    for folder in (out / "checkpoint-3", out, elsewhere):
        text = render_without_nslora(folder, user)
        assert f"<|im_start|>system\n{NEW_PROMPT}<|im_end|>" in text, folder
    own = [{"role": "system", "content": "Be terse."}] + user
    assert NEW_PROMPT not in render_without_nslora(out, own)


def test_the_switch_keeps_the_saved_template_as_it_was(tmp_path, default_model_dir):
    tokenizer = load_tokenizer(default_model_dir)
    rows = make_word_problems(40, seed=3)
    out = tmp_path / "run"
    trainer = sft_trainer(tokenizer, out, rows[:32], max_steps=3, save_steps=3)
    config = NSLoRAConfig(system_prompt=SYSTEM, editor="constraint", check_every=3, probe_size=4,
                          probe_max_new_tokens=8, answer_format=ANSWER_FORMAT,
                          format_instruction=FORMAT_INSTRUCTION, nll_threshold=100.0,
                          gate_tie_break="accept", prompt_in_template=False)
    callback = attach(trainer, config, probe=rows[32:])
    trainer.train()
    trainer.save_model(str(out))
    assert callback.loop.prompt == NEW_PROMPT
    for folder in (out / "checkpoint-3", out):
        assert FORMAT_INSTRUCTION not in render_without_nslora(folder, [{"role": "user", "content": "Hi"}])
