"""The embedded student, warmed up to follow a format stated in its system prompt.

SmolLM2-135M-Instruct, the embedded default, ignores format instructions; real students (1B-8B
instruct models) follow them, and NSLoRA's premise (a prompt edit fixes format without retraining)
needs a student that does. This package builds one, offline, from the raw model:

- `rules`: the format-rule registry, split by construction into a *warm-up* family (what the
  student is trained on) and an *evaluation* family (what the demo, `compare`, `sweep` and the
  benchmarks measure), with no surface string (marker, wrapper, key, prefix, unit) in common;
  and the generator of instruction-following rows over arithmetic, look-ups and definitions.
- `generated`: many more warm-up rules, each instance with its own surface strings (the default
  warm-up's rule set), so the student learns to copy what the prompt names, not a few strings.
- `warmup`: LoRA on those rows, merged into the base weights and cached as a normal model folder
  (`ensure_warmed_student()`).
- `compliance`: how often a model obeys each evaluation rule when its system prompt states it, and
  how often it adds one when none is stated; answer accuracy and reference NLL on neutral questions.

Importing this package costs nothing: torch, transformers and friends load inside the functions.
"""

from __future__ import annotations

from nslora_plugin.apps.student.generated import GENERATED_VERSION, generated_warmup_rules
from nslora_plugin.apps.student.rules import (
    EVAL,
    EVAL_RULES,
    REGISTRY_VERSION,
    WARMUP,
    WARMUP_RULES,
    FormatRule,
    Plain,
    get_rule,
    make_questions,
    make_warmup_rows,
)
from nslora_plugin.apps.student.warmup import (
    WarmupResult,
    WarmupSettings,
    ensure_warmed_student,
    student_folder,
    warm_student,
)

__all__ = [
    "EVAL",
    "EVAL_RULES",
    "GENERATED_VERSION",
    "REGISTRY_VERSION",
    "WARMUP",
    "WARMUP_RULES",
    "FormatRule",
    "Plain",
    "WarmupResult",
    "WarmupSettings",
    "ensure_warmed_student",
    "get_rule",
    "make_questions",
    "generated_warmup_rules",
    "make_warmup_rows",
    "student_folder",
    "warm_student",
]
