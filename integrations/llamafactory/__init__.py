"""NSLoRA for LLaMA-Factory.

LLaMA-Factory has no plugin mechanism, but `llamafactory.train.tuner.run_exp(args, callbacks)`
accepts extra `TrainerCallback`s. This adapter is a thin wrapper around it:

- command line: `nslora-lf train config.yaml [key=value ...]` (or
  `python -m nslora_plugin.integrations.llamafactory.cli train ...`), a drop-in for
  `llamafactory-cli train` that understands `nslora_*` keys in the same YAML;
- Python: `run("config.yaml", ["max_steps=10"])` or `run({...dict...})`.

How prompt edits reach training: LLaMA-Factory tokenizes the dataset (system prompt included)
before training; `NSLoRACallback.on_train_begin` wraps the train DataLoader's collate function
(LLaMA-Factory's `SFTDataCollatorWith4DAttentionMask`) so that every batch has the token span of
the initial system prompt replaced by the current accepted prompt, and a share of each batch
replaced by augmented rows. `nslora/state.json` counts it (`collator.swapped`). See README.md.

Importing this package imports neither LLaMA-Factory nor torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .args import LlamaFactoryNSLoRAArgs, check_lf_settings, prepare, read_config, split_config

if TYPE_CHECKING:
    from nslora_plugin.trainer.callback import NSLoRACallback

__all__ = ["run", "run_prepared", "prepare", "read_config", "split_config", "check_lf_settings",
           "make_callbacks", "LlamaFactoryNSLoRAArgs",
           "write_word_problem_dataset", "dataset_info", "DEFAULT_DATASET_NAME"]

DEFAULT_DATASET_NAME = "nslora_word_problems"


def run(config: str | Path | Mapping[str, Any], overrides: Sequence[str] = (), *,
        callbacks: Sequence[Any] = (), plugins: Sequence[Any] = (), probe: Any = None,
        ) -> "NSLoRACallback | None":
    """Train like `nslora-lf train`: `config` is a YAML/JSON path (with `key=value` overrides) or
    an already-read dict. Returns the NSLoRA callback (None when `nslora: false`)."""
    if isinstance(config, Mapping):
        if overrides:
            raise ValueError("overrides apply to a config file; merge them into the dict instead")
        prepared = prepare(config)
    else:
        prepared = prepare(read_config(config, overrides), base_dir=Path(config).resolve().parent)
    return run_prepared(prepared, callbacks=callbacks, plugins=plugins, probe=probe)


def make_callbacks(prepared: LlamaFactoryNSLoRAArgs, *, plugins: Sequence[Any] = (),
                   probe: Any = None) -> list[Any]:
    """The callbacks NSLoRA adds to a LLaMA-Factory run: the NSLoRA callback and, for multi-GPU
    runs, a per-rank summary in the log (a no-op on one process). Empty when `nslora: false`."""
    if not prepared.nslora.enabled:
        return []
    from nslora_plugin.trainer.callback import NSLoRACallback

    from ._ranks import RankSummary

    cutoff = prepared.lf_args.get("cutoff_len")  # LLaMA-Factory's max length is a data argument
    callback = NSLoRACallback(prepared.nslora, probe=probe, plugins=plugins,
                              max_length=int(cutoff) if cutoff else None)
    return [callback, RankSummary(callback)]


def run_prepared(prepared: LlamaFactoryNSLoRAArgs, *, callbacks: Sequence[Any] = (),
                 plugins: Sequence[Any] = (), probe: Any = None) -> "NSLoRACallback | None":
    from llamafactory.train.tuner import run_exp

    ours = make_callbacks(prepared, plugins=plugins, probe=probe)
    # run_exp appends its own callbacks to the list it gets: hand it a fresh one, ours first.
    run_exp(args=dict(prepared.lf_args), callbacks=ours + list(callbacks))
    return ours[0] if ours else None


# ------------------------------------------------------------------------------------ data
def dataset_info(dataset_name: str = DEFAULT_DATASET_NAME, file_name: str = "train.jsonl") -> dict:
    """A `dataset_info.json` entry for chat rows `{"messages": [{"role", "content"}, ...]}` (system
    message first), in LLaMA-Factory's sharegpt format with OpenAI-style tags."""
    return {dataset_name: {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                 "assistant_tag": "assistant", "system_tag": "system"},
    }}


def write_word_problem_dataset(folder: str | Path, *, n_train: int = 256, n_probe: int = 32,
                               seed: int = 0, system_prompt: str | None = "You are a helpful assistant.",
                               dataset_name: str = DEFAULT_DATASET_NAME) -> dict[str, Path]:
    """Generate arithmetic word problems (`nslora_plugin.core.data.make_word_problems`) and write a
    LLaMA-Factory `dataset_dir`: `dataset_info.json`, `train.jsonl` (chat rows whose system message
    is `system_prompt`) and `probe.jsonl` (held-out question/answer rows for `nslora_probe_path`)."""
    from nslora_plugin.core.data import chat_rows, make_word_problems

    if n_train < 1 or n_probe < 1:
        raise ValueError("n_train and n_probe must be at least 1")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = make_word_problems(n_train + n_probe, seed=seed)
    train, probe = rows[:n_train], rows[n_train:]
    paths = {"dataset_dir": folder, "dataset_info": folder / "dataset_info.json",
             "train": folder / "train.jsonl", "probe": folder / "probe.jsonl"}
    _write_jsonl(paths["train"], chat_rows(train, system_prompt))
    _write_jsonl(paths["probe"], probe)
    paths["dataset_info"].write_text(json.dumps(dataset_info(dataset_name, "train.jsonl"), indent=2) + "\n",
                                     encoding="utf-8")
    return paths


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
