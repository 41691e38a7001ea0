"""`nslora demo` end to end on a tiny real model (constraint editor, no LLM): the summary carries the
plain-LoRA reference column next to NSLoRA's, and progress lines reach a non-terminal output."""

from __future__ import annotations

import json

from nslora_plugin.apps.harness.demo import build_parser, run_demo
from tiny import write_trl_workdir


def test_demo_reports_plain_lora_next_to_nslora_and_prints_progress(tmp_path, tokenizer, capsys):
    work = write_trl_workdir(tmp_path, tokenizer)
    args = build_parser().parse_args([
        "--model", str(work / "tiny"), "--output-dir", str(tmp_path / "run"), "--no-editor-llm",
        "--max-steps", "6", "--train-size", "24", "--probe-size", "4", "--eval-size", "4",
        "--batch-size", "4"])
    summary = run_demo(args)
    out = capsys.readouterr().out

    plain = summary["plain_lora"]
    assert set(plain["held_out"]) >= {"correctness", "format", "n"} and plain["held_out"]["n"] == 4
    assert plain["train_seconds"] > 0 and summary["nslora_train_seconds"] > 0
    assert "plain LoRA" in out and "NSLoRA" in out
    # a progress line every max_steps // 12 (at least 1) steps, with s/step and ETA, without a TTY
    assert "step 3/6 · " in out and "s/step" in out and "ETA" in out and "step 6/6 · " in out
    saved = json.loads((tmp_path / "run" / "nslora" / "summary.json").read_text())
    assert saved["plain_lora"]["held_out"] == plain["held_out"]
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()


def test_demo_without_reference_has_no_plain_column(tmp_path, tokenizer, capsys):
    work = write_trl_workdir(tmp_path, tokenizer)
    args = build_parser().parse_args([
        "--model", str(work / "tiny"), "--output-dir", str(tmp_path / "run"), "--no-editor-llm",
        "--max-steps", "2", "--train-size", "16", "--probe-size", "4", "--eval-size", "4",
        "--batch-size", "4", "--no-reference"])
    summary = run_demo(args)
    assert summary["plain_lora"] is None
    assert "plain LoRA" not in capsys.readouterr().out
