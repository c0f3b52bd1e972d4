"""The `pdserve` command as a user runs it: the README's serve command (foreground, with
the demo completion), and two named detached deployments on one host driven by
`generate --url`, `status --name` and `down --name`. No test here runs `ray stop`: each
stops only the Ray processes its own `pdserve up` started."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("ray")
PDSERVE = [sys.executable, "-m", "pdserve"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def home(tmp_path, monkeypatch):
    """Deployment records of this test only."""
    monkeypatch.setenv("PDSERVE_HOME", str(tmp_path))
    return tmp_path


def pdserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*PDSERVE, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_serve_local_yaml_streams_a_demo_completion(home):
    out = pdserve(
        "up", "deploy/local.yaml", "--port", "0", "--http-port", "0", "--demo", "--serve-seconds", "1"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(
        r"pdserve is serving tiny at 127\.0\.0\.1:\d+ \(1P/1D/0 co-located, transfer grpc", out.stdout
    )
    assert re.search(r"OpenAI-compatible HTTP at http://127\.0\.0\.1:\d+/v1 \(metrics: ", out.stdout)
    assert "[length] prompt 16 tokens" in out.stderr and "32 generated" in out.stderr
    assert not os.listdir(home / "deployments")  # the foreground deployment's record went with it


def _processes(cmdline_part: str = "", environ_part: str = "") -> list[int]:
    """This host's processes whose command line and environment hold these strings."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().decode(errors="replace")
        except OSError:
            continue
        if cmdline_part in cmdline and environ_part in environ:
            found.append(int(pid))
    return found


def _head_processes(name: str) -> list[int]:
    """The `ray start` / GCS / raylet of the head `pdserve up --detach --name NAME` started."""
    return _processes(cmdline_part=f"pdserve-ray/{name}")


def test_two_detached_deployments_are_isolated(home):
    """Two named deployments on one host: each has its own Ray head and namespace; `status` and
    `down` act on the named one only; `down` stops the head its `up` started and nothing else,
    and `up --detach` after `down` works."""
    names = [f"cli-a-{os.getpid()}", f"cli-b-{os.getpid()}"]
    urls = {}
    try:
        for name in names:
            out = pdserve(
                "up", "deploy/local.yaml", "--port", "0", "--http-port", "0", "--detach", "--name", name
            )
            assert out.returncode == 0, out.stderr[-2000:]
            urls[name] = re.search(r"at (127\.0\.0\.1:\d+)", out.stdout).group(1)
        out = pdserve(
            "up", "deploy/local.yaml", "--port", "0", "--http-port", "0", "--detach", "--name", names[0]
        )
        assert out.returncode == 2 and out.stderr.strip() == (
            f"pdserve: error: deployment '{names[0]}' is already up (router at {urls[names[0]]}): "
            f"`pdserve down --name {names[0]}` first, or pick another --name"
        )
        status = pdserve("status")
        assert status.returncode == 2 and "several deployments on this host: pass --name" in status.stderr
        status = pdserve("status", "--name", names[1])
        assert status.returncode == 0, status.stderr[-2000:]
        assert f"deployment '{names[1]}' (namespace pdserve-{names[1]}" in status.stdout
        assert "router ready: True" in status.stdout
        assert re.search(r"prefill-0\s+prefill\s+0/4096", status.stdout)
        down = pdserve("down", "--name", names[0])
        assert down.returncode == 0, down.stderr[-2000:]
        assert f"stopped 3 pdserve actor(s) of deployment '{names[0]}'" in down.stdout
        assert "stopped the Ray head it started" in down.stdout
        assert not _head_processes(names[0]) and _head_processes(names[1])
        gen = pdserve("generate", "--url", urls[names[1]], "--prompt", "Hello", "--max-tokens", "8")
        assert gen.returncode == 0 and "8 generated" in gen.stderr, gen.stderr[-2000:]
        out = pdserve("up", "deploy/local.yaml", "--port", "0", "--detach", "--name", names[0])
        assert out.returncode == 0, out.stderr[-2000:]  # up --detach after down
    finally:
        downs = [pdserve("down", "--name", name) for name in names]
    assert all(d.returncode == 0 for d in downs), [d.stderr[-1000:] for d in downs]
    assert not _head_processes(names[0]) and not _head_processes(names[1])
    # nothing this test's commands started is left, Ray's worker processes included
    assert not _processes(environ_part=f"PDSERVE_HOME={home}\0")
    assert not os.listdir(home / "deployments")


def test_user_errors_are_one_line():
    out = pdserve("up", "deploy/no-such.yaml")
    assert (
        out.returncode == 2
        and out.stderr.strip() == "pdserve: error: config file 'deploy/no-such.yaml' does not exist"
    )
    out = pdserve("generate", "--model", "/no/such/dir", "--prompt", "x")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "/no/such/dir" in out.stderr
