"""Microbenchmark: latency of one routing decision at scale.

Builds a tracker with `--num-workers` workers (half prefill, half decode), a KV
index of `--num-blocks` block hashes spread over them as cached prompts, then
times `policy.route`, and route + `tracker.on_routed` (the whole decision path
of a request; `release` runs when it ends and is not timed), for prompts that
partly hit cached prefixes.

    python -m pdserve.bench.route_latency [--num-workers 64 --num-blocks 1000000 --json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from pdserve.engine.core.block_pool import BlockStored
from pdserve.engine.core.outputs import LoadReport
from pdserve.router.kv_index import KVIndex
from pdserve.router.kv_sync import KVEventBatch
from pdserve.router.policy import POLICIES, make_policy
from pdserve.router.routing import RouteRequest
from pdserve.router.worker_state import WorkerStateTracker

BLOCK_SIZE = 16


def build_state(
    num_workers: int, num_blocks: int, prompt_blocks: int, seed: int
) -> tuple[WorkerStateTracker, list[list[int]]]:
    rng = random.Random(seed)
    tracker = WorkerStateTracker(KVIndex(max_entries=num_blocks + 1), clock=lambda: 0.0)
    num_prefill = num_workers // 2
    workers = [f"prefill-{i}" for i in range(num_prefill)] + [
        f"decode-{i}" for i in range(num_workers - num_prefill)
    ]
    for i, worker_id in enumerate(workers):
        role = "prefill" if i < num_prefill else "decode"
        tracker.update_load(
            LoadReport(
                worker_id,
                "i0",
                role,
                40_000,
                50_000,
                BLOCK_SIZE,
                rng.randrange(64),
                0,
                rng.randrange(20_000),
                0.0,
            )
        )
    # Cached prompts: each held by 1-3 workers, until the index holds num_blocks hashes.
    prompts: list[list[int]] = []
    seq = dict.fromkeys(workers, 0)
    while len(tracker.index) < num_blocks:
        hashes = [rng.getrandbits(64) for _ in range(prompt_blocks)]
        prompts.append(hashes)
        for worker_id in rng.sample(workers, rng.randint(1, 3)):
            tracker.apply(KVEventBatch(worker_id, "i0", seq[worker_id], [BlockStored(tuple(hashes), 0)]))
            seq[worker_id] += 1
    return tracker, prompts


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-workers", type=int, default=64)
    parser.add_argument("--num-blocks", type=int, default=1_000_000)
    parser.add_argument("--prompt-blocks", type=int, default=136, help="blocks per prompt (2,176 tokens)")
    parser.add_argument("--num-routes", type=int, default=5000)
    parser.add_argument("--policy", default="cache_aware", choices=sorted(POLICIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    build_start = time.perf_counter()
    tracker, prompts = build_state(args.num_workers, args.num_blocks, args.prompt_blocks, args.seed)
    build_s = time.perf_counter() - build_start
    policy = make_policy(args.policy)
    rng = random.Random(args.seed + 1)

    route_us: list[float] = []
    total_us: list[float] = []
    for i in range(args.num_routes):
        # A cached prefix of random length followed by new blocks.
        cached = rng.choice(prompts)
        keep = rng.randrange(args.prompt_blocks + 1)
        hashes = cached[:keep] + [rng.getrandbits(64) for _ in range(args.prompt_blocks - keep)]
        request = RouteRequest(f"r{i}", args.prompt_blocks * BLOCK_SIZE + 5, hashes, max_tokens=256)
        start = time.perf_counter()
        decision = policy.route(request, tracker)
        routed = time.perf_counter()
        assert decision is not None
        tracker.on_routed(request, decision, now=0.0)
        end = time.perf_counter()
        tracker.release(request.req_id)
        route_us.append((routed - start) * 1e6)
        total_us.append((end - start) * 1e6)

    result = {
        "policy": args.policy,
        "num_workers": args.num_workers,
        "num_indexed_blocks": len(tracker.index),
        "prompt_blocks": args.prompt_blocks,
        "num_routes": args.num_routes,
        "route_p50_us": round(statistics.median(route_us), 1),
        "route_p99_us": round(percentile(route_us, 0.99), 1),
        "route_and_record_p50_us": round(statistics.median(total_us), 1),
        "route_and_record_p99_us": round(percentile(total_us, 0.99), 1),
        "index_build_s": round(build_s, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.policy}: {args.num_workers} workers, {len(tracker.index):,} indexed blocks, "
            f"{args.prompt_blocks}-block prompts, {args.num_routes} routes\n"
            f"  route():                 p50 {result['route_p50_us']} us  p99 {result['route_p99_us']} us\n"
            f"  route() + on_routed():   p50 {result['route_and_record_p50_us']} us  "
            f"p99 {result['route_and_record_p99_us']} us"
        )
    return result


if __name__ == "__main__":
    main()
