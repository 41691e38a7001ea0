"""`nslora bake`: a real short run (tiny model, one accepted prompt edit) is baked with real
generation and real TRL training; the baked folder is a plain PEFT adapter whose saved template
renders the student prompt, the teacher answered under the optimized prompt, the student trained
on the replies alone under the initial prompt, and every refusal names its folder or file."""

from __future__ import annotations

import json
import shutil

import pytest

from nslora_plugin.apps.cli import main
from nslora_plugin.apps.tools.bake import (ARMS, BAKE_FILE, BakeError, BakeSettings, NothingToBake,
                                           bake, evaluate, plan_bake)
from nslora_plugin.core.data import make_word_problems
from tiny import FORMAT_INSTRUCTION, SYSTEM, run_from_base_folder

OPTIMIZED = f"{SYSTEM}\n{FORMAT_INSTRUCTION}"
USER = [{"role": "user", "content": "What is 6 * 7?"}]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    """A run folder (adapter + nslora/) whose first check accepted the format edit."""
    root = tmp_path_factory.mktemp("bake")
    trainer, _ = run_from_base_folder(tokenizer, root, max_steps=3, save_steps=3, check_every=3)
    trainer.save_model(str(root / "run"))
    return root / "run"


class _SeenInTraining:
    """A `TrainerCallback` keeping (input_ids, labels) of every training forward."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        seen = self.batches = []

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                def hook(module, a, kw):
                    if module.training:
                        seen.append((kw["input_ids"].tolist(), kw["labels"].tolist()))
                self.handle = model.register_forward_pre_hook(hook, with_kwargs=True)

            def on_train_end(self, args, state, control, **kwargs):
                self.handle.remove()

        self.callback = Callback()


@pytest.fixture(scope="module")
def baked(run_dir, tokenizer):
    """`bake` on the run (default output RUN_DIR/baked), with what the teacher's `generate` got
    and what the student trained on."""
    from transformers.generation.utils import GenerationMixin

    prompts: list[str] = []
    original = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        prompts.extend(tokenizer.batch_decode(kwargs["input_ids"], skip_special_tokens=False))
        return original(self, *args, **kwargs)

    seen = _SeenInTraining()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GenerationMixin, "generate", spy)
        out = bake(run_dir, settings=BakeSettings(steps=2, batch_size=2, max_new_tokens=6),
                   callbacks=[seen.callback])
    return out, prompts, seen.batches


def _copy_run(run_dir, dest):
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("checkpoint-*", "baked", ".*"))
    return dest


def _set_prompt(run, prompt):
    path = run / "nslora" / "prompt.json"
    data = json.loads(path.read_text())
    data["system_prompt"] = prompt
    path.write_text(json.dumps(data))


def test_the_baked_folder_is_a_drop_in_peft_adapter(run_dir, baked):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, _, _ = baked
    assert out == run_dir / "baked"
    first = json.loads((run_dir / "adapter_config.json").read_text())
    second = json.loads((out / "adapter_config.json").read_text())
    for key in ("base_model_name_or_path", "r", "lora_alpha", "task_type"):
        assert second[key] == first[key], key
    assert sorted(second["target_modules"]) == sorted(first["target_modules"])  # a set in PEFT
    before = load_file(str(run_dir / "adapter_model.safetensors"))
    after = load_file(str(out / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained from there

    base = AutoModelForCausalLM.from_pretrained(second["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids).logits.shape[:2] == (1, 3)

    info = json.loads((out / BAKE_FILE).read_text())
    questions = [json.loads(line)["messages"][0]["content"]
                 for line in (run_dir / "nslora" / "augmented.jsonl").read_text().splitlines()]
    assert info["data"]["source"] == "run" and info["data"]["rows_used"] == len(questions) == 4
    assert info["data"]["files"][0]["file"].endswith("augmented.jsonl")
    assert info["teacher"] == {"system_prompt": OPTIMIZED, "prompt_version": 1}
    assert info["student"] == {"mode": "initial", "system_prompt": SYSTEM}
    assert info["settings"]["steps"] == info["training"]["steps"] == 2
    assert len(info["training"]["losses"]) == 2
    assert set(info["seconds"]) == {"load", "teacher", "train", "total"}
    teacher = [json.loads(line) for line in (out / "teacher.jsonl").read_text().splitlines()]
    assert [t["question"] for t in teacher] == questions
    assert info["replies"]["n"] == 4 and info["replies"]["cut"] == sum(t["cut"] for t in teacher)


def test_the_saved_template_renders_the_student_prompt_and_the_card_is_tagged(baked):
    import yaml
    from transformers import AutoTokenizer

    from nslora_plugin.apps.tools.inference import load_for_inference

    out, _, _ = baked
    tok = AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert f"<|im_start|>system\n{SYSTEM}<|im_end|>" in text
    assert FORMAT_INSTRUCTION not in text and "SmolLM" not in text
    assert tok.chat_template.count("nslora: default system prompt") == 1
    own = tok.apply_chat_template([{"role": "system", "content": "Be terse."}, *USER], tokenize=False)
    assert "Be terse." in own and SYSTEM not in own

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert {"nslora", "nslora-baked", "arxiv:2601.12711"} <= set(meta["tags"])
    assert FORMAT_INSTRUCTION in card  # the teacher's prompt is documented

    _, loaded = load_for_inference(out)  # `nslora generate RUN_DIR/baked` works too
    assert f"system\n{SYSTEM}<|im_end|>" in loaded.apply_chat_template(USER, tokenize=False)


def test_the_teacher_answered_under_the_optimized_prompt_and_the_student_learned_replies_only(
        baked, tokenizer):
    out, prompts, batches = baked
    questions = [json.loads(line)["question"] for line in (out / "teacher.jsonl").read_text().splitlines()]
    replies = [json.loads(line)["reply"] for line in (out / "teacher.jsonl").read_text().splitlines()]
    assert len(prompts) == len(questions) == 4
    for question, prompt in zip(questions, prompts):
        assert f"<|im_start|>system\n{OPTIMIZED}<|im_end|>" in prompt
        assert question in prompt and prompt.rstrip("\n").endswith("<|im_start|>assistant")

    assert len(batches) == 2  # two steps of two rows
    trained = set()
    for ids, labels in batches:
        for row_ids, row_labels in zip(ids, labels):
            text = tokenizer.decode(row_ids)
            learned = tokenizer.decode([t for t, lab in zip(row_ids, row_labels) if lab != -100])
            assert f"<|im_start|>system\n{SYSTEM}<|im_end|>" in text and FORMAT_INSTRUCTION not in text
            question = next(q for q in questions if q in text)
            trained.add(question)
            reply = replies[questions.index(question)]
            assert reply in learned and learned.endswith(("<|im_end|>", "<|im_end|>\n"))
            assert question not in learned and SYSTEM not in learned and "user" not in learned
    assert trained == set(questions)


def test_student_prompt_empty_from_a_data_file_through_the_cli(run_dir, tokenizer, tmp_path, capsys):
    rows = [{"messages": [{"role": "system", "content": "ignored"},
                          {"role": "user", "content": "How many legs do 3 cats have?"},
                          {"role": "assistant", "content": "12"}]},
            {"question": "What is 9 - 4?", "answer": "5"},
            {"prompt": [{"role": "user", "content": "Name a colour."}]},
            {"question": "What is 9 - 4?"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "empty-baked"
    rc = main(["bake", str(run_dir), "--data", str(data), "--student-prompt", "empty", "--output",
               str(out), "--steps", "1", "--batch-size", "2", "--max-new-tokens", "4", "--rows", "2"])
    assert rc == 0, capsys.readouterr().err
    assert f"baked: {out.resolve()}" in capsys.readouterr().out
    info = json.loads((out / BAKE_FILE).read_text())
    assert info["student"] == {"mode": "empty", "system_prompt": None}
    assert info["data"]["source"] == "file" and info["data"]["rows_read"] == 4
    assert info["data"]["duplicates"] == 1 and info["data"]["rows_used"] == 2
    used = [json.loads(line)["question"] for line in (out / "teacher.jsonl").read_text().splitlines()]
    assert len(used) == 2 and set(used) <= {"How many legs do 3 cats have?", "What is 9 - 4?",
                                            "Name a colour."}

    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(out))
    assert "nslora" not in saved.chat_template
    assert saved.apply_chat_template(USER, tokenize=False) == tokenizer.apply_chat_template(
        USER, tokenize=False, chat_template=tokenizer.pristine_chat_template)


def test_evaluate_scores_the_three_arms_with_their_prompts_and_adapters(run_dir, baked):
    from transformers.generation.utils import GenerationMixin

    probe = make_word_problems(40, seed=3)[32:34]
    calls = []

    def check(example, reply):
        calls.append((example.id, reply))
        return reply.strip() == ""

    active: list[list[str]] = []  # the LoRA layers' active adapter at each generate call
    original = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        active.append(next(list(m.active_adapters) for m in self.modules() if hasattr(m, "lora_A")))
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GenerationMixin, "generate", spy)
        result = evaluate(run_dir, probe, check, max_new_tokens=4)
    assert result["n"] == 2 and list(result["arms"]) == list(ARMS)
    assert [result["arms"][a]["system_prompt"] for a in ARMS] == [OPTIMIZED, SYSTEM, SYSTEM]
    assert active == [["default"], ["default"], ["baked"]]
    assert len(calls) == 6 and {i for i, _ in calls} == {"wp32", "wp33"}
    for arm in ARMS:
        assert set(result["arms"][arm]["scores"]) == {"score"}
        assert len(result["arms"][arm]["replies"]) == 2

    default = evaluate(run_dir, probe, max_new_tokens=4)  # the run's own reward components
    for arm in ARMS:
        scores = default["arms"][arm]["scores"]
        assert set(scores) == {"correctness", "format"} and all(0 <= v <= 1 for v in scores.values())


# ------------------------------------------------------------------------------------------------
# Refusals: each names the folder or file and what to do, and writes nothing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, words", [(SYSTEM, "is the initial one"),
                                           (None, "default system prompt")])
def test_nothing_to_bake_exits_1_unless_forced(run_dir, tmp_path, capsys, prompt, words):
    run = _copy_run(run_dir, tmp_path / "run")
    _set_prompt(run, prompt)
    assert main(["bake", str(run)]) == 1
    err = capsys.readouterr().err
    assert "nothing to bake" in err and words in err and str(run) in err and "--force" in err
    assert not (run / "baked").exists()
    with pytest.raises(NothingToBake):
        plan_bake(run)
    plan = plan_bake(run, force=True)  # forced: the plan goes ahead
    assert plan.teacher_prompt == prompt and len(plan.questions) == 4


def test_folders_without_a_run_or_an_adapter_are_refused(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["bake", str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no LoRA adapter" in err and "save_model" in err

    assert main(["bake", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err

    only_artifacts = tmp_path / "only"
    shutil.copytree(run_dir / "nslora", only_artifacts / "nslora")
    assert main(["bake", str(only_artifacts)]) == 2
    assert "no LoRA adapter" in capsys.readouterr().err

    no_artifacts = tmp_path / "adapter"
    no_artifacts.mkdir()
    shutil.copy(run_dir / "adapter_config.json", no_artifacts)
    assert main(["bake", str(no_artifacts)]) == 2
    assert "No NSLoRA artifacts" in capsys.readouterr().err

    moved = _copy_run(run_dir, tmp_path / "moved")
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone" / "base")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert main(["bake", str(moved)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "gone" / "base") in err and "--base-model" in err


def test_missing_rows_and_bad_data_files_are_refused(run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path / "run")
    (run / "nslora" / "augmented.jsonl").write_text("")
    assert main(["bake", str(run)]) == 2
    err = capsys.readouterr().err
    assert "keeps no rows" in err and "--data" in err and str(run) in err

    missing = tmp_path / "nope.jsonl"
    assert main(["bake", str(run), "--data", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    assert main(["bake", str(run), "--data", str(bad)]) == 2
    assert f"{bad}:1" in capsys.readouterr().err and not (run / "baked").exists()


def test_outputs_are_never_overwritten_by_surprise(run_dir, baked, tmp_path, capsys):
    assert main(["bake", str(run_dir)]) == 2  # RUN_DIR/baked exists (the fixture's)
    err = capsys.readouterr().err
    assert "holds a baked adapter already" in err and "--force" in err
    assert main(["bake", str(run_dir), "--output", str(run_dir), "--force"]) == 2
    assert "would replace the run itself" in capsys.readouterr().err
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert main(["bake", str(run_dir), "--output", str(other), "--force"]) == 2
    assert "is not a baked folder" in capsys.readouterr().err and (other / "keep.txt").is_file()
    with pytest.raises(BakeError, match="student_prompt"):
        BakeSettings(student_prompt="optimized")
    with pytest.raises(SystemExit):
        main(["bake", str(run_dir), "--student-prompt", "optimized"])
