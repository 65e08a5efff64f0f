"""Reads a package's import graph from its source (ast, nothing is imported) and checks it against layers."""

from __future__ import annotations

import ast
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    """'retina_fn/data/coco.py' -> 'retina_fn.data.coco'; a package's __init__.py -> the package."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(target: str, known: set[str]) -> str | None:
    """The longest known module that `target` names or lies in (a name imported from a module maps to it)."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: modules of the same top-level package it imports}, for every .py file under `root`
    (imports inside functions count too: a lazy import is still a dependency)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    known, top = set(files), root.name
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.update(f"{base}.{a.name}" for a in node.names)  # a module, or a name in `base`
        resolved = {_resolve(t, known) for t in targets if t == top or t.startswith(top + ".")}
        graph[name] = {t for t in resolved if t and t != name and t != top}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer_violations(graph: dict[str, set[str]], layers: list[tuple[str, ...]]) -> list[str]:
    """'a -> b' for every import of a module from a higher layer (a layer is a tuple of subpackage or
    module names directly under the top package); modules of no layer are reported too."""
    rank = {name: i for i, names in enumerate(layers) for name in names}

    def layer_of(module: str) -> int | None:
        parts = module.split(".")
        return rank.get(parts[1]) if len(parts) > 1 else None

    problems = []
    for src, targets in sorted(graph.items()):
        if len(src.split(".")) > 1 and layer_of(src) is None:
            problems.append(f"{src} is in no layer")
            continue
        for dst in sorted(targets):
            if layer_of(src) is not None and layer_of(dst) is not None and layer_of(dst) > layer_of(src):
                problems.append(f"{src} (layer {layer_of(src)}) -> {dst} (layer {layer_of(dst)})")
    return problems
