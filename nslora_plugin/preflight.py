"""What can be checked before a model is loaded: the probe and pool files, and the editor LLM.

A framework script loads (and maybe downloads) a model before it trains; a missing probe file or a
dead editor endpoint should stop or warn before that, not minutes later at the first check.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import NSLoRAConfig, NSLoRAConfigError
from .util import redact

log = logging.getLogger("nslora")


def preflight(config: NSLoRAConfig) -> str | None:
    """Raise `NSLoRAConfigError` for a missing probe / pool file; check the editor LLM and return
    why it cannot be used (None when it can, or when no LLM editor is configured). With
    `on_editor_down="fail"` an unusable editor raises `RuntimeError` here instead."""
    for name in ("probe_path", "pool_path"):
        path = getattr(config, name)
        if path is not None and not Path(path).is_file():
            raise NSLoRAConfigError(f"Invalid NSLoRA config value {name}={path!r}: no such file "
                                    f"(relative paths are read from {str(Path.cwd())!r})", key=name)
    if not config.enabled or config.editor != "textgrad":
        return None
    problem = editor_problem(config)
    if problem is None:
        return None
    if config.on_editor_down == "fail":
        raise RuntimeError(f"NSLoRA: {problem}; point editor_base_url / editor_model at a working "
                           f"editor (editor_backend={config.editor_backend!r}), or set "
                           "on_editor_down='numerical'")
    log.warning("NSLoRA: %s — the run will train numerically unless the editor is up by the first "
                "check", problem)
    return problem


def editor_problem(config: NSLoRAConfig) -> str | None:
    from .editor.engine import configuration_problem, make_client

    problem = configuration_problem(config)
    if problem:
        return problem
    if config.editor_backend == "local":  # loading it is the check, and it is a model: not here
        return None if Path(str(config.editor_model)).is_dir() else \
            f"editor model folder {config.editor_model!r} does not exist"
    client = make_client(config)
    try:
        client.health()
    except Exception as exc:
        return redact(client.redact(f"editor endpoint unreachable ({type(exc).__name__}: {exc})"))[:300]
    return None
