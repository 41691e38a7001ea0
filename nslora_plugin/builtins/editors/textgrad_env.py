"""Import TextGrad safely: lazily, offline, with its logs under the run folder.

`import textgrad` creates `./logs/` in the working directory (or `$TEXTGRAD_LOG_DIR`) and imports
litellm, which tries to download a cost map. We point both somewhere harmless *before* the first
import; a later run in the same process re-points TextGrad's file handler to its own folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

_log_dir: Path | None = None


def import_textgrad(log_dir: str | Path | None = None) -> Any:
    global _log_dir
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    if log_dir is not None:
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TEXTGRAD_LOG_DIR"] = str(log_dir)
    elif "TEXTGRAD_LOG_DIR" not in os.environ:
        import tempfile

        os.environ["TEXTGRAD_LOG_DIR"] = tempfile.mkdtemp(prefix="nslora-textgrad-logs-")
    import textgrad

    # TextGrad logs every prompt and reply at INFO; keep them in its file under the run folder
    # instead of letting them reach the user's console through the root logger.
    logging.getLogger("textgrad").propagate = False
    if log_dir is not None and log_dir != _log_dir:
        _retarget_file_handlers(textgrad, log_dir)
        _log_dir = log_dir
    return textgrad


def _retarget_file_handlers(textgrad: Any, log_dir: Path) -> None:
    logger = logging.getLogger("textgrad")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent != log_dir:
            logger.removeHandler(handler)
            handler.close()
            new = logging.FileHandler(log_dir / Path(handler.baseFilename).name)
            new.setFormatter(handler.formatter)
            logger.addHandler(new)
