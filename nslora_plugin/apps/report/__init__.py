"""HTML reports: what a run did (`nslora report RUN_DIR`, `report: true`, the end of `nslora demo`),
and the arms of `nslora compare` / `nslora sweep` side by side.

Each report is one static file that opens from disk with no network and no script: the plots are
PNGs drawn with matplotlib's Agg canvas and embedded as `data:` URIs, every text is escaped.
Without matplotlib (the `plots` extra) the page is still written, with a note where each plot
would be.

    from nslora_plugin.apps.report import write_report
    write_report("runs/my-run")                       # -> runs/my-run/nslora/report.html

Modules: `data` reads a run into series and rows, `plots` draws them, `worddiff` diffs two
prompts, `page` holds the HTML pieces, `run_page` / `compare_page` lay the pages out.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["write_report", "try_write_report", "compare_report", "sweep_report", "REPORT_NAME"]

log = logging.getLogger("nslora")

REPORT_NAME = "report.html"


def _write(path: Path, text: str) -> Path:
    """Write the page whole or not at all (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_report(path: str | Path, output: str | Path | None = None) -> Path:
    """Write the run report of the run under `path` (run folder, `checkpoint-N`, final adapter
    folder or the `nslora/` folder) to `output` (default: `report.html` in the artifacts folder)
    and return its path. `NoArtifactsError` (a `FileNotFoundError`) when there is no run there."""
    from nslora_plugin.apps.report.data import load_run
    from nslora_plugin.apps.report.run_page import render_run

    run = load_run(path)
    target = Path(output) if output is not None else run.arts.root / REPORT_NAME
    return _write(target, render_run(run))


def try_write_report(path: str | Path, output: str | Path | None = None) -> Path | None:
    """`write_report` for the end of training: a failure is a logged warning, never an error."""
    try:
        return write_report(path, output)
    except Exception as exc:  # a report must never break the training run that asked for it
        log.warning("NSLoRA: could not write the run report for %s: %s: %s", path,
                    type(exc).__name__, exc)
        return None


def compare_report(result: dict[str, Any], path: str | Path, sweep: dict[str, Any] | None = None) -> Path:
    """The `nslora compare` result (its JSON) as a page: held-out accuracy per arm as bars with
    every seed as a dot, the verdict, the arms table, seeds and splits; with `sweep`, the
    "when" sweep too."""
    from nslora_plugin.apps.report.compare_page import render_compare

    return _write(Path(path), render_compare(result, sweep))


def sweep_report(sweep: dict[str, Any], path: str | Path) -> Path:
    """The `nslora sweep` result as a page: accuracy against the mix per arm with intervals and
    seeds, the table, and each mix point's arms side by side."""
    from nslora_plugin.apps.report.compare_page import render_sweep

    return _write(Path(path), render_sweep(sweep))
