"""The load generator against 1P1D on a two-node Ray cluster (prefill pool on one
node, decode pool on the other), through the router's gRPC API.

A short `bench.sweep` (two rates) must come back complete and consistent: no
failures, exactly the asked output lengths, metrics within sane bounds, report
files written. And the bench's client-side TTFT must agree with the router's own
`ttft_ms` at low load, i.e. the client does not distort what it measures.
"""

from __future__ import annotations

import asyncio
import json
import statistics

import pytest

from pdserve.bench.datasets import sample_random
from pdserve.bench.serve import run_benchmark
from pdserve.bench.sweep import run_sweep, write_report
from pdserve.deploy.launcher import up
from tests.e2e.conftest import tiny_config, two_node_cluster

ray = pytest.importorskip("ray")

VOCAB_SIZE, EOS_TOKEN_ID = 258, 257  # the built-in tiny model
NUM_PROMPTS = 16
RATES = [4.0, float("inf")]
SLOS_MS = {"ttft": 2000.0, "tpot": 500.0}


@pytest.fixture(scope="module")
def deployment():
    with two_node_cluster("pdserve-test-bench"):
        dep = up(tiny_config(1, 1, "grpc", two_nodes=True))
        try:
            yield dep
        finally:
            dep.down()


def test_pools_on_different_nodes(deployment):
    nodes = {wid: ray.get(handle.node_id.remote()) for wid, handle in deployment.workers.items()}
    assert nodes["prefill-0"] != nodes["decode-0"]


def check_run(metrics: dict, requests) -> None:
    asked = [r.output_len for r in requests]
    assert metrics["failed"] == 0, metrics["errors"]
    assert metrics["completed"] == len(requests)
    assert metrics["output_lens"] == asked
    assert metrics["input_lens"] == [r.prompt_len for r in requests]
    assert metrics["total_output_tokens"] == sum(asked)
    for ttft, e2el, tpot, server_ttft in zip(
        metrics["ttfts"], metrics["e2els"], metrics["tpots"], metrics["server_ttfts_ms"], strict=True
    ):
        assert 0 < ttft <= e2el < 60
        assert tpot > 0  # every request asks for > 1 token
        assert server_ttft is not None and 0 < server_ttft <= ttft * 1000.0
    assert metrics["request_throughput"] > 0 and metrics["output_throughput"] > 0
    assert 0 <= metrics["request_goodput"] <= metrics["request_throughput"] + 1e-9
    assert 0.0 <= metrics["slo_attainment"] <= 1.0
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < metrics[f"median_{name}_ms"] <= metrics[f"p99_{name}_ms"]
    assert metrics["median_ttft_ms"] <= metrics["median_e2el_ms"]
    # ITL gaps add up to the time after the first token
    for itls, ttft, e2el in zip(metrics["itls"], metrics["ttfts"], metrics["e2els"], strict=True):
        assert sum(itls) == pytest.approx(e2el - ttft, abs=1e-6)


def test_sweep_results_complete_and_consistent(deployment, tmp_path):
    # output lengths vary (range ratio 0.5) so "exactly as asked" is checked per request; each
    # round (the warm-up, then each rate) gets prompts of its own, as the CLI's seed + round gives
    rounds: dict[int, list] = {}

    def make_requests(info, round_index: int) -> list:
        return rounds.setdefault(
            round_index,
            sample_random(
                NUM_PROMPTS, 64, 12, 0.5, VOCAB_SIZE, seed=round_index, excluded_token_ids=[EOS_TOKEN_ID]
            ),
        )

    spec = ("1p1d", lambda: deployment.url, lambda: None)  # deployment is brought down by the fixture
    report = run_sweep([spec], RATES, make_requests, slos_ms=SLOS_MS, timeout=60.0)
    runs = report["deployments"]["1p1d"]["runs"]
    assert [m["request_rate"] for m in runs] == RATES
    assert sorted(rounds) == list(range(len(RATES) + 1))
    for round_index, metrics in enumerate(runs, start=1):
        check_run(metrics, rounds[round_index])
        assert metrics["total_cached_tokens"] == 0  # no rate re-sends an earlier round's prompts
    paths = write_report(report, tmp_path)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["deployments"]["1p1d"]["runs"][0]["completed"] == NUM_PROMPTS
    table = (tmp_path / "sweep.md").read_text()
    assert table.count("| 1p1d | ") == 1 + len(RATES)  # summary row + one per rate
    assert all(path.exists() for path in paths)


def test_client_ttft_agrees_with_router(deployment):
    """Sequential requests: the client's TTFT is the router's ttft_ms plus the gRPC hop.

    The hop (request in, first chunk out, on loopback) costs about 1-1.5 ms on this
    machine whatever the prompt, so prompts are long enough (1024 tokens, all distinct:
    no cache hits) that prefill dominates and 5% is a real bound on what the client adds.
    """
    requests = sample_random(8, 1024, 4, 0.0, VOCAB_SIZE, seed=7, excluded_token_ids=[EOS_TOKEN_ID])
    metrics = asyncio.run(run_benchmark(deployment.url, requests, max_concurrency=1, timeout=60.0))
    assert metrics["failed"] == 0, metrics["errors"]
    client_ms = [t * 1000.0 for t in metrics["ttfts"]]
    server_ms = metrics["server_ttfts_ms"]
    # the client's interval contains the router's, for every request (the first one included:
    # the bench connects before it starts the clock)
    assert all(s < c for c, s in zip(client_ms, server_ms, strict=True))
    client_median, server_median = statistics.median(client_ms), statistics.median(server_ms)
    print(f"median TTFT: client {client_median:.2f} ms, router {server_median:.2f} ms")
    assert client_median == pytest.approx(server_median, rel=0.05), (client_ms, server_ms)


def test_client_time_per_output_token_agrees_with_router(deployment):
    """The client's mean time per output token (TPOT: first token to last over output tokens
    - 1) equals the router's `decode_ms / (output tokens - 1)` within 5%: both span first
    token to last. (Not the client's ITL, which is per chunk: outputs that pile up while the
    router is busy leave as one chunk, so a chunk can carry several tokens.)"""
    output_len = 64
    requests = sample_random(4, 128, output_len, 0.0, VOCAB_SIZE, seed=11, excluded_token_ids=[EOS_TOKEN_ID])
    metrics = asyncio.run(run_benchmark(deployment.url, requests, max_concurrency=1, timeout=60.0))
    assert metrics["failed"] == 0, metrics["errors"]
    server_tpot_ms = metrics["mean_server_decode_ms"] / (output_len - 1)
    print(f"mean TPOT: client {metrics['mean_tpot_ms']:.3f} ms, router {server_tpot_ms:.3f} ms")
    assert metrics["mean_tpot_ms"] == pytest.approx(server_tpot_ms, rel=0.05)
