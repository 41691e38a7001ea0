"""The `nslora` command: `nslora demo`, `nslora show RUN_DIR`, `nslora version`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nslora", description="Neurosymbolic LoRA plugin")
    sub = parser.add_subparsers(dest="command", required=True)
    from .demo import build_parser

    build_parser(sub.add_parser("demo", help="run the whole loop on the embedded default (CPU, offline)",
                                description="Run the neurosymbolic loop end to end on SmolLM2-135M-Instruct."))
    show = sub.add_parser("show", help="print a run's prompt, decisions and summary")
    show.add_argument("path", help="run output folder, checkpoint or adapter folder")
    show.add_argument("--decisions", action="store_true", help="print every decision line")
    sub.add_parser("version", help="print the version")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import run_demo

        run_demo(args)
        return 0
    if args.command == "show":
        from .artifacts import load_artifacts

        try:
            arts = load_artifacts(args.path)
        except FileNotFoundError as exc:
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
    if args.command == "version":
        from . import __version__

        print(__version__)
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
