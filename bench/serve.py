"""Load generator against the router's gRPC API (`pdserve bench serve`), or any OpenAI-compatible server.

    python -m pdserve.bench.serve --url 127.0.0.1:50051 --dataset random --num-prompts 200 \\
        --random-input-len 512 --random-output-len 128 --request-rate 8 --goodput ttft:500 tpot:50
    python -m pdserve.bench.serve --backend openai --url http://127.0.0.1:8000 --vocab-size 258 ...

`--dataset multi-turn` runs conversations (bench/multiturn.py) instead of independent
requests: --multi-turn-* size them, --max-concurrency bounds the requests in flight.

`--backend openai` streams `/v1/completions` (bench/openai_backend.py): pdserve's HTTP API,
vLLM or SGLang, measured the same way.

Flags, metric names and definitions follow vLLM's `vllm bench serve` (see
bench/metrics.py). Requests are token ids with `ignore_eos` and exact
`max_tokens`, so output lengths are as asked. The run is bounded: it sends
--num-prompts requests and gives up on whatever is unfinished after --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np

from pdserve.bench.datasets import (
    DATASET_NAMES,
    BenchRequest,
    check_fits_model,
    sample_prefix_repetition,
    sample_random,
    sample_sharegpt_synthetic,
)
from pdserve.bench.metrics import (
    RequestResult,
    compute_metrics,
    format_summary,
    parse_goodput,
    parse_metric_percentiles,
    parse_percentile_metrics,
)
from pdserve.bench.multiturn import (
    add_multi_turn_arguments,
    build_conversations,
    format_multi_turn,
    run_multi_turn,
)
from pdserve.bench.openai_backend import OpenAIBackendError, OpenAISender
from pdserve.engine.gc_heap import frozen_heap
from pdserve.router.client import AsyncPdserveClient, GenerateChunk, GenerateComplete, ModelInfo, PdserveError


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag but the target; shared with bench.sweep."""
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests/s; inf sends all at once, else arrivals are Poisson (or gamma)",
    )
    parser.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of inter-arrival times: 1 = Poisson, < 1 burstier, > 1 steadier",
    )
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dataset", "--dataset-name", dest="dataset", choices=DATASET_NAMES, default="random"
    )
    parser.add_argument("--random-input-len", type=int, default=1024)
    parser.add_argument("--random-output-len", type=int, default=128)
    parser.add_argument("--random-range-ratio", type=float, default=0.0)
    parser.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    parser.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    parser.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    parser.add_argument("--prefix-repetition-output-len", type=int, default=128)
    add_multi_turn_arguments(parser)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (vLLM's default)")
    parser.add_argument(
        "--goodput",
        nargs="+",
        default=[],
        metavar="NAME:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000",
    )
    parser.add_argument("--percentile-metrics", default="ttft,tpot,itl")
    parser.add_argument("--metric-percentiles", default="99")
    parser.add_argument("--save-result", action="store_true")
    parser.add_argument("--result-dir", default=".")
    parser.add_argument("--result-filename", default=None)
    parser.add_argument("--label", default=None)
    parser.add_argument(
        "--vocab-size", type=int, default=None, help="default: the model's, from GetModelInfo"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    parser.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for the router")
    parser.add_argument("--disable-tqdm", action="store_true")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="router gRPC address HOST:PORT (openai: the base URL)")
    parser.add_argument(
        "--backend",
        choices=("pdserve", "openai"),
        default="pdserve",
        help="pdserve: the gRPC API; openai: POST /v1/completions of any OpenAI-compatible server",
    )
    parser.add_argument(
        "--model", default=None, help="openai backend: the model name (default: the first listed)"
    )
    add_workload_arguments(parser)


class _GrpcSender:
    """The gRPC API behind the interface `OpenAISender` has (wait_ready, send)."""

    def __init__(self, target: str) -> None:
        self.client = AsyncPdserveClient(target)

    async def __aenter__(self) -> _GrpcSender:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.__aexit__(*exc)

    async def wait_ready(self, timeout: float) -> None:
        await self.client.wait_ready(timeout)

    async def send(self, request: BenchRequest, temperature: float, deadline: float) -> RequestResult:
        return await send_one(self.client, request, temperature, deadline)


def open_sender(backend: str, target: str, model: str | None = None) -> _GrpcSender | OpenAISender:
    return OpenAISender(target, model) if backend == "openai" else _GrpcSender(target)


def build_requests(args: argparse.Namespace, info: ModelInfo, seed: int | None = None) -> list[BenchRequest]:
    """The workload named by the flags, sized to the model's vocabulary and context; `seed`
    (default: the flags') draws it."""
    seed = args.seed if seed is None else seed
    vocab_size = args.vocab_size or info.vocab_size
    excluded = [info.eos_token_id] if info.eos_token_id is not None else []
    if args.dataset == "random":
        requests = sample_random(
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            vocab_size,
            seed,
            excluded,
        )
    elif args.dataset == "multi-turn":
        raise ValueError(
            "multi-turn turns depend on earlier replies: run it with `bench serve`, not as loose requests"
        )
    elif args.dataset == "prefix-repetition":
        requests = sample_prefix_repetition(
            args.num_prompts,
            args.prefix_repetition_prefix_len,
            args.prefix_repetition_suffix_len,
            args.prefix_repetition_num_prefixes,
            args.prefix_repetition_output_len,
            vocab_size,
            seed,
            excluded,
        )
    else:
        max_total = min(2048, info.max_model_len) if info.max_model_len else 2048
        requests = sample_sharegpt_synthetic(
            args.num_prompts,
            vocab_size,
            seed,
            excluded,
            max_prompt_len=min(1024, max_total - 4),
            max_total_len=max_total,
        )
    if info.max_model_len:
        check_fits_model(requests, info.max_model_len)
    return requests


async def arrivals(
    requests: Sequence[BenchRequest], request_rate: float, burstiness: float, seed: int
) -> AsyncIterator[tuple[int, BenchRequest]]:
    """Yield requests at the given rate: gamma inter-arrival gaps with mean 1/rate (vLLM's scheme)."""
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    rng = np.random.default_rng(seed)
    for index, request in enumerate(requests):
        yield index, request
        if math.isinf(request_rate) or index == len(requests) - 1:
            continue
        theta = 1.0 / (request_rate * burstiness)
        await asyncio.sleep(float(rng.gamma(shape=burstiness, scale=theta)))


async def send_one(
    client: AsyncPdserveClient, request: BenchRequest, temperature: float, deadline: float
) -> RequestResult:
    """Stream one request and time it the way vLLM does (perf_counter at each chunk)."""
    result = RequestResult(prompt_len=request.prompt_len)
    start = time.perf_counter()
    last_chunk_at = start
    try:
        async for event in client.generate(
            request.prompt_token_ids,
            max_tokens=request.output_len,
            temperature=temperature,
            ignore_eos=True,
            timeout=max(0.001, deadline - time.monotonic()),
        ):
            now = time.perf_counter()
            result.request_id = event.request_id or result.request_id
            if isinstance(event, GenerateChunk):
                if not event.token_ids:
                    continue
                if result.output_tokens == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last_chunk_at)
                result.output_tokens += len(event.token_ids)
                result.output_token_ids.extend(event.token_ids)
                last_chunk_at = now
            elif isinstance(event, GenerateComplete):
                result.finish_reason = event.finish_reason
                result.cached_tokens = event.usage.cached_tokens
                result.server_timings = {
                    name: getattr(event.timings, name)
                    for name in ("queue_ms", "prefill_ms", "kv_transfer_ms", "decode_ms", "ttft_ms")
                }
                result.success = event.finish_reason != "abort" and result.output_tokens > 0
                if not result.success:
                    result.error = f"finished with {event.finish_reason} after {result.output_tokens} tokens"
        result.latency = last_chunk_at - start
        if not result.success and not result.error:
            result.error = "stream ended without a completion"
    except PdserveError as error:
        result.success, result.error = False, str(error)
    return result


class _Progress:
    """tqdm when installed, else one line rewritten in place."""

    def __init__(self, total: int, disable: bool) -> None:
        self.total, self.done, self._bar = total, 0, None
        self.disable = disable
        if not disable:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc="requests")

    def update(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif not self.disable:
            print(f"\rrequests: {self.done}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif not self.disable:
            print(file=sys.stderr)


async def run_benchmark(
    target: str,
    requests: Sequence[BenchRequest],
    request_rate: float = float("inf"),
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    seed: int = 0,
    temperature: float = 0.0,
    goodput_slos_ms: dict[str, float] | None = None,
    percentile_metrics: Sequence[str] = ("ttft", "tpot", "itl"),
    metric_percentiles: Sequence[float] = (99.0,),
    timeout: float = 3600.0,
    disable_progress: bool = True,
    backend: str = "pdserve",
    model: str | None = None,
) -> dict[str, object]:
    """Send `requests` to the router at `target` (through `backend`) and return the metrics dict.

    Requests unfinished when `timeout` seconds have passed are cancelled and
    counted as failed.
    """
    if not requests:
        raise ValueError("no requests to send")
    results: list[RequestResult | None] = [None] * len(requests)
    limiter = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    progress = _Progress(len(requests), disable_progress)
    deadline = time.monotonic() + timeout

    async with open_sender(backend, target, model) as client:
        # Connect before the clock starts: otherwise the first request's TTFT also holds
        # the TCP + HTTP/2 handshake (~6 ms on loopback), which the server never sees.
        await client.wait_ready(timeout)

        async def limited(index: int, request: BenchRequest) -> None:
            if limiter is None:
                results[index] = await client.send(request, temperature, deadline)
            else:
                async with limiter:
                    results[index] = await client.send(request, temperature, deadline)
            progress.update()

        async def dispatch() -> None:
            tasks = []
            try:
                async for index, request in arrivals(requests, request_rate, burstiness, seed):
                    tasks.append(asyncio.create_task(limited(index, request)))
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        # What is alive now stays out of garbage collection for the run, as in vLLM's bench
        # serve: a full collection in this process (torch, Ray, gRPC loaded) takes ~85 ms on
        # the 2-core CPU bench and would hold every stream's sends and reads, so the measured
        # TTFTs would include it.
        with frozen_heap():
            start = time.perf_counter()
            try:
                await asyncio.wait_for(dispatch(), timeout=timeout)
            except asyncio.TimeoutError:
                pass
        duration = time.perf_counter() - start
    progress.close()

    finished = [
        r
        if r is not None
        else RequestResult(prompt_len=q.prompt_len, error=f"not finished within --timeout {timeout:g} s")
        for r, q in zip(results, requests, strict=False)
    ]
    metrics = compute_metrics(finished, duration, goodput_slos_ms, percentile_metrics, metric_percentiles)
    metrics.update(
        request_rate=request_rate,
        burstiness=burstiness,
        max_concurrency=max_concurrency,
        num_prompts=len(requests),
    )
    return metrics


def default_result_filename(label: str | None, request_rate: float, max_concurrency: int | None) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{label or 'pdserve'}-{request_rate:g}qps-concurrency{max_concurrency or 'none'}-{stamp}.json"


async def _model_info(args: argparse.Namespace) -> ModelInfo:
    if args.backend == "openai":
        async with OpenAISender(args.url, args.model) as sender:
            await sender.wait_ready(args.ready_timeout)
            info = await sender.model_info(args.vocab_size)
        args.model = info.model_name
        return info
    async with AsyncPdserveClient(args.url) as client:
        await client.wait_ready(args.ready_timeout)
        return await client.model_info()


async def _run_multi_turn(
    args: argparse.Namespace,
    info: ModelInfo,
    goodput: dict[str, float],
    percentile_metrics: list[str],
    percentiles: list[float],
) -> dict[str, object]:
    if args.backend != "pdserve":
        raise ValueError(
            "--dataset multi-turn needs --backend pdserve: each turn resends the reply's token ids"
        )
    if not math.isinf(args.request_rate):
        raise ValueError(
            "--request-rate does not apply to --dataset multi-turn: every conversation starts at once, "
            "--max-concurrency bounds the requests in flight and --multi-turn-think-time paces the turns"
        )
    conversations = build_conversations(args, info)
    print(
        f"{info.model_name}: {len(conversations)} conversations x {args.multi_turn_turns} turns "
        f"(max concurrency {args.max_concurrency}, think time {args.multi_turn_think_time:g} s)",
        file=sys.stderr,
    )
    return await run_multi_turn(
        lambda: open_sender(args.backend, args.url),
        conversations,
        args.max_concurrency,
        args.multi_turn_think_time,
        args.seed,
        args.temperature,
        percentile_metrics,
        percentiles,
        args.timeout,
        goodput,
    )


async def _main_async(args: argparse.Namespace) -> dict[str, object]:
    info = await _model_info(args)
    goodput = parse_goodput(args.goodput)
    percentile_metrics = parse_percentile_metrics(args.percentile_metrics)
    percentiles = parse_metric_percentiles(args.metric_percentiles)
    if args.dataset == "multi-turn":
        metrics = await _run_multi_turn(args, info, goodput, percentile_metrics, percentiles)
        print(format_summary(metrics, percentile_metrics, percentiles))
        print(format_multi_turn(metrics))
        return _finish(args, info, metrics, goodput)
    requests = build_requests(args, info)
    print(
        f"{info.model_name}: {len(requests)} {args.dataset} requests at rate {args.request_rate:g}/s "
        f"(burstiness {args.burstiness:g}, max concurrency {args.max_concurrency})",
        file=sys.stderr,
    )
    metrics = await run_benchmark(
        args.url,
        requests,
        args.request_rate,
        args.burstiness,
        args.max_concurrency,
        args.seed,
        args.temperature,
        goodput,
        percentile_metrics,
        percentiles,
        args.timeout,
        args.disable_tqdm,
        args.backend,
        args.model,
    )
    print(format_summary(metrics, percentile_metrics, percentiles))
    return _finish(args, info, metrics, goodput)


def _finish(
    args: argparse.Namespace, info: ModelInfo, metrics: dict[str, object], goodput: dict[str, float]
) -> dict[str, object]:
    """Label the metrics with the run's settings and save them when asked."""
    metrics.update(
        date=datetime.now().strftime("%Y%m%d-%H%M%S"),
        backend="pdserve-grpc" if args.backend == "pdserve" else "openai",
        label=args.label,
        model_id=info.model_name,
        dataset=args.dataset,
        goodput_slos_ms=goodput,
    )
    if args.save_result:
        result_dir = Path(args.result_dir)
        result_dir.mkdir(parents=True, exist_ok=True)
        path = result_dir / (
            args.result_filename
            or default_result_filename(args.label, args.request_rate, args.max_concurrency)
        )
        path.write_text(json.dumps(metrics, indent=2))
        print(f"result written to {path}", file=sys.stderr)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        asyncio.run(_main_async(args))
    except (PdserveError, OpenAIBackendError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
