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

from nslora_plugin.core.data import load_probe_examples, make_word_problems
from nslora_plugin.integrations.trl import attach
from nslora_plugin.core.loop import NeurosymbolicLoop

from fault_server import FaultSchedule, FaultServer, editor_config
from tiny import load_tokenizer, sft_trainer

FAKE_KEY = "sk-nslora-FAKE-0123456789abcdef"
KEY_ENV = "NSLORA_EDITOR_CRED"  # deliberately without KEY / TOKEN / SECRET in the name


def scan_files(root) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if FAKE_KEY.encode() in data or FAKE_KEY[-8:].encode() in data:
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
        assert "[Bearer ***]" in loop.prompt  # a leaked key reaches nothing, not even the prompt
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
    assert FAKE_KEY[-8:] not in out + err_text + caplog.text
    assert len(caplog.records) > 50  # DEBUG logs of every library were captured
    for record in caplog.records:
        assert FAKE_KEY not in record.getMessage(), record.name
        assert FAKE_KEY not in str(record.__dict__), record.name


URL_PASSWORD = "pw-nslora-URL-9876543210fedcba"


def test_a_password_in_the_editor_url_reaches_no_file_and_no_log(tmp_path, monkeypatch, default_model_dir,
                                                                caplog, capfd):
    """A key given as the URL's password (http://user:KEY@host/v1): not in config.json, not in
    a checkpoint, not in decisions, not in a log, whole or as its last 8 characters or as the
    Basic token built from it; a candidate prompt carrying it is dropped."""
    import base64

    monkeypatch.chdir(tmp_path)
    tokenizer = load_tokenizer(default_model_dir)
    rows = make_word_problems(68, seed=13)
    token = base64.b64encode(f"nslora:{URL_PASSWORD}".encode()).decode()
    with FaultServer() as server, caplog.at_level(logging.DEBUG):
        schedule = FaultSchedule(server, {1: {"mode": "5xx"}, 2: {"mode": "leak"}})
        trainer = sft_trainer(tokenizer, tmp_path / "run", rows[:64], max_steps=2, save_steps=1,
                              batch_size=1)
        cfg = editor_config(server, probe_size=2, editor_batch_size=1)
        url = cfg.editor_base_url.replace("http://", f"http://nslora:{URL_PASSWORD}@")
        callback = attach(trainer, cfg.replace(editor_base_url=url), probe=rows[64:], plugins=[schedule])
        trainer.train()
        loop = callback.loop
        # the candidate check drops a prompt that carries a secret
        assert loop.sanitize(f"Be brief. {token}")[1] == \
            "candidate contains a secret (an editor key or a URL password)"
        log_text = caplog.text
    assert '"editor_base_url": "http://nslora:***@' in (tmp_path / "run" / "nslora" / "config.json").read_text()
    assert (tmp_path / "run" / "checkpoint-1" / "nslora" / "config.json").is_file()
    leaks = (URL_PASSWORD, URL_PASSWORD[-8:], token, token.rstrip("="))
    hits = [str(p) for p in tmp_path.rglob("*") if p.is_file()
            and any(s.encode() in p.read_bytes() for s in leaks)]
    assert hits == []
    out, err = capfd.readouterr()
    assert not any(s in text for s in leaks for text in (log_text, out, err))


def test_redaction_covers_fragments_and_masked_quotes(monkeypatch):
    from nslora_plugin.core.util import redact

    monkeypatch.setenv("MY_API_KEY", FAKE_KEY)
    assert redact(f"bad key {FAKE_KEY}") == "bad key ***"
    assert redact(f"Incorrect API key provided: sk-nslo...{FAKE_KEY[-4:]}.") == \
        "Incorrect API key provided: sk-nslo***."
    assert redact(f"key ending {FAKE_KEY[-8:]}") == "key ending ***"
    assert redact("year 1234 and ...1234x stay") == "year 1234 and ...1234x stay"
