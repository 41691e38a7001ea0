"""Faults of a real editor LLM never kill a training run (issue 3).

Each test is one short real TRL SFTTrainer run (tiny model, a check and a symbolic round at every
step) against the loopback `FaultServer`. The first round is healthy and its candidate is accepted
(prompt v1, saved in checkpoint-1); every later round meets a different fault. For each fault the
run must complete, the prompt must stay v1, the fault must be logged once on the "nslora" logger
with a clear message and be in the decision log, and nothing saved before it may be lost.
"""

from __future__ import annotations

import json

import pytest

from nslora_plugin import load_artifacts
from nslora_plugin.core.data import make_word_problems
from nslora_plugin.integrations.trl import attach

from fault_server import FaultSchedule, FaultServer, editor_config
from tiny import sft_trainer

V1 = "You are a careful assistant. End every reply with a final line 'Answer: <number>'."


@pytest.fixture(scope="module")
def rows():
    return make_word_problems(70, seed=11)


@pytest.fixture()
def server():
    with FaultServer() as srv:
        yield srv


# (fault class in the log, words the message must carry) for each scheduled mode
EXPECTED = {
    "5xx": ("EditorHTTPError", "answered HTTP 500"),
    "timeout": ("EditorTimeout", "timed out after 1.0 s"),
    "garbage": ("EditorBadReply", "malformed reply"),
    "empty": ("EditorEmptyReply", "returned an empty reply"),
    "overlong": ("EditorOverlongCandidate", "max_prompt_chars=2000"),
    "inject": ("EditorUnsafeCandidate", "<|im_start|>"),
    "badjson": ("EditorBadReply", "not a chat completion"),
    "die": ("EditorUnreachable", "cannot reach the editor endpoint"),
}

SCENARIOS = {
    # transport faults: HTTP 500 (retried once), calls that time out, a body that is not JSON
    "transport": {1: {"mode": "ok"}, 2: {"mode": "5xx"}, 3: {"mode": "timeout"}, 4: {"mode": "garbage"}},
    # replies that arrive but are unusable
    "content": {1: {"mode": "ok"}, 2: {"mode": "empty"}, 3: {"mode": "overlong"}, 4: {"mode": "inject"}},
    # a server without usage fields, then wrong JSON, then a crash in the middle of a round
    "crash": {1: {"mode": "ok", "usage": False}, 2: {"mode": "badjson"},
              3: {"mode": "ok", "usage": True, "die_in": 2}, 4: {"mode": "ok"}},
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_faults_never_kill_a_run(scenario, tmp_path, tokenizer, rows, server, caplog):
    modes = SCENARIOS[scenario]
    server.improved = V1
    server.slow_seconds = 3.0
    schedule = FaultSchedule(server, modes)
    steps = len(modes)
    trainer = sft_trainer(tokenizer, tmp_path / "run", rows[:64], max_steps=steps, save_steps=1,
                          batch_size=1)
    callback = attach(trainer, editor_config(server, probe_size=2, editor_batch_size=2,
                                             editor_timeout=1.0), probe=rows[64:], plugins=[schedule])
    with caplog.at_level("INFO", logger="nslora"):
        trainer.train()

    # the run completed, every check was a symbolic round
    assert trainer.state.global_step == steps
    arts = load_artifacts(tmp_path / "run")
    routes = [d for d in arts.decisions if d["kind"] == "route"]
    assert [d["action"] for d in routes] == ["symbolic"] * steps

    # the healthy first round was accepted; the prompt stays the last accepted one
    accepted = [c for c in arts.prompt_history if c["accepted"]]
    assert [c["editor"] for c in accepted] == ["initial", "textgrad"] and accepted[1]["step"] == 1
    assert arts.system_prompt == V1 and arts.prompt_version == 1
    assert callback.loop.prompt == V1
    assert all(c["step"] == 1 for c in arts.prompt_history[1:])  # no candidate from a faulty round

    # each fault: logged once with a clear message, and on record in the decision log
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "nslora" and r.levelname == "WARNING"]
    faults = [d for d in arts.decisions if d["kind"] == "fault"]
    for step, settings in modes.items():
        mode = "die" if "die_in" in settings else settings["mode"]
        if mode not in EXPECTED:
            continue
        cls, words = EXPECTED[mode]
        logged = [w for w in warnings if f"editor fault (textgrad): {cls}:" in w]
        assert len(logged) == 1, (mode, warnings)
        assert words in logged[0], logged[0]
        assert any(f["step"] == step and f["where"] == "textgrad" and words in f["message"]
                   for f in faults), (mode, faults)
    assert sum("no editor proposed a prompt" in w for w in warnings) == 1
    assert not any("Traceback" in w for w in warnings)

    # nothing saved before a fault is lost: logs only grew, the prompt file is unchanged,
    # and the checkpoint written after the accepted edit still carries it
    final = {name: (arts.root / name).read_text() for name in
             ("decisions.jsonl", "prompt_history.jsonl", "prompt.json", "probe_reports.jsonl")}
    for step, snapshot in schedule.snapshots.items():
        if step == 1:
            continue
        for name in ("decisions.jsonl", "prompt_history.jsonl", "probe_reports.jsonl"):
            assert final[name].startswith(snapshot[name]), (step, name)
        assert json.loads(snapshot["prompt.json"]) == json.loads(final["prompt.json"])
    for step in range(1, steps + 1):
        ckpt = load_artifacts(tmp_path / "run" / f"checkpoint-{step}")
        assert ckpt.system_prompt == V1 and ckpt.prompt_version == 1

    usage = arts.summary["editor_usage"]
    assert usage["calls"] >= 7 and usage["rounds"] == steps
    if scenario == "transport":
        assert usage["failed_calls"] >= 2 and usage["retried_calls"] >= 1  # 5xx retried once
    if scenario == "crash":
        assert server.dead
        assert usage["estimated_calls"] >= 7  # round 1 had no usage field: tokens were estimated
        assert callback.loop.faults["textgrad:EditorUnreachable"] >= 2  # counted, logged once
