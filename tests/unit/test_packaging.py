"""The wheel claims one top-level import name, `pdserve`, and its router loads no torch."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_wheel_has_one_top_level_package_and_a_torch_free_router(tmp_path):
    # Built from a copy: setuptools builds in the source tree (build/, *.egg-info).
    source = tmp_path / "src"
    skip = shutil.ignore_patterns(".*", "build", "*.egg-info", "results", "__pycache__", "tests")
    shutil.copytree(ROOT, source, ignore=skip)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("pdserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"pdserve", next(t for t in top if t.endswith(".dist-info"))}, top
    for must in (
        "pdserve/cli.py",
        "pdserve/router/service.py",
        "pdserve/engine/core/scheduler.py",
        "pdserve/bench/serve.py",
        "pdserve/v1/generate_pb2.py",
        "pdserve/deploy/local.yaml",
    ):
        assert must in names, must
    # Import from the wheel itself (pure Python: zipimport), away from the checkout.
    code = (
        f"import sys; sys.path.insert(0, {str(wheel)!r}); "
        "import pdserve.router.service, pdserve.router.server; "
        f"assert pdserve.__file__.startswith({str(wheel)!r}), pdserve.__file__; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
