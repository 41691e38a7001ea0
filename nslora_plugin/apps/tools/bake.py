"""`nslora bake RUN_DIR`: distil a run's optimized system prompt into a second LoRA adapter.

Context distillation. The run's adapter, under the optimized prompt, is the teacher: it answers
user turns greedily. A copy of the same adapter is the student: it is trained (TRL `SFTTrainer`,
loss on the reply tokens only) to give those replies under the *initial* system prompt
(`--student-prompt initial`, the default) or with no system message (`--student-prompt empty`).
The result, `RUN_DIR/baked/`, is a drop-in replacement for the run's adapter (same base, rank and
modules) that needs no optimized prompt:

    RUN_DIR/baked/
      adapter_config.json, adapter_model.safetensors   a plain PEFT adapter
      tokenizer files, chat_template.jinja             the student prompt as the default system
                                                       message (none with `empty`)
      README.md                                        its card (tags nslora, nslora-baked, ...)
      bake.json                                        settings, rows, replies, losses, timings
      teacher.jsonl                                    the distillation rows (question, reply)
      nslora/prompt.json                               the student prompt, so `nslora generate`
                                                       and `load_for_inference` work on it

Where the user turns come from. A run folder does not keep the trainer's dataset, so by default
the bake uses the rows the run did keep: its prompts-as-data rows (`nslora/augmented.jsonl`) and
the pool file its config names (`pool_path`), if it is still there. The probe rows are left out
(they stay held out for `evaluate`). `--data FILE.jsonl` uses that file instead (rows with
`messages`, `question` or `prompt`; the last user turn of each row; its reply and system message
are not used). `bake.json` records which rows were used.

`evaluate` scores (run adapter + optimized prompt), (run adapter + student prompt) and (baked
adapter + student prompt) on held-out rows with a check function, for a results script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from nslora_plugin.core.artifacts import (ARTIFACT_DIR, ArtifactsUnreadable, NSLoRAArtifacts,
                                          load_artifacts, package_versions)
from nslora_plugin.core.chat import chat_messages, render
from nslora_plugin.core.data import load_probe_examples, read_jsonl
from nslora_plugin.core.records import ProbeExample

__all__ = ["BakeError", "NothingToBake", "BakeSettings", "BakePlan", "plan_bake", "bake",
           "teacher_replies", "student_rows", "evaluate", "build_parser", "run"]

log = logging.getLogger("nslora")

STUDENT_PROMPTS = ("initial", "empty")
#: Hub tags of a baked adapter's card
BAKED_TAGS = ("nslora", "nslora-baked", "arxiv:2601.12711")
BAKE_FILE = "bake.json"
TEACHER_FILE = "teacher.jsonl"
#: arm names of `evaluate`
ARMS = ("adapter+optimized", "adapter+student", "baked+student")


class BakeError(ValueError):
    """A run folder, data file or output folder the bake cannot use; the message says what to do."""


class NothingToBake(BakeError):
    """The run has no optimized prompt that differs from the initial one."""


@dataclass
class BakeSettings:
    """What `bake` trains with. `steps` None: two passes over the rows."""

    steps: int | None = None
    learning_rate: float = 1e-4
    batch_size: int = 8
    max_new_tokens: int = 256
    rows: int | None = None
    student_prompt: str = "initial"
    seed: int = 0
    generation_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.student_prompt not in STUDENT_PROMPTS:
            raise BakeError(f"student_prompt must be one of {', '.join(STUDENT_PROMPTS)}, "
                            f"got {self.student_prompt!r}")
        for name in ("batch_size", "max_new_tokens", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise BakeError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("steps", "rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise BakeError(f"{name} must be at least 1, got {value}")
        if not self.learning_rate > 0:
            raise BakeError(f"learning_rate must be positive, got {self.learning_rate}")


@dataclass
class BakePlan:
    """Everything `bake` checked before loading a model."""

    run_dir: Path
    adapter_dir: Path
    artifacts: NSLoRAArtifacts
    base_model: str
    teacher_prompt: str | None
    student_prompt: str | None
    questions: list[str]
    source: dict[str, Any]
    output: Path
    settings: BakeSettings
    forced: bool = False

    @property
    def steps(self) -> int:
        s = self.settings
        return s.steps or max(1, math.ceil(2 * len(self.questions) / s.batch_size))


@dataclass
class Reply:
    """One greedy reply; `cut`: it stopped at the token cap, not at the end of turn."""

    text: str
    cut: bool
    tokens: int


# ------------------------------------------------------------------------------------------------
# Checks before any model is loaded
# ------------------------------------------------------------------------------------------------


def _run_adapter(run_dir: Path) -> tuple[Path, NSLoRAArtifacts]:
    """The folder with the run's adapter (the run folder, or its latest checkpoint) and the
    artifacts saved with that adapter."""
    from nslora_plugin.apps.tools.inference import _model_folder

    if not run_dir.is_dir():
        raise BakeError(f"{str(run_dir)!r} is not a folder; give the output folder of an NSLoRA "
                        "run (or one of its checkpoint-N folders)")
    folder = _model_folder(run_dir)
    if not (folder / "adapter_config.json").is_file():
        raise BakeError(f"{str(run_dir)!r} holds no LoRA adapter (no adapter_config.json in it or "
                        "in a checkpoint-N folder); bake needs the run's adapter: save it with "
                        "trainer.save_model(output_dir), or point at a checkpoint-N folder")
    try:
        arts = load_artifacts(folder)
    except FileNotFoundError as exc:
        raise BakeError(str(exc)) from None
    return folder, arts


def _base_model(adapter_dir: Path, override: str | None) -> str:
    from nslora_plugin.apps.tools.inference import _locate_base

    if override:
        return override
    config = adapter_dir / "adapter_config.json"
    try:
        name = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise BakeError(f"{str(config)!r} is not readable JSON ({exc})") from None
    base = _locate_base(name, adapter_dir)
    if not base:
        raise BakeError(f"{str(config)!r} names no base model; pass --base-model")
    if Path(base).is_absolute() and not Path(base).exists():
        raise BakeError(f"the base model {base!r} that {str(config)!r} names is not there; pass "
                        "--base-model with its folder or Hub id")
    return base


def _student_prompt(arts: NSLoRAArtifacts, mode: str) -> str | None:
    return arts.initial_system_prompt if mode == "initial" else None


def _check_prompt(arts: NSLoRAArtifacts, folder: Path) -> None:
    where = f"{str(arts.root / 'prompt.json')!r}"
    if arts.system_prompt is None:
        raise NothingToBake(
            f"nothing to bake in {str(folder)!r}: the run kept the chat template's default system "
            f"prompt ({where} has system_prompt: null), so there is no optimized prompt to distil; "
            "pass --force to distil anyway")
    if arts.system_prompt == arts.initial_system_prompt:
        raise NothingToBake(
            f"nothing to bake in {str(folder)!r}: the optimized prompt is the initial one (version "
            f"{arts.prompt_version} in {where}; no edit was accepted), so the adapter already works "
            "without it; pass --force to distil anyway")


def _question(row: Mapping[str, Any], where: str) -> str:
    """The last user turn of a row (`messages`, `question` or `prompt`)."""
    if isinstance(row.get("messages"), list):
        users = [m.get("content") for m in row["messages"]
                 if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1], str) and users[-1].strip():
            return users[-1]
        raise BakeError(f"{where}: 'messages' has no user turn with text")
    if isinstance(row.get("question"), str) and row["question"].strip():
        return row["question"]
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    if isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1], str) and users[-1].strip():
            return users[-1]
    raise BakeError(f"{where}: no user turn (expected 'messages' with a user message, 'question' "
                    f"or 'prompt'; keys: {sorted(row)})")


def _file_near(name: str, run_dir: Path) -> Path | None:
    """A data file the run's config names: as given, or relative to a folder above the run."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if not path.is_absolute():
        for parent in run_dir.resolve().parents:
            if (parent / path).is_file():
                return parent / path
    return None


def _rows_from_run(arts: NSLoRAArtifacts, run_dir: Path) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """(question, where) pairs from what the run kept, and a description of it."""
    out: list[tuple[str, str]] = []
    files: list[dict[str, Any]] = []
    augmented = arts.root / "augmented.jsonl"
    for i, row in enumerate(arts.augmented_rows):
        out.append((_question(row, f"{augmented}:{i + 1}"), "augmented"))
    files.append({"file": str(augmented), "kind": "prompts-as-data rows", "rows": len(arts.augmented_rows)})
    pool = arts.config.get("pool_path")
    if pool:
        found = _file_near(str(pool), run_dir)
        if found is None:
            files.append({"file": str(pool), "kind": "pool_path", "rows": 0, "skipped": "not found"})
            log.warning("NSLoRA bake: the run's pool_path %r is not there any more; using the "
                        "other rows", pool)
        else:
            rows = read_jsonl(found)
            out += [(_question(r, f"{found}:{i + 1}"), "pool") for i, r in enumerate(rows)]
            files.append({"file": str(found), "kind": "pool_path", "rows": len(rows)})
    return out, {"source": "run", "files": files,
                 "note": "the run folder keeps no copy of the trainer's dataset; its "
                         "prompts-as-data rows and pool file are used (probe rows are not)"}


def _rows_from_file(path: Path) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    try:
        rows = read_jsonl(path)
    except (FileNotFoundError, ValueError) as exc:
        raise BakeError(f"--data: {exc}") from None
    if not rows:
        raise BakeError(f"--data {str(path)!r} has no rows; give JSONL rows with 'messages', "
                        "'question' or 'prompt'")
    return ([(_question(r, f"{path}:{i + 1}"), "data") for i, r in enumerate(rows)],
            {"source": "file", "files": [{"file": str(path), "kind": "--data", "rows": len(rows)}]})


def _select(pairs: Sequence[tuple[str, str]], limit: int | None, seed: int) -> tuple[list[str], int]:
    """Distinct questions in order (at most `limit`, chosen with `seed`), and how many were
    duplicates."""
    seen: dict[str, None] = {}
    for question, _ in pairs:
        seen.setdefault(question, None)
    questions = list(seen)
    duplicates = len(pairs) - len(questions)
    if limit is not None and len(questions) > limit:
        keep = sorted(random.Random(seed).sample(range(len(questions)), limit))
        questions = [questions[i] for i in keep]
    return questions, duplicates


def _check_output(output: Path, run_dir: Path, adapter_dir: Path, force: bool) -> None:
    resolved = output.resolve()
    for protected in (run_dir.resolve(), adapter_dir.resolve()):
        if resolved == protected or resolved in protected.parents:
            raise BakeError(f"--output {str(output)!r} would replace the run itself; give a new "
                            "folder (the default is RUN_DIR/baked)")
    if output.exists() and not output.is_dir():
        raise BakeError(f"--output {str(output)!r} is a file; give a folder")
    if output.is_dir() and any(output.iterdir()):
        if not (output / BAKE_FILE).is_file():
            raise BakeError(f"--output {str(output)!r} exists and is not a baked folder (no "
                            f"{BAKE_FILE}); give another --output")
        if not force:
            raise BakeError(f"{str(output)!r} holds a baked adapter already; pass --force to "
                            "replace it, or --output elsewhere")


def plan_bake(run_dir: str | Path, *, data: str | Path | None = None, output: str | Path | None = None,
              settings: BakeSettings | None = None, force: bool = False,
              base_model: str | None = None) -> BakePlan:
    """Check the run, the rows and the output folder (no model is loaded); `BakeError` (or
    `NothingToBake`, unless `force`) says what is wrong and what to do."""
    settings = settings or BakeSettings()
    run_dir = Path(run_dir)
    adapter_dir, arts = _run_adapter(run_dir)
    if not force:
        _check_prompt(arts, run_dir)
    out = Path(output) if output is not None else run_dir / "baked"
    _check_output(out, run_dir, adapter_dir, force)
    if data is not None:
        pairs, source = _rows_from_file(Path(data))
    else:
        pairs, source = _rows_from_run(arts, run_dir)
        if not pairs:
            raise BakeError(
                f"{str(run_dir)!r} keeps no rows to take user turns from (its "
                f"{ARTIFACT_DIR}/augmented.jsonl is empty and its config names no pool_path file); "
                "pass --data FILE.jsonl with the training rows (messages, question or prompt)")
    questions, duplicates = _select(pairs, settings.rows, settings.seed)
    source.update(rows_read=len(pairs), duplicates=duplicates, rows_used=len(questions))
    return BakePlan(run_dir=run_dir, adapter_dir=adapter_dir, artifacts=arts,
                    base_model=_base_model(adapter_dir, base_model), teacher_prompt=arts.system_prompt,
                    student_prompt=_student_prompt(arts, settings.student_prompt),
                    questions=questions, source=source, output=out, settings=settings, forced=force)


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_tokenizer(adapter_dir: Path, base: str) -> Any:
    """The run's tokenizer with NSLoRA's default-prompt preamble taken out of its template (the
    saved one puts the optimized prompt into conversations without a system message)."""
    from transformers import AutoTokenizer

    from nslora_plugin.apps.tools.inference import _has_tokenizer
    from nslora_plugin.trainer.template import strip_default_prompt

    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir) if _has_tokenizer(adapter_dir) else base)
    if isinstance(tokenizer.chat_template, str):
        tokenizer.chat_template = strip_default_prompt(tokenizer.chat_template)
    elif not tokenizer.chat_template:
        raise BakeError(f"the tokenizer of {str(adapter_dir)!r} has no chat template; bake renders "
                        "conversations with it")
    return tokenizer


def _load_model(base: str, adapter_dir: Path, *, trainable: bool) -> Any:
    """The base with the run's adapter (a `PeftModel`), on the accelerator when there is one."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = _device()
    dtype: Any = torch.float32 if device == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    return model.to(device)


def teacher_replies(model: Any, tokenizer: Any, questions: Sequence[str], system_prompt: str | None, *,
                    max_new_tokens: int = 256, batch_size: int = 8) -> list[Reply]:
    """Greedy replies to `questions` under `system_prompt` (None: no system message), in
    batches with left padding; each reply as decoded, special tokens dropped."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ends = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ends.update(config_eos if isinstance(config_eos, list) else [config_eos])
    ends.discard(None)
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[Reply] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(questions), batch_size):
            texts = [render(tokenizer, chat_messages(system_prompt, q), generation_prompt=True)
                     for q in questions[start:start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=pad)
            for row in ids[:, enc["input_ids"].shape[1]:].tolist():
                stop = next((i for i, t in enumerate(row) if t in ends), None)
                kept = row if stop is None else row[:stop]
                out.append(Reply(tokenizer.decode(kept, skip_special_tokens=True),
                                 cut=stop is None and len(row) >= max_new_tokens, tokens=len(kept)))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def student_rows(questions: Sequence[str], replies: Sequence[str], system_prompt: str | None) -> list[dict[str, Any]]:
    """TRL prompt/completion conversations: the question under the student prompt, the teacher's
    reply as the completion (the only tokens the loss sees)."""
    return [{"prompt": chat_messages(system_prompt, q),
             "completion": [{"role": "assistant", "content": r}]} for q, r in zip(questions, replies)]


def _train(model: Any, tokenizer: Any, rows: list[dict[str, Any]], plan: BakePlan,
           callbacks: Sequence[Any]) -> list[float]:
    """Train the student adapter in place with TRL's `SFTTrainer`; the logged losses."""
    import tempfile

    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    from nslora_plugin.apps.harness.sft import full_logits_sft_trainer_class, sft_config
    from nslora_plugin.trainer.precision import runs_on_cpu

    s = plan.settings
    with tempfile.TemporaryDirectory(prefix="nslora-bake-") as scratch:
        args = sft_config(scratch, max_steps=plan.steps, batch_size=s.batch_size,
                          learning_rate=s.learning_rate, seed=s.seed, data_seed=s.seed,
                          max_length=None, logging_steps=1, completion_only_loss=True,
                          disable_tqdm=True)
        cls = full_logits_sft_trainer_class() if runs_on_cpu(args) else SFTTrainer
        trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)
        for callback in callbacks:
            trainer.add_callback(callback)
        trainer.train()
    return [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]


# ------------------------------------------------------------------------------------------------
# The baked folder
# ------------------------------------------------------------------------------------------------


def _card(plan: BakePlan, info: dict[str, Any]) -> str:
    import yaml

    from nslora_plugin.trainer.card import _fence

    meta = {"library_name": "peft", "base_model": plan.base_model,
            "tags": [*BAKED_TAGS, "lora", "peft"]}
    teacher, student = plan.teacher_prompt or "", plan.student_prompt
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             "# Baked NSLoRA adapter", "",
             "The LoRA adapter of an [nslora-plugin](https://github.com/nslora/nslora-plugin) run "
             "with the run's optimized system prompt distilled into its weights (`nslora bake`, "
             "context distillation): the run's adapter under the optimized prompt answered "
             f"{info['data']['rows_used']} user turns greedily, and this adapter, started from the "
             f"same weights, was trained for {info['training']['steps']} "
             f"step{'' if info['training']['steps'] == 1 else 's'} to give those "
             "replies " + ("under the run's initial system prompt." if student is not None
                           else "with no system message."), "",
             "It is a drop-in replacement for the run's adapter (same base model, rank and target "
             "modules), used **without** the optimized prompt.", "",
             "Optimized prompt (the teacher's):", "", f"{_fence(teacher)}text", teacher, _fence(teacher), ""]
    if student is not None:
        lines += ["System prompt to use with this adapter (the chat template saved here puts it in "
                  "front of any conversation without a system message):", "",
                  f"{_fence(student)}text", student, _fence(student), ""]
    else:
        lines += ["Use it with no system message (the chat template saved here is the base "
                  "model's own).", ""]
    lines += ["## Load it", "", "```python", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'folder = "path/to/this/folder"',
              f"base = AutoModelForCausalLM.from_pretrained({plan.base_model!r})",
              "model = PeftModel.from_pretrained(base, folder).eval()",
              "tokenizer = AutoTokenizer.from_pretrained(folder)",
              'messages = [{"role": "user", "content": "Your question"}]',
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,",
              '                                       return_tensors="pt", return_dict=True)',
              "out = model.generate(**inputs, max_new_tokens=256, do_sample=False)",
              'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
              "```", "",
              f"Settings, rows, replies, losses and timings are in `{BAKE_FILE}`; the distillation "
              f"rows (question, teacher reply) in `{TEACHER_FILE}`.", ""]
    return "\n".join(lines)


def _write_folder(folder: Path, plan: BakePlan, model: Any, tokenizer: Any, replies: Sequence[Reply],
                  info: dict[str, Any]) -> None:
    from nslora_plugin.trainer.template import set_default_system_prompt

    model.save_pretrained(str(folder))
    if plan.student_prompt is not None:
        set_default_system_prompt(tokenizer, plan.student_prompt)
    tokenizer.save_pretrained(str(folder))
    (folder / TEACHER_FILE).write_text("".join(
        json.dumps({"question": q, "reply": r.text, "cut": r.cut}, ensure_ascii=False) + "\n"
        for q, r in zip(plan.questions, replies)), encoding="utf-8")
    (folder / ARTIFACT_DIR).mkdir(exist_ok=True)
    arts = plan.artifacts
    (folder / ARTIFACT_DIR / "prompt.json").write_text(json.dumps(
        {"system_prompt": plan.student_prompt, "version": 0,
         "initial_system_prompt": arts.initial_system_prompt,
         "baked_from": {"run": str(plan.run_dir.resolve()), "system_prompt": arts.system_prompt,
                        "version": arts.prompt_version}}, indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8")
    (folder / "README.md").write_text(_card(plan, info), encoding="utf-8")
    (folder / BAKE_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _put_in_place(built: Path, output: Path) -> None:
    """Move the finished folder to `output`, replacing an older baked folder there."""
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    if output.exists():
        os.replace(output, old)
    os.replace(built, output)
    shutil.rmtree(old, ignore_errors=True)


def bake(run_dir: str | Path, *, data: str | Path | None = None, output: str | Path | None = None,
         settings: BakeSettings | None = None, force: bool = False, base_model: str | None = None,
         callbacks: Sequence[Any] = (), say: Callable[[str], None] | None = None) -> Path:
    """Distil the run's optimized prompt into a second adapter; returns the baked folder.
    `callbacks`: extra `TrainerCallback`s for the student's training."""
    import torch
    from transformers import set_seed

    say = say or log.info
    started = time.monotonic()
    plan = plan_bake(run_dir, data=data, output=output, settings=settings, force=force,
                     base_model=base_model)
    s = plan.settings
    set_seed(s.seed)
    say(f"bake: {len(plan.questions)} user turns ({plan.source['source']}), teacher = adapter "
        f"{plan.adapter_dir} under the optimized prompt (version {plan.artifacts.prompt_version})")
    tokenizer = _load_tokenizer(plan.adapter_dir, plan.base_model)
    model = _load_model(plan.base_model, plan.adapter_dir, trainable=True)
    loaded = time.monotonic()
    replies = teacher_replies(model, tokenizer, plan.questions, plan.teacher_prompt,
                              max_new_tokens=s.max_new_tokens, batch_size=s.generation_batch_size)
    taught = time.monotonic()
    cut = sum(r.cut for r in replies)
    empty = sum(not r.text.strip() for r in replies)
    say(f"bake: {len(replies)} teacher replies ({cut} cut at {s.max_new_tokens} tokens, "
        f"{empty} empty); training the student for {plan.steps} steps")
    if empty:
        log.warning("NSLoRA bake: %d of %d teacher replies are empty", empty, len(replies))
    rows = student_rows(plan.questions, [r.text for r in replies], plan.student_prompt)
    losses = _train(model, tokenizer, rows, plan, callbacks)
    trained = time.monotonic()
    info = {
        "format": 1,
        "run": str(plan.run_dir.resolve()), "adapter": str(plan.adapter_dir.resolve()),
        "base_model": plan.base_model, "forced": plan.forced,
        "teacher": {"system_prompt": plan.teacher_prompt, "prompt_version": plan.artifacts.prompt_version},
        "student": {"mode": s.student_prompt, "system_prompt": plan.student_prompt},
        "settings": {**dataclasses.asdict(s), "steps": plan.steps},
        "data": plan.source,
        "replies": {"n": len(replies), "cut": cut, "empty": empty,
                    "mean_tokens": round(sum(r.tokens for r in replies) / max(len(replies), 1), 2)},
        "training": {"steps": plan.steps, "first_loss": losses[0] if losses else None,
                     "last_loss": losses[-1] if losses else None, "losses": losses,
                     "device": str(next(model.parameters()).device)},
        "seconds": {"load": round(loaded - started, 2), "teacher": round(taught - loaded, 2),
                    "train": round(trained - taught, 2)},
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    plan.output.parent.mkdir(parents=True, exist_ok=True)
    built = plan.output.with_name(f".{plan.output.name}.baking-{os.getpid()}")
    shutil.rmtree(built, ignore_errors=True)
    built.mkdir()
    try:
        info["seconds"]["total"] = round(time.monotonic() - started, 2)
        _write_folder(built, plan, model, tokenizer, replies, info)
        _put_in_place(built, plan.output)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    say(f"bake: wrote {plan.output}")
    return plan.output


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------

Check = Callable[[ProbeExample, str], Mapping[str, float] | float | bool]


def _default_check(arts: NSLoRAArtifacts) -> Check:
    """The run's own reward components (correctness, format, ...) from its saved config."""
    from nslora_plugin.builtins.rewards import BuiltinRewards
    from nslora_plugin.core.config import NSLoRAConfig

    known = set(NSLoRAConfig.field_names())
    keys = ("answer_format", "answer_pattern", "max_reply_chars", "reply_json", "exact_match")
    config = NSLoRAConfig.from_dict({k: arts.config[k] for k in keys if k in arts.config and k in known})
    rewards = BuiltinRewards()
    return lambda example, reply: rewards.nslora_score_probe(example, reply, config) or {}


def _scores(result: Mapping[str, float] | float | bool) -> dict[str, float]:
    if isinstance(result, Mapping):
        return {str(k): float(v) for k, v in result.items()}
    return {"score": float(result)}


def evaluate(run_dir: str | Path, rows: Any, check: Check | None = None, *,
             baked: str | Path | None = None, max_new_tokens: int = 256, batch_size: int = 8,
             base_model: str | None = None) -> dict[str, Any]:
    """Held-out scores of the run's adapter with the optimized prompt, the run's adapter with the
    student prompt, and the baked adapter with the student prompt (arms `ARMS`).

    `rows`: a JSONL path, a `datasets.Dataset` or a list of rows / `ProbeExample`s (with
    reference answers). `check(example, reply)` returns a score or a dict of them; default: the
    run's reward components. `baked` defaults to `RUN_DIR/baked`."""
    run_dir = Path(run_dir)
    adapter_dir, arts = _run_adapter(run_dir)
    baked_dir = Path(baked) if baked is not None else run_dir / "baked"
    try:
        info = json.loads((baked_dir / BAKE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BakeError(f"{str(baked_dir)!r} holds no {BAKE_FILE}; run `nslora bake {run_dir}` "
                        "first, or pass baked=") from None
    examples = load_probe_examples(rows)
    check = check or _default_check(arts)
    student = info.get("student", {}).get("system_prompt")
    base = _base_model(adapter_dir, base_model or info.get("base_model"))
    tokenizer = _load_tokenizer(adapter_dir, base)
    model = _load_model(base, adapter_dir, trainable=False)
    model.load_adapter(str(baked_dir), adapter_name="baked")
    arms = {ARMS[0]: ("default", arts.system_prompt), ARMS[1]: ("default", student),
            ARMS[2]: ("baked", student)}
    questions = [e.question for e in examples]
    out: dict[str, Any] = {"n": len(examples), "teacher_prompt": arts.system_prompt,
                           "student_prompt": student, "arms": {}}
    for name, (adapter, prompt) in arms.items():
        model.set_adapter(adapter)
        replies = teacher_replies(model, tokenizer, questions, prompt, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size)
        scored = [_scores(check(e, r.text)) for e, r in zip(examples, replies)]
        keys = sorted({k for s in scored for k in s})
        means = {k: sum(s.get(k, 0.0) for s in scored) / max(len(scored), 1) for k in keys}
        out["arms"][name] = {"system_prompt": prompt, "scores": means,
                             "replies": [r.text for r in replies]}
    return out


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Fill the `nslora bake` parser."""
    d = BakeSettings()
    parser.description = (
        "Distil a run's optimized system prompt into a second LoRA adapter (context distillation): "
        "the run's adapter under the optimized prompt answers user turns greedily; a copy of it is "
        "trained on those replies under the initial prompt (or none). Writes RUN_DIR/baked/. User "
        "turns: the run's prompts-as-data rows and pool file (the run folder keeps no copy of the "
        "trainer's dataset), or --data.")
    parser.add_argument("run_dir", help="the run's output folder (or a checkpoint-N folder)")
    parser.add_argument("--data", default=None,
                        help="JSONL of rows (messages, question or prompt) whose last user turns "
                             "to use instead of the run's rows")
    parser.add_argument("--steps", type=_positive, default=None,
                        help="training steps (default: two passes over the rows)")
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate,
                        help=f"(default {d.learning_rate:g})")
    parser.add_argument("--batch-size", type=_positive, default=d.batch_size,
                        help=f"rows a training step (default {d.batch_size})")
    parser.add_argument("--max-new-tokens", type=_positive, default=d.max_new_tokens,
                        help=f"cap on each teacher reply (default {d.max_new_tokens})")
    parser.add_argument("--rows", type=_positive, default=None,
                        help="use at most N distinct user turns (chosen with --seed)")
    parser.add_argument("--student-prompt", choices=STUDENT_PROMPTS, default=d.student_prompt,
                        help="the student's system prompt: the run's initial one (default) or none")
    parser.add_argument("--output", default=None, help="where to write (default RUN_DIR/baked)")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"(default {d.seed})")
    parser.add_argument("--base-model", default=None,
                        help="base model (default: from the adapter's adapter_config.json)")
    parser.add_argument("--force", action="store_true",
                        help="bake even when the prompt is unchanged, and replace an existing "
                             "baked folder")
    return parser


def run(args: argparse.Namespace) -> int:
    """`nslora bake`: 0 when baked, 1 when there is nothing to bake, 2 on a usage error."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        settings = BakeSettings(steps=args.steps, learning_rate=args.learning_rate,
                                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                rows=args.rows, student_prompt=args.student_prompt, seed=args.seed)
        out = bake(args.run_dir, data=args.data, output=args.output, settings=settings,
                   force=args.force, base_model=args.base_model,
                   say=lambda line: print(line, file=sys.stderr))
    except NothingToBake as exc:
        print(f"nslora bake: {exc}", file=sys.stderr)
        return 1
    except (BakeError, ArtifactsUnreadable, OSError) as exc:
        print(f"nslora bake: {exc}", file=sys.stderr)
        return 2
    print(f"baked: {out.resolve()}")
    return 0

