"""TensorBoard, for real (issue 16): a tiny model trained through TRL's SFTTrainer with
`report_to=["tensorboard"]` and NSLoRA attached, its event files read back with TensorBoard's own
reader.

NSLoRA is added the way LLaMA-Factory and plain scripts add a callback — after the trainer is
built, so after transformers' `TensorBoardCallback` in the list. Its `on_log` adds the `nslora/*`
metrics to the log dict, which the report_to callbacks only see if it runs first; the callback
moves itself to the front when training begins, and this test fails if it does not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nslora_plugin import NSLoRACallback, load_artifacts
from nslora_plugin.core.data import make_word_problems

from tiny import edit_config, sft_trainer

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


def test_nslora_scalars_reach_tensorboard_at_every_check(tmp_path, tokenizer):
    from transformers.integrations import TensorBoardCallback

    rows = make_word_problems(72, seed=3)
    trainer = sft_trainer(tokenizer, tmp_path / "run", rows[:64], max_steps=6, report_to=["tensorboard"])
    callback = NSLoRACallback(edit_config(max_symbolic_rounds=2), probe=rows[64:])
    trainer.add_callback(callback)  # after TensorBoardCallback, as Trainer(callbacks=[...]) puts it
    handler = trainer.callback_handler.callbacks
    assert handler.index(callback) > next(i for i, c in enumerate(handler) if isinstance(c, TensorBoardCallback))
    trainer.train()
    assert trainer.callback_handler.callbacks[0] is callback  # it moved itself first

    scalars = read_scalars(tmp_path / "run")
    arts = load_artifacts(tmp_path / "run")
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
