"""What the interleaved benchmarks share: run one repetition in a fresh Python process (so its
timing and peak memory are its own) and read the JSON line it prints last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Sequence


def run_worker(script: str, variant: str, flags: Sequence[str]) -> dict[str, Any]:
    """`python script --worker variant *flags` with plugin autoload off; exits with its stderr on failure."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", NSLORA_DISABLE_PLUGIN_AUTOLOAD="1")
    proc = subprocess.run([sys.executable, script, "--worker", variant, *flags],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.exit(f"{variant} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
