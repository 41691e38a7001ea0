"""No deprecation warning comes from the project's own settings: a short run the way the harnesses
train (their `SFTConfig`, an attached NSLoRA callback with a check, a save) records every
warning with the stack that raised it, and fails on a Deprecation/FutureWarning whose stack passes
through `nslora_plugin` code. Warnings that third-party code raises on its own are not ours to fix
and are left alone."""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path

import nslora_plugin
from nslora_plugin import NSLoRAConfig
from nslora_plugin.apps.harness import sft
from nslora_plugin.core.data import make_word_problems
from nslora_plugin.integrations.trl import attach
from tiny import ANSWER_FORMAT, FORMAT_INSTRUCTION, SYSTEM, tiny_model

OURS = str(Path(nslora_plugin.__file__).resolve().parent)
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


class StackRecorder:
    """A `warnings.showwarning` that keeps each deprecation with the frames that led to it."""

    def __init__(self) -> None:
        self.ours: list[str] = []

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:
        if not issubclass(category, DEPRECATIONS):
            return
        stack = [f for f in traceback.extract_stack()[:-1] if Path(f.filename).name != "warnings.py"]
        ours = [i for i, f in enumerate(stack[:-1]) if str(Path(f.filename).resolve()).startswith(OURS)]
        if not ours:
            return
        i = ours[-1]
        # ours when our frame calls the deprecated code itself (a property read, a function), or
        # builds a settings object with a deprecated argument (a dataclass's generated __init__,
        # whose __post_init__ chain warns); a warning inside a third party's own call is theirs
        if i == len(stack) - 2 or stack[i + 1].filename == "<string>":
            self.ours.append(f"{category.__name__}: {message} (through {stack[i].filename}:{stack[i].lineno})")


def run_recorded(work) -> list[str]:
    recorder = StackRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = recorder
        work()
    return recorder.ours


def test_the_recorder_catches_a_warning_raised_through_our_code():
    from nslora_plugin.core import ranks

    class OldModel:
        @property
        def is_gradient_checkpointing(self) -> bool:
            warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
            return False

    found = run_recorded(lambda: ranks._checkpointing(OldModel()))
    assert len(found) == 1 and "ranks.py" in found[0]
    assert run_recorded(lambda: warnings.warn("not through us", FutureWarning)) == []


def test_a_harness_run_with_nslora_raises_no_deprecation_of_our_making(tmp_path, tokenizer):
    rows = make_word_problems(24, seed=3)

    def work() -> None:
        args = sft.sft_config(tmp_path / "run", max_steps=2, batch_size=4, learning_rate=1e-3,
                              save_steps=2, max_length=128)
        trainer = sft.build_sft_trainer(tiny_model(tokenizer), tokenizer, rows[:16], SYSTEM, args,
                                        lora_r=4, quiet=True)
        attach(trainer, NSLoRAConfig(system_prompt=SYSTEM, editor="constraint", check_every=2,
                                     probe_size=4, probe_max_new_tokens=4,
                                     answer_format=ANSWER_FORMAT,
                                     format_instruction=FORMAT_INSTRUCTION), probe=rows[16:])
        trainer.train()

    assert run_recorded(work) == []
