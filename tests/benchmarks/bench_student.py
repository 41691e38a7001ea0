"""Does the warmed student follow a stated format? Raw vs warmed, on the evaluation rules only.
Not a test: nothing is asserted.

    python tests/benchmarks/bench_student.py                        # builds the warmed student if missing
    python tests/benchmarks/bench_student.py --items 24 --out student-compliance.json
    python tests/benchmarks/bench_student.py --student /path/to/warmed --raw /path/to/raw

For each evaluation rule (which the warm-up never saw: no shared marker, wrapper, key or prefix),
`--items` fresh questions under "You are a helpful assistant. <rule>": compliance of the raw and the
warmed student with a 95% bootstrap interval over items, and whether the reply still states the
right answer. Then, with no rule stated, how often replies obey some rule unasked (evaluation or
warm-up family: a baked-in rule would show here), answer accuracy on arithmetic and look-ups, and
reference NLL on GSM8K test answers (`--gsm8k`, default ../shared/data/gsm8k/test.jsonl when
present) and on plain replies. Greedy decoding. Writes the JSON (`--out`) and prints the tables and
the CPU. With the defaults, 224 replies of up to 128 tokens per model (measured times:
recipes/results/student.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

DEFAULT_GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default=None,
                   help="the warmed student folder (default: ensure_warmed_student(), built if missing)")
    p.add_argument("--raw", default=None,
                   help="the raw model folder (default: the warmed student's base, else the embedded model)")
    p.add_argument("--items", type=int, default=16, help="questions per evaluation rule")
    p.add_argument("--neutral", type=int, default=32, help="questions with no rule stated")
    p.add_argument("--nll-rows", type=int, default=32, help="rows for each reference-NLL set")
    p.add_argument("--gsm8k", default=str(DEFAULT_GSM8K) if DEFAULT_GSM8K.is_file() else None,
                   help="GSM8K test JSONL for the neutral reference NLL")
    p.add_argument("--rules", default=None, help="comma-separated evaluation rule names (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, or 1 when the machine is already busy)")
    p.add_argument("--cache", default=None, help="model cache (default: $NSLORA_CACHE, else ~/.cache/nslora)")
    p.add_argument("--out", default="student-compliance.json", help="where to write the JSON")
    args = p.parse_args()

    from rich.console import Console

    from nslora_plugin.apps.student.compliance import compare_students, render_tables
    from nslora_plugin.apps.student.rules import EVAL, EVAL_RULES, get_rule
    from nslora_plugin.apps.student.warmup import ensure_warmed_student, read_marker
    from nslora_plugin.trainer.precision import cpu_flags, cpu_model_name

    console = Console(width=None if sys.stdout.isatty() else 140)

    def log(message: str) -> None:
        console.print(message, markup=False, highlight=False)

    flags = cpu_flags()
    kind = ("AMX" if "amx_bf16" in flags else "AVX-512 with bf16" if "avx512_bf16" in flags
            else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other")
    log(f"CPU: {cpu_model_name()} ({os.cpu_count()} cores, {kind})")

    started = time.monotonic()
    student = Path(args.student) if args.student else ensure_warmed_student(
        cache_dir=args.cache, log=log, console=console, threads=args.threads)
    marker = read_marker(student) or {}
    raw = args.raw or marker.get("base")
    if raw is None:
        from nslora_plugin.apps.tools.models import ensure_default_model

        raw = ensure_default_model(args.cache, log=log)
    rules = EVAL_RULES
    if args.rules:
        rules = tuple(get_rule(name.strip()) for name in args.rules.split(",") if name.strip())
        if any(r.family != EVAL for r in rules):
            p.error("--rules takes evaluation rules only")

    result = compare_students(raw, student, rules=rules, items_per_rule=args.items,
                              neutral=args.neutral, nll_rows=args.nll_rows, gsm8k=args.gsm8k,
                              seed=args.seed, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, log=log, threads=args.threads)
    result["cpu_kind"] = kind
    result["student"] = {"path": str(student), "warmup": marker}
    result["command"] = " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    result["seconds"] = round(time.monotonic() - started, 1)
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    render_tables(result, console)
    log(f"wrote {out.resolve()} ({result['seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
