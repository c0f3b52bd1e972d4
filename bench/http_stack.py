"""Streaming through the router's OpenAI-compatible HTTP API against its gRPC API, one run.

    python -m pdserve.bench.http_stack --output bench/results/cpu_http_stack.json

One 1P1D deployment of the tiny model on CPU (deploy/cpu-1p1d.yaml, HTTP on a free port),
the same random prompts (token ids, ignore_eos, exact output lengths) sent as `streams`
concurrent streams through each API in turn, alternating gRPC, HTTP, gRPC, HTTP, ...
(`rounds` of each, so the machine's drift falls on both). The figure is output tokens
delivered to the clients per second of wall time; the verdict is the ratio of the medians,
HTTP over gRPC. HTTP streams are `/v1/completions` with `stream: true` and
`stream_options.include_usage`, read by an aiohttp client that parses every SSE event;
the gRPC ones go through `pdserve bench serve`'s client. Every server binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import aiohttp

from pdserve.bench.datasets import BenchRequest, sample_random
from pdserve.bench.openai_backend import sse_events
from pdserve.bench.serve import run_benchmark
from pdserve.deploy.launcher import up

TINY_VOCAB_SIZE, TINY_EOS = 258, 257
CONFIG_1P1D = "deploy/cpu-1p1d.yaml"


async def _http_stream(session: aiohttp.ClientSession, url: str, request: BenchRequest) -> int:
    """One streamed completion; returns its completion tokens (from the usage event)."""
    body = {
        "model": "tiny",
        "prompt": request.prompt_token_ids,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage, done = None, False
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        async for event in sse_events(response):
            if event is None:  # data: [DONE]
                done = True
                break
            usage = event.get("usage") or usage
    if not done or usage is None:
        raise RuntimeError("the stream ended without usage or [DONE]")
    return usage["completion_tokens"]


async def run_http(base_url: str, requests: list[BenchRequest], streams: int) -> dict[str, float]:
    limiter = asyncio.Semaphore(streams)
    connector = aiohttp.TCPConnector(limit=streams)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(request: BenchRequest) -> int:
            async with limiter:
                return await _http_stream(session, base_url + "/v1/completions", request)

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(r) for r in requests))
        elapsed = time.perf_counter() - start
    expected = sum(r.output_len for r in requests)
    if sum(tokens) != expected:
        raise RuntimeError(f"HTTP delivered {sum(tokens)} tokens, expected {expected}")
    return {"output_tokens": sum(tokens), "duration_s": elapsed, "output_tokens_per_s": sum(tokens) / elapsed}


def run_grpc(target: str, requests: list[BenchRequest], streams: int) -> dict[str, float]:
    metrics = asyncio.run(run_benchmark(target, requests, max_concurrency=streams, timeout=600.0))
    if metrics["failed"]:
        raise RuntimeError(f"{metrics['failed']} gRPC streams failed: {set(metrics['errors'])}")
    return {
        "output_tokens": metrics["total_output_tokens"],
        "duration_s": metrics["duration"],
        "output_tokens_per_s": metrics["output_throughput"],
    }


def measure(args: argparse.Namespace) -> dict[str, object]:
    requests = sample_random(
        args.streams * args.waves,
        args.input_len,
        args.output_len,
        0.0,
        TINY_VOCAB_SIZE,
        seed=1,
        excluded_token_ids=[TINY_EOS],
    )
    dep = up(CONFIG_1P1D, overrides={"router.http_port": 0})
    runs: dict[str, list[dict[str, float]]] = {"grpc": [], "http": []}
    try:
        # warm-up of both paths (first prefill, first KV transfer, connections), not measured
        run_grpc(dep.url, requests[:4], args.streams)
        asyncio.run(run_http(dep.http_url, requests[:4], args.streams))
        for _ in range(args.rounds):
            runs["grpc"].append(run_grpc(dep.url, requests, args.streams))
            runs["http"].append(asyncio.run(run_http(dep.http_url, requests, args.streams)))
    finally:
        dep.down()
    median = {k: statistics.median(r["output_tokens_per_s"] for r in v) for k, v in runs.items()}
    return {
        "config": CONFIG_1P1D,
        "concurrent_streams": args.streams,
        "requests_per_run": len(requests),
        "input_len": args.input_len,
        "output_len": args.output_len,
        "runs": runs,
        "grpc_output_tokens_per_s": median["grpc"],
        "http_output_tokens_per_s": median["http"],
        "http_over_grpc": median["http"] / median["grpc"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="bench/results/cpu_http_stack.json")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--waves", type=int, default=2, help="requests per run = streams * waves")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each API, alternating")
    args = parser.parse_args(argv)
    result = measure(args)
    given = argv if argv is not None else sys.argv[1:]
    result["command"] = " ".join(["python -m pdserve.bench.http_stack", *given])
    result["date"] = datetime.now().isoformat(timespec="seconds")
    print(f"{'API':<6}{'tok/s (median)':>16}   runs")
    for api in ("grpc", "http"):
        per_run = ", ".join(f"{r['output_tokens_per_s']:.0f}" for r in result["runs"][api])
        print(f"{api:<6}{result[f'{api}_output_tokens_per_s']:>16.0f}   {per_run}")
    print(f"HTTP / gRPC = {result['http_over_grpc']:.3f} (target >= 0.9)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
