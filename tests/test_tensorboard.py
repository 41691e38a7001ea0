"""TensorBoard, for real (issue 16): a tiny model trained through TRL's SFTTrainer with
`report_to=["tensorboard"]` and NSLoRA attached, its event files read back with TensorBoard's own
reader.

NSLoRA is added the way LLaMA-Factory and plain scripts add a callback — after the trainer is
built, so after transformers' `TensorBoardCallback` in the list. Its `on_log` adds the `nslora/*`
metrics to the log dict, which the report_to callbacks only see if it runs first; the callback
moves itself to the front when training begins, and this test fails if it does not.

Each prompt version (the initial one, then every accepted edit) also reaches TensorBoard as text
with a word diff against the version before (issue 27), and W&B as a table when wandb is installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from nslora_plugin import NSLoRACallback, load_artifacts
from nslora_plugin.core.data import make_word_problems

from tiny import FORMAT_INSTRUCTION, SYSTEM, edit_config, sft_trainer

#: what every log line carries once a probe has run (names under TensorBoard's "train/" prefix)
SCALARS = ("prompt_version", "symbolic_rounds", "augmented_examples", "probe_reward",
           "probe_correctness", "probe_format", "probe_ref_nll", "edits_accepted", "edits_rejected")


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(folder.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {folder}"
    out: dict[str, dict[int, float]] = {}
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def read_texts(folder: Path) -> dict[str, dict[int, str]]:
    """The text summaries (`SummaryWriter.add_text`) under `folder`, by tag and step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    out: dict[str, dict[int, str]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            for event in acc.Tensors(tag):
                value = tensor_util.make_ndarray(event.tensor_proto).reshape(-1)[0]
                out.setdefault(tag, {})[event.step] = value.decode()
    return out


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory, tokenizer) -> SimpleNamespace:
    """One tiny training run with report_to tensorboard whose checks accept edits."""
    from transformers.integrations import TensorBoardCallback

    tokenizer.chat_template = tokenizer.pristine_chat_template
    folder = tmp_path_factory.mktemp("tensorboard") / "run"
    rows = make_word_problems(72, seed=3)
    trainer = sft_trainer(tokenizer, folder, rows[:64], max_steps=6, report_to=["tensorboard"])
    callback = NSLoRACallback(edit_config(max_symbolic_rounds=2), probe=rows[64:])
    trainer.add_callback(callback)  # after TensorBoardCallback, as Trainer(callbacks=[...]) puts it
    handler = trainer.callback_handler.callbacks
    tb_index = next(i for i, c in enumerate(handler) if isinstance(c, TensorBoardCallback))
    added_after = handler.index(callback) > tb_index
    trainer.train()
    tokenizer.chat_template = tokenizer.pristine_chat_template
    return SimpleNamespace(folder=folder, trainer=trainer, callback=callback,
                           added_after=added_after, arts=load_artifacts(folder))


def test_nslora_scalars_reach_tensorboard_at_every_check(tensorboard_run):
    run = tensorboard_run
    assert run.added_after
    assert run.trainer.callback_handler.callbacks[0] is run.callback  # it moved itself first

    scalars = read_scalars(run.folder)
    arts = run.arts
    checks = [d["step"] for d in arts.decisions if d["kind"] == "route"]
    assert checks == [2, 4, 6]
    assert set(scalars["train/loss"]) == set(range(1, 7))  # the trainer's own scalars, every step
    for name in SCALARS:
        tag = f"train/nslora/{name}"
        assert tag in scalars, sorted(scalars)
        assert set(checks) <= set(scalars[tag]), (tag, scalars[tag])
    for step in checks:  # at a check, the values are that check's (its last probe: after an edit)
        last = [r for r in arts.probe_reports if r["step"] == step][-1]
        assert scalars["train/nslora/probe_reward"][step] == pytest.approx(last["reward"], abs=1e-4)
        assert scalars["train/nslora/probe_ref_nll"][step] == pytest.approx(last["ref_nll"], abs=1e-3)
        assert scalars["train/nslora/prompt_version"][step] == last["prompt_version"]
    edits = [d for d in arts.decisions if d["kind"] == "edit"]
    assert scalars["train/nslora/edits_accepted"][6] == sum(e["accepted"] for e in edits)
    assert scalars["train/nslora/symbolic_rounds"][6] == arts.summary["decisions"]["symbolic"]


def test_prompt_text_and_word_diff_reach_tensorboard(tensorboard_run):
    """The initial prompt at step 0, then each accepted edit at its step: the prompt as written
    and `[-old-]{+new+}` against the version before."""
    from nslora_plugin.trainer.prompt_log import word_diff

    arts = tensorboard_run.arts
    accepted = [d for d in arts.decisions if d["kind"] == "edit" and d["accepted"]]
    assert accepted, "the run accepted no edit"
    texts = read_texts(tensorboard_run.folder)
    prompts, diffs = texts["nslora/prompt/text_summary"], texts["nslora/prompt_diff/text_summary"]
    assert FORMAT_INSTRUCTION not in SYSTEM
    assert sorted(prompts) == sorted(diffs) == sorted({0} | {d["step"] for d in accepted})
    assert prompts[0] == f"```\n{SYSTEM}\n```" and diffs[0] == f"```\n{{+{SYSTEM}+}}\n```"

    versions = [c for c in arts.prompt_history if c["accepted"]]
    assert [c["version"] for c in versions] == list(range(len(accepted) + 1))
    for before, after in zip(versions, versions[1:]):  # one edit per check in this run
        step = after["step"]
        assert prompts[step] == f"```\n{after['prompt']}\n```"
        diff = word_diff(before["prompt"], after["prompt"])
        assert diffs[step] == f"```\n{diff}\n```"
        assert "{+" in diff
    first = versions[1]["prompt"]
    assert first.startswith(SYSTEM) and FORMAT_INSTRUCTION in first  # the constraint editor's edit
    added = first[len(SYSTEM):]
    between = added[:len(added) - len(added.lstrip())]  # the editor's separator, kept as written
    assert diffs[versions[1]["step"]] == f"```\n{SYSTEM}{between}{{+{added.strip()}+}}\n```"
    assert versions[-1]["prompt"] == arts.system_prompt


def test_word_diff_marks_removed_and_added_words():
    from nslora_plugin.trainer.prompt_log import word_diff

    assert word_diff("a b c", "a x c") == "a [-b-]{+x+} c"
    assert word_diff("a b c d", "b c d e") == "[-a-] b c d {+e+}"
    assert word_diff("one\ntwo", "one\n2 three") == "one\n[-two-]{+2 three+}"
    assert word_diff("", "hello world") == "{+hello world+}"
    assert word_diff("same", "same") == "same"


def test_report_to_without_tensorboard_or_wandb_logs_no_text():
    from nslora_plugin.trainer.prompt_log import PromptLog, requested

    assert requested(["tensorboard", "mlflow"]) == ["tensorboard"]
    assert requested("wandb") == ["wandb"]
    assert requested("none") == requested([]) == requested(None) == []
    assert PromptLog(["mlflow"]).pending == {}


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb is not installed (not in the test extra: a 20 MB wheel with a "
                           "service binary); `pip install wandb` runs this test offline")
def test_prompt_versions_reach_wandb_as_a_table(tmp_path, tokenizer, monkeypatch):
    """report_to wandb, offline: the table the run saved holds every prompt version."""
    import wandb

    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                        "WANDB_PROJECT": "nslora-test", "WANDB_DISABLE_CODE": "true"}.items():
        monkeypatch.setenv(name, value)
    rows = make_word_problems(40, seed=3)
    trainer = sft_trainer(tokenizer, tmp_path / "run", rows[:32], max_steps=2, report_to=["wandb"])
    trainer.add_callback(NSLoRACallback(edit_config(max_symbolic_rounds=1), probe=rows[32:]))
    try:
        trainer.train()
    finally:
        wandb.finish()
    arts = load_artifacts(tmp_path / "run")
    assert arts.prompt_version == 1

    pattern = "offline-run-*/files/media/table/nslora/prompts_*.table.json"
    tables = sorted((tmp_path / "wandb").glob(pattern), key=lambda p: p.stat().st_mtime)
    assert tables, sorted(str(p) for p in (tmp_path / "wandb").rglob("*"))[:40]
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["step", "version", "prompt", "diff"]
    assert [r[:2] for r in table["data"]] == [[0, 0], [2, 1]]
    assert table["data"][0][2:] == [SYSTEM, f"{{+{SYSTEM}+}}"]
    assert table["data"][1][2] == arts.system_prompt
    assert table["data"][1][3].startswith(SYSTEM) and table["data"][1][3].endswith("+}")
    assert f"{{+{FORMAT_INSTRUCTION}" in table["data"][1][3]
