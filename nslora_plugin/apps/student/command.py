"""`nslora student`: build, locate and smoke-check the warmed student (the subcommand's parser and
its runner; `apps/cli.py` mounts them)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

DESCRIPTION = """\
The embedded student (SmolLM2-135M-Instruct) ignores formats stated in its system prompt; real
students follow them. `nslora student build` warms it up once: LoRA on generated rows whose system
prompt states one *warm-up* format rule (final-line markers, prefixes, wrappers, casing, length
caps, JSON keys, bullets, units) with replies that obey it, plus the same questions with no rule
and a plain reply; merged into the weights and saved as a normal model folder in the model cache,
under a key of its settings (changed settings build anew; the same ones reuse it). The demo,
compare and sweep measure *evaluation* rules, which share no marker, wrapper, key or prefix with
the warm-up's. Built once (times: recipes/results/student.md).

  nslora student build            # train and cache (progress bar); --force rebuilds
  nslora student path             # print the folder (exit 1 if not built yet)
  nslora student check            # compliance with evaluation rules, raw vs warmed (a smoke)
"""


def _settings_arguments(parser: argparse.ArgumentParser) -> None:
    from nslora_plugin.apps.student.warmup import RULE_SETS, WarmupSettings

    d = WarmupSettings()
    group = parser.add_argument_group("warm-up settings (each one is part of the cache key)")
    group.add_argument("--model", default=None,
                       help="base model folder (default: the embedded SmolLM2-135M-Instruct)")
    group.add_argument("--cache", default=None,
                       help="model cache folder (default: $NSLORA_CACHE, else ~/.cache/nslora)")
    group.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default {d.steps})")
    group.add_argument("--rows", type=int, default=d.rows, help=f"generated rows (default {d.rows})")
    group.add_argument("--batch-size", type=int, default=d.batch_size,
                       help=f"rows a step (default {d.batch_size})")
    group.add_argument("--lr", type=float, default=d.learning_rate,
                       help=f"learning rate (default {d.learning_rate:g})")
    group.add_argument("--rank", type=int, default=d.lora_r, help=f"LoRA rank (default {d.lora_r})")
    group.add_argument("--seed", type=int, default=d.seed, help=f"seed of rows and training (default {d.seed})")
    group.add_argument("--rule-set", choices=RULE_SETS, default=d.rule_set,
                       help="generated: many warm-up rules, each with its own markers, tags and keys; "
                            "generated-v2: more of them, from larger vocabularies (measured no better, "
                            "recipes/results/student.md); fixed: the first warm-up's 19 rules (the "
                            f"student the committed evidence was measured on) (default {d.rule_set})")


def _threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, or 1 when the machine is already "
                             "busy: on shared cores one thread is often several times faster)")


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Fill the `nslora student` parser (its three actions and their options)."""
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="student_command", required=True, metavar="{build,path,check}")
    build = sub.add_parser("build",
                           help="warm the student up and cache it (a quarter of an hour on 2 CPU cores)",
                           description="Train the warm-up LoRA, merge it and save the model folder in "
                                       "the cache; a no-op when the same settings are cached.")
    _settings_arguments(build)
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    _threads_argument(build)
    path = sub.add_parser("path", help="print the warmed student's folder (exit 1 if not built)",
                          description="Print where the warmed student of these settings lives.")
    _settings_arguments(path)
    check = sub.add_parser(
        "check", help="compliance with stated evaluation rules, raw vs warmed (a quick smoke)",
        description="Ask the raw and the warmed student a few questions under each evaluation rule "
                    "(and a few with no rule) and print how often each obeys. For the full "
                    "measurement run tests/benchmarks/bench_student.py.")
    _settings_arguments(check)
    check.add_argument("--items", type=int, default=2, help="questions per evaluation rule (default 2)")
    check.add_argument("--neutral", type=int, default=4, help="questions with no rule stated (default 4)")
    check.add_argument("--max-new-tokens", type=int, default=96)
    check.add_argument("--build", action="store_true", help="build the warmed student first if missing")
    _threads_argument(check)
    return parser


def _settings(args: argparse.Namespace) -> Any:
    from nslora_plugin.apps.student.warmup import WarmupSettings

    return WarmupSettings(rows=args.rows, steps=args.steps, batch_size=args.batch_size,
                          learning_rate=args.lr, lora_r=args.rank, seed=args.seed,
                          rule_set=args.rule_set)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from nslora_plugin.apps.student.warmup import is_warmed_student, student_folder, warm_student

    console = Console(width=None if sys.stdout.isatty() else 140)

    def log(message: str) -> None:
        console.print(message, markup=False, highlight=False)

    try:
        settings = _settings(args)
    except ValueError as exc:
        print(f"nslora: {exc}", file=sys.stderr)
        return 2
    if args.student_command == "build":
        result = warm_student(args.model, settings, cache_dir=args.cache, force=args.force, log=log,
                              console=console, threads=args.threads)
        if not result.built:
            log(f"nslora: already built (cache hit): {result.path}")
        print(result.path)
        return 0
    folder = student_folder(args.model, settings, cache_dir=args.cache, log=log)
    built = is_warmed_student(folder)
    if args.student_command == "path":
        print(folder)
        if not built:
            print("nslora: not built yet; run `nslora student build` (same options)", file=sys.stderr)
        return 0 if built else 1
    if args.student_command == "check":
        if not built:
            if not args.build:
                print(f"nslora: the warmed student is not built yet ({folder}); run `nslora student "
                      "build` (same options) or add --build", file=sys.stderr)
                return 2
            folder = warm_student(args.model, settings, cache_dir=args.cache, log=log,
                                  console=console, threads=args.threads).path
        from nslora_plugin.apps.student.compliance import compare_students, render_tables
        from nslora_plugin.apps.student.warmup import read_marker

        raw = (read_marker(folder) or {}).get("base")
        if not raw:
            print(f"nslora: {folder} does not name its base model", file=sys.stderr)
            return 2
        result = compare_students(raw, folder, items_per_rule=args.items, neutral=args.neutral,
                                  nll_rows=0, max_new_tokens=args.max_new_tokens, log=log,
                                  threads=args.threads)
        render_tables(result, console)
        return 0
    return 2
