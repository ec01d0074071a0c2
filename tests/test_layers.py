"""The layers of src/gsq import downward only: no import cycle between modules or between
subpackages, and `gsq.gguf` (the GGUF codec at the bottom) imports nothing of gsq but
`gsq.errors`.

Imports are read with `ast` from every module, those inside functions included (a function-level
import is still a dependency, only a later one).
"""

from __future__ import annotations

import ast
from pathlib import Path

import gsq

ROOT = Path(gsq.__file__).resolve().parent
BOTTOM = "gsq.gguf"
BOTTOM_MAY_IMPORT = ("gsq.errors",)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The gsq module an imported name lives in (`gsq.a.b.c` -> `gsq.a.b` if c is an object)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """gsq module -> the gsq modules it imports (anywhere in its body)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` depends on mod; `from mod import obj` on mod
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            deps |= {m for t in targets if t.split(".")[0] == "gsq"
                     if (m := _resolve(t, modules)) is not None}
        deps.discard(name)
        deps.discard("gsq")  # the package root (the public API) is nobody's dependency
        graph[name] = deps
    return graph


def _subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "gsq.errors" in graph["gsq.gguf.types"]  # module level
    assert "gsq.models.loading" in graph["gsq.export.gguf_file"]  # inside a function


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_import_cycle_between_subpackages():
    packages: dict[str, set[str]] = {}
    for module, deps in import_graph().items():
        packages.setdefault(_subpackage(module), set()).update(
            _subpackage(d) for d in deps if _subpackage(d) != _subpackage(module))
    cycle = find_cycle(packages)
    assert cycle is None, " -> ".join(cycle)


def test_gguf_layer_imports_only_itself_and_errors():
    for module, deps in import_graph().items():
        if module == BOTTOM or module.startswith(BOTTOM + "."):
            upward = sorted(d for d in deps if not (d == BOTTOM or d.startswith(BOTTOM + "."))
                            and d not in BOTTOM_MAY_IMPORT)
            assert not upward, f"{module} imports {upward}"


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
