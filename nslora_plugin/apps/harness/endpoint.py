"""The editor LLM's endpoint for the harness: the one the user names, or `transformers serve` on
the trained model, started on a free loopback port and stopped when the block ends."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, Iterator

__all__ = ["editor_endpoint"]


@contextlib.contextmanager
def editor_endpoint(args: argparse.Namespace, model_dir: Path, output_dir: Path,
                    console: Any) -> Iterator[tuple[str | None, str | None]]:
    if args.no_editor_llm or args.editor_base_url:
        yield args.editor_base_url, args.editor_model
        return
    from nslora_plugin.apps.tools.serve import EditorServer

    console.print("[bold]Starting the editor LLM[/] (transformers serve on loopback)…")
    server = EditorServer(model_dir, log_path=output_dir / "editor-server.log")
    try:
        server.start()
        console.print(f"  editor at {server.base_url} (model {Path(server.model).name})")
        yield server.base_url, server.model
    finally:
        server.stop()
