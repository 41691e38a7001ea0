"""Nothing lost, nothing leaked (issue 15): special tokens, one run per folder, bad probe rows,
torn state, exact resume with prompts-as-data. Tiny real models through the real `SFTTrainer`
and the real SmolLM2 tokenizer; secrets and config edges are in test_secrets / test_config_edges.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest

from nslora_plugin import NSLoRAConfig
from nslora_plugin.core.data import load_probe_examples, make_word_problems
from nslora_plugin.integrations.trl import attach

from tiny import DiskFiller, edit_config, load_tokenizer, sft_trainer

ROWS = make_word_problems(48, seed=21)


config = edit_config


# ------------------------------------------------------------------ 3. special and added tokens
@pytest.mark.parametrize("token", ["<filename>", "<jupyter_code>", "<|im_start|>", "<|custom_x|>", "[INST]"])
def test_one_filter_rejects_every_special_and_added_token(tmp_path, default_model_dir, token):
    from nslora_plugin.builtins.editors.textgrad import candidate_problem
    from nslora_plugin.core.loop import NeurosymbolicLoop

    tok = load_tokenizer(default_model_dir)
    loop = NeurosymbolicLoop(config(), tok, load_probe_examples(ROWS[:4]), output_dir=tmp_path)
    text = f"Answer briefly. {token} Then stop."
    prompt, problem = loop.sanitize(text)
    assert prompt is None and token in problem
    assert token in str(candidate_problem(text, loop.config, tok))  # the TextGrad editor agrees
    assert loop.sanitize("Answer briefly, in <b>bold</b> if you like.")[1] is None


# ------------------------------------------------------------------ 4. one run per folder
def test_a_second_run_on_the_same_folder_stops_at_once(tmp_path, default_model_dir):
    from nslora_plugin.core.artifacts import RunFolderInUse
    from nslora_plugin.core.loop import NeurosymbolicLoop

    tok = load_tokenizer(default_model_dir)
    first = NeurosymbolicLoop(config(), tok, load_probe_examples(ROWS[32:36]), output_dir=tmp_path / "a")
    first.artifacts.lock()
    second = NeurosymbolicLoop(config(), tok, load_probe_examples(ROWS[32:36]), output_dir=tmp_path / "a")
    with pytest.raises(RunFolderInUse, match="another run is writing to .* own output_dir"):
        second.start(None)
    assert not (tmp_path / "a" / "decisions.jsonl").exists()  # it wrote nothing
    first.artifacts.unlock()
    second.artifacts.lock()  # free again once the first run is done
    second.artifacts.unlock()


def test_a_killed_runs_lock_is_not_stale(tmp_path):
    from nslora_plugin.core.artifacts import ArtifactStore

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from nslora_plugin.core.artifacts import ArtifactStore; "
        f"s = ArtifactStore({str(tmp_path)!r}); s.lock(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        store = ArtifactStore(tmp_path)
        with pytest.raises(RuntimeError, match="another run"):
            store.lock()
        holder.kill()
        holder.wait(timeout=10)
        time.sleep(0.1)
        store.lock()  # the OS released the killed process's lock: nothing to clean up by hand
        store.unlock()
    finally:
        holder.kill()


# ------------------------------------------------------------------ 5. bad probe rows
@pytest.mark.parametrize("content,message", [
    ('{"question": "q", "answer": null}\n', "row 0: 'answer' is null"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}\n',
     "row 0: a 'user' message has no text 'content'"),
    ('{"messages": "hello"}\n', "row 0: 'messages' must be a list"),
    ('[{"question": "q", "answer": "a"}]\n', "holds a JSON array; NSLoRA reads JSONL"),
    ('{"question": "q", "answer": "a"}\n"just a string"\n', ":2 is a JSON str, not an object"),
    ("", "has no rows"),
])
def test_bad_probe_rows_name_the_file_and_row(tmp_path, content, message):
    path = tmp_path / "probe.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="probe.jsonl") as err:
        load_probe_examples(path)
    assert message in str(err.value)


def test_non_utf8_probe_file_names_the_file(tmp_path):
    path = tmp_path / "probe.jsonl"
    path.write_bytes('{"question": "caf\xe9", "answer": "a"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="probe.jsonl is not UTF-8"):
        load_probe_examples(path)


def test_an_oversized_probe_row_is_cut_with_a_warning_naming_it(tmp_path, default_model_dir, caplog):
    tok = load_tokenizer(default_model_dir)
    huge = {"id": "huge", "question": "What is 2+2? " + "very " * 20000, "answer": "Answer: 4"}
    trainer = sft_trainer(tok, tmp_path / "out", ROWS[:16], max_steps=2, max_length=64)
    with caplog.at_level(logging.WARNING, logger="nslora"):
        callback = attach(trainer, config(), probe=[huge, *ROWS[32:35]])
        trainer.train()
    example = callback.loop.examples["huge"]
    assert len(tok(example.question + example.reference)["input_ids"]) <= 70
    assert any("probe row huge has" in r.getMessage() and "max_length=64" in r.getMessage()
               for r in caplog.records)


# ------------------------------------------------------------------ 6. torn state, exact resume
def test_a_torn_checkpoint_state_names_the_file(tmp_path):
    from nslora_plugin.core.artifacts import ArtifactsUnreadable, load_artifacts

    folder = tmp_path / "checkpoint-4" / "nslora"
    folder.mkdir(parents=True)
    (folder / "prompt.json").write_text('{"system_prompt": "x", "version": 0}')
    (folder / "state.json").write_text('{"router": {"symbolic_rou')
    with pytest.raises(ArtifactsUnreadable, match="state.json' is not readable JSON.*earlier checkpoint"):
        load_artifacts(folder)


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_resume_with_prompts_as_data_is_bit_identical(tmp_path, default_model_dir):
    """augment_share > 0: the collator's mixing RNG and counters travel in the checkpoint."""
    import shutil

    tok = load_tokenizer(default_model_dir)
    cfg = config(augment_share=0.5, check_every=2)
    full = sft_trainer(tok, tmp_path / "full", ROWS[:32], max_steps=8, save_steps=4)
    attach(full, cfg, probe=ROWS[32:36])
    full.train()
    reference = _losses(full)
    state = json.loads((tmp_path / "full" / "checkpoint-4" / "nslora" / "state.json").read_text())
    assert state["collator"]["augmented"] > 0  # augmented rows were mixed in before the checkpoint

    shutil.copytree(tmp_path / "full" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    resumed = sft_trainer(tok, tmp_path / "resumed", ROWS[:32], max_steps=8, save_steps=4)
    callback = attach(resumed, cfg, probe=ROWS[32:36])
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-4"))
    after = _losses(resumed)  # steps 1-4 come from the checkpoint's trainer state
    assert sorted(after) == sorted(reference) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [after[s] for s in (5, 6, 7, 8)] == [reference[s] for s in (5, 6, 7, 8)]
    assert callback.loop.batch_stats["augmented"] == \
        json.loads((tmp_path / "full" / "nslora" / "state.json").read_text())["collator"]["augmented"]


# ------------------------------------------------------------------ 2. a full disk
def test_a_full_disk_under_the_artifacts_never_stops_training_or_loses_a_record(
        tmp_path, default_model_dir, small_disk, caplog):
    tok = load_tokenizer(default_model_dir)
    filler = DiskFiller(small_disk, fill_at=2, free_at=6)
    trainer = sft_trainer(tok, tmp_path / "run", ROWS[:32], max_steps=8, save_steps=4)
    cfg = config(output_dir=str(small_disk / "nslora"), augment_share=0.5)
    with caplog.at_level(logging.WARNING, logger="nslora"):
        callback = attach(trainer, cfg, probe=ROWS[32:36], plugins=[filler])
        trainer.train()
    assert trainer.state.global_step == 8  # training never stopped
    loop = callback.loop
    assert any(k.startswith("disk:") for k in loop.faults)
    warnings = [r.getMessage() for r in caplog.records if "could not write" in r.getMessage()]
    assert len(warnings) == 1  # said once per kind
    # the checkpoint written while the run folder was full carries the state of its step
    ckpt = json.loads((tmp_path / "run" / "checkpoint-4" / "nslora" / "state.json").read_text())
    assert ckpt["last_check_step"] == 4
    ckpt_routes = [json.loads(x)["step"] for x in
                   (tmp_path / "run" / "checkpoint-4" / "nslora" / "decisions.jsonl").open()
                   if json.loads(x)["kind"] == "route"]
    assert ckpt_routes == [2, 4]
    # once space was back, every record reached the run folder, none torn, none twice
    lines = (small_disk / "nslora" / "decisions.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]  # every line parses
    assert [r["step"] for r in records if r["kind"] == "route"] == [2, 4, 6, 8]
    assert [r["kind"] for r in records][0] == "start" and records[-1]["kind"] == "end"
    prompt = json.loads((small_disk / "nslora" / "prompt.json").read_text())
    assert prompt["system_prompt"] == loop.prompt
    assert not list((small_disk / "nslora").glob(".*.tmp*")) and loop.artifacts.pending_lines == 0


# ------------------------------------------------------------------ 7. checked before the model loads
def test_probe_file_and_editor_are_checked_before_the_model_is_loaded(tmp_path, caplog):
    from nslora_plugin import NSLoRAConfigError
    from nslora_plugin.integrations.trl.cli import _split, make_parser, run_sft
    from nslora_plugin.trainer.preflight import preflight
    from nslora_plugin.core.util import free_port

    argv = ["--model_name_or_path", str(tmp_path / "no-such-model"), "--dataset_name", "none",
            "--output_dir", str(tmp_path / "out"), "--use_cpu", "--bf16", "false", "--nslora",
            "--nslora_probe_path", str(tmp_path / "missing.jsonl")]
    parsed = make_parser().parse_args_and_config(argv, fail_with_unknown_args=False)
    with pytest.raises(NSLoRAConfigError, match="probe_path=.*missing.jsonl.*no such file"):
        run_sft(*_split(parsed))  # not a model or dataset error: those would come later

    probe = tmp_path / "probe.jsonl"
    probe.write_text(json.dumps(ROWS[0]) + "\n")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    down = NSLoRAConfig(probe_path=str(probe), editor_base_url=dead, editor_model="m",
                        editor_timeout=2, editor_retries=0)
    with caplog.at_level(logging.WARNING, logger="nslora"):
        problem = preflight(down)
    assert problem and problem.startswith("editor endpoint unreachable")
    assert any("; the constraint editor stands in" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match="editor endpoint unreachable.*on_editor_down"):
        preflight(down.replace(on_editor_down="fail"))
    assert preflight(down.replace(editor="constraint")) is None
