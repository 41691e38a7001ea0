"""Build the plugin manager: the built-in behaviour is registered as plugins exactly like third
parties' (by name: nslora.rewards, nslora.router, nslora.augment, nslora.editor.constraint,
nslora.editor.demonstrations, nslora.editor.textgrad), third parties also through the `nslora` entry-point group (opt out with
NSLORA_DISABLE_PLUGIN_AUTOLOAD=1)."""

from __future__ import annotations

import importlib
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .config import NSLoRAConfig
from .util import env_flag

AUTOLOAD_OPT_OUT = "NSLORA_DISABLE_PLUGIN_AUTOLOAD"


def builtin_plugins(config: NSLoRAConfig) -> list[tuple[str, Any]]:
    """The default stages, in registration order (pluggy calls the last registered first)."""
    from .augment import PromptsAsData
    from .editor.constraint_editor import ConstraintEditor
    from .rewards import BuiltinRewards
    from .router import LearnedRouter, PriorRouter

    plugins: list[tuple[str, Any]] = [
        ("nslora.rewards", BuiltinRewards()),
        ("nslora.router", LearnedRouter() if config.router == "learned" else PriorRouter()),
        ("nslora.augment", PromptsAsData()),
    ]
    wants_constraint = config.editor == "constraint" or (
        config.editor != "none" and config.editor_fallback == "constraint")
    if wants_constraint:
        plugins.append(("nslora.editor.constraint", ConstraintEditor()))
    if config.editor == "demonstrations":
        from .editor.demonstrations import DemonstrationsEditor

        plugins.append(("nslora.editor.demonstrations", DemonstrationsEditor()))
    if config.editor == "textgrad":
        from .editor.textgrad_editor import TextGradEditor

        plugins.append(("nslora.editor.textgrad", TextGradEditor()))
    return plugins


def load_object(dotted: str) -> Any:
    """Import `package.module:attr` or `package.module.attr` (for plugins named in a config)."""
    module_name, _, attr = dotted.replace(":", ".").rpartition(".")
    if not module_name:
        raise ValueError(f"{dotted!r} is not a dotted path like 'package.module.Name'")
    obj = getattr(importlib.import_module(module_name), attr)
    return obj() if isinstance(obj, type) else obj


BLOCK_PREFIX = "no:"


def make_plugin_manager(config: NSLoRAConfig, extra: Iterable[Any] = ()) -> pluggy.PluginManager:
    """Built-ins first, then the config's dotted paths, then `extra`, then entry points. A
    `plugins` entry "no:<name>" (pytest's `-p no:name`) blocks the plugin of that name, built-in
    or entry point, so a third-party plugin can replace it (e.g. "no:nslora.rewards")."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for entry in config.plugins:
        if entry.startswith(BLOCK_PREFIX):
            pm.set_blocked(entry[len(BLOCK_PREFIX):].strip())
    for name, plugin in builtin_plugins(config):
        pm.register(plugin, name=name)
    for dotted in config.plugins:
        if not dotted.startswith(BLOCK_PREFIX):
            pm.register(load_object(dotted), name=f"config:{dotted}")
    for plugin in extra:
        pm.register(plugin)
    if not env_flag(AUTOLOAD_OPT_OUT):
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    pm.check_pending()
    return pm
