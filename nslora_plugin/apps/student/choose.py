"""Which model the harness trains: the `--student` option of `demo`, `compare` and `sweep`.

- no `--model`: the embedded SmolLM2-135M-Instruct, *warmed* by default (it follows a format
  stated in its system prompt, as the 1B-8B students users train do), or raw with
  `--student raw`; `--student warmed-fixed` is the first warm-up (the fixed rule set, the student
  the committed evidence was measured on), rebuilt under its recorded cache key;
- `--model FOLDER`: that model as it is, unless `--student warmed` asks for it to be warmed too.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable

__all__ = ["STUDENTS", "add_student_argument", "choose_student"]

STUDENTS = ("warmed", "raw", "warmed-fixed")

#: Earlier warm-ups that committed results were measured on: their rule set, and with the default
#: settings also the budget they were built with, so the folder is found under its recorded key.
EARLIER = {"warmed-fixed": {"rule_set": "fixed", "steps": 160, "rows": 1200}}


def add_student_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--student", choices=STUDENTS, default=None,
        help="warmed: the model after the format-following warm-up (`nslora student build`, "
             "built on first use and cached); raw: the model as it is. Default: warmed for the "
             "embedded model, raw for --model. warmed-fixed: the first warm-up, on its fixed "
             "rule set (the student recipes/results/evidence.md was measured on)")


def choose_student(args: argparse.Namespace, log: Callable[[str], Any] = print,
                   console: Any = None, *, settings: Any = None,
                   cache_dir: str | Path | None = None) -> tuple[Path, str]:
    """The model folder to train and which student it is (`"warmed"` or `"raw"`: the folder's
    name carries the warm-up's cache key); `settings` and `cache_dir` go to `ensure_warmed_student`
    (default: its defaults; `--student warmed-fixed` sets the fixed rule set, and its budget too
    when `settings` is not given)."""
    from nslora_plugin.apps.tools.models import ensure_default_model

    model = getattr(args, "model", None)
    student = getattr(args, "student", None) or ("raw" if model else "warmed")
    base = Path(model) if model else ensure_default_model(log=log)
    if student == "raw":
        return base, "raw"
    from nslora_plugin.apps.student.warmup import WarmupSettings, ensure_warmed_student

    if student in EARLIER:
        pinned = EARLIER[student] if settings is None else {"rule_set": EARLIER[student]["rule_set"]}
        settings = dataclasses.replace(settings or WarmupSettings(), **pinned)
    return ensure_warmed_student(base if model else None, settings, cache_dir=cache_dir, log=log,
                                 console=console), "warmed"
