"""Build (once) and cache the warmed student: LoRA on the warm-up rows, merged into the base.

    from nslora_plugin.apps.student import ensure_warmed_student

    folder = ensure_warmed_student()          # the embedded SmolLM2-135M-Instruct, warmed
    folder = ensure_warmed_student("my/model-folder", WarmupSettings(steps=60))

The first call trains a LoRA adapter on `rules.make_warmup_rows` (system prompts stating one
warm-up rule, of `generated.generated_warmup_rules` by default or `rules.WARMUP_RULES` with
`rule_set="fixed"`, replies obeying it, plus the same questions under a neutral prompt with plain
replies), merges it into the base weights (`merge_and_unload`) and saves an ordinary model folder
with the base's tokenizer under the model cache (`apps/tools/models.default_cache_dir()`):

    <cache>/students/<base name>-warm-<key>/

`key` hashes everything the result depends on: the settings (rows, steps, batch size, learning
rate, rank, seed, neutral share, max length, rule set), the base model's fingerprint (its config,
tokenizer and a sample of its weight files), `rules.REGISTRY_VERSION`, `RECIPE_VERSION` and, for
generated rules, `generated.GENERATED_VERSION`. Changed settings build a new folder; the same
settings find the cached one. A marker file written last means "complete"; builds are serialized
across processes by a file lock, and the folder appears atomically. The raw model stays where it
was (`ensure_default_model()`).

The default budget (`WarmupSettings()`) is sized for a laptop-class CPU (fp32,
`harness.sft.cpu_training_overrides()`; times in recipes/results/student.md); a rich progress bar (plain lines when the output is not a
terminal) shows steps, loss and ETA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nslora_plugin.apps.student.generated import GENERATED_VERSION, generated_warmup_rules
from nslora_plugin.apps.student.rules import REGISTRY_VERSION, WARMUP_RULES, make_warmup_rows

__all__ = [
    "MARKER",
    "RECIPE_VERSION",
    "RULE_SETS",
    "WarmupResult",
    "WarmupSettings",
    "cache_key",
    "cpu_threads",
    "ensure_warmed_student",
    "is_warmed_student",
    "model_fingerprint",
    "read_marker",
    "student_folder",
    "warm_student",
]

#: The warm-up rule sets `WarmupSettings.rule_set` accepts: "generated" draws
#: `generated.GENERATED_VERSION`, "generated-v2" the wider draw that measured no better.
RULE_SETS = ("generated", "generated-v2", "fixed")
#: Bumped when the training recipe (not its settings) changes: part of the cache key.
RECIPE_VERSION = 1
#: Written last into a finished student folder: provenance, settings and the cache key.
MARKER = ".nslora-student.json"
#: Sub-folder of the model cache that holds warmed students.
STUDENTS_DIR = "students"

Log = Callable[[str], object]


@dataclass(frozen=True)
class WarmupSettings:
    """What the warm-up trains with; every field is part of the cache key.

    Default budget: 160 steps of batch 8 (1,280 rows seen, about one pass over 1,200 rows,
    batched by length), LoRA rank 16 on every linear layer, learning rate 6e-4 decaying linearly;
    sized to build once on two CPU cores (measured times: recipes/results/student.md). "fixed"
    keys stay what they were before `rule_set` existed (`cache_key`).
    """

    rows: int = 1200
    steps: int = 160
    batch_size: int = 8
    learning_rate: float = 6e-4
    lora_r: int = 16
    seed: int = 0
    neutral_share: float = 0.35
    max_length: int = 384
    #: "generated": many rule instances, each with its own markers, tags, keys and phrasings
    #: (`generated.generated_warmup_rules`); "generated-v2": more instances from larger
    #: vocabularies (measured no better, recipes/results/student.md); "fixed": the 19 rules of
    #: `rules.WARMUP_RULES`, the first warm-up (the student `recipes/results/evidence.md` was
    #: measured on).
    rule_set: str = "generated"

    def __post_init__(self) -> None:
        for name in ("rows", "steps", "batch_size", "lora_r", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"WarmupSettings.{name} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"WarmupSettings.learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.neutral_share < 1.0:
            raise ValueError(f"WarmupSettings.neutral_share must be in [0, 1), got {self.neutral_share}")
        if self.rule_set not in RULE_SETS:
            raise ValueError(f"WarmupSettings.rule_set must be one of {', '.join(RULE_SETS)}, "
                             f"got {self.rule_set!r}")


@dataclass(frozen=True)
class WarmupResult:
    """`path`: the warmed model folder; `built`: True when this call trained it (False: cache
    hit); `seconds`: time this call spent; `key`: the cache key; `base`: the base model folder."""

    path: Path
    built: bool
    seconds: float
    key: str
    base: Path


# ------------------------------------------------------------------------------------------------
# Cache key and folder
# ------------------------------------------------------------------------------------------------

_SAMPLE = 1 << 16
_SAMPLES = 16


def _file_digest(path: Path, full: bool) -> str:
    """sha256 of the whole file (`full`), else of its size, first MiB and `_SAMPLES` evenly spaced
    64 KiB samples: enough to tell two checkpoints apart without reading 500 MB every call."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as handle:
        if full or size <= (1 << 20) + _SAMPLES * _SAMPLE:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(handle.read(1 << 20))
            for i in range(_SAMPLES):
                handle.seek((1 << 20) + (size - (1 << 20) - _SAMPLE) * i // max(_SAMPLES - 1, 1))
                h.update(handle.read(_SAMPLE))
    return h.hexdigest()


def model_fingerprint(folder: str | Path) -> str:
    """A content hash of a model folder: config, tokenizer files (whole) and weights (sampled)."""
    root = Path(folder)
    h = hashlib.sha256()
    found = False
    for path in sorted(root.iterdir()):
        name = path.name
        if not path.is_file() or name.startswith("."):
            continue
        weights = name.endswith((".safetensors", ".bin")) or name.endswith(".safetensors.index.json")
        small = name in {"config.json", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json", "generation_config.json", "chat_template.jinja"}
        if weights or small:
            found = True
            h.update(name.encode() + b"\0" + _file_digest(path, full=small).encode() + b"\0")
    if not found:
        raise FileNotFoundError(f"{root} holds no model files (config.json, *.safetensors)")
    return h.hexdigest()


def cache_key(settings: WarmupSettings, base_fingerprint: str) -> str:
    """16 hex digits naming the warmed student of `settings` on the base `base_fingerprint`."""
    fields = dataclasses.asdict(settings)
    payload: dict[str, Any] = {"base": base_fingerprint, "registry": REGISTRY_VERSION,
                               "recipe": RECIPE_VERSION}
    rule_set = fields.pop("rule_set")
    if rule_set.startswith("generated"):
        # Keys of the fixed rule set stay what they were before rule sets existed, and a generated
        # version's key what it was when that version was current, so the students the committed
        # results were measured on can be rebuilt under their recorded keys.
        fields["rule_set"] = "generated"
        payload["generated"] = _generated_version(rule_set)
    payload["settings"] = fields
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _generated_version(rule_set: str) -> int:
    return 2 if rule_set == "generated-v2" else GENERATED_VERSION


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def _resolve_base(base_model: str | Path | None, cache: Path, log: Log) -> tuple[Path, str]:
    """(folder, display name) of the base model: the given folder, else the embedded default."""
    if base_model is None:
        from nslora_plugin.apps.tools.models import DEFAULT_MODEL_NAME, ensure_default_model

        return Path(ensure_default_model(cache, log=log)), DEFAULT_MODEL_NAME
    folder = Path(base_model).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"base model {str(folder)!r} is not a model folder (no config.json)")
    return folder, _safe_name(folder.resolve().name)


def _cache_root(cache_dir: str | Path | None) -> Path:
    from nslora_plugin.apps.tools.models import default_cache_dir

    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _locate(base_model: str | Path | None, settings: WarmupSettings | None,
            cache_dir: str | Path | None, log: Log) -> tuple[Path, Path, str, WarmupSettings]:
    settings = settings or WarmupSettings()
    cache = _cache_root(cache_dir)
    base, name = _resolve_base(base_model, cache, log)
    key = cache_key(settings, model_fingerprint(base))
    return cache / STUDENTS_DIR / f"{name}-warm-{key}", base, key, settings


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The provenance a finished student folder carries, or None."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_warmed_student(folder: str | Path, key: str | None = None) -> bool:
    """True when `folder` is a finished warm-up (of cache key `key`, when given)."""
    marker = read_marker(folder)
    return (marker is not None and (key is None or marker.get("key") == key)
            and (Path(folder) / "config.json").is_file())


def student_folder(base_model: str | Path | None = None, settings: WarmupSettings | None = None,
                   *, cache_dir: str | Path | None = None, log: Log = print) -> Path:
    """Where the warmed student of these settings lives (built or not; see `is_warmed_student`).
    With `base_model=None` the embedded default is fetched/converted if it is not cached yet."""
    return _locate(base_model, settings, cache_dir, log)[0]


# ------------------------------------------------------------------------------------------------
# Threads
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cpu_threads(threads: int | None = None, log: Log = print) -> Iterator[int]:
    """Run the block with `threads` torch CPU threads; None: torch's default, except on a machine
    already busy (1-minute load average at least the core count), where 1 thread is used. There
    every parallel region waits for a thread the scheduler has parked: on 2 shared cores at load 8,
    2 threads generated 12x slower than 1 (measured). The previous setting is restored after."""
    import torch

    before = torch.get_num_threads()
    chosen = threads
    if chosen is None:
        cores = os.cpu_count() or 1
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):
            load = 0.0
        if before > 1 and load >= cores:
            chosen = 1
            log(f"nslora: this machine is busy (load {load:.1f} on {cores} cores): using 1 CPU thread "
                "(--threads N to choose)")
    if chosen is not None and chosen != before:
        torch.set_num_threads(max(int(chosen), 1))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# Build
# ------------------------------------------------------------------------------------------------


def ensure_warmed_student(base_model: str | Path | None = None,
                          settings: WarmupSettings | None = None, *,
                          cache_dir: str | Path | None = None, log: Log = print,
                          console: Any = None, threads: int | None = None) -> Path:
    """The warmed student's folder, built on first use (see `warm_student`).

    `AutoModelForCausalLM.from_pretrained(folder)` / `AutoTokenizer.from_pretrained(folder)` load
    it like any model; `base_model=None` means the embedded SmolLM2-135M-Instruct."""
    return warm_student(base_model, settings, cache_dir=cache_dir, log=log, console=console,
                        threads=threads).path


def warm_student(base_model: str | Path | None = None, settings: WarmupSettings | None = None, *,
                 cache_dir: str | Path | None = None, force: bool = False, log: Log = print,
                 console: Any = None, threads: int | None = None) -> WarmupResult:
    """Return the cached warmed student of (`base_model`, `settings`), training it when missing
    (or when `force`). `console` is the rich Console the progress bar draws on (default: a new
    one on stdout); `log` receives one-line status messages; `threads`: see `cpu_threads` (not
    part of the cache key)."""
    started = time.monotonic()
    target, base, key, settings = _locate(base_model, settings, cache_dir, log)
    if not force and is_warmed_student(target, key):
        return WarmupResult(target, False, time.monotonic() - started, key, base)

    from nslora_plugin.apps.tools.models import _exclusive_lock, _make_portable, _relax_permissions

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    waiting = f"nslora: another process is building this student ({lock}); waiting ..."
    with _exclusive_lock(lock, on_wait=lambda: log(waiting)):
        if not force and is_warmed_student(target, key):  # built while we waited
            return WarmupResult(target, False, time.monotonic() - started, key, base)
        log(f"nslora: warming up {base} into {target} ({settings.steps} steps of batch "
            f"{settings.batch_size}, LoRA r={settings.lora_r}, lr={settings.learning_rate:g}) ...")
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
        try:
            with cpu_threads(threads, log):
                info = _train_and_merge(base, settings, staging, console=console)
            _make_portable(staging, _Config(staging))
            _write_marker(staging, key=key, base=base, settings=settings, info=info)
            if target.exists():
                shutil.rmtree(target)
            _relax_permissions(staging)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    seconds = time.monotonic() - started
    log(f"nslora: warmed student ready at {target} ({seconds / 60:.1f} min; final loss "
        f"{info['final_loss']:.3f}).")
    return WarmupResult(target, True, seconds, key, base)


class _Config:
    """The one attribute `_make_portable` reads from a config, taken from the saved folder."""

    def __init__(self, folder: Path) -> None:
        data = json.loads((folder / "config.json").read_text())
        self.max_position_embeddings = int(data.get("max_position_embeddings", 8192))


def warmup_dataset_rows(settings: WarmupSettings) -> list[dict[str, Any]]:
    """The warm-up rows of `settings` as TRL prompt/completion conversations (the loss is on the
    reply only)."""
    from nslora_plugin.core.chat import chat_messages

    rules = (generated_warmup_rules(settings.seed, version=_generated_version(settings.rule_set))
             if settings.rule_set.startswith("generated") else WARMUP_RULES)
    rows = make_warmup_rows(settings.rows, seed=settings.seed, neutral_share=settings.neutral_share,
                            rules=rules)
    return [{"prompt": chat_messages(r["system_prompt"], r["question"]),
             "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows]


def _train_and_merge(base: Path, settings: WarmupSettings, out_dir: Path, *,
                     console: Any) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    from nslora_plugin.apps.harness.sft import (
        full_logits_sft_trainer_class,
        load_fp32_model,
        lora_config,
        sft_config,
    )
    from nslora_plugin.trainer.precision import runs_on_cpu

    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = load_fp32_model(base)
    data = Dataset.from_list(warmup_dataset_rows(settings))
    with tempfile.TemporaryDirectory(prefix="nslora-student-") as scratch:
        args = sft_config(scratch, max_steps=settings.steps, batch_size=settings.batch_size,
                          learning_rate=settings.learning_rate, seed=settings.seed,
                          max_length=settings.max_length,
                          logging_steps=max(settings.steps // 20, 1), lr_scheduler_type="linear",
                          warmup_steps=max(settings.steps // 20, 0), data_seed=settings.seed,
                          disable_tqdm=True, **_length_grouping())
        cls = full_logits_sft_trainer_class() if runs_on_cpu(args) else SFTTrainer
        trainer = cls(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      peft_config=lora_config(settings.lora_r))
        trainer.remove_callback(PrinterCallback)
        bar = _progress_callback(console, settings.steps)
        trainer.add_callback(bar)
        started = time.monotonic()
        try:
            trainer.train()
        finally:
            bar.close()
        seconds = time.monotonic() - started
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    return {"train_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
            "final_loss": losses[-1] if losses else float("nan"),
            "first_loss": losses[0] if losses else float("nan"),
            "seconds_per_step": round(seconds / max(settings.steps, 1), 3),
            "device": _device_name(args)}


def _length_grouping() -> dict[str, Any]:
    """Batches of similar lengths (less padding: about 20% fewer tokens a step on these rows),
    under whichever name this transformers calls it."""
    from trl import SFTConfig

    fields = SFTConfig.__dataclass_fields__
    if "train_sampling_strategy" in fields:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True} if "group_by_length" in fields else {}


def _device_name(args: Any) -> str:
    from nslora_plugin.trainer.precision import cpu_model_name, runs_on_cpu

    if runs_on_cpu(args):
        return f"CPU: {cpu_model_name()} ({os.cpu_count()} cores)"
    import torch

    return f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "unknown"


def _write_marker(folder: Path, *, key: str, base: Path, settings: WarmupSettings,
                  info: dict[str, Any]) -> None:
    import torch
    import transformers

    data = {"key": key, "base": str(base), "settings": dataclasses.asdict(settings),
            "registry_version": REGISTRY_VERSION, "recipe_version": RECIPE_VERSION,
            "source": "nslora student warm-up (nslora_plugin.apps.student.warmup)",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info}
    (folder / MARKER).write_text(json.dumps(data, indent=2) + "\n")


def _progress_callback(console: Any, total: int) -> Any:
    """A `TrainerCallback` with a `close()`: a rich progress bar (steps, loss, elapsed, ETA) on a
    terminal; elsewhere `harness.sft.step_progress` lines, about 20 over the run."""
    from rich.console import Console
    from transformers import TrainerCallback

    from nslora_plugin.apps.harness.sft import step_progress

    console = console if console is not None else Console()
    if not console.is_terminal:
        lines = step_progress(console, max(total // 20, 1))
        lines.close = lambda: None  # type: ignore[attr-defined]
        return lines

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class RichSteps(TrainerCallback):
        def __init__(self) -> None:
            self.progress: Any = None
            self.task: Any = None
            self.loss = "-"

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.progress = Progress(TextColumn("warm-up"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                                     TextColumn("ETA"), TimeRemainingColumn(), console=console)
            self.progress.start()
            self.task = self.progress.add_task("warm-up", total=state.max_steps, loss=self.loss)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self.loss = f"{logs['loss']:.3f}"

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step, loss=self.loss)

        def close(self) -> None:
            if self.progress is not None:
                self.progress.stop()
                self.progress = None

    return RichSteps()
