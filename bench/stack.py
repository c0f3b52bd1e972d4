"""Measurements of the whole serving stack on CPU with the tiny model (issues 3 and 4).

    python -m pdserve.bench.stack all --output bench/results/cpu_stack.json

`streaming` (issue 3): 1P1D from deploy/cpu-1p1d.yaml.
  - capacity: 64 concurrent streams through the router; output tokens/s delivered
    to the clients, next to the offline engine's tokens/s for the same prompts
    (LLM.generate, all at once, after the deployment is down) as the ceiling.
  - added TTFT: sequential requests (no queueing); for each prompt the offline
    engine's own prefill (one LLMEngine.step() that computes the prompt and samples
    the first token, in this process, just before the request), the router's
    ttft_ms, and the client's TTFT. Added = those minus the engine's prefill.
`policy` (issue 4): 2 prefill + 2 decode workers, a prefix-sharing workload
  (prefix-repetition) through the gRPC API, once per policy, in one run: total
  cached_tokens and median TTFT. local_prefill_threshold_tokens is 0, so every
  request is prefilled by the prefill pool and the policies differ only in which
  prefill (and decode) worker they pick; with the default 256, a request whose
  decode worker already holds the prefix would prefill its short remainder there.

Every server binds 127.0.0.1. Prints a table; writes JSON.
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

import numpy as np

from pdserve.bench.datasets import BenchRequest, sample_prefix_repetition, sample_random
from pdserve.bench.serve import run_benchmark
from pdserve.deploy.launcher import up
from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine

TINY_VOCAB_SIZE, TINY_EOS = 258, 257
CONFIG_1P1D = "deploy/cpu-1p1d.yaml"


def engine_prefill_ms(engine: LLMEngine, request_id: str, prompt: list[int]) -> float:
    """Wall time of the one engine step that computes `prompt` and samples its first token."""
    engine.add_request(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    start = time.perf_counter()
    outputs = engine.step()
    elapsed_ms = (time.perf_counter() - start) * 1e3
    if not any(out.req_id == request_id and out.new_token_ids for out in outputs):
        raise RuntimeError(f"{request_id}: the prompt did not finish prefill in one step")
    return elapsed_ms


def offline_tokens_per_s(requests: list[BenchRequest]) -> float:
    """The engine alone, every prompt at once: the ceiling for what the stack can deliver."""
    llm = LLM("tiny", num_gpu_blocks=4096, max_num_seqs=128, max_num_batched_tokens=2048)
    prompts = [r.prompt_token_ids for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    llm.generate(prompts[:8], params[:8])  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outputs) / elapsed


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def measure_streaming(args: argparse.Namespace) -> dict[str, object]:
    stream_requests = sample_random(
        args.streams * args.waves,
        args.stream_input_len,
        args.stream_output_len,
        0.0,
        TINY_VOCAB_SIZE,
        seed=1,
        excluded_token_ids=[TINY_EOS],
    )
    ttft_requests = sample_random(
        args.ttft_requests,
        args.ttft_input_len,
        4,
        0.0,
        TINY_VOCAB_SIZE,
        seed=2,
        excluded_token_ids=[TINY_EOS],
    )
    # the engine the deployment's workers run, without prefix caching (every prompt is new anyway)
    # and synchronous, as the prefill role runs it: with async scheduling a step returns the
    # previous step's tokens, so the prompt's first token would come out of the step after.
    engine = LLMEngine(
        EngineConfig(
            model="tiny",
            num_gpu_blocks=4096,
            max_num_batched_tokens=2048,
            enable_prefix_caching=False,
            async_scheduling=False,
        )
    )
    for index in range(3):  # the first steps are slow (allocator, kernels): not measured
        engine_prefill_ms(engine, f"warm-up-{index}", ttft_requests[index].prompt_token_ids)
    dep = up(CONFIG_1P1D)
    try:
        # warm-up of the stack (first prefill, first KV transfer), not measured
        asyncio.run(run_benchmark(dep.url, stream_requests[:4], timeout=60.0))
        per_request = []
        for index, request in enumerate(ttft_requests):
            engine_ms = engine_prefill_ms(engine, f"ttft-{index}", request.prompt_token_ids)
            metrics = asyncio.run(run_benchmark(dep.url, [request], timeout=60.0))
            if metrics["failed"]:
                raise RuntimeError(f"TTFT request {index} failed: {metrics['errors']}")
            per_request.append(
                {
                    "engine_prefill_ms": engine_ms,
                    "router_ttft_ms": metrics["server_ttfts_ms"][0],
                    "client_ttft_ms": metrics["ttfts"][0] * 1e3,
                }
            )
        capacity = asyncio.run(
            run_benchmark(dep.url, stream_requests, max_concurrency=args.streams, timeout=300.0)
        )
    finally:
        dep.down()
    if capacity["failed"]:
        raise RuntimeError(f"{capacity['failed']} streams failed: {set(capacity['errors'])}")
    num_chunks = sum(len(itls) + 1 for itls in capacity["itls"])
    # per request: what the client waited beyond the router's own ttft_ms (the router's clock
    # starts when its handler runs, so this holds the wait to be accepted and the way back)
    ttft_gaps_ms = [
        client_s * 1e3 - router_ms
        for client_s, router_ms in zip(capacity["ttfts"], capacity["server_ttfts_ms"], strict=True)
        if client_s is not None and router_ms is not None
    ]
    engine_ceiling = offline_tokens_per_s(stream_requests)
    columns = {key: [row[key] for row in per_request] for key in per_request[0]}
    engine_med = median(columns["engine_prefill_ms"])
    return {
        "config": CONFIG_1P1D,
        "streams": {
            "concurrent_streams": args.streams,
            "num_requests": len(stream_requests),
            "input_len": args.stream_input_len,
            "output_len": args.stream_output_len,
            "duration_s": capacity["duration"],
            "delivered_output_tokens_per_s": capacity["output_throughput"],
            "offline_engine_output_tokens_per_s": engine_ceiling,
            "tokens_per_chunk": capacity["total_output_tokens"] / num_chunks,
            "median_ttft_ms": capacity["median_ttft_ms"],
            "median_router_ttft_ms": median([t for t in capacity["server_ttfts_ms"] if t is not None]),
            "median_ttft_gap_ms": median(ttft_gaps_ms),
            "p90_ttft_gap_ms": float(np.percentile(ttft_gaps_ms, 90)) if ttft_gaps_ms else float("nan"),
            "median_itl_ms": capacity["median_itl_ms"],
            "p99_itl_ms": capacity["p99_itl_ms"],
        },
        "added_ttft": {
            "num_requests": len(per_request),
            "input_len": args.ttft_input_len,
            "median_engine_prefill_ms": engine_med,
            "median_router_ttft_ms": median(columns["router_ttft_ms"]),
            "median_client_ttft_ms": median(columns["client_ttft_ms"]),
            "median_router_added_ms": median(
                [r["router_ttft_ms"] - r["engine_prefill_ms"] for r in per_request]
            ),
            "median_client_added_ms": median(
                [r["client_ttft_ms"] - r["engine_prefill_ms"] for r in per_request]
            ),
            "per_request": per_request,
        },
    }


def measure_policies(args: argparse.Namespace) -> dict[str, object]:
    requests = sample_prefix_repetition(
        args.policy_requests,
        args.prefix_len,
        args.suffix_len,
        args.num_prefixes,
        args.policy_output_len,
        TINY_VOCAB_SIZE,
        seed=3,
        excluded_token_ids=[TINY_EOS],
    )
    results: dict[str, object] = {}
    for policy in ("round_robin", "cache_aware"):
        overrides = {
            "prefill.count": 2,
            "decode.count": 2,
            "router.policy": policy,
            "router.policy_params": {"local_prefill_threshold_tokens": 0},
        }
        dep = up(CONFIG_1P1D, overrides=overrides)
        try:
            metrics = asyncio.run(
                run_benchmark(dep.url, requests, request_rate=args.policy_rate, seed=0, timeout=300.0)
            )
        finally:
            dep.down()
        if metrics["failed"]:
            raise RuntimeError(f"{policy}: {metrics['failed']} requests failed: {set(metrics['errors'])}")
        results[policy] = {
            "total_cached_tokens": metrics["total_cached_tokens"],
            "total_input_tokens": metrics["total_input_tokens"],
            "cached_fraction": metrics["total_cached_tokens"] / metrics["total_input_tokens"],
            "median_ttft_ms": metrics["median_ttft_ms"],
            "p99_ttft_ms": metrics["p99_ttft_ms"],
            "median_router_ttft_ms": median([t for t in metrics["server_ttfts_ms"] if t is not None]),
            "median_e2el_ms": metrics["median_e2el_ms"],
            "request_throughput": metrics["request_throughput"],
        }
    return {
        "workers": "2 prefill + 2 decode",
        "policy_params": {"local_prefill_threshold_tokens": 0},
        "workload": {
            "dataset": "prefix-repetition",
            "num_requests": args.policy_requests,
            "prefix_len": args.prefix_len,
            "suffix_len": args.suffix_len,
            "num_prefixes": args.num_prefixes,
            "output_len": args.policy_output_len,
            "request_rate": args.policy_rate,
        },
        "policies": results,
    }


def format_tables(report: dict[str, object]) -> str:
    lines = []
    if "streaming" in report:
        s, a = report["streaming"]["streams"], report["streaming"]["added_ttft"]
        lines += [
            f"1P1D, {s['concurrent_streams']} concurrent streams ({s['num_requests']} requests, "
            f"{s['input_len']} in / {s['output_len']} out):",
            f"  delivered to clients   {s['delivered_output_tokens_per_s']:8.0f} output tok/s",
            f"  offline engine alone   {s['offline_engine_output_tokens_per_s']:8.0f} output tok/s",
            f"  tokens per chunk       {s['tokens_per_chunk']:8.2f}",
            f"  median / p99 ITL       {s['median_itl_ms']:8.1f} / {s['p99_itl_ms']:.1f} ms",
            f"  median TTFT client / router  {s['median_ttft_ms']:.1f} / {s['median_router_ttft_ms']:.1f} ms",
            f"  client - router TTFT   {s['median_ttft_gap_ms']:8.1f} ms median, "
            f"{s['p90_ttft_gap_ms']:.1f} ms p90 (per request)",
            f"Added TTFT, {a['num_requests']} sequential {a['input_len']}-token prompts (medians):",
            f"  engine prefill step    {a['median_engine_prefill_ms']:8.2f} ms",
            f"  router ttft_ms         {a['median_router_ttft_ms']:8.2f} ms "
            f"(+{a['median_router_added_ms']:.2f})",
            f"  client TTFT            {a['median_client_ttft_ms']:8.2f} ms "
            f"(+{a['median_client_added_ms']:.2f})",
        ]
    if "policy" in report:
        p = report["policy"]
        w = p["workload"]
        lines += [
            f"{p['workers']}, prefix-repetition {w['num_requests']} requests ({w['num_prefixes']} prefixes x "
            f"{w['prefix_len']} + {w['suffix_len']} tokens, {w['output_len']} out, "
            f"{w['request_rate']:g} req/s), local_prefill_threshold_tokens=0:",
            f"  {'policy':<12} {'cached tok':>10} {'cached %':>8} {'p50 TTFT':>9} {'p99 TTFT':>9}",
        ]
        for name, r in p["policies"].items():
            lines.append(
                f"  {name:<12} {r['total_cached_tokens']:>10} {r['cached_fraction']:>8.1%} "
                f"{r['median_ttft_ms']:>9.1f} {r['p99_ttft_ms']:>9.1f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    # One intra-op thread, as each Ray worker gets (OMP_NUM_THREADS=1): the offline engine is
    # then the same engine the workers run, and does not fight them for the 2 cores.
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(
        prog="python -m pdserve.bench.stack", description=__doc__.splitlines()[0]
    )
    parser.add_argument("what", choices=("streaming", "policy", "all"), nargs="?", default="all")
    parser.add_argument("--output", default="bench/results/cpu_stack.json")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--waves", type=int, default=3, help="requests = streams * waves")
    parser.add_argument("--stream-input-len", type=int, default=128)
    parser.add_argument("--stream-output-len", type=int, default=128)
    parser.add_argument("--ttft-requests", type=int, default=16)
    parser.add_argument("--ttft-input-len", type=int, default=512)
    parser.add_argument("--policy-requests", type=int, default=64)
    parser.add_argument("--prefix-len", type=int, default=512)
    parser.add_argument("--suffix-len", type=int, default=64)
    parser.add_argument("--num-prefixes", type=int, default=16)
    parser.add_argument("--policy-output-len", type=int, default=16)
    parser.add_argument("--policy-rate", type=float, default=8.0)
    args = parser.parse_args(argv)
    report: dict[str, object] = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "args": vars(args)}
    if args.what in ("streaming", "all"):
        report["streaming"] = measure_streaming(args)
    if args.what in ("policy", "all"):
        report["policy"] = measure_policies(args)
    print(format_tables(report))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
