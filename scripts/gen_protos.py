"""Regenerate the committed Python modules for every `.proto` under `proto/`.

    python scripts/gen_protos.py          # rewrite the *_pb2.py, *_pb2.pyi, *_pb2_grpc.py files
    python scripts/gen_protos.py --check  # exit 1 if a committed file differs from fresh output

Why a pinned, old grpcio-tools: generated `_pb2.py` files refuse to import under a
protobuf runtime older than the protoc that wrote them, and `_pb2_grpc.py` files
refuse a grpcio older than the grpcio-tools that wrote them. Generating with
grpcio-tools 1.66.2 (protoc for protobuf 5.27.2) keeps the stubs importable from
grpcio>=1.66 / protobuf>=5.27 (the floors in pyproject.toml) up to the newest
releases. When the current interpreter does not have exactly that version, this
script installs it once with pip into a cache folder (`--target`, never into the
active environment) and runs protoc from there.

Files are compiled with `-I proto`, so the modules import as `pdserve.v1.generate_pb2`
and their cross-imports read `from pdserve.v1 import ...`.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GRPCIO_TOOLS_VERSION = "1.66.2"

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def find_proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every `.proto` under `proto_root`, as paths relative to it, sorted."""
    return sorted(path.relative_to(proto_root) for path in proto_root.rglob("*.proto"))


def _installed_grpc_tools_version() -> str | None:
    try:
        return importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pdserve" / f"grpcio-tools-{GRPCIO_TOOLS_VERSION}"


def ensure_pinned_tools() -> dict[str, str]:
    """Return the environment under which `python -m grpc_tools.protoc` is the pinned version.

    Installs the pinned grpcio-tools into a cache folder on first use.
    """
    env = dict(os.environ)
    if _installed_grpc_tools_version() == GRPCIO_TOOLS_VERSION:
        return env
    target = _cache_dir()
    if not (target / "grpc_tools").is_dir():
        print(f"installing grpcio-tools=={GRPCIO_TOOLS_VERSION} into {target} (once)", file=sys.stderr)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Install into a fresh sibling folder and rename, so an interrupted install
        # never leaves a half-filled cache that looks complete.
        staging = Path(tempfile.mkdtemp(prefix="grpcio-tools-", dir=target.parent))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-warn-conflicts",
                "--target",
                str(staging),
                f"grpcio-tools=={GRPCIO_TOOLS_VERSION}",
            ],
            check=True,
        )
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def compile_protos(out_dir: Path, proto_root: Path = PROTO_ROOT, env: dict[str, str] | None = None) -> None:
    """Write the generated modules of every `.proto` under `proto_root` into `out_dir`."""
    protos = find_proto_files(proto_root)
    if not protos:
        raise SystemExit(f"no .proto files under {proto_root}")
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in protos],
    ]
    subprocess.run(command, check=True, cwd=proto_root, env=env)


def _generated_files(root: Path) -> set[Path]:
    return {
        path.relative_to(root)
        for path in root.rglob("*")
        if path.is_file() and path.name.endswith(GENERATED_SUFFIXES)
    }


def _ensure_package_inits(proto_root: Path) -> None:
    # Each folder holding generated modules must be a regular package so
    # `pdserve.v1` and `pdserve.internal` import the same way installed or not.
    for proto in find_proto_files(proto_root):
        folder = proto_root / proto.parent
        while folder != proto_root:
            init = folder / "__init__.py"
            if not init.exists():
                init.touch()
                print(f"created {init.relative_to(REPO_ROOT)}")
            folder = folder.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with fresh output; change nothing")
    args = parser.parse_args(argv)

    env = ensure_pinned_tools()
    with tempfile.TemporaryDirectory() as scratch:
        fresh_root = Path(scratch)
        compile_protos(fresh_root, env=env)
        fresh = _generated_files(fresh_root)
        committed = _generated_files(PROTO_ROOT)
        differing = sorted(
            str(rel)
            for rel in fresh
            if rel not in committed or not filecmp.cmp(fresh_root / rel, PROTO_ROOT / rel, shallow=False)
        )
        orphaned = sorted(str(rel) for rel in committed - fresh)
        if args.check:
            for rel in differing:
                print(f"stale: proto/{rel}")
            for rel in orphaned:
                print(f"orphaned (its .proto is gone): proto/{rel}")
            if differing or orphaned:
                print("run: python scripts/gen_protos.py", file=sys.stderr)
                return 1
            print(f"generated modules are up to date ({len(fresh)} files)")
            return 0
        for rel in sorted(fresh):
            destination = PROTO_ROOT / rel
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fresh_root / rel, destination)
        for rel in orphaned:
            (PROTO_ROOT / rel).unlink()
            print(f"removed orphaned proto/{rel}")
    _ensure_package_inits(PROTO_ROOT)
    print(f"wrote {len(fresh)} files with grpcio-tools {GRPCIO_TOOLS_VERSION} ({len(differing)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
