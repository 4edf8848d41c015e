"""The import graph of trex_serve, drawn from the source (ast; nothing is imported): every import
between two packages points down the layers, so no two packages import each other, and the core
never imports Ray (deployments/ does)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "trex_serve"

# Top to bottom. A package may import its own modules and any package below it, never one above.
LAYERS = [
    ("local",),  # one machine's tooling: the CLI, the processes it starts
    ("runtime",),  # builds a replica's collaborators
    ("web",),  # HTTP front ends
    ("pipeline",),  # the request path
    ("cache", "conversations"),  # the response cache and stored responses
    ("api",),  # the client wires: schemas, checks, Responses <-> chat
    ("admission",),
    ("routing",),
    ("billing",),
    ("hop",),
    ("providers",),
    ("store", "migrations"),
    ("observability",),
    ("settings", "catalog", "errors", "redis_durability", "gc_settings"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}

# Imports that still point up, each a (module, imported module) pair: the list may only shrink.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, lazily inside a function or not."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            else:
                found.add(node.module or "")
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_package_has_a_layer():
    packages = {_package(m) for m in _graph()} - {"trex_serve"}
    assert packages <= set(RANK), f"add to LAYERS: {sorted(packages - set(RANK))}"


def test_imports_point_down_the_layers():
    upward = set()
    for module, imported in _graph().items():
        for target in imported:
            if not target.startswith("trex_serve.") or _package(module) == "trex_serve":
                continue
            src, dst = _package(module), _package(target)
            if src != dst and RANK[src] > RANK[dst]:
                upward.add((module, target))
    assert upward - KNOWN_UPWARD == set(), "imports that point up the layers"
    assert KNOWN_UPWARD - upward == set(), "fixed: take these out of KNOWN_UPWARD"


def test_no_cycle_between_packages():
    edges: dict[str, set[str]] = {}
    for module, imported in _graph().items():
        for target in imported:
            if target.startswith("trex_serve.") and (module, target) not in KNOWN_UPWARD:
                src, dst = _package(module), _package(target)
                if src != dst and src != "trex_serve":
                    edges.setdefault(src, set()).add(dst)
    seen: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, f"import cycle: {' -> '.join([*path[path.index(node):], node])}"
        if node in seen:
            return
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, [*path, node])
        seen.add(node)

    for start in sorted(edges):
        visit(start, [])


def test_the_core_never_imports_ray():
    ray = {m for m, imported in _graph().items() if any(t == "ray" or t.startswith("ray.") for t in imported)}
    assert ray == set()
