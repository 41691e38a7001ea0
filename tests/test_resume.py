"""Killed with SIGKILL after a checkpoint, a resumed run restores the prompt and its history, the
router state, the usage and the augmented data; nothing is lost and no decision is duplicated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nslora_plugin import load_artifacts

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=600, **kw)


@pytest.mark.slow
def test_sigkill_then_resume_restores_everything(tmp_path, default_model_dir):
    out = tmp_path / "run"
    killed = run([str(out), str(default_model_dir), "--kill-at-step", "8"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = load_artifacts(out)  # the run folder as the killed process left it
    routes_killed = [d["step"] for d in before.decisions if d["kind"] == "route"]
    assert routes_killed == [2, 4, 6, 8]  # the step-8 check happened, then the kill
    ckpt = load_artifacts(out / "checkpoint-6")
    assert ckpt.prompt_version == 1 and ckpt.state["router"]["symbolic_rounds"] == 1

    resumed = run([str(out), str(default_model_dir), "--resume", str(out / "checkpoint-6")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.split("NSLORA_RESULT ")[-1])
    assert result["steps"] == 10

    final = load_artifacts(out)
    routes = [d["step"] for d in final.decisions if d["kind"] == "route"]
    assert routes == [2, 4, 6, 8, 10]  # step 8 re-run once after the rollback, not twice
    assert [d["kind"] for d in final.decisions].count("resume") == 1
    edits = [d for d in final.decisions if d["kind"] == "edit"]
    assert len(edits) == 1  # the router's spent symbolic budget survived the kill
    assert final.system_prompt == ckpt.system_prompt == result["prompt"]
    assert final.prompt_history == ckpt.prompt_history
    assert final.state["router"]["symbolic_rounds"] == 1
    assert final.state["decision_counts"]["numerical"] == 4 and final.state["decision_counts"]["symbolic"] == 1
    assert final.augmented_rows == ckpt.augmented_rows
    assert final.state["monitor"]["losses"]  # the loss window came back too
