"""No two router modules import each other, not even under TYPE_CHECKING."""

import ast
from pathlib import Path

ROUTER = Path(__file__).resolve().parents[2] / "router"


def imported_router_modules(path: Path) -> set[str]:
    """The router modules `path` imports anywhere in its source (top level, functions, TYPE_CHECKING)."""
    modules = {p.stem for p in ROUTER.glob("*.py")}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from inside the router package
                target = f"router.{node.module}" if node.module else "router"
            else:
                target = node.module or ""
            names = [target]
            if target == "router":  # `from router import x`, `from . import x`: x may be a module
                names += [f"router.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "router" and len(parts) > 1 and parts[1] in modules:
                found.add(parts[1])
    found.discard(path.stem)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # module -> "visiting" | "done"

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "visiting"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "visiting":
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])) is not None:
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])) is not None:
            return cycle
    return None


def test_find_cycle_sees_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_parsing_sees_type_checking_and_package_forms(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import router.policy\n"
        "from router import kv_index\n"
        "from .routing import RouteRequest\n"
        "if TYPE_CHECKING:\n"
        "    from router.worker_state import WorkerStateTracker\n"
    )
    assert imported_router_modules(source) == {"policy", "kv_index", "routing", "worker_state"}


def test_router_modules_import_each_other_without_cycles() -> None:
    graph = {path.stem: imported_router_modules(path) for path in ROUTER.glob("*.py")}
    assert graph["policy"] >= {"worker_state", "routing"}  # the walk does see router imports
    assert find_cycle(graph) is None, f"router import cycle: {' -> '.join(find_cycle(graph))}"
