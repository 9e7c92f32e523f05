"""The package's shape: no import circle in `proxy/`, and imports at the top of modules.

Imports are read with `ast` from the source, so a circle hidden by an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"

# Imports inside a function that defer something heavy or optional, and only those (module: imported names).
DEFERRED = {
    "proxy.cli": {"uvloop"},
    "proxy.comfy.frontend": {"comfyui_frontend_package"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = here.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported(path: Path, known: dict[str, Path]) -> list[tuple[str, ast.stmt]]:
    """Every `proxy.*` module this file imports, with the statement that does it."""
    here = module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[str, ast.stmt]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node) for alias in node.names if alias.name.startswith("proxy")]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(node, here, path.name == "__init__.py")
            if not target.startswith("proxy"):
                continue
            for alias in node.names:   # `from proxy.api import files` imports the module proxy.api.files
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in known else target, node))
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {target for target, _ in imported(path, known) if target in known and target != name}
            for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A depth-first search that returns the first circle it meets, as the modules along it."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_finder_reports_a_circle_it_is_given() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_in_the_package() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def _function_imports(path: Path) -> list[tuple[int, set[str]]]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, set[str]]] = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                found.append((node.lineno, {a.name for a in node.names}))
            elif isinstance(node, ast.ImportFrom):
                found.append((node.lineno, {node.module or ""}))
    return found


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_inside_functions_only_defer_heavy_or_optional_ones(name: str) -> None:
    allowed = DEFERRED.get(name, set())
    hidden = [(line, mods) for line, mods in _function_imports(modules()[name]) if not mods <= allowed]
    assert not hidden, f"{name}: imports inside functions at lines {[line for line, _ in hidden]}: {hidden}"
