"""The `nslora` command: `nslora demo`, `nslora compare`, `nslora sweep`, `nslora show RUN_DIR`,
`nslora report RUN_DIR`, `nslora generate RUN_DIR "question"`, `nslora doctor --model ...`,
`nslora student build|path|check`, `nslora bake RUN_DIR`, `nslora version` (or `nslora --version`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def main(argv: list[str] | None = None) -> int:
    from nslora_plugin import __version__

    parser = argparse.ArgumentParser(prog="nslora", description="Neurosymbolic LoRA plugin")
    parser.add_argument("--version", action="version", version=f"nslora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from nslora_plugin.apps.harness.demo import build_parser

    build_parser(sub.add_parser("demo", help="run the whole loop on the embedded default (CPU, offline)",
                                description="Run the neurosymbolic loop end to end on SmolLM2-135M-Instruct."))
    show = sub.add_parser("show", help="print a run's prompt, decisions and summary")
    show.add_argument("path", help="run output folder, checkpoint or adapter folder")
    show.add_argument("--decisions", action="store_true", help="print every decision line")
    report = sub.add_parser(
        "report", help="write a run's HTML report (plots, prompt history, router, editor usage)",
        description="Write one self-contained HTML page (no network, no script) for a run: the "
                    "timeline, every candidate prompt with its gate verdict and diff, the router's "
                    "labels, editor usage, prompts-as-data rows, config and versions. Also renders "
                    "the JSON of nslora compare / nslora sweep.")
    report.add_argument("path", help="run output folder, checkpoint-N, final adapter folder, or a "
                                     "compare / sweep JSON file")
    report.add_argument("-o", "--output", default=None,
                        help="where to write the page (default: report.html in the artifacts "
                             "folder; for a JSON file, the same name with .html)")
    sub.add_parser("version", help="print the version")
    _add_generate_and_doctor(sub)
    from nslora_plugin.apps.harness.compare import build_parser as build_compare_parser

    build_compare_parser(sub.add_parser(
        "compare", help="the loop against fair baselines on one task, same budgets and seeds",
        description="Run the arms (LoRA baselines, prompt edits only, a fixed schedule, the loop) "
                    "and print a table."))
    from nslora_plugin.apps.harness.sweep import build_parser as build_sweep_parser

    build_sweep_parser(sub.add_parser(
        "sweep", help="the 'when' sweep: compare's arms over a mix of fact and format weaknesses",
        description="Run nslora compare at each --mix point and write a table and a plot."))
    from nslora_plugin.apps.student.command import build_parser as build_student_parser

    build_student_parser(sub.add_parser(
        "student", help="the warmed student: a format-following warm-up of the embedded model",
        description="Build, locate and check the warmed student."))
    from nslora_plugin.apps.tools.bake import build_parser as build_bake_parser

    build_bake_parser(sub.add_parser(
        "bake", help="distil a run's optimized prompt into a second adapter (RUN_DIR/baked)"))
    args = parser.parse_args(argv)

    if args.command == "bake":
        from nslora_plugin.apps.tools.bake import run as run_bake

        return run_bake(args)

    if args.command == "student":
        from nslora_plugin.apps.student.command import run as run_student

        return run_student(args)
    if args.command == "sweep":
        from nslora_plugin.apps.harness.sweep import run_sweep

        run_sweep(args)
        return 0
    if args.command == "compare":
        if args.merge:  # train nothing: one comparison from results files
            from nslora_plugin.apps.harness.merge import run_merge

            run_merge(args)
            return 0
        from nslora_plugin.apps.harness.compare import run_compare

        run_compare(args)
        return 0

    if args.command == "demo":
        from nslora_plugin.apps.harness.demo import run_demo

        run_demo(args)
        return 0
    if args.command == "report":
        return _report(args)
    if args.command == "show":
        from nslora_plugin.core.artifacts import ArtifactsUnreadable, load_artifacts

        try:
            arts = load_artifacts(args.path)
        except (FileNotFoundError, ArtifactsUnreadable) as exc:
            print(f"nslora: {exc}", file=sys.stderr)
            return 2
        print(f"artifacts: {arts.root}")
        print(f"system prompt (version {arts.prompt_version}):\n{arts.system_prompt}\n")
        for c in arts.prompt_history:
            mark = "accepted" if c.get("accepted") else "rejected"
            print(f"  v{c.get('version')} step {c.get('step')} {c.get('editor')}: {mark} — {c.get('reason')}")
        if args.decisions:
            for d in arts.decisions:
                print(json.dumps(d, ensure_ascii=False))
        if arts.summary:
            print(json.dumps({k: arts.summary[k] for k in ("probe_before", "probe_after", "decisions")
                              if k in arts.summary}, indent=2))
        return 0
    if args.command == "generate":
        return _generate(args)
    if args.command == "doctor":
        from nslora_plugin.apps.tools.doctor import run as run_doctor

        return run_doctor(args)
    if args.command == "version":
        print(__version__)
        return 0
    return 2


def _report(args: argparse.Namespace) -> int:
    """`nslora report`: a run folder's page, or a compare / sweep JSON's page."""
    from pathlib import Path

    from nslora_plugin.core.artifacts import ArtifactsUnreadable

    path = Path(args.path)
    try:
        if path.is_file() and path.suffix == ".json":
            from nslora_plugin.apps.report import compare_report, sweep_report

            data = json.loads(path.read_text(encoding="utf-8"))
            output = Path(args.output) if args.output else path.with_suffix(".html")
            if isinstance(data, dict) and "points" in data:
                written = sweep_report(data, output)
            elif isinstance(data, dict) and "arms" in data:
                written = compare_report(data, output)
            else:
                print(f"nslora: {str(path)!r} is neither an nslora compare nor an nslora sweep "
                      "result (no 'arms' or 'points' key)", file=sys.stderr)
                return 2
        else:
            from nslora_plugin.apps.report import write_report

            written = write_report(path, args.output)
    except (FileNotFoundError, ArtifactsUnreadable, json.JSONDecodeError) as exc:
        print(f"nslora: {exc}", file=sys.stderr)
        return 2
    from nslora_plugin.apps.report.plots import PLOTS_MISSING, available

    if not available():
        print(f"nslora: {PLOTS_MISSING}", file=sys.stderr)
    print(f"report: {written.resolve()}")
    return 0


def _add_generate_and_doctor(sub: Any) -> None:
    gen = sub.add_parser("generate", help="answer a question with a trained adapter and its optimized prompt",
                         description="Load a run folder, checkpoint or saved adapter with its NSLoRA "
                                     "system prompt and print the model's answer.")
    gen.add_argument("path", help="run output folder, checkpoint-N or adapter folder (with nslora/)")
    gen.add_argument("question", help="the user message")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--base-model", default=None, help="base model (default: from adapter_config.json)")
    gen.add_argument("--load-in-4bit", action="store_true", help="load the base in NF4, as in QLoRA training")
    gen.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    gen.add_argument("--device-map", default=None, help="e.g. auto or cuda:0 (default: CPU)")
    gen.add_argument("--system-prompt", default=None, help="use this system prompt instead of the optimized one")
    gen.add_argument("--show-prompt", action="store_true", help="print the rendered chat prompt (to stderr)")
    from nslora_plugin.apps.tools.doctor import build_parser as build_doctor_parser

    build_doctor_parser(sub.add_parser("doctor", help="estimate GPU memory of a LoRA/QLoRA + NSLoRA run"))


def _generate(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from nslora_plugin.apps.tools.inference import generate, load_for_inference

    try:
        model, tokenizer = load_for_inference(args.path, base_model=args.base_model, dtype=args.dtype,
                                              device_map=args.device_map, load_in_4bit=args.load_in_4bit)
    except (FileNotFoundError, ValueError) as exc:
        print(f"nslora: {exc}", file=sys.stderr)
        return 2
    if args.show_prompt:
        messages = [{"role": "user", "content": args.question}]
        if args.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": args.system_prompt})
        print(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              file=sys.stderr)
    print(generate(model, tokenizer, args.question, system_prompt=args.system_prompt,
                   max_new_tokens=args.max_new_tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
