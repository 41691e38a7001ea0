"""The symbolic half against real endpoints: TextGrad through a real `transformers serve` on
loopback (the 135M model as editor LLM), an endpoint that is down, and the gate's verdicts."""

from __future__ import annotations


import pytest

from nslora_plugin import NSLoRAConfig, load_artifacts
from nslora_plugin.core.data import make_word_problems
from nslora_plugin.builtins.editors.textgrad import parse_tagged
from nslora_plugin.integrations.trl import attach
from nslora_plugin.apps.tools.serve import free_port
from nslora_plugin.core.records import ProbeReport, ProbeResult

from tiny import ANSWER_FORMAT, FORMAT_INSTRUCTION, SYSTEM, sft_trainer


@pytest.fixture(scope="module")
def rows():
    return make_word_problems(70, seed=5)


def config(**overrides) -> NSLoRAConfig:
    base = dict(system_prompt=SYSTEM, check_every=3, probe_size=4, probe_max_new_tokens=8,
                answer_format=ANSWER_FORMAT, format_instruction=FORMAT_INSTRUCTION,
                nll_threshold=100.0, max_symbolic_rounds=1, gate_tie_break="accept",
                editor_batch_size=1, editor_max_tokens=48, editor_timeout=120.0)
    base.update(overrides)
    return NSLoRAConfig(**base)


def test_parse_tagged_handles_missing_and_unclosed_tags() -> None:
    assert parse_tagged("x <IMPROVED_VARIABLE> new prompt </IMPROVED_VARIABLE> y") == "new prompt"
    assert parse_tagged("<IMPROVED_VARIABLE>cut off mid-way") == "cut off mid-way"
    assert parse_tagged("no tags at all") is None
    assert parse_tagged("<IMPROVED_VARIABLE>   </IMPROVED_VARIABLE>") is None


@pytest.mark.slow
def test_textgrad_round_through_a_real_server(tmp_path, monkeypatch, tokenizer, rows, editor_server):
    monkeypatch.chdir(tmp_path)  # TextGrad must not write ./logs here
    trainer = sft_trainer(tokenizer, tmp_path / "run", rows[:64], max_steps=4)
    cb = attach(trainer, config(editor_base_url=editor_server.base_url,
                                editor_model=editor_server.model), probe=rows[64:])
    trainer.train()

    assert trainer.state.global_step == 4
    arts = load_artifacts(tmp_path / "run")
    start = next(d for d in arts.decisions if d["kind"] == "start")
    assert start["llm_editor_ready"] is True
    usage = arts.summary["editor_usage"]
    # batch 1: at most 3B+1 = 4 TextGrad calls, plus one repair call when the tags are missing
    assert 1 <= usage["calls"] <= 5 and usage["failed_calls"] == 0
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    editors = [c["editor"] for c in arts.prompt_history[1:]]
    faults = [d for d in arts.decisions if d["kind"] == "fault"]
    # The 135M editor either produced a candidate (gated like any other) or failed the tag format,
    # in which case that is logged and the deterministic constraint editor stands in.
    if "textgrad" in editors:
        cand = next(c for c in arts.prompt_history if c["editor"] == "textgrad")
        assert cand["reward_after"] is not None or cand["reason"].startswith("rejected")
    else:
        assert any("IMPROVED_VARIABLE" in f["message"] for f in faults)
        assert editors == ["constraint"]
    assert not (tmp_path / "logs").exists()
    assert list((tmp_path / "run" / "nslora" / "editor_logs").glob("*.jsonl"))
    assert cb.loop.prompt == arts.system_prompt


def test_editor_down_at_start_never_kills_the_run(tmp_path, tokenizer, rows, caplog):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    trainer = sft_trainer(tokenizer, tmp_path / "run", rows[:64], max_steps=6)
    attach(trainer, config(editor_base_url=dead, editor_model="m", max_symbolic_rounds=2,
                           stall_patience=5), probe=rows[64:])
    with caplog.at_level("WARNING", logger="nslora"):
        trainer.train()
    assert trainer.state.global_step == 6
    arts = load_artifacts(tmp_path / "run")
    start = next(d for d in arts.decisions if d["kind"] == "start")
    assert start["llm_editor_ready"] is False
    startup = [d for d in arts.decisions if d["kind"] == "fault" and d["where"] == "startup"]
    assert len(startup) == 1 and "unreachable" in startup[0]["message"]
    assert "constraint editor stands in" in startup[0]["message"]
    assert sum("editor fault (startup)" in r.message for r in caplog.records) == 1
    assert [c["editor"] for c in arts.prompt_history[1:]] == ["constraint"]


def test_on_editor_down_fail_raises_clearly(tmp_path, tokenizer, rows):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    trainer = sft_trainer(tokenizer, tmp_path / "run", rows[:64], max_steps=2)
    attach(trainer, config(editor_base_url=dead, on_editor_down="fail"), probe=rows[64:])
    with pytest.raises(RuntimeError, match="editor endpoint unreachable.*on_editor_down='numerical'"):
        trainer.train()


def _report(rewards: list[float], nll: float) -> ProbeReport:
    return ProbeReport(step=0, prompt_version=0, results=[
        ProbeResult(example_id=str(i), completion="", rewards={"correctness": r}, reward=r, ref_nll=nll)
        for i, r in enumerate(rewards)])


def test_gate_verdicts() -> None:
    from nslora_plugin.core.loop import gate_verdict

    cfg = NSLoRAConfig()
    assert gate_verdict(_report([0, 1], 1.0), _report([1, 1], 2.0), cfg)[0] is True   # reward up
    assert gate_verdict(_report([1, 1], 1.0), _report([0, 1], 0.1), cfg)[0] is False  # reward down
    ok, why = gate_verdict(_report([0, 1], 1.0), _report([0, 1], 0.9), cfg)
    assert ok and "tie broken by reference NLL" in why
    assert gate_verdict(_report([0, 1], 1.0), _report([0, 1], 1.1), cfg)[0] is False
    assert gate_verdict(_report([0, 1], 1.0), _report([0, 1], 1.1),
                        cfg.replace(gate_tie_break="accept"))[0] is True
    margin = cfg.replace(acceptance_margin=0.6)
    assert gate_verdict(_report([0, 1], 1.0), _report([1, 1], 1.0), margin)[0] is False


@pytest.mark.slow
def test_transformers_serve_accepts_and_ignores_response_format(editor_server):
    """What the embedded editor does with structured output: the call succeeds (no refusal, so
    no fallback), and the reply is the model's free text — only the lenient parse helps it."""
    from nslora_plugin.builtins.editors.clients import OpenAICompatibleClient

    client = OpenAICompatibleClient(NSLoRAConfig(editor_base_url=editor_server.base_url,
                                                 editor_model=editor_server.model,
                                                 editor_max_tokens=8, editor_cache=False))
    reply = client.chat("Say hello.", structured=True)
    assert reply.strip() and client.structured_refused == ""
    assert client.structured_request() == "json_schema"
    assert client.usage.calls == 1 and client.usage.failed_calls == 0
