"""The import graph of src/: no cycle, and no import from a lower layer to a higher one.

Every import that runs counts, also those inside functions (the lazy ones that keep `synprobe punch`
fast): a lazy import that runs back up is still a cycle waiting for the first caller that
imports both modules at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# Lowest first. A module may import from its own layer and the layers before it.
LAYERS: list[tuple[str, ...]] = [
    ("simulsyn_core",),
    ("synprobe.packets", "synprobe.rawnet", "synprobe.state", "synprobe.cliutil", "synprobe.schema",
     "=synprobe"),
    ("synprobe.natcheck", "synprobe.analyze", "synprobe.punch_pcap", "synprobe.lab",
     "synprobe.report"),
    ("synprobe.cli", "synprobe.__main__"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under ``if TYPE_CHECKING:`` (imports for annotations only,
    which never run)."""
    out: list[ast.AST] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``name`` imports (a package's submodule where it is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(name: str) -> int:
    best, depth = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix.startswith("="):  # that module alone (a package's __init__)
                if name == prefix[1:]:
                    return i
            elif (name == prefix or name.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = i, len(prefix)
    assert best >= 0, f"{name}: in no layer of test_layers.LAYERS (add it where it belongs)"
    return best


def test_every_module_has_a_layer() -> None:
    for name in graph():
        layer_of(name)


def test_no_import_runs_up_a_layer() -> None:
    wrong = [f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
             for name, targets in graph().items() for target in sorted(targets)
             if layer_of(target) > layer_of(name)]
    assert wrong == []


def test_the_core_imports_nothing_from_synprobe() -> None:
    wrong = [(name, t) for name, targets in graph().items() if name.startswith("simulsyn_core")
             for t in targets if t.startswith("synprobe")]
    assert wrong == []


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, the first again at the end), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle() -> None:
    # A package's __init__ that re-exports its submodules is an edge down, never back up.
    assert find_cycle(graph()) is None


def package_of(name: str) -> str:
    """synprobe.natcheck.client -> synprobe.natcheck; synprobe.cli -> synprobe.cli."""
    return ".".join(name.split(".")[:2])


def test_no_cycle_between_packages() -> None:
    """synprobe.cli may import synprobe.natcheck, but then nothing in synprobe.natcheck
    may import synprobe.cli, not even lazily."""
    packages: dict[str, set[str]] = {}
    for name, targets in graph().items():
        edges = packages.setdefault(package_of(name), set())
        edges.update(package_of(t) for t in targets if package_of(t) != package_of(name))
    assert find_cycle(packages) is None


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
