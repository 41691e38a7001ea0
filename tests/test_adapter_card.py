"""The adapter card carries the prompt (issue 16).

A real 4-step run (TRL SFTTrainer, a tiny model loaded from a folder as users have one, one
accepted constraint edit) saved like a user saves it; then the cards are read back: the final
folder's README.md, the checkpoint's, and the run folder's after TRL rewrites it (as it does at
every checkpoint and in `push_to_hub`, right before the upload). The card's two code snippets are
run as written, with the folder filled in.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from nslora_plugin import load_artifacts
from nslora_plugin.trainer.card import BEGIN, END, write_card_section
from nslora_plugin.integrations.trl import save_artifacts

from tiny import FORMAT_INSTRUCTION, SYSTEM, run_from_base_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("card")
    trainer, callback = run_from_base_folder(tokenizer, root, max_steps=4, save_steps=2, check_every=2)
    trainer.save_model(str(root / "final"))
    save_artifacts(callback, root / "final")
    return root, trainer


def section(card: str) -> str:
    assert card.count(BEGIN) == 1 and card.count(END) == 1, card[:400]
    return card[card.index(BEGIN):card.index(END) + len(END)]


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^(`{{3,}}){lang}\n(.*?)^\1$", text, flags=re.M | re.S)


def test_the_final_card_carries_prompt_loading_code_decisions_and_probe_numbers(trained):
    root, _ = trained
    final = root / "final"
    arts = load_artifacts(final)
    assert arts.system_prompt == f"{SYSTEM}\n{FORMAT_INSTRUCTION}"
    card = (final / "README.md").read_text()
    ours = section(card)
    # the prompt itself, byte for byte, in a fenced block
    assert [body for _, body in code_blocks(ours, "text")] == [arts.system_prompt + "\n"]
    assert "load_for_inference(" in ours and "PeftModel.from_pretrained(" in ours
    assert "apply_chat_template(" in ours and str(root / "base") in ours  # the base model by name
    counts = arts.summary["decisions"]
    assert (f"{counts['numerical']} kept training the adapter (numerical), {counts['symbolic']} ran a "
            "prompt rewrite (symbolic)") in ours
    assert f"{counts['accepted']} accepted by the validation gate" in ours
    before, after = arts.summary["probe_before"], arts.summary["probe_after"]
    assert f"| probe reward | {before['reward']:.3f} | {after['reward']:.3f} |" in ours
    assert f"| reference NLL (nats/token) | {before['ref_nll']:.3f} | {after['ref_nll']:.3f} |" in ours
    # PEFT's card is still there around it: its metadata and its own sections
    assert card.startswith("---\n") and "library_name: peft" in card
    assert "### Framework versions" in card and card.index(BEGIN) < card.index("## Model Details")


def test_the_card_is_tagged_for_the_hub_beside_peft_and_trl(trained):
    import yaml

    from nslora_plugin.trainer.card import TAGS, with_tags

    root, _ = trained
    for folder in (root / "final", root / "run"):
        card = (folder / "README.md").read_text()
        meta = yaml.safe_load(card.split("---\n")[1])
        assert set(TAGS) <= set(meta["tags"]) and meta["library_name"], meta  # PEFT's / TRL's kept
        assert with_tags(card) == card  # tagging again changes nothing
    assert with_tags("# A card\n").startswith("---\ntags:\n- nslora\n- arxiv:2601.12711\n---\n")
    assert "arxiv:2601.12711" in with_tags("---\ntags: lora\n---\n# x\n")


def test_checkpoint_and_run_folder_cards_have_it_and_survive_trl_rewriting_them(trained):
    root, trainer = trained
    for folder in (root / "run" / "checkpoint-2", root / "run" / "checkpoint-4", root / "run"):
        section((folder / "README.md").read_text())
    # push_to_hub regenerates the card right before uploading output_dir: the section comes back
    trainer.create_model_card(model_name="run")
    card = (root / "run" / "README.md").read_text()
    assert "trl" in card.lower() and load_artifacts(root / "run").system_prompt in section(card)
    # ... and what push_to_hub uploads (output_dir without checkpoint-* and _*) has the artifacts
    assert (root / "run" / "nslora" / "prompt.json").is_file()


def test_writing_it_again_replaces_it_and_a_save_keeps_it(trained, tmp_path):
    root, trainer = trained
    folder = tmp_path / "final"
    shutil.copytree(root / "final", folder)
    card = folder / "README.md"
    before = card.read_text()
    assert write_card_section(folder) == card and card.read_text() == before  # idempotent
    prompt = json.loads((folder / "nslora" / "prompt.json").read_text())
    prompt["system_prompt"] = "Use ``` fences.\nAnswer: <n> at the end."
    (folder / "nslora" / "prompt.json").write_text(json.dumps(prompt))
    write_card_section(folder)
    text = card.read_text()
    ours = section(text)
    assert [body for fence, body in code_blocks(ours, "text")] == [prompt["system_prompt"] + "\n"]
    assert "````text" in ours  # a fence longer than the backticks in the prompt
    assert text.replace(ours, "") == before.replace(section(before), "")  # the rest untouched
    trainer.save_model(str(folder))  # PEFT updates the existing card in place
    assert prompt["system_prompt"] in section(card.read_text())


def test_a_card_that_cannot_be_written_never_breaks_a_save(trained, tmp_path, caplog):
    root, _ = trained
    no_artifacts = tmp_path / "plain-adapter"
    no_artifacts.mkdir()
    blocked = tmp_path / "blocked"
    shutil.copytree(root / "final" / "nslora", blocked / "nslora")
    (blocked / "README.md").mkdir()  # a folder where the card should be
    with caplog.at_level("WARNING", logger="nslora"):
        assert write_card_section(no_artifacts) is None
        assert write_card_section(blocked) is None
    assert caplog.text.count("could not write the model card section") == 2
    assert not (no_artifacts / "README.md").exists()


def test_the_cards_code_runs_as_written(trained):
    root, _ = trained
    final = root / "final"
    ours = section((final / "README.md").read_text())
    snippets = [body for _, body in code_blocks(ours, "python")]
    assert len(snippets) == 2
    for code in snippets:  # the folder filled in, fewer tokens (a tiny model writes noise)
        code = code.replace("path/to/this/folder", str(final)).replace("max_new_tokens=256", "max_new_tokens=4")
        code = code.replace('generate(model, tokenizer, "Your question")',
                            'generate(model, tokenizer, "Your question", max_new_tokens=4)')
        scope: dict = {}
        exec(compile(code, "card", "exec"), scope)  # noqa: S102 - the card's own code
        tokenizer = scope["tokenizer"]
        rendered = tokenizer.apply_chat_template(
            scope.get("messages") or [{"role": "user", "content": "Your question"}], tokenize=False)
        assert load_artifacts(final).system_prompt in rendered
