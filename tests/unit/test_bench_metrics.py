"""Benchmark metric math against hand-computed cases, and run_benchmark end to end
against a small scripted Generation server on 127.0.0.1 (real gRPC, real client)."""

from __future__ import annotations

import asyncio
import json
import math

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdserve.bench.datasets import BenchRequest
from pdserve.bench.metrics import (
    RequestResult,
    compute_metrics,
    count_good_requests,
    format_summary,
    parse_goodput,
    parse_metric_percentiles,
    request_tpot,
)
from pdserve.bench.serve import arrivals, run_benchmark
from pdserve.router.client import AsyncPdserveClient, GenerateComplete, PdserveError
from pdserve.v1 import generate_pb2, generate_pb2_grpc

# r1: 5 tokens, TTFT 100 ms, gaps 20/30/50/100 ms -> E2EL 300 ms, TPOT 200/4 = 50 ms.
# r2: 1 token, TTFT = E2EL = 400 ms: no TPOT sample; TPOT counts as 0 for goodput.
# r3: failed.
R1 = RequestResult(
    success=True,
    prompt_len=10,
    output_tokens=5,
    ttft=0.1,
    itl=[0.02, 0.03, 0.05, 0.1],
    latency=0.3,
    server_timings={
        "queue_ms": 1.0,
        "prefill_ms": 2.0,
        "kv_transfer_ms": 3.0,
        "decode_ms": 4.0,
        "ttft_ms": 90.0,
    },
)
R2 = RequestResult(
    success=True,
    prompt_len=20,
    output_tokens=1,
    ttft=0.4,
    latency=0.4,
    server_timings={
        "queue_ms": 3.0,
        "prefill_ms": 4.0,
        "kv_transfer_ms": 5.0,
        "decode_ms": 6.0,
        "ttft_ms": 390.0,
    },
)
R3 = RequestResult(success=False, prompt_len=30, error="boom")


def test_throughputs_and_counts() -> None:
    m = compute_metrics([R1, R2, R3], duration_s=2.0)
    assert (m["completed"], m["failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 6)
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(3.0)
    assert m["total_token_throughput"] == pytest.approx(18.0)
    assert m["request_goodput"] is None


def test_latency_statistics_follow_vllm_definitions() -> None:
    m = compute_metrics(
        [R1, R2, R3],
        2.0,
        percentile_metrics=("ttft", "tpot", "itl", "e2el"),
        metric_percentiles=(50.0, 99.0, 99.9),
    )
    assert m["mean_ttft_ms"] == pytest.approx(250.0)
    assert m["std_ttft_ms"] == pytest.approx(150.0)
    assert m["p99_ttft_ms"] == pytest.approx(100.0 + 0.99 * 300.0)  # linear interpolation
    assert m["p99.9_ttft_ms"] == pytest.approx(100.0 + 0.999 * 300.0)
    # TPOT only from requests with > 1 output token.
    assert m["mean_tpot_ms"] == pytest.approx(50.0) and m["p99_tpot_ms"] == pytest.approx(50.0)
    # ITL pools every chunk gap of every completed request.
    assert m["mean_itl_ms"] == pytest.approx(50.0)
    assert m["median_itl_ms"] == pytest.approx(40.0)
    assert m["p50_itl_ms"] == pytest.approx(40.0)
    assert m["mean_e2el_ms"] == pytest.approx(350.0)
    assert request_tpot(R1) == pytest.approx(0.05) and request_tpot(R2) == 0.0
    assert m["mean_server_ttft_ms"] == pytest.approx(240.0)
    assert m["mean_server_kv_transfer_ms"] == pytest.approx(4.0)
    assert m["server_ttfts_ms"] == [90.0, 390.0, None]


def test_empty_metric_reports_zero_not_nan() -> None:
    m = compute_metrics([R2], 1.0)
    assert m["mean_tpot_ms"] == 0.0 and m["p99_itl_ms"] == 0.0


@pytest.mark.parametrize(
    ("slos", "good"),
    [
        ({"ttft": 300}, 1),
        ({"tpot": 40}, 1),
        ({"ttft": 500, "tpot": 60}, 2),
        ({"e2el": 350}, 1),
        ({"e2el": 299}, 0),
        ({"ttft": 400, "tpot": 50, "e2el": 400}, 2),
    ],
)
def test_goodput_counts_requests_within_every_slo(slos: dict[str, float], good: int) -> None:
    assert count_good_requests([R1, R2, R3], slos) == good
    assert compute_metrics([R1, R2, R3], 2.0, slos)["request_goodput"] == pytest.approx(good / 2.0)


def test_flag_parsing_and_summary() -> None:
    assert parse_goodput(["ttft:200", "tpot:50.5"]) == {"ttft": 200.0, "tpot": 50.5}
    for bad in (["ttft"], ["itl:5"], ["ttft:x"], ["e2el:-1"]):
        with pytest.raises(ValueError, match="goodput"):
            parse_goodput(bad)
    assert parse_metric_percentiles("50,90,99.9") == [50.0, 90.0, 99.9]
    with pytest.raises(ValueError):
        parse_metric_percentiles("100")
    text = format_summary(compute_metrics([R1, R2], 1.0, {"ttft": 300}), ["ttft"], [99.0])
    assert "Request goodput (req/s):" in text and "P99 TTFT (ms):" in text and "Server ttft" in text


def test_poisson_arrivals_have_the_asked_mean_rate() -> None:
    async def gaps() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        async for _ in arrivals([BenchRequest([1], 1)] * 41, request_rate=400.0, burstiness=1.0, seed=0):
            pass
        return loop.time() - start

    elapsed = asyncio.run(gaps())
    assert 0.04 < elapsed < 0.5  # 40 gaps of mean 2.5 ms = 0.1 s expected


class ScriptedGeneration(generate_pb2_grpc.GenerationServicer):
    """Streams token i+1 for i < max_tokens, 5 ms apart; a prompt starting with 13 gets an Error."""

    async def Generate(self, request, context):
        rid = request.request_id or "srv-1"
        ids = list(request.token_ids.ids)
        if ids and ids[0] == 13:
            yield generate_pb2.GenerateResponse(
                request_id=rid, error=generate_pb2.Error(code=8, message="full")
            )
            return
        await asyncio.sleep(0.02)
        for i in range(request.sampling.max_tokens):
            yield generate_pb2.GenerateResponse(request_id=rid, chunk=generate_pb2.Chunk(token_ids=[i + 1]))
            await asyncio.sleep(0.005)
        yield generate_pb2.GenerateResponse(
            request_id=rid,
            complete=generate_pb2.Complete(
                finish_reason=generate_pb2.FINISH_REASON_LENGTH,
                usage=generate_pb2.Usage(
                    prompt_tokens=len(ids), completion_tokens=request.sampling.max_tokens
                ),
                timings=generate_pb2.Timings(ttft_ms=20.0),
            ),
        )

    async def GetModelInfo(self, request, context):
        return generate_pb2.ModelInfo(model_name="scripted", vocab_size=50, max_model_len=64, eos_token_id=2)


async def _with_server(body):
    server = grpc.aio.server()
    generate_pb2_grpc.add_GenerationServicer_to_server(ScriptedGeneration(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("pdserve.v1.Generation", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        return await body(f"127.0.0.1:{port}")
    finally:
        await server.stop(None)


def test_run_benchmark_against_a_scripted_server() -> None:
    requests = [BenchRequest([5, 6, 7], 4)] * 5 + [BenchRequest([13, 6], 4)]

    async def body(target: str) -> dict:
        async with AsyncPdserveClient(target) as client:
            await client.wait_ready(5.0)
            assert (await client.model_info()).eos_token_id == 2
            events = [e async for e in client.generate([5], max_tokens=2, request_id="mine")]
            assert isinstance(events[-1], GenerateComplete) and events[-1].finish_reason == "length"
            assert [e.token_ids for e in events[:-1]] == [[1], [2]] and events[0].request_id == "mine"
            with pytest.raises(PdserveError) as raised:
                async for _ in client.generate([13]):
                    pass
            assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in raised.value.message
            with pytest.raises(PdserveError) as unimplemented:
                await client.abort("x")
            assert unimplemented.value.code == grpc.StatusCode.UNIMPLEMENTED
        return await run_benchmark(
            target,
            requests,
            request_rate=math.inf,
            max_concurrency=2,
            goodput_slos_ms={"ttft": 10_000},
            timeout=20.0,
        )

    m = asyncio.run(_with_server(body))
    assert (m["completed"], m["failed"]) == (5, 1)
    assert "RESOURCE_EXHAUSTED" in m["errors"][5]
    assert m["output_lens"][:5] == [4] * 5 and m["total_output_tokens"] == 20
    assert m["request_goodput"] == pytest.approx(m["request_throughput"])
    # The client sees at least the server's 20 ms wait before the first token.
    assert all(ttft >= 0.02 for ttft in m["ttfts"][:5])
    assert m["server_ttfts_ms"][:5] == [20.0] * 5 and m["mean_server_ttft_ms"] == 20.0
    assert all(len(gaps) == 3 for gaps in m["itls"][:5])


def test_run_benchmark_timeout_counts_unfinished_requests_as_failed() -> None:
    async def body(target: str) -> dict:
        return await run_benchmark(target, [BenchRequest([5], 200)] * 2, timeout=0.3)

    m = asyncio.run(_with_server(body))
    assert m["completed"] == 0 and m["failed"] == 2
    assert m["duration"] < 2.0


def test_sweep_finds_the_max_rate_meeting_the_slo_and_writes_a_report(tmp_path) -> None:
    from pdserve.bench.sweep import markdown_table, run_sweep, write_report

    stopped, rounds = [], []

    def make_requests(info, round_index: int) -> list[BenchRequest]:
        rounds.append(round_index)
        return [BenchRequest([5, 6], 3)] * 4

    async def body(target: str) -> dict:
        # run_sweep drives its own event loops, so it runs in a thread beside the server's loop.
        return await asyncio.to_thread(
            run_sweep,
            [("scripted", lambda: target, lambda: stopped.append(True))],
            [50.0, math.inf],
            make_requests,
            slos_ms={"ttft": 10_000},
            ready_timeout=5.0,
            timeout=20.0,
        )

    report = asyncio.run(_with_server(body))
    assert stopped == [True]
    assert rounds == [0, 1, 2]  # the warm-up's requests, then fresh ones for each rate
    result = report["deployments"]["scripted"]
    assert [m["meets_slo"] for m in result["runs"]] == [True, True]
    assert result["max_rate_meeting_slo"] == math.inf
    assert "| scripted | inf |" in markdown_table(report)
    written = write_report(report, tmp_path)
    assert (tmp_path / "sweep.md").is_file()
    assert (
        json.loads((tmp_path / "sweep.json").read_text())["deployments"]["scripted"]["runs"][0]["completed"]
        == 4
    )
    assert len(written) >= 2
