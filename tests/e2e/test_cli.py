"""The `pdserve` command as a user runs it: the README's serve command (foreground, with
the demo completion), and a detached deployment driven by `generate --url`, `status`
and `down`."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("ray")
PDSERVE = [sys.executable, "-m", "pdserve"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pdserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*PDSERVE, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_serve_local_yaml_streams_a_demo_completion():
    subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "stop", "--force"], capture_output=True
    )
    out = pdserve(
        "up", "deploy/local.yaml", "--port", "0", "--http-port", "0", "--demo", "--serve-seconds", "1"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(
        r"pdserve is serving tiny at 127\.0\.0\.1:\d+ \(1P/1D/0 co-located, transfer grpc", out.stdout
    )
    assert re.search(r"OpenAI-compatible HTTP at http://127\.0\.0\.1:\d+/v1 \(metrics: ", out.stdout)
    assert "[length] prompt 16 tokens" in out.stderr and "32 generated" in out.stderr


def test_detached_deployment_status_generate_down():
    subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "stop", "--force"], capture_output=True
    )
    try:
        out = pdserve("up", "deploy/local.yaml", "--port", "0", "--http-port", "0", "--detach")
        assert out.returncode == 0, out.stderr[-2000:]
        url = re.search(r"at (127\.0\.0\.1:\d+)", out.stdout).group(1)
        gen = pdserve("generate", "--url", url, "--prompt", "Hello", "--max-tokens", "8")
        assert gen.returncode == 0, gen.stderr[-2000:]
        assert "8 generated" in gen.stderr
        status = pdserve("status")
        assert status.returncode == 0, status.stderr[-2000:]
        assert "router ready: True" in status.stdout
        assert re.search(r"prefill-0\s+prefill\s+0/4096", status.stdout)
        assert re.search(r"decode-0\s+decode\s+0/4096", status.stdout)
    finally:
        down = pdserve("down", "--stop-ray")
    assert down.returncode == 0 and "stopped 3 pdserve actor(s)" in down.stdout, down.stdout + down.stderr


def test_user_errors_are_one_line():
    out = pdserve("up", "deploy/no-such.yaml")
    assert (
        out.returncode == 2
        and out.stderr.strip() == "pdserve: error: config file 'deploy/no-such.yaml' does not exist"
    )
    out = pdserve("generate", "--model", "/no/such/dir", "--prompt", "x")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "/no/such/dir" in out.stderr
