"""No silent wrong answers (issue 28): inputs that were accepted and made results wrong without a
word, and the end of a run on a full disk. Tiny real models through the real `SFTTrainer` and the
real SmolLM2 tokenizer; the full-disk tests on a real 2 MB tmpfs (`small_disk`, conftest.py).

1. `none` / `null` for a setting that needs a value is refused by every adapter (was: the default).
2. A probe row with an empty answer is refused, naming the file and the row.
3. A probe row with its own system message (not the run's prompt) is refused, naming the row.
4. An `answer_format` without a capture group, or one that matches every reply, is refused.
5. A check cadence longer than the run is said at train start, naming the settings.
6. `nslora-lf` says one thing when `editor_base_url` is missing.
7. `probe_path` naming a folder and an `output_dir` under a file name the setting.
8. / 9. A full disk at the end of a run: the end-of-run copy is complete (from memory), and the
   run's last line says what the run folder lacks and where the complete record is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from nslora_plugin import NSLoRAConfig, NSLoRAConfigError, load_artifacts
from nslora_plugin.core.data import load_probe_examples, make_word_problems
from nslora_plugin.integrations.trl import NSLoRAArguments, attach

from tiny import ANSWER_FORMAT, SYSTEM, DiskFiller, edit_config, fill_disk, sft_trainer

ROWS = make_word_problems(40, seed=28)
NO_GROUP = r"^Answer: -?\d+\s*$"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]  # every line parses


def trl_parse(args: list[str]):
    from trl import TrlParser

    return TrlParser((NSLoRAArguments,)).parse_args_and_config(args)[0]


def lf_config(probe: Path, **keys):
    return {"stage": "sft", "do_train": True, "finetuning_type": "lora", "output_dir": "out",
            "nslora": True, "nslora_probe_path": str(probe), "nslora_system_prompt": SYSTEM, **keys}


def nslora_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "nslora"]


# ------------------------------------------------------------------ 1. none for a needed value
def test_none_for_a_setting_that_needs_a_value_is_refused_by_every_adapter(tmp_path):
    from nslora_plugin.integrations.axolotl.args import normalize_axolotl_cfg
    from nslora_plugin.integrations.llamafactory import prepare

    refused = r"check_every=None: expected an integer; null / none is not allowed"
    with pytest.raises(NSLoRAConfigError, match=refused):  # the TRL command line
        trl_parse(["--nslora", "--nslora_check_every", "none"])
    trl_yaml = tmp_path / "trl.yaml"
    trl_yaml.write_text("nslora: true\nnslora_check_every: null\n")
    with pytest.raises(NSLoRAConfigError, match=refused):  # a TrlParser --config YAML
        trl_parse(["--config", str(trl_yaml)])
    assert trl_parse(["--nslora", "--nslora_answer_format", "none"]).to_config().answer_format is None
    assert trl_parse(["--nslora"]).to_config().check_every == 20  # not given: the default

    probe = write_jsonl(tmp_path / "probe.jsonl", ROWS[:2])
    with pytest.raises(NSLoRAConfigError, match=rf"nslora_check_every: .*{refused}"):  # Axolotl
        normalize_axolotl_cfg({"nslora": True, "nslora_probe_path": str(probe),
                               "nslora_check_every": None})
    with pytest.raises(NSLoRAConfigError, match=r"nslora_check_every=None: expected an integer"):
        prepare(lf_config(probe, nslora_check_every=None), lookup_template_default=False)


# ------------------------------------------------------------------ 2. an empty answer
@pytest.mark.parametrize("row, what", [
    ({"question": "What is 2+2?", "answer": ""}, "'answer'"),
    ({"question": "What is 2+2?", "answer": "  \n"}, "'answer'"),
    ({"messages": [{"role": "user", "content": "What is 2+2?"},
                   {"role": "assistant", "content": ""}]}, "the last assistant message"),
    ({"prompt": "What is 2+2?", "completion": ""}, "'completion'"),
    ({"question": "What is 2+2?", "answer": "Answer: 4", "final_answer": ""}, "'final_answer'"),
])
def test_a_probe_row_with_an_empty_answer_is_refused_naming_file_and_row(tmp_path, row, what):
    probe = write_jsonl(tmp_path / "probe.jsonl", [ROWS[0], row])
    with pytest.raises(ValueError, match="probe.jsonl: row 1: the answer") as err:
        load_probe_examples(probe)
    assert f"row 1: the answer ({what}) is empty" in str(err.value)


def test_an_empty_answer_stops_the_trainer_before_any_step(tmp_path, tokenizer):
    probe = write_jsonl(tmp_path / "probe.jsonl", [ROWS[0], {"question": "What is 2+2?", "answer": ""}])
    trainer = sft_trainer(tokenizer, tmp_path / "out", ROWS[:8], max_steps=2)
    attach(trainer, edit_config(probe_path=str(probe)))
    with pytest.raises(ValueError, match=r"probe.jsonl: row 1: the answer \('answer'\) is empty"):
        trainer.train()
    assert trainer.state.global_step == 0


# ------------------------------------------------------------------ 3. a row's own system message
def test_probe_rows_with_their_own_system_message_are_refused(tmp_path, tokenizer):
    from nslora_plugin.core.loop import NeurosymbolicLoop

    turns = [{"role": "user", "content": ROWS[1]["question"]},
             {"role": "assistant", "content": ROWS[1]["answer"]}]
    pirate = {"id": "pirate-1", "messages": [
        {"role": "system", "content": "You are a pirate. Answer like one."}, *turns]}
    probe = write_jsonl(tmp_path / "probe.jsonl", [ROWS[0], pirate])
    trainer = sft_trainer(tokenizer, tmp_path / "out", ROWS[:8], max_steps=2)
    attach(trainer, edit_config(probe_path=str(probe)))
    with pytest.raises(ValueError) as err:
        trainer.train()
    message = str(err.value)
    for needle in ("probe row pirate-1", "probe.jsonl", "You are a pirate", SYSTEM,
                   "remove the system message", "set system_prompt"):
        assert needle in message
    assert trainer.state.global_step == 0
    # the chat-style prompt/completion shape carries one too
    chat = {"id": "chat-1", "prompt": pirate["messages"][:2], "completion": ROWS[1]["answer"]}
    with pytest.raises(ValueError, match="probe row chat-1 carries its own system message"):
        NeurosymbolicLoop(edit_config(), tokenizer, load_probe_examples([chat]),
                          output_dir=tmp_path / "chat")
    # a row whose system message is the run's prompt is probed as written
    same = {"id": "same", "messages": [{"role": "system", "content": SYSTEM}, *turns]}
    loop = NeurosymbolicLoop(edit_config(), tokenizer, load_probe_examples([ROWS[0], same]),
                             output_dir=tmp_path / "same")
    assert loop.examples["same"].system == SYSTEM and loop.examples["same"].question == turns[0]["content"]


# ------------------------------------------------------------------ 4. answer_format
def test_an_answer_format_that_cannot_extract_or_matches_everything_is_refused(tmp_path):
    from nslora_plugin.builtins.rewards import BuiltinRewards
    from nslora_plugin.core.records import ProbeExample
    from nslora_plugin.integrations.llamafactory import prepare

    with pytest.raises(NSLoRAConfigError, match=r"answer_format=.*capture group around the final"):
        NSLoRAConfig(answer_format=NO_GROUP)
    for pattern in (".*", ".+", r"(\d*)", r"^\s*", r"(?s).*"):
        with pytest.raises(NSLoRAConfigError, match="matches any reply.*always pass"):
            NSLoRAConfig(answer_format=pattern)
    with pytest.raises(NSLoRAConfigError, match=r"answer_pattern=.*matches an empty string"):
        NSLoRAConfig(answer_pattern=r"(\d*)")
    # the one schema: the TRL flags and the LLaMA-Factory keys say the same
    with pytest.raises(NSLoRAConfigError, match="answer_format=.*capture group"):
        trl_parse(["--nslora", "--nslora_answer_format", NO_GROUP])
    probe = write_jsonl(tmp_path / "probe.jsonl", ROWS[:2])
    with pytest.raises(NSLoRAConfigError, match="nslora_answer_format=.*matches any reply"):
        prepare(lf_config(probe, nslora_answer_format=".*"), lookup_template_default=False)
    # what is accepted scores a right reply right: a group, or answer_pattern to extract with
    example = ProbeExample("a", "q", "12 + 26 = 38.\nAnswer: 38", "38")
    reply = "12 + 26 = 38.\nAnswer: 38"
    for cfg in (NSLoRAConfig(answer_format=ANSWER_FORMAT),
                NSLoRAConfig(answer_format=NO_GROUP, answer_pattern=r"Answer: (-?\d+)")):
        assert BuiltinRewards().nslora_score_probe(example, reply, cfg) == {
            "correctness": 1.0, "format": 1.0}


# ------------------------------------------------------------------ 5. cadence vs planned steps
def test_a_check_cadence_longer_than_the_run_is_said_at_train_start(tmp_path, tokenizer, caplog):
    trainer = sft_trainer(tokenizer, tmp_path / "out", ROWS[:8], max_steps=2)
    with caplog.at_level(logging.WARNING, logger="nslora"):
        callback = attach(trainer, edit_config(check_every=20), probe=ROWS[32:34])
        trainer.train()
    said = [m for m in nslora_lines(caplog) if "check_every=20" in m]
    assert len(said) == 1
    for needle in ("max_steps=2", "no check runs", "never routes or edits",
                   "set check_every to at most 2"):
        assert needle in said[0]
    assert callback.loop.decision_counts["numerical"] + callback.loop.decision_counts["symbolic"] == 0
    # warmup past the end says so; a cadence that fits says nothing
    from nslora_plugin.core.loop import cadence_problem

    assert "warmup_steps=5" in cadence_problem(edit_config(check_every=2, warmup_steps=5), 4)
    assert cadence_problem(edit_config(check_every=3), 3) is None
    assert cadence_problem(edit_config(check_every=2, warmup_steps=3), 4) is None


# ------------------------------------------------------------------ 6. nslora-lf, one wording
@pytest.mark.parametrize("fallback, consequence", [("constraint", "the constraint editor stands in"),
                                                    ("none", "training stays numerical")])
def test_nslora_lf_says_one_thing_when_editor_base_url_is_missing(
        tmp_path, tokenizer, monkeypatch, caplog, fallback, consequence):
    import yaml

    from nslora_plugin.core.loop import NeurosymbolicLoop
    from nslora_plugin.integrations import llamafactory
    from nslora_plugin.integrations.llamafactory import cli

    probe = write_jsonl(tmp_path / "probe.jsonl", ROWS[:2])
    config = tmp_path / "lf.yaml"
    config.write_text(yaml.safe_dump(lf_config(probe, nslora_editor_fallback=fallback)))
    started = []

    def run_prepared(prepared, **_):  # what the callback does when LLaMA-Factory starts training
        loop = NeurosymbolicLoop(prepared.nslora, tokenizer, load_probe_examples(probe),
                                 output_dir=tmp_path / "nslora")
        loop.start_editors()
        started.append(loop)

    monkeypatch.setattr(llamafactory, "run_prepared", run_prepared)
    with caplog.at_level(logging.WARNING, logger="nslora"):
        assert cli.main(["train", str(config)]) == 0
    assert started
    said = [m for m in nslora_lines(caplog) if "editor_base_url is not set" in m]
    assert len(said) == 2  # before the model loads, and when training starts
    assert all(f"editor_base_url is not set; {consequence}" in m for m in said), said
    assert not any(("numerical" in m) != (fallback == "none") for m in said), said


# ------------------------------------------------------------------ 7. folders and files
def test_a_folder_for_a_file_and_a_file_for_a_folder_name_the_setting(tmp_path, tokenizer):
    from nslora_plugin.integrations.axolotl.args import normalize_axolotl_cfg
    from nslora_plugin.integrations.llamafactory import prepare

    folder = tmp_path / "probes"
    folder.mkdir()
    trainer = sft_trainer(tokenizer, tmp_path / "out", ROWS[:8], max_steps=1)
    is_folder = r"probe_path='[^']*probes': it is a folder, not a file"
    with pytest.raises(NSLoRAConfigError, match=is_folder):
        attach(trainer, edit_config(probe_path=str(folder)))
    with pytest.raises(NSLoRAConfigError, match=is_folder):
        prepare(lf_config(folder), lookup_template_default=False)
    with pytest.raises(NSLoRAConfigError, match="nslora_probe_path: .*it is a folder, not a file"):
        normalize_axolotl_cfg({"nslora": True, "nslora_probe_path": str(folder)})

    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    under = r"output_dir='[^']*results.txt/nslora': '[^']*results.txt', a folder above it, is a file"
    with pytest.raises(NSLoRAConfigError, match=under + r".*set NSLoRA's output_dir"):
        attach(trainer, edit_config(output_dir=str(blocker / "nslora")), probe=ROWS[32:34])
    with pytest.raises(NSLoRAConfigError, match="nslora_output_dir=.*a folder above it, is a file"):
        prepare(lf_config(write_jsonl(tmp_path / "p.jsonl", ROWS[:2]),
                          nslora_output_dir=str(blocker / "nslora")), lookup_template_default=False)
    # NSLoRA's folder under the trainer's output_dir: the trainer's output_dir is named
    trainer.args.output_dir = str(blocker / "run")
    attach(trainer, edit_config(), probe=ROWS[32:34])
    with pytest.raises(NSLoRAConfigError, match="The trainer's output_dir='[^']*results.txt/run' "
                                                "cannot hold NSLoRA's folder: '[^']*results.txt', "
                                                "a folder above it, is a file"):
        trainer.train()


# ------------------------------------------------------------------ 8, 9. the end on a full disk
def check_complete_copy(copy: Path, callback, routes: list[int]) -> list[dict]:
    records = read_jsonl(copy / "decisions.jsonl")
    assert records[0]["kind"] == "start" and records[-1]["kind"] == "end"
    assert [r["step"] for r in records if r["kind"] == "route"] == routes
    reports = read_jsonl(copy / "probe_reports.jsonl")
    assert reports[0]["step"] == 0 and reports[-1]["step"] == routes[-1]
    summary = json.loads((copy / "summary.json").read_text())
    assert summary == json.loads(json.dumps(callback.summary, default=str))
    arts = load_artifacts(copy)
    assert arts.system_prompt == callback.loop.prompt and arts.state["last_check_step"] == routes[-1]
    return records


def test_a_disk_full_from_the_start_leaves_a_complete_end_of_run_copy(
        tmp_path, tokenizer, small_disk, caplog):
    run_folder = small_disk / "nslora"
    run_folder.mkdir()
    fill_disk(small_disk / "filler.bin")
    trainer = sft_trainer(tokenizer, tmp_path / "out", ROWS[:16], max_steps=4, save_steps=2)
    with caplog.at_level(logging.WARNING, logger="nslora"):
        callback = attach(trainer, edit_config(output_dir=str(run_folder)), probe=ROWS[32:36])
        trainer.train()
    assert trainer.state.global_step == 4  # training finished
    copy = tmp_path / "out" / "nslora"
    check_complete_copy(copy, callback, [2, 4])
    assert not (run_folder / "summary.json").exists()
    last = nslora_lines(caplog)[-1]
    for needle in ("could not write", "decisions.jsonl (", "probe_reports.jsonl (", "summary.json",
                   str(run_folder), "No space left", f"the complete record is in {str(copy)!r}"):
        assert needle in last, last


def test_a_disk_that_fills_mid_run_and_stays_full_leaves_a_complete_record_and_says_where(
        tmp_path, tokenizer, small_disk, caplog):
    from nslora_plugin.trainer.callback import save_artifacts

    run_folder = small_disk / "nslora"
    trainer = sft_trainer(tokenizer, tmp_path / "out", ROWS[:24], max_steps=6, save_steps=6)
    cfg = edit_config(output_dir=str(run_folder), augment_share=0.5)
    with caplog.at_level(logging.WARNING, logger="nslora"):
        callback = attach(trainer, cfg, probe=ROWS[32:36], plugins=[DiskFiller(small_disk, fill_at=2)])
        trainer.train()
    assert trainer.state.global_step == 6
    copy = tmp_path / "out" / "nslora"
    records = check_complete_copy(copy, callback, [2, 4, 6])
    assert len(records) > len(read_jsonl(tmp_path / "out" / "checkpoint-6" / "nslora" / "decisions.jsonl"))
    # the run folder stopped where the disk filled: nothing torn, records missing
    kept = read_jsonl(run_folder / "decisions.jsonl")
    assert len(kept) < len(records) and not (run_folder / "summary.json").exists()
    last = nslora_lines(caplog)[-1]
    for needle in ("could not write", "decisions.jsonl (", "summary.json", str(run_folder),
                   f"the complete record is in {str(copy)!r}"):
        assert needle in last, last
    # a folder named afterwards (the final adapter folder) gets the complete record too
    final = save_artifacts(callback, tmp_path / "final")
    assert read_jsonl(final / "decisions.jsonl") == records
    assert (final / "summary.json").read_text() == (copy / "summary.json").read_text()


def test_with_no_copy_anywhere_the_record_goes_where_there_is_room(tmp_path, tokenizer, small_disk,
                                                                     caplog):
    """NSLoRA's folder is the trainer's own `output_dir/nslora`, on the full disk: no end-of-run
    copy can take the record, so it is written from memory into the system's temporary folder."""
    trainer = sft_trainer(tokenizer, small_disk / "out", ROWS[:16], max_steps=4, save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="nslora"):
        callback = attach(trainer, edit_config(), probe=ROWS[32:36],
                          plugins=[DiskFiller(small_disk, fill_at=2)])
        trainer.train()
    last = nslora_lines(caplog)[-1]
    assert "could not write" in last and str(small_disk / "out" / "nslora") in last, last
    where = Path(last.rpartition("the complete record is in ")[2].strip("'"))
    assert where.name == "nslora" and where.parent.name.startswith("nslora-record-")
    check_complete_copy(where, callback, [2, 4])
