"""The CPU precision check every attached run goes through.

TRL's `SFTConfig` defaults to `bf16=True`, and on a CPU the Trainer turns that into bf16 autocast.
A CPU without native bf16 instructions (no AVX512-BF16, no AMX) emulates every bf16 matmul, many
times slower than fp32 (`tests/benchmarks/bench_step.py` measures it; the figures are on the
results pages). So a CPU run with bf16/fp16 on such a CPU gets one warning naming the fix.
"""

from __future__ import annotations

import functools
import platform
from typing import Any

#: /proc/cpuinfo flags that mean the CPU computes bf16 matmuls natively.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when bf16 matmuls run natively on this CPU (AVX512-BF16 or AMX on x86; Apple silicon
    and ARMv8.6 `bf16`)."""
    flags = cpu_flags()
    if any(f in flags for f in NATIVE_BF16_FLAGS) or "bf16" in flags:
        return True
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def cpu_model_name() -> str:
    """The CPU model as /proc/cpuinfo names it (for benchmark and results headers)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runs_on_cpu(args: Any) -> bool:
    """Whether a `TrainingArguments` trains on the CPU (use_cpu, or no accelerator present)."""
    if getattr(args, "use_cpu", False):
        return True
    device = getattr(args, "device", None)
    return getattr(device, "type", None) == "cpu"


def cpu_precision_problem(args: Any) -> str | None:
    """The one-line warning for a CPU run whose mixed precision will be emulated, or None.

    `args` is a `TrainingArguments` (or anything with `bf16`, `fp16`, `use_cpu`)."""
    if not runs_on_cpu(args):
        return None
    if getattr(args, "fp16", False):
        return ("training on a CPU with fp16=True: CPUs have no fast fp16 matmul, so every step is "
                "emulated and many times slower; set fp16=False (--fp16 false) to train in fp32")
    if getattr(args, "bf16", False) and not cpu_has_native_bf16():
        return ("training on a CPU with bf16=True (TRL's SFTConfig default) on a CPU without native "
                "bf16 (no avx512_bf16 / amx_bf16 flag): bf16 autocast is emulated and a step is "
                "about 20x slower; set bf16=False (--bf16 false, or `bf16: false` in the YAML) to "
                "train in fp32")
    return None
