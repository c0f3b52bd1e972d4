"""The field's load generators against pdserve's OpenAI-compatible HTTP API: guidellm and AIPerf.

Both run unchanged from their PyPI releases (guidellm 0.8.1, aiperf 0.13.0 when written)
against an in-process 1P1D deployment of a save_pretrained instruct checkpoint (they read
its tokenizer to make prompts), with few requests, and their own reports are parsed: zero
failed requests, and the token counts they report equal the server's usage (the router's
`/metrics` counters).

The tools are not dependencies of pdserve: `bash scripts/quickstart.sh test` (CI) installs
both from PyPI into `.venv-tools` (with the CPU torch that guidellm needs) and points
PDSERVE_GUIDELLM / PDSERVE_AIPERF at them. By hand, install each in a virtual environment of
its own and set those variables, or put the tools on PATH; without one its test is skipped.

    python -m venv /tmp/guidellm && /tmp/guidellm/bin/pip install guidellm
    python -m venv /tmp/aiperf && /tmp/aiperf/bin/pip install aiperf
    PDSERVE_GUIDELLM=/tmp/guidellm/bin/guidellm PDSERVE_AIPERF=/tmp/aiperf/bin/aiperf \\
        python -m pytest tests/e2e/test_bench_tools_e2e.py
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.engine.config import EngineConfig
from tests.hf_models import LLAMA3_TEMPLATE, make_checkpoint, save_chat_tokenizer
from tests.inprocess import InProcessDeployment

OUTPUT_TOKENS = 8


def _tool(name: str) -> str:
    path = os.environ.get(f"PDSERVE_{name.upper()}") or shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        pytest.skip(f"{name} is not installed (set PDSERVE_{name.upper()} to its executable)")
    return path


@pytest.fixture
def guidellm() -> str:
    return _tool("guidellm")


@pytest.fixture
def aiperf() -> str:
    return _tool("aiperf")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("instruct"))
    make_checkpoint("llama", directory)
    save_chat_tokenizer(directory, LLAMA3_TEMPLATE)
    dep = InProcessDeployment(engine=EngineConfig(model=directory, num_gpu_blocks=512))
    yield dep, directory
    dep.close()


def _counters(url: str) -> dict[str, float]:
    """The router's token and request counters, summed over labels."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("pdserve:prompt_tokens_total", "pdserve:generation_tokens_total") or (
                sample.name == "pdserve:request_success_total"
            ):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _system_temp_entries(pattern: str) -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), pattern)))


def _run(cmd: list[str], cwd: str) -> None:
    """Run a client tool in `cwd`, which also holds its temporary files (AIPerf leaves an
    aiperf_mmap_* directory in the system temp dir after every run otherwise)."""
    env = {**os.environ, "TMPDIR": cwd}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


@pytest.mark.parametrize(
    "profile, count", [("kind=synchronous", 6), ("kind=constant,rate=4", 8)], ids=["synchronous", "constant"]
)
def test_guidellm(guidellm, served, tmp_path, profile, count):  # the tool first: no deployment to skip
    dep, model_dir = served
    before = _counters(dep.http_url)
    report = tmp_path / "report.json"
    _run(
        [
            guidellm, "run",
            "--backend", f"kind=openai_http,target={dep.http_url}",
            "--profile", profile,
            "--constraint", f"kind=max_requests,count={count}",
            "--data", f"kind=synthetic_text,prompt_tokens=16,output_tokens={OUTPUT_TOKENS}",
            "--tokenizer", f"kind=huggingface_auto,model={model_dir}",
            "--output", f"kind=json,path={report}",
            "--disable-console-interactive",
        ],
        str(tmp_path),
    )  # fmt: skip
    after = _counters(dep.http_url)
    benchmark = json.loads(report.read_text())["benchmarks"][0]
    requests = benchmark["requests"]
    assert len(requests["errored"]) == 0 and len(requests["incomplete"]) == 0
    assert len(requests["successful"]) == count
    assert all(r["output_tokens"] == OUTPUT_TOKENS for r in requests["successful"])
    assert _delta(after, before, "pdserve:request_success_total") == count
    assert sum(r["output_tokens"] for r in requests["successful"]) == _delta(
        after, before, "pdserve:generation_tokens_total"
    )
    assert sum(r["prompt_tokens"] for r in requests["successful"]) == _delta(
        after, before, "pdserve:prompt_tokens_total"
    )


def test_aiperf(aiperf, served, tmp_path):
    dep, model_dir = served
    name = os.path.basename(model_dir)
    count = 8
    before = _counters(dep.http_url)
    temp_before = _system_temp_entries("aiperf_mmap_*")
    _run(
        [
            aiperf, "profile", "-m", name, "--url", dep.http_url,
            "--endpoint-type", "chat", "--streaming", "--tokenizer", model_dir,
            "--request-count", str(count), "--concurrency", "2",
            "--prompt-input-tokens-mean", "16", "--prompt-input-tokens-stddev", "0",
            "--prompt-output-tokens-mean", str(OUTPUT_TOKENS), "--prompt-output-tokens-stddev", "0",
            "--extra-inputs", "ignore_eos:true", "--random-seed", "1",
            "--output-artifact-dir", str(tmp_path / "out"), "--ui-type", "none", "--no-gpu-telemetry",
        ],
        str(tmp_path),
    )  # fmt: skip
    after = _counters(dep.http_url)
    assert _system_temp_entries("aiperf_mmap_*") == temp_before  # its files stayed in tmp_path
    export = json.loads((tmp_path / "out" / "profile_export_aiperf.json").read_text())
    assert export["request_error_rate"]["avg"] == 0.0
    assert export["completed_request_count"]["avg"] == count
    # AIPerf's own record of the server's usage, per request and in total
    assert (
        export["usage_completion_tokens"]["min"] == export["usage_completion_tokens"]["max"] == OUTPUT_TOKENS
    )
    completion = export["total_usage_completion_tokens"]["avg"]
    assert completion == count * OUTPUT_TOKENS == _delta(after, before, "pdserve:generation_tokens_total")
    assert export["total_usage_prompt_tokens"]["avg"] == _delta(after, before, "pdserve:prompt_tokens_total")
    assert _delta(after, before, "pdserve:request_success_total") == count
