"""The plugin registry: one pluggy manager per run. The built-in behaviour is registered as
plugins exactly like third parties' — loaded by dotted name, as pytest loads its own plugins, so
the core imports none of them — under the names nslora.rewards, nslora.router, nslora.augment,
nslora.editor.constraint, nslora.editor.demonstrations, nslora.editor.textgrad,
nslora.editor.gepa and nslora.report;
third parties come from the config's `plugins`, from code, and from the `nslora` entry-point group
(opt out with NSLORA_DISABLE_PLUGIN_AUTOLOAD=1)."""

from __future__ import annotations

import importlib
from typing import Any, Iterable

import pluggy

from nslora_plugin.core import hookspecs
from nslora_plugin.core.config import NSLoRAConfig
from nslora_plugin.core.util import env_flag

AUTOLOAD_OPT_OUT = "NSLORA_DISABLE_PLUGIN_AUTOLOAD"

#: Every built-in plugin: its registered name and where it lives.
BUILTINS: dict[str, str] = {
    "nslora.rewards": "nslora_plugin.builtins.rewards:BuiltinRewards",
    "nslora.router.prior": "nslora_plugin.builtins.router:PriorRouter",
    "nslora.router.learned": "nslora_plugin.builtins.router:LearnedRouter",
    "nslora.augment": "nslora_plugin.builtins.augment:PromptsAsData",
    "nslora.editor.constraint": "nslora_plugin.builtins.editors.constraint:ConstraintEditor",
    "nslora.editor.demonstrations": "nslora_plugin.builtins.editors.demonstrations:DemonstrationsEditor",
    "nslora.editor.textgrad": "nslora_plugin.builtins.editors.textgrad:TextGradEditor",
    "nslora.editor.gepa": "nslora_plugin.builtins.editors.gepa:GEPAEditor",
    "nslora.report": "nslora_plugin.apps.report.plugin:RunReportWriter",
}


def builtin_names(config: NSLoRAConfig) -> list[tuple[str, str]]:
    """The built-ins this config asks for, as (registered name, BUILTINS key), in registration
    order (pluggy calls the last registered first)."""
    names = [("nslora.rewards", "nslora.rewards"),
             ("nslora.router", f"nslora.router.{'learned' if config.router == 'learned' else 'prior'}"),
             ("nslora.augment", "nslora.augment")]
    if config.editor == "constraint" or (config.editor != "none" and config.editor_fallback == "constraint"):
        names.append(("nslora.editor.constraint", "nslora.editor.constraint"))
    if config.editor in ("demonstrations", "textgrad", "gepa"):
        names.append((f"nslora.editor.{config.editor}", f"nslora.editor.{config.editor}"))
    if config.report:
        names.append(("nslora.report", "nslora.report"))
    return names


def builtin_plugins(config: NSLoRAConfig) -> list[tuple[str, Any]]:
    """The default stages, loaded by name, in registration order."""
    return [(name, load_object(BUILTINS[key])) for name, key in builtin_names(config)]


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
    for name, key in builtin_names(config):
        if not pm.is_blocked(name):
            pm.register(load_object(BUILTINS[key]), name=name)
    for dotted in config.plugins:
        if not dotted.startswith(BLOCK_PREFIX):
            pm.register(load_object(dotted), name=f"config:{dotted}")
    for plugin in extra:
        pm.register(plugin)
    if not env_flag(AUTOLOAD_OPT_OUT):
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    pm.check_pending()
    return pm
