"""The editor API key never leaves the environment (issue 3).

A full TRL run sends a recognisable fake key to the loopback `FaultServer`, which echoes it back
in every way it can: inside replies (so in TextGrad's prompts, its logs, the cache and even the
accepted prompt), inside HTTP 500 error bodies of the chat and /models endpoints (so in the SDK's
exception messages). The variable's name has none of KEY/TOKEN/SECRET in it, so the loop's
name-based redaction cannot help: the editor must remove the key itself. Then every file the run
wrote (checkpoints, trainer_state.json, TextGrad logs, the cache) and everything it printed or
logged, at DEBUG level for every logger, is scanned for it.
"""

from __future__ import annotations

import logging

import pytest

from nslora_plugin.data import load_probe_examples, make_word_problems
from nslora_plugin.integrations.trl import attach
from nslora_plugin.loop import NeurosymbolicLoop

from fault_server import FaultSchedule, FaultServer, editor_config
from tiny import load_tokenizer, sft_trainer

FAKE_KEY = "sk-nslora-FAKE-0123456789abcdef"
KEY_ENV = "NSLORA_EDITOR_CRED"  # deliberately without KEY / TOKEN / SECRET in the name


def scan_files(root) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if FAKE_KEY.encode() in data or b"0123456789abcdef" in data:
                hits.append(str(path))
    return hits


def test_the_key_never_reaches_artifacts_logs_state_or_errors(tmp_path, monkeypatch, default_model_dir,
                                                             caplog, capfd):
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    monkeypatch.chdir(tmp_path)
    tokenizer = load_tokenizer(default_model_dir)
    rows = make_word_problems(68, seed=13)
    with FaultServer() as server, caplog.at_level(logging.DEBUG):
        schedule = FaultSchedule(server, {1: {"mode": "leak"}, 2: {"mode": "5xx"},
                                          3: {"mode": "5xx"}, 4: {"mode": "leak"}})
        trainer = sft_trainer(tokenizer, tmp_path / "run", rows[:64], max_steps=4, save_steps=2,
                              batch_size=1)
        callback = attach(trainer, editor_config(server, editor_api_key_env=KEY_ENV, probe_size=2,
                                                 editor_batch_size=1),
                          probe=rows[64:], plugins=[schedule])
        trainer.train()
        assert trainer.state.global_step == 4

        # the server did get the key, and did echo it back (the test is not vacuous)
        assert {r["auth"] for r in server.requests} == {f"Bearer {FAKE_KEY}"}
        loop = callback.loop
        assert "textgrad:EditorHTTPError" in loop.faults
        assert "[Bearer ***]" in loop.prompt_state.current  # a leaked key reaches nothing, not even the prompt
        usage = loop.usage()
        assert usage["calls"] > 0 and usage["health_checks"] >= 2  # /models 500s were echoed too

        # an error raised to the user at start carries no key either
        server.mode = "5xx"
        strict = NeurosymbolicLoop(editor_config(server, editor_api_key_env=KEY_ENV, on_editor_down="fail"),
                                   tokenizer, load_probe_examples(rows[64:]), output_dir=tmp_path / "strict")
        with pytest.raises(RuntimeError) as err:
            strict.start(None)
        assert "HTTP 500" in str(err.value) and "Bearer ***" in str(err.value)
        assert FAKE_KEY not in str(err.value) and FAKE_KEY not in repr(err.value)
        assert FAKE_KEY not in repr(loop.pm.get_plugin("nslora.editor.textgrad").client)

    assert (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").is_file()
    assert list((tmp_path / "run" / "nslora" / "editor_logs").glob("*.jsonl"))
    assert list((tmp_path / "run" / "nslora" / "editor_cache").rglob("*.json"))
    assert '"editor_api_key_env": "NSLORA_EDITOR_CRED"' in (tmp_path / "run" / "nslora" / "config.json").read_text()
    assert scan_files(tmp_path) == []
    out, err_text = capfd.readouterr()
    assert FAKE_KEY not in out and FAKE_KEY not in err_text
    assert len(caplog.records) > 50  # DEBUG logs of every library were captured
    for record in caplog.records:
        assert FAKE_KEY not in record.getMessage(), record.name
        assert FAKE_KEY not in str(record.__dict__), record.name
