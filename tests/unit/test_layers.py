"""The package's layers import downward only, and nothing imports in a circle.

    pdserve.cli                       (the command)
    pdserve.bench                     (load generator, benchmarks: may bring deployments up)
    pdserve.deploy                    (configs, wiring, Ray actors)
    pdserve.router   pdserve.prefill_worker   pdserve.decode_worker
    pdserve.transfer                  (KV connector: contract, backends)
    pdserve.engine                    (engine/core: pure Python)

Static checks read every source file's imports (lazy ones inside functions included);
the runtime checks import modules in a fresh interpreter and look at sys.modules.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Repository folder -> its name under the pdserve import root.
PACKAGES = {
    "engine": "pdserve.engine",
    "transfer": "pdserve.transfer",
    "prefill_worker": "pdserve.prefill_worker",
    "decode_worker": "pdserve.decode_worker",
    "router": "pdserve.router",
    "deploy": "pdserve.deploy",
    "bench": "pdserve.bench",
    "proto/pdserve": "pdserve",
}
# What each layer may import from the project (besides itself and the generated stubs).
ALLOWED = {
    "engine": {"engine"},
    "transfer": {"transfer", "engine"},
    "prefill_worker": {"prefill_worker", "engine", "transfer"},
    "decode_worker": {"decode_worker", "engine", "transfer"},
    "router": {"router", "engine", "transfer"},
    "deploy": {"deploy", "router", "prefill_worker", "decode_worker", "engine", "transfer"},
    "bench": {"bench", "deploy", "router", "prefill_worker", "decode_worker", "engine", "transfer"},
    "cli": {"cli", "deploy", "bench"},
}


def module_name(path: pathlib.Path) -> str:
    for folder, name in PACKAGES.items():
        base = ROOT / folder
        if path.is_relative_to(base):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([name, *parts])
    raise AssertionError(path)


def production_modules() -> dict[str, pathlib.Path]:
    modules = {}
    for folder in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            if "_pb2" not in path.name and "results" not in path.parts:
                modules[module_name(path)] = path
    return modules


def imported_names(path: pathlib.Path) -> list[str]:
    """Every module an `import` or `from ... import` in the file names (absolute imports)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def layer_of(module: str) -> str | None:
    if module == "pdserve.cli" or module == "pdserve.__main__":
        return "cli"
    parts = module.split(".")
    if parts[0] != "pdserve" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in ALLOWED else None


def test_every_import_of_the_project_goes_through_pdserve():
    bare = set(PACKAGES) - {"proto/pdserve"}
    for module, path in production_modules().items():
        for name in imported_names(path):
            assert name.split(".")[0] not in bare, f"{module} imports {name}: use pdserve.{name}"


def test_layers_import_downward_only():
    for module, path in production_modules().items():
        layer = layer_of(module)
        if layer is None:
            continue
        for name in imported_names(path):
            target = layer_of(name)
            if target is not None:
                assert target in ALLOWED[layer], f"{module} ({layer}) imports {name} ({target})"


def test_engine_imports_no_ray_and_no_grpc():
    for module, path in production_modules().items():
        if layer_of(module) == "engine":
            for name in imported_names(path):
                assert name.split(".")[0] not in ("ray", "grpc"), f"{module} imports {name}"


def test_router_sources_import_no_torch():
    for module, path in production_modules().items():
        if layer_of(module) == "router":
            for name in imported_names(path):
                assert name.split(".")[0] not in ("torch", "numpy"), f"{module} imports {name}"


def test_importing_the_router_loads_no_torch():
    router = sorted(m for m in production_modules() if layer_of(m) == "router")
    code = f"import sys; import {', '.join(router)}; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def find_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of two or more modules: the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_find_cycles_sees_a_cycle():
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert find_cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


def test_no_import_cycles():
    """Over every production module's imports (TYPE_CHECKING and lazy ones included)."""
    modules = production_modules()
    graph = {m: sorted({n for n in imported_names(p) if n in modules and n != m}) for m, p in modules.items()}
    cycles = find_cycles(graph)
    assert not cycles, f"import cycles: {cycles}"
