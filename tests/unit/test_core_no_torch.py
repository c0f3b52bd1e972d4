"""engine/core must stay pure Python: importing it must not pull in torch."""

import ast
import pathlib
import subprocess
import sys

CORE = pathlib.Path(__file__).resolve().parents[2] / "engine" / "core"


def test_core_sources_do_not_import_torch():
    for path in CORE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("torch", "numpy"), f"{path.name} imports {name}"


def test_importing_core_loads_no_torch():
    code = "import sys, pdserve.engine.core; assert 'torch' not in sys.modules, 'torch was imported'"
    root = CORE.parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
