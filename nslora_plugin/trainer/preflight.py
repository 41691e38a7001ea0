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
    check_output_dir(config.output_dir)
    if not config.enabled or config.editor not in ("textgrad", "gepa"):
        return None
    problem = editor_problem(config)
    if problem is None:
        return None
    if config.on_editor_down == "fail":
        from nslora_plugin.core.run import editor_down_error

        raise editor_down_error(problem, config.editor_backend)
    from nslora_plugin.builtins.editors.clients import configuration_problem
    from nslora_plugin.core.run import editor_down_message

    again = "" if configuration_problem(config) else " (checked again when training starts)"
    log.warning("NSLoRA: %s%s", editor_down_message(problem, stand_in(config)), again)
    return problem


def stand_in(config: NSLoRAConfig) -> str | None:
    """The editor that edits while the LLM editor is down (the run's other built-in or plugin
    editors that are ready without an LLM), or None: training stays numerical. The same answer
    the loop gives when it starts its editors."""
    from nslora_plugin.core.registry import make_plugin_manager

    try:
        pm = make_plugin_manager(config)
        statuses = pm.hook.nslora_editor_status(config=config, run=None)
    except Exception:  # noqa: BLE001 - a plugin that needs the run: judge by the built-ins
        return "constraint" if config.editor_fallback == "constraint" else None
    return next((s.editor for s in statuses if s is not None and s.ready), None)


def check_data_files(sources: dict[str, object]) -> None:
    """Raise `NSLoRAConfigError` naming the key for a probe / pool path that is not a file (a
    missing path, or a folder)."""
    from nslora_plugin.core.data import data_file_problem

    for name, source in sources.items():
        if isinstance(source, (str, Path)):
            problem = data_file_problem(source)
            if problem:
                raise NSLoRAConfigError(f"Invalid NSLoRA config value {name}={str(source)!r}: "
                                        f"{problem}", key=name)


def check_output_dir(path: str | Path | None, *, trainer: bool = False) -> None:
    """Raise `NSLoRAConfigError` naming the setting when the NSLoRA folder `path` cannot be made
    because it, or a folder above it, is a regular file. `trainer`: `path` is
    `<the trainer's output_dir>/nslora` (NSLoRA's own `output_dir` is unset)."""
    from nslora_plugin.core.artifacts import folder_problem

    problem = folder_problem(path) if path is not None else None
    if not problem:
        return
    if trainer:
        raise NSLoRAConfigError(
            f"The trainer's output_dir={str(Path(path).parent)!r} cannot hold NSLoRA's folder: "
            f"{problem}; set the trainer's output_dir to a folder path (or NSLoRA's own "
            "output_dir)", key="output_dir")
    raise NSLoRAConfigError(f"Invalid NSLoRA config value output_dir={str(path)!r}: {problem}, so "
                            "the NSLoRA folder cannot be made there; set NSLoRA's output_dir to a "
                            "folder path", key="output_dir")


def editor_problem(config: NSLoRAConfig) -> str | None:
    """The LLM editor's own start-up check (TextGrad's, or GEPA's: the gepa package too), except
    that a `local` editor model is only looked for (loading it is the check, and it is a model:
    not before the student is loaded)."""
    from nslora_plugin.builtins.editors.clients import configuration_problem
    from nslora_plugin.builtins.editors.gepa import GEPAEditor, import_gepa
    from nslora_plugin.builtins.editors.textgrad import TextGradEditor

    if config.editor == "gepa":
        try:
            import_gepa()
        except ImportError as exc:
            return f"the gepa package is not available ({exc}); pip install 'nslora-plugin[gepa]'"
    if config.editor_backend == "local" and not configuration_problem(config):
        return None if Path(str(config.editor_model)).is_dir() else \
            f"editor model folder {config.editor_model!r} does not exist"
    editor = GEPAEditor() if config.editor == "gepa" else TextGradEditor()
    problem = editor.startup_problem(config, None)
    return redact(problem) if problem else None
