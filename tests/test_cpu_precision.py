"""CPU precision: the harnesses train in fp32 on a CPU, and a user's CPU run whose bf16/fp16 would be
emulated gets one warning naming the setting and the fix (the callback and `nslora doctor`)."""

from __future__ import annotations

import logging
import types

import pytest

from nslora_plugin.trainer import callback as callback_module
from nslora_plugin.apps.harness import sft
from nslora_plugin.trainer import precision as training


@pytest.fixture()
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(training, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(training.platform, "system", lambda: "Linux")


def _args(**kw):
    return types.SimpleNamespace(**{"use_cpu": True, "bf16": False, "fp16": False, **kw})


def test_problem_named_only_where_precision_is_emulated(no_native_bf16, monkeypatch):
    problem = training.cpu_precision_problem(_args(bf16=True))
    assert problem and "bf16=True" in problem and "bf16=False" in problem
    assert "fp16=False" in training.cpu_precision_problem(_args(fp16=True))
    assert training.cpu_precision_problem(_args()) is None
    assert training.cpu_precision_problem(_args(use_cpu=False, bf16=True)) is None  # on a GPU
    monkeypatch.setattr(training, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert training.cpu_precision_problem(_args(bf16=True)) is None  # native bf16: fast


def test_harness_config_is_fp32_on_cpu(tmp_path):
    args = sft.sft_config(tmp_path, max_steps=2, batch_size=2, learning_rate=1e-3)
    assert args.use_cpu and not args.bf16 and not args.fp16
    assert training.runs_on_cpu(args)


def test_callback_warns_once(no_native_bf16, monkeypatch, caplog):
    monkeypatch.setattr(callback_module, "_precision_warned", False)
    with caplog.at_level(logging.WARNING, logger="nslora"):
        callback_module.warn_cpu_precision(_args(bf16=True))
        callback_module.warn_cpu_precision(_args(bf16=True))
    hits = [r for r in caplog.records if "bf16=True" in r.getMessage()]
    assert len(hits) == 1


def test_doctor_says_the_same(no_native_bf16, tmp_path, capsys):
    from nslora_plugin.apps.tools.doctor import main

    cfg = tmp_path / "cpu.yaml"
    cfg.write_text("model_name_or_path: llama-3-8b\nuse_cpu: true\n")  # bf16 unset: TRL's default, true
    main(["--config", str(cfg)])
    assert "CPU: training on a CPU with bf16=True" in capsys.readouterr().out
    cfg.write_text("model_name_or_path: llama-3-8b\nuse_cpu: true\nbf16: false\n")
    main(["--config", str(cfg)])
    assert "CPU:" not in capsys.readouterr().out
