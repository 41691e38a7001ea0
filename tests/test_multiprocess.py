"""Two real processes on the CPU (gloo), launched by accelerate: only the main process probes and
edits, every rank trains on the same prompt from the same step, and the artifacts are written once.

Note: `accelerate launch --cpu` always starts a single process (its "simple" launcher); two CPU
processes come from the torchrun-based launcher (`--multi_gpu`) with the Trainer's `use_cpu=True`,
which makes accelerate pick the gloo backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nslora_plugin import load_artifacts
from nslora_plugin.apps.tools.serve import free_port

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


@pytest.mark.slow
def test_two_processes_share_one_prompt(tmp_path, default_model_dir):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           str(SCRIPT), str(out), str(default_model_dir), "--max-steps", "6", "--save-steps", "100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = sorted((json.loads(line.split("NSLORA_RESULT ", 1)[1])
                      for line in proc.stdout.splitlines() if "NSLORA_RESULT " in line),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["main"] for r in results] == [True, False]
    assert results[0]["prompt"] == results[1]["prompt"] and results[0]["version"] == results[1]["version"] == 1
    # both ranks spliced the accepted prompt into their own batches
    assert all(r["collator"]["swapped"] > 0 and r["collator"]["no_span"] == 0 for r in results)
    assert results[0]["collator"]["swapped"] == results[1]["collator"]["swapped"]
    # every rank probes its share of the rows (rank 0 does not generate the whole set alone)
    assert all(r["rows_answered"] > 0 for r in results)

    arts = load_artifacts(out)
    kinds = [d["kind"] for d in arts.decisions]
    assert kinds.count("start") == 1 and kinds.count("end") == 1  # written once, by rank 0
    assert [d["step"] for d in arts.decisions if d["kind"] == "route"] == [2, 4, 6]
    assert [c["editor"] for c in arts.prompt_history] == ["initial", "constraint"]
