"""The architecture the code claims, checked by reading it: the core imports nothing from the
framework adapters, and the core's modules import each other without a cycle (imports inside
functions and `TYPE_CHECKING`-only imports included: an annotation cycle is still a design cycle)."""

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
    assert "nslora_plugin.run" in _imports("nslora_plugin.mod", src, {})
    assert "nslora_plugin.loop.X" in _imports("nslora_plugin.mod", src, {}) or \
        "nslora_plugin.loop" in _imports("nslora_plugin.mod", src, {})
