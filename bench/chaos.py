"""Recovery from a worker's death on a real deployment (Ray actors, tiny model on CPU).

    python -m pdserve.bench.chaos --kill decode --output bench/results/chaos_cpu.json

Brings up 1 prefill + 2 decode workers (`--kill prefill`: 2 prefill + 1 decode), streams
`--num-requests` greedy requests once undisturbed (the baseline), then again killing one
worker of the `--kill` pool (`ray.kill`; with `--restart` Ray restarts it) once the streams
have received `--kill-after-tokens` tokens in all. It prints and writes:
- the time from the kill to each interrupted stream's next token (the first migrated
  token, for a stream that lived on the killed worker), p50 / p90 / max;
- tokens/s delivered to clients, whole run and from the kill on, against the baseline;
- whether every stream's tokens equal the baseline's (no token missing or repeated), and
  the router's failure counters.
`run_with_kill` is the driver `tests/e2e/test_chaos.py` uses too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pdserve.router.client import AsyncPdserveClient, GenerateChunk, GenerateComplete, PdserveError


@dataclass
class StreamResult:
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # perf_counter at each token's arrival
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None  # "CODE: message" when the stream ended with an error


async def _one_stream(
    client: AsyncPdserveClient, prompt: list[int], sampling: dict[str, Any], progress: Callable[[int], None]
) -> StreamResult:
    result = StreamResult()
    try:
        async for event in client.generate(prompt, **sampling):
            if isinstance(event, GenerateChunk):
                now = time.perf_counter()
                result.tokens += event.token_ids
                result.token_times += [now] * len(event.token_ids)
                progress(len(event.token_ids))
            elif isinstance(event, GenerateComplete):
                result.finish_reason = event.finish_reason
                result.completion_tokens = event.usage.completion_tokens
    except PdserveError as exc:
        result.error = f"{exc.code.name}: {exc.message}"
    return result


async def run_with_kill(
    url: str,
    prompts: list[list[int]],
    sampling: list[dict[str, Any]],
    kill: Callable[[], None] | None = None,
    kill_after_tokens: int = 0,
    timeout_s: float = 120.0,
) -> tuple[list[StreamResult], float | None]:
    """Stream every prompt at once; call `kill()` once `kill_after_tokens` tokens arrived
    in all. Returns each stream's result and when the kill happened (perf_counter)."""
    received = 0
    enough = asyncio.Event()

    def progress(n: int) -> None:
        nonlocal received
        received += n
        if received >= kill_after_tokens:
            enough.set()

    killed_at: float | None = None

    async def killer() -> None:
        nonlocal killed_at
        await enough.wait()
        killed_at = time.perf_counter()
        kill()

    async with AsyncPdserveClient(url) as client:
        task = asyncio.ensure_future(killer()) if kill is not None else None
        streams = [_one_stream(client, p, s, progress) for p, s in zip(prompts, sampling, strict=True)]
        results = await asyncio.wait_for(asyncio.gather(*streams), timeout_s)
        if task is not None:
            if not task.done():
                task.cancel()  # every stream ended before the threshold
            await asyncio.gather(task, return_exceptions=True)
    return results, killed_at


def recovery_figures(results: list[StreamResult], killed_at: float, started: float) -> dict[str, Any]:
    """Next token after the kill per interrupted stream, and delivered tokens/s."""
    delays = []
    for r in results:
        before = sum(t < killed_at for t in r.token_times)
        if 0 < before < len(r.token_times):
            delays.append((r.token_times[before] - killed_at) * 1e3)
    delays.sort()
    end = max((r.token_times[-1] for r in results if r.token_times), default=killed_at)
    after = sum(t >= killed_at for r in results for t in r.token_times)
    total = sum(len(r.tokens) for r in results)
    return {
        "num_interrupted_streams": len(delays),
        "next_token_after_kill_ms": {
            "p50": _pct(delays, 0.5),
            "p90": _pct(delays, 0.9),
            "max": delays[-1] if delays else None,
        },
        "tokens_per_s": total / (end - started),
        "tokens_per_s_after_kill": after / (end - killed_at) if end > killed_at else None,
    }


def _pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _config(kill: str, backend: str) -> Any:
    from pdserve.deploy.config import parse_config

    num_prefill, num_decode = (2, 1) if kill == "prefill" else (1, 2)
    return parse_config(
        {
            "model": "tiny",
            "engine": {"num_gpu_blocks": 1024, "max_num_seqs": 64, "max_num_batched_tokens": 1024},
            "prefill": {"count": num_prefill},
            "decode": {"count": num_decode},
            "transfer": {"backend": backend},
            "router": {"port": 0, "policy_params": {"local_prefill_threshold_tokens": 0}},
            "ray": {"num_cpus": 2, "namespace": "pdserve-chaos"},
        }
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kill", choices=["decode", "prefill"], default="decode")
    ap.add_argument("--backend", choices=["grpc", "nccl"], default="grpc")
    ap.add_argument("--restart", action="store_true", help="let Ray restart the killed worker")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--kill-after-tokens", type=int, default=16 * 32)
    ap.add_argument("--output", help="write the figures here (JSON)")
    args = ap.parse_args(argv)

    import ray

    from pdserve.deploy.launcher import up

    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(args.prompt_len)] for _ in range(args.num_requests)]
    sampling = [{"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True}] * len(prompts)
    dep = up(_config(args.kill, args.backend))
    try:
        started = time.perf_counter()
        baseline, _ = asyncio.run(run_with_kill(dep.url, prompts, sampling))
        baseline_s = max(t for r in baseline for t in r.token_times) - started
        victim = dep.workers[f"{args.kill}-0"]
        started = time.perf_counter()
        results, killed_at = asyncio.run(
            run_with_kill(
                dep.url,
                prompts,
                sampling,
                kill=lambda: ray.kill(victim, no_restart=not args.restart),
                kill_after_tokens=args.kill_after_tokens,
            )
        )
        status = dep.status()
    finally:
        dep.down()
    same = sum(r.tokens == b.tokens for r, b in zip(results, baseline, strict=True))
    report = {
        "command": "python -m pdserve.bench.chaos " + " ".join(argv if argv is not None else _argv()),
        "args": vars(args),
        "baseline_tokens_per_s": sum(len(r.tokens) for r in baseline) / baseline_s,
        **recovery_figures(results, killed_at, started),
        "num_streams_equal_to_baseline": same,
        "num_streams_failed": sum(r.error is not None for r in results),
        "errors": sorted({r.error for r in results if r.error}),
        "router_stats": status["stats"],
    }
    print(json.dumps(report, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if report["num_streams_equal_to_baseline"] != len(prompts):
        raise SystemExit("some streams differ from the undisturbed run")


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
