"""Write the data (and model link) the TRL recipes in this folder read, relative to --dir.

    python recipes/trl/prepare.py                        # word problems + the embedded 135M model
    python recipes/trl/prepare.py --gsm8k --no-model     # GSM8K from the Hub, for the 8B recipe
    python recipes/trl/prepare.py --jsonl my.jsonl       # your own question/answer rows

It writes:

    data/nslora-trl/train.jsonl     training rows {"messages": [system, user, assistant]}
                                    (the folder is the recipes' --dataset_name)
    data/nslora-trl-probe.jsonl     held-out probe rows {"question", "answer", "final_answer"}
    models/SmolLM2-135M-Instruct    link to a trainable SmolLM2-135M-Instruct (unless --no-model)

Every training row carries the same system message (--system-prompt, default below); the recipes
pass the same text as --nslora_system_prompt, so NSLoRA can find it in each tokenized example and
splice the current (edited) prompt in its place.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

SYSTEM_PROMPT = "You are a helpful assistant."
DATA_DIR = Path("data") / "nslora-trl"
PROBE = Path("data") / "nslora-trl-probe.jsonl"
MODEL_LINK = Path("models") / "SmolLM2-135M-Instruct"


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _rows(args: argparse.Namespace) -> list[dict]:
    from nslora_plugin.core.data import make_word_problems, read_jsonl

    n = args.train + args.probe
    if args.gsm8k:
        from datasets import load_dataset

        rows = [dict(r) for r in load_dataset("openai/gsm8k", "main", split="train")]
    elif args.jsonl:
        rows = read_jsonl(args.jsonl)
    else:
        return make_word_problems(n, seed=args.seed)
    random.Random(args.seed).shuffle(rows)
    for r in rows:  # GSM8K references end with "#### <n>": keep them, note the final answer
        if "####" in str(r.get("answer", "")):
            r["final_answer"] = str(r["answer"]).split("####")[-1].strip().replace(",", "")
    return rows[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("."))
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--probe", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--gsm8k", action="store_true", help="GSM8K train split from the Hub")
    src.add_argument("--jsonl", help="a JSONL file with question/answer rows")
    p.add_argument("--model", help="link this model folder instead of the embedded default")
    p.add_argument("--no-model", action="store_true", help="write the data only")
    args = p.parse_args()

    from nslora_plugin.core.data import chat_rows

    rows = _rows(args)
    probe, train = rows[:args.probe], rows[args.probe:]
    _write(args.dir / DATA_DIR / "train.jsonl", chat_rows(train, args.system_prompt))
    _write(args.dir / PROBE, probe)
    print(f"train: {args.dir / DATA_DIR / 'train.jsonl'} ({len(train)} rows)")
    print(f"probe: {args.dir / PROBE} ({len(probe)} rows)")
    if not args.no_model:
        model = args.model
        if model is None:
            from nslora_plugin.apps.tools.models import ensure_default_model

            model = str(ensure_default_model())
        link = args.dir / MODEL_LINK
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(Path(model).resolve(), link, target_is_directory=True)
        print(f"model: {link} -> {Path(model).resolve()}")


if __name__ == "__main__":
    main()
