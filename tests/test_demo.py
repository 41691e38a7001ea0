"""`nslora demo` end to end on a tiny real model (constraint editor, no LLM): the summary carries the
plain-LoRA and manual-fix reference columns next to NSLoRA's with the paired intervals of the
differences (or says plainly that n rows and one seed cannot separate them), and progress lines
reach a non-terminal output."""

from __future__ import annotations

import json

from nslora_plugin.apps.harness.demo import build_parser, run_demo
from tiny import write_trl_workdir


def test_demo_reports_plain_lora_next_to_nslora_and_prints_progress(tmp_path, tokenizer, capsys):
    work = write_trl_workdir(tmp_path, tokenizer)
    args = build_parser().parse_args([
        "--model", str(work / "tiny"), "--output-dir", str(tmp_path / "run"), "--no-editor-llm",
        "--max-steps", "6", "--entities", "3", "--probe-size", "4", "--pool-size", "2",
        "--eval-size", "4", "--batch-size", "4"])
    summary = run_demo(args)
    out = capsys.readouterr().out

    assert summary["task"] == "synthetic" and summary["student"] == "raw"  # --model: as it is
    plain, manual = summary["plain_lora"], summary["manual_fix"]
    assert set(plain["held_out"]) >= {"correctness", "format", "n"} and plain["held_out"]["n"] == 4
    assert plain["train_seconds"] > 0 and summary["nslora_train_seconds"] > 0
    # the manual fix states the task's format rule in its prompt; plain LoRA keeps the original
    assert "Final: <answer>" in manual["system_prompt"] and "Final" not in plain["system_prompt"]
    assert manual["held_out"]["n"] == 4
    assert "plain LoRA" in out and "manual fix" in out and "NSLoRA" in out
    m = summary["comparison_manual_fix"]
    assert m["measure"] == "held-out accuracy, NSLoRA − the manual fix"
    assert m["interval95"][0] <= m["difference"] <= m["interval95"][1]
    # the comparison with its interval (one task instance, one seed, 4 rows): a tie, said plainly
    c = summary["comparison"]
    assert c["levels"] == "1 task seed × 1 seed × 4 items"
    lo, hi = c["interval95"]
    assert lo <= c["difference"] <= hi
    if c["call"] == "tie":
        assert "a tie: 4 held-out rows and one seed cannot separate the arms" in out
    assert "95 % interval [" in out and "(1 task seed × 1 seed × 4 items)" in out
    # a progress line every max_steps // 12 (at least 1) steps, with s/step and ETA, without a TTY
    assert "step 3/6 · " in out and "s/step" in out and "ETA" in out and "step 6/6 · " in out
    saved = json.loads((tmp_path / "run" / "nslora" / "summary.json").read_text())
    assert saved["plain_lora"]["held_out"] == plain["held_out"]
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()


def test_demo_without_reference_has_no_plain_column(tmp_path, tokenizer, capsys):
    work = write_trl_workdir(tmp_path, tokenizer)
    args = build_parser().parse_args([
        "--model", str(work / "tiny"), "--output-dir", str(tmp_path / "run"), "--no-editor-llm",
        "--max-steps", "2", "--task", "word-problems", "--train-size", "16", "--probe-size", "4",
        "--eval-size", "4", "--batch-size", "4", "--no-reference"])
    summary = run_demo(args)
    assert summary["plain_lora"] is None and summary["manual_fix"] is None
    assert summary["task"] == "word-problems"
    assert summary["held_out_after"]["n"] == 4
    out = capsys.readouterr().out
    assert "plain LoRA" not in out and "manual fix" not in out and "comparison" not in summary


def test_demo_comparison_names_a_tie_and_a_lead():
    from nslora_plugin.apps.harness.demo import compare_held_out, comparison_line
    from nslora_plugin.core.records import ProbeReport, ProbeResult

    def report(right):
        return ProbeReport(step=1, prompt_version=0, results=[
            ProbeResult(example_id=f"wp{i}", completion="", rewards={"correctness": float(ok)},
                        reward=float(ok), ref_nll=0.0, signals={}) for i, ok in enumerate(right)])

    close = compare_held_out(report([1] * 11 + [0] * 21), report([1] * 13 + [0] * 19))
    assert close["call"] == "tie" and close["difference"] == -0.0625
    assert "a tie: 32 held-out rows and one seed cannot separate the arms" in comparison_line(close)
    apart = compare_held_out(report([1] * 30 + [0] * 2), report([1] * 2 + [0] * 30))
    assert apart["call"] == "NSLoRA ahead" and apart["interval95"][0] > 0
    assert "NSLoRA ahead" in comparison_line(apart) and "(1 task seed × 1 seed × 32 items)" in comparison_line(apart)


def test_demo_checks_at_start_half_way_and_end_and_gives_its_own_editor_a_short_budget(tmp_path):
    """The demo's cadence and editor budget (its run time): the one symbolic round happens at the
    start, so checks every max_steps // 2 suffice; the embedded editor the demo starts writes no
    TextGrad tags at any length, so it gets the short budget and a named endpoint the usual one."""
    from nslora_plugin.apps.harness.demo import EDITOR_MAX_TOKENS, OWN_EDITOR_MAX_TOKENS, demo_config

    args = build_parser().parse_args(["--max-steps", "20"])
    own = demo_config(args, tmp_path, own_editor=True)
    named = demo_config(args, tmp_path)
    assert own.check_every == named.check_every == 10 and own.check_at_start
    assert own.max_symbolic_rounds == 1
    assert own.editor_max_tokens == OWN_EDITOR_MAX_TOKENS < named.editor_max_tokens == EDITOR_MAX_TOKENS
