"""The architecture the code claims, checked by reading it: the layers (core, built-ins, the
transformers adapter, apps) import only the layers below them, the core imports nothing from the
framework adapters, and the modules import each other without a cycle (imports inside functions
and `TYPE_CHECKING`-only imports included: an annotation cycle is still a design cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nslora_plugin"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every nslora_plugin module `path` imports (anywhere in the file, `TYPE_CHECKING` too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                full = f"{module}.{alias.name}"
                out.add(full if full in modules else module)

        def visit_Import(self, node: ast.Import) -> None:
            out.update(alias.name for alias in node.names)

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    out.discard(name)
    return out


#: The layers, lowest first: a module may import its own layer and the ones before it.
LAYERS = ("nslora_plugin.core", "nslora_plugin.builtins", "nslora_plugin.trainer", "nslora_plugin.apps")


def _layer(module: str) -> int | None:
    for rank, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return None


def _layer_violations(modules: dict[str, Path]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, path in modules.items():
        own = _layer(name)
        if own is None:
            continue
        above = sorted(i for i in _imports(name, path, modules)
                       if (_layer(i) is not None and _layer(i) > own)
                       or i.startswith(("nslora_plugin.integrations", "integrations")))
        if above:
            found[name] = above
    return found


def test_every_module_sits_in_a_layer():
    """Only the package's public face (`nslora_plugin/__init__.py`) stands outside the layers."""
    assert sorted(n for n in _modules() if _layer(n) is None) == ["nslora_plugin"]


def test_layers_import_only_the_layers_below():
    assert _layer_violations(_modules()) == {}


def test_the_core_imports_no_builtin_by_module():
    """Built-ins are loaded by the registry by dotted name (a string), never imported."""
    modules = _modules()
    core = {n: p for n, p in modules.items() if _layer(n) == 0}
    assert {n: sorted(i for i in _imports(n, p, modules) if i.startswith("nslora_plugin.builtins"))
            for n, p in core.items() if any(i.startswith("nslora_plugin.builtins")
                                            for i in _imports(n, p, modules))} == {}


def test_the_layer_check_can_fail(tmp_path):
    """A core module importing a built-in, or a built-in importing the adapter, is caught."""
    core = tmp_path / "loop.py"
    core.write_text("from nslora_plugin.builtins.rewards import BuiltinRewards\n")
    builtin = tmp_path / "router.py"
    builtin.write_text("def f():\n    from nslora_plugin.trainer.callback import NSLoRACallback\n")
    found = _layer_violations({"nslora_plugin.core.loop": core, "nslora_plugin.builtins.router": builtin})
    assert set(found) == {"nslora_plugin.core.loop", "nslora_plugin.builtins.router"}


def test_core_imports_no_adapter():
    modules = _modules()
    offenders = {name: sorted(i for i in _imports(name, path, modules)
                              if i.startswith("nslora_plugin.integrations") or i.startswith("integrations"))
                 for name, path in modules.items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycle_among_core_modules():
    modules = _modules()
    graph = {name: {i for i in _imports(name, path, modules) if i in modules}
             for name, path in modules.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # a package's __init__ importing its own submodules is not a cycle worth reporting
    cycles = [c for c in cycles if not all(m.startswith(c[0]) or c[0].startswith(m) for m in c)]
    assert cycles == [], " -> ".join(cycles[0]) if cycles else ""


def test_the_checks_can_fail(tmp_path):
    """The visitor sees a lazy import inside a function and one under `TYPE_CHECKING` (what a
    cycle through a function or an annotation looks like)."""
    src = tmp_path / "mod.py"
    src.write_text("if TYPE_CHECKING:\n    from .run import Y\ndef f():\n    from .loop import X\n")
    assert "nslora_plugin.core.run" in _imports("nslora_plugin.core.mod", src, {})
    assert "nslora_plugin.core.loop.X" in _imports("nslora_plugin.core.mod", src, {}) or \
        "nslora_plugin.core.loop" in _imports("nslora_plugin.core.mod", src, {})
