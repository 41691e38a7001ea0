"""Using a trained run: adapter + optimized system prompt back in one call, and `nslora generate`.

A real short run (TRL SFTTrainer, tiny model, one accepted prompt edit) is saved like a user saves
it; `load_for_inference` on the final folder and on a checkpoint gives the model with the adapter
and a tokenizer whose chat template puts the optimized prompt into conversations that have none.
"""

from __future__ import annotations

import pytest

from nslora_plugin import load_artifacts
from nslora_plugin.apps.tools.inference import (generate, load_for_inference, set_default_system_prompt,
                                     wrap_chat_template)
from nslora_plugin.integrations.trl import save_artifacts

from tiny import FORMAT_INSTRUCTION, SYSTEM, run_from_base_folder

USER = [{"role": "user", "content": "What is 6 * 7?"}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """(run folder, final adapter folder) of a 3-step run whose first check accepts an edit."""
    root = tmp_path_factory.mktemp("inference")
    trainer, callback = run_from_base_folder(tokenizer, root, max_steps=3, save_steps=3, check_every=3)
    final = root / "final"
    trainer.save_model(str(final))
    save_artifacts(callback, final)
    return root / "run", final


def test_load_for_inference_applies_adapter_and_optimized_prompt(trained):
    from peft import PeftModel

    run, final = trained
    optimized = load_artifacts(final).system_prompt
    assert optimized == f"{SYSTEM}\n{FORMAT_INSTRUCTION}"
    for folder in (final, run / "checkpoint-3", run):
        model, tok = load_for_inference(folder)
        assert isinstance(model, PeftModel) and not model.training
        text = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
        assert f"<|im_start|>system\n{optimized}<|im_end|>" in text
        assert "SmolLM" not in text  # the template's own default is gone
    # a conversation that brings its own system message keeps it
    own = tok.apply_chat_template([{"role": "system", "content": "Be terse."}, *USER], tokenize=False)
    assert "Be terse." in own and optimized not in own

    answer = generate(model, tok, "What is 6 * 7?", max_new_tokens=6)
    assert isinstance(answer, str)
    import torch

    torch.manual_seed(0)  # greedy on a 2-layer model may be only newlines: sample for visible text
    sampled = generate(model, tok, "What is 6 * 7?", max_new_tokens=8, do_sample=True, temperature=2.0)
    assert sampled.strip()


def test_the_prompt_survives_save_and_reload(trained, tmp_path):
    from transformers import AutoTokenizer

    _, final = trained
    _, tok = load_for_inference(final)
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert FORMAT_INSTRUCTION in again.apply_chat_template(USER, tokenize=False)


def test_wrapping_is_literal_and_idempotent(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tricky = 'Say "hi" \\ then %} {{ x }} {% endif %}\n\ttab, é, 中文, 😀, \'quotes\''
    set_default_system_prompt(tok, tricky)
    assert f"system\n{tricky}<|im_end|>" in tok.apply_chat_template(USER, tokenize=False)
    set_default_system_prompt(tok, "second")
    assert tok.chat_template.count("nslora: default system prompt") == 1
    text = tok.apply_chat_template(USER, tokenize=False)
    assert "system\nsecond<|im_end|>" in text and tricky not in text


def test_wrapping_a_template_that_reads_the_system_message_itself():
    """Llama-3-style templates take messages[0] out as the system message before the loop."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ("{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
                "{%- set messages = messages[1:] -%}{%- else -%}{%- set system = 'DEFAULT' -%}{%- endif -%}"
                "[SYS]{{ system }}[/SYS]{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    render = ImmutableSandboxedEnvironment().from_string(wrap_chat_template(template, "OPT")).render
    assert render(messages=USER) == "[SYS]OPT[/SYS][user]What is 6 * 7?"
    assert render(messages=[{"role": "system", "content": "Own"}, *USER]).startswith("[SYS]Own[/SYS]")


def test_nslora_generate_command(trained, capsys):
    from nslora_plugin.apps.cli import main

    _, final = trained
    assert main(["generate", str(final), "What is 6 * 7?", "--max-new-tokens", "4", "--show-prompt"]) == 0
    captured = capsys.readouterr()
    assert FORMAT_INSTRUCTION in captured.err  # the rendered prompt carries the optimized prompt
    assert main(["generate", str(final.parent / "missing"), "q"]) == 2
