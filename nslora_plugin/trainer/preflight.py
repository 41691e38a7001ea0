"""What can be checked before a model is loaded: the probe and pool files, and the editor LLM.

A framework script loads (and maybe downloads) a model before it trains; a missing probe file or a
dead editor endpoint should stop or warn before that, not minutes later at the first check.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nslora_plugin.core.config import NSLoRAConfig, NSLoRAConfigError
from nslora_plugin.core.util import redact

log = logging.getLogger("nslora")


def preflight(config: NSLoRAConfig) -> str | None:
    """Raise `NSLoRAConfigError` for a missing probe / pool file; check the editor LLM and return
    why it cannot be used (None when it can, or when no LLM editor is configured). With
    `on_editor_down="fail"` an unusable editor raises `RuntimeError` here instead."""
    check_data_files({"probe_path": config.probe_path, "pool_path": config.pool_path})
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


def check_data_files(sources: dict[str, object]) -> None:
    """Raise `NSLoRAConfigError` naming the key for a probe / pool path that is not a file."""
    for name, source in sources.items():
        if isinstance(source, (str, Path)) and not Path(source).is_file():
            raise NSLoRAConfigError(f"Invalid NSLoRA config value {name}={str(source)!r}: no such "
                                    f"file (relative paths are read from {str(Path.cwd())!r})", key=name)


def editor_problem(config: NSLoRAConfig) -> str | None:
    """The TextGrad editor's own start-up check, except that a `local` editor model is only looked
    for (loading it is the check, and it is a model: not before the student is loaded)."""
    from nslora_plugin.builtins.editors.clients import configuration_problem
    from nslora_plugin.builtins.editors.textgrad import TextGradEditor

    if config.editor_backend == "local" and not configuration_problem(config):
        return None if Path(str(config.editor_model)).is_dir() else \
            f"editor model folder {config.editor_model!r} does not exist"
    problem = TextGradEditor().startup_problem(config, None)
    return redact(problem) if problem else None
