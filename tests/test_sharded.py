"""Several ranks sharing the probe: FSDP2 over gloo, two "nodes" on loopback, rank 0 failing.

Real processes, a real tiny model, the real SFTTrainer and accelerate; CPU processes over gloo
stand in for GPUs over NCCL. accelerate turns FSDP on for accelerator devices only, so the FSDP
run imports `tests/scripts/cpu_fsdp.py`, which promotes an FSDP-launched CPU state to FSDP; from
there on it is accelerate's `fully_shard` preparation, DTensor parameters and PyTorch's own
all-gathers, as on GPUs. The accelerate config is the shipped recipe
(`recipes/accelerate/fsdp2.yaml`) with only the device keys changed for the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nslora_plugin import load_artifacts
from nslora_plugin.core.ranks import Ranks, ZERO3_OPT_IN, sharding_problem
from nslora_plugin.core.probe import _in_order
from nslora_plugin.apps.tools.serve import free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _results(stdout: str) -> list[dict]:
    return sorted((json.loads(line.split("NSLORA_RESULT ", 1)[1])
                   for line in stdout.splitlines() if "NSLORA_RESULT " in line),
                  key=lambda r: r["rank"])


def _cpu_fsdp2_config(tmp_path: Path) -> Path:
    config = yaml.safe_load((REPO / "recipes" / "accelerate" / "fsdp2.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    config.update(use_cpu=True, mixed_precision="no", num_processes=2)
    # Sharded checkpoints: resuming from the recipe's FULL_STATE_DICT checkpoint with CPU RAM
    # efficient loading and FSDP activation checkpointing hung on the CPU (not diagnosed yet, see
    # the issue note); the sharded layout resumes.
    config["fsdp_config"].update(fsdp_state_dict_type="SHARDED_STATE_DICT",
                                 fsdp_cpu_ram_efficient_loading=False,
                                 fsdp_activation_checkpointing=False)
    path = tmp_path / "fsdp2-cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _launch_fsdp2(config: Path, out: Path, model_dir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(free_port()), str(SCRIPT), str(out), str(model_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV}, timeout=420)


@pytest.mark.slow
def test_fsdp2_two_ranks_share_the_probe_edit_together_and_resume(tmp_path, default_model_dir):
    config = _cpu_fsdp2_config(tmp_path)
    out = tmp_path / "run"
    proc = _launch_fsdp2(config, out, default_model_dir, "--max-steps", "4", "--save-steps", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = _results(proc.stdout)
    assert [r["rank"] for r in results] == [0, 1] and [r["main"] for r in results] == [True, False]
    # really sharded: FSDP2 DTensor parameters on both ranks, detected as such
    assert all(r["sharding"] == "fsdp2" and r["dtensor_params"] > 0 for r in results)
    # one symbolic round, the same prompt on both ranks, spliced into both ranks' batches
    assert results[0]["prompt"] == results[1]["prompt"] and results[0]["version"] == results[1]["version"] == 1
    assert "Answer:" in results[0]["prompt"]
    assert all(r["collator"]["swapped"] > 0 and r["collator"]["no_span"] == 0 for r in results)
    # both ranks generated: 4 probe rows x (baseline, check 2, candidate, check 4) = 16, half each
    assert [r["rows_answered"] for r in results] == [8, 8]
    # artifacts written once, by rank 0
    arts = load_artifacts(out)
    kinds = [d["kind"] for d in arts.decisions]
    assert kinds.count("start") == 1 and kinds.count("end") == 1 and kinds.count("edit") == 1
    assert [d["step"] for d in arts.decisions if d["kind"] == "route"] == [2, 4]
    # every probe report covers the whole probe set (the ranks' shares gathered)
    assert all(r["n"] == 4 for r in arts.probe_reports)
    assert (out / "checkpoint-2" / "nslora" / "state.json").is_file()

    proc = _launch_fsdp2(config, out, default_model_dir, "--max-steps", "6", "--save-steps", "2",
                         "--resume", str(out / "checkpoint-2"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = _results(proc.stdout)
    assert all(r["steps"] == 6 and r["version"] == 1 for r in resumed)
    assert resumed[0]["prompt"] == resumed[1]["prompt"] == results[0]["prompt"]
    kinds = [d["kind"] for d in load_artifacts(out).decisions]
    assert kinds.count("resume") == 1 and kinds.count("edit") == 1  # no decision counted twice


@pytest.mark.slow
def test_two_nodes_on_loopback_one_editor_caller_one_writer(tmp_path, default_model_dir):
    """Two torchrun launches with --nnodes 2, as on two machines: each "node" has its own output
    folder (no shared disk); only global rank 0 calls the editor and writes artifacts."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(SCRIPT), str(tmp_path / f"node{node}"), str(default_model_dir),
               "--max-steps", "4", "--save-steps", "100"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, **ENV}))
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    results = _results(outputs[0][0] + outputs[1][0])
    assert [r["rank"] for r in results] == [0, 1] and [r["world_size"] for r in results] == [2, 2]
    assert results[0]["prompt"] == results[1]["prompt"] and results[0]["version"] == 1
    assert all(r["rows_answered"] > 0 for r in results)  # DDP: each node probes its half
    arts = load_artifacts(tmp_path / "node0")
    assert [d["kind"] for d in arts.decisions].count("edit") == 1  # one editor caller
    node1 = tmp_path / "node1" / "nslora"  # one artifact writer: nothing written on node 1
    assert not node1.exists() or not [p for p in node1.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_rank_zero_failing_stops_every_rank(tmp_path, default_model_dir):
    """Rank 0's check raises: the other rank is told and stops, instead of waiting forever."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(SCRIPT), str(tmp_path / "run"),
           str(default_model_dir), "--max-steps", "4", "--save-steps", "100", "--fail-at-check", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV}, timeout=600)
    assert proc.returncode != 0
    assert "router failed on purpose at step 2" in proc.stderr
    assert "RankAbort" in proc.stderr and "rank 1 stops too" in proc.stderr


def test_shares_cover_every_row_once_in_order():
    # one process: the whole list; a padded share repeats a row, whose first answer is kept
    assert Ranks().share(5) == [0, 1, 2, 3, 4]
    gathered = [(0, "a"), (1, "b"), (2, "c"), (2, "c-pad"), (3, "d")]
    assert _in_order(gathered, 4) == [("a",), ("b",), ("c",), ("d",)]
    assert Ranks().gather([1, 2]) == [1, 2] and Ranks().broadcast("x") == "x"


def test_unsupported_sharding_is_refused_naming_the_fix(monkeypatch):
    assert sharding_problem(Ranks(world_size=2, rank=0, sharding="fsdp2")) is None
    assert sharding_problem(Ranks(world_size=2, rank=0)) is None
    assert "fsdp_version: 2" in sharding_problem(Ranks(world_size=2, sharding="fsdp1"))
    monkeypatch.delenv(ZERO3_OPT_IN, raising=False)
    problem = sharding_problem(Ranks(world_size=2, sharding="zero3"))
    assert problem and ZERO3_OPT_IN in problem and "fsdp2.yaml" in problem
    monkeypatch.setenv(ZERO3_OPT_IN, "1")
    assert sharding_problem(Ranks(world_size=2, sharding="zero3")) is None
