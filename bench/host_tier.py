"""The prefix cache's host tier: time to first token of a long prompt whose blocks sit only
in host memory, against computing it again, in the same run.

    python -m pdserve.bench.host_tier                       # Llama-3-8B shape, 8,000 tokens, CUDA
    python -m pdserve.bench.host_tier --prompt-tokens 32000 --max-position 131072
    python -m pdserve.bench.host_tier --small               # tiny model on CPU (seconds)

The GPU cache holds one prompt, a suffix and a bit; two more prompts evict the first into
the host tier, which holds four prompts (P stays there through the rep). After a warm-up
that also runs a suffix over a cached prompt (first-call costs of those shapes), each rep,
with P a fresh prompt:
- P computed, then P + a fresh suffix (P's blocks hit on the GPU, the suffix computed);
- two fresh prompts evict P; P again: its full blocks loaded from the host tier, the last
  block computed (`ttft_host_tier_ms`), against a fresh prompt of the same length computed
  whole (`ttft_recompute_ms`);
- one more fresh prompt evicts P from the GPU; P + another fresh suffix: P's blocks loaded
  while the suffix's prefill runs (each layer's attention waits only for its own layer's
  loads), against the GPU-hit run above: `load_hidden_fraction` is how much of the load
  time the overlap hid.
Times are medians of --reps. The load's own time is its stream's (CUDA events from its
first copy to its last scatter); its rate is set against a plain pinned host-to-device copy
of the same bytes in one piece. The hit step also saves the blocks it evicts to make room
(device to host, on the other copy stream, layer by layer ahead of the load's scatters):
`plain_pinned_copy_both_ways_gbps` is the plain copy's rate while as many bytes go the other
way, the link's bound for such a step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from pdserve.bench.gpu import LLAMA3_8B, TINY
from pdserve.bench.gpu_baselines import timed_seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="tiny model on CPU, float32")
    parser.add_argument("--prompt-tokens", type=int, help="default 8,000 (256 with --small)")
    parser.add_argument("--max-position", type=int, help="raise the model's max_position_embeddings")
    parser.add_argument(
        "--suffix-tokens",
        type=int,
        help="new tokens after the reloaded prefix (default 2,048; 64 with --small)",
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--chunk-tokens", type=int, default=8192, help="the prefill chunk (max_num_batched_tokens)"
    )
    parser.add_argument(
        "--trace",
        metavar="PATH",
        help="profile the last host-prefix + suffix request (CUDA): chrome trace to PATH, "
        "each stream's busy span printed and reported",
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    args.prompt_tokens = args.prompt_tokens or (256 if args.small else 8000)
    args.suffix_tokens = args.suffix_tokens or (64 if args.small else 2048)
    return args


def build(args: argparse.Namespace, model_dir: str):
    from pdserve.engine import LLM

    cfg = dict(TINY if args.small else LLAMA3_8B)
    if args.max_position:
        cfg["max_position_embeddings"] = args.max_position
    with open(os.path.join(model_dir, "config.json"), "w") as file:
        json.dump(cfg, file)
    blocks_per_prompt = -(-(args.prompt_tokens + 1) // 16)
    suffix_blocks = -(-args.suffix_tokens // 16)
    return LLM(
        model_dir,
        device="cpu" if args.small else "cuda",
        dtype="float32" if args.small else "bfloat16",
        attention_backend="reference" if args.small else "auto",
        num_gpu_blocks=blocks_per_prompt + suffix_blocks + blocks_per_prompt // 4,  # one prompt and a bit
        # P must stay in the LRU tier through the three prompts computed after its hit (the
        # recompute one, the one that pushes P off the GPU, and the suffix request's own
        # evictions): with room for only 2.5 prompts, the suffix request found part of P
        # evicted from reps 2 on and recomputed it (a step log on CPU showed 1,483 of 2,000).
        num_host_blocks=4 * blocks_per_prompt,
        max_num_batched_tokens=args.chunk_tokens,
        load_format="dummy",
    )


def first_token_seconds(llm, prompt: list[int]) -> float:
    from pdserve.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    return timed_seconds(lambda: llm.generate([prompt], params), llm.engine.runner.device)


def plain_copy_gbps(num_bytes: int, device: torch.device, both_ways: bool = False) -> float:
    """A pinned host buffer of the same bytes copied to the device in one piece (`both_ways`:
    while as many bytes go the other way on a second stream, as in a hit step that evicts)."""
    if device.type != "cuda" or not num_bytes:
        return float("nan")
    host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    if both_ways:
        host_out = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
        dev_out = torch.empty(num_bytes, dtype=torch.uint8, device=device)
        side = torch.cuda.Stream(device)

    def copy() -> None:
        if both_ways:
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                host_out.copy_(dev_out, non_blocking=True)
        dev.copy_(host, non_blocking=True)

    times = [timed_seconds(copy, device) for _ in range(5)]
    return num_bytes / min(times) / 1e9


@dataclass
class Timings:
    """Per rep: TTFTs (s), blocks the host tier served, copy-stream load times (s)."""

    host: list[float] = field(default_factory=list)
    recompute: list[float] = field(default_factory=list)
    gpu_suffix: list[float] = field(default_factory=list)
    host_suffix: list[float] = field(default_factory=list)
    hits: list[int] = field(default_factory=list)
    suffix_hits: list[int] = field(default_factory=list)  # P's blocks the suffix request loaded
    load: list[float] = field(default_factory=list)
    suffix_load: list[float] = field(default_factory=list)
    queue: list[float] = field(default_factory=list)  # host time to queue the hit step's copies
    suffix_queue: list[float] = field(default_factory=list)
    copies: list[int] = field(default_factory=list)
    stream_spans: dict = field(default_factory=dict)  # --trace: stream -> (start, end, busy) ms
    slow_runtime_calls: list = field(default_factory=list)  # --trace: the longest host CUDA calls
    allocator_counts: dict = field(default_factory=dict)  # --trace: allocator events in the request
    offloaded: list[int] = field(default_factory=list)  # blocks the hit step saved (it evicts)
    offload: list[float] = field(default_factory=list)


@contextlib.contextmanager
def stream_trace(path: str | None, t: Timings) -> Iterator[None]:
    """With `path` (CUDA): profile the block, write its chrome trace there and keep each CUDA
    stream's span in `t.stream_spans`: whether the forward's kernels ran beside the tier's
    copies or after them."""
    if path is None or not torch.cuda.is_available():
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    device_before, host_before = torch.cuda.memory_stats(), torch.cuda.host_memory_stats()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        yield
    t.allocator_counts = _count_changes(device_before, torch.cuda.memory_stats())
    t.allocator_counts.update(_count_changes(host_before, torch.cuda.host_memory_stats(), "host."))
    print("allocator counts in the request:", t.allocator_counts)
    prof.export_chrome_trace(path)
    with open(path) as file:
        events = json.load(file)["traceEvents"]
    t.slow_runtime_calls = _slowest_runtime_calls(events)
    for call in t.slow_runtime_calls:
        print(f"runtime call {call['name']}: {call['ms']:.1f} ms at {call['at_ms']:.1f} ms")
    spans: dict[str, list[float]] = {}
    for event in events:
        if event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in event:
            span = spans.setdefault(str(event["args"].get("stream")), [math.inf, 0.0, 0.0])
            span[0] = min(span[0], event["ts"])
            span[1] = max(span[1], event["ts"] + event["dur"])
            span[2] += event["dur"]
    origin = min((span[0] for span in spans.values()), default=0.0)
    t.stream_spans = {
        stream: {"start_ms": (lo - origin) / 1e3, "end_ms": (hi - origin) / 1e3, "busy_ms": busy / 1e3}
        for stream, (lo, hi, busy) in spans.items()
    }
    for stream, span in t.stream_spans.items():
        print(f"stream {stream}: " + ", ".join(f"{k} {v:.1f}" for k, v in span.items()))


def _count_changes(before: dict, after: dict, prefix: str = "") -> dict[str, int]:
    """Allocator event counters (`num_*`) that moved between two stats snapshots: a device
    `num_alloc_retries` or `num_sync_all_streams`, or a new pinned `num_host_alloc`, can
    each stall the host on the GPU's queue."""
    return {
        prefix + key: after[key] - before.get(key, 0)
        for key in after
        if key.startswith("num_") and after[key] != before.get(key, 0)
    }


def _slowest_runtime_calls(events: list[dict], count: int = 8) -> list[dict]:
    """The longest CUDA runtime/driver calls on the host in a chrome trace (where a host
    thread waited on the GPU: a synchronize, a cudaFree, a pinned allocation)."""
    calls = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and "dur" in e]
    origin = min((e["ts"] for e in events if "ts" in e), default=0.0)
    calls.sort(key=lambda e: e["dur"], reverse=True)
    return [
        {"name": e["name"], "ms": e["dur"] / 1e3, "at_ms": (e["ts"] - origin) / 1e3} for e in calls[:count]
    ]


def one_rep(
    llm, fresh: Callable[[int], list[int]], args: argparse.Namespace, t: Timings, last: bool = False
) -> None:
    tier, pool = llm.engine.kv_manager.host, llm.engine.runner.host_kv
    prompt = fresh(args.prompt_tokens)
    first_token_seconds(llm, prompt)  # computed, its blocks cached on the GPU
    t.gpu_suffix.append(first_token_seconds(llm, prompt + fresh(args.suffix_tokens)))
    for _ in range(2):  # two more prompts evict every block of it into the host tier
        first_token_seconds(llm, fresh(args.prompt_tokens))
    hits, copies, offloaded = tier.num_hits, pool.num_load_copies, pool.num_offloaded_blocks
    t.host.append(first_token_seconds(llm, prompt))
    t.hits.append(tier.num_hits - hits)
    t.copies.append(pool.num_load_copies - copies)
    t.load.append(pool.last_load_seconds() or float("nan"))
    t.queue.append(pool.last_queue_seconds)
    t.offloaded.append(pool.num_offloaded_blocks - offloaded)
    t.offload.append(pool.last_offload_seconds() or float("nan"))
    t.recompute.append(first_token_seconds(llm, fresh(args.prompt_tokens)))
    first_token_seconds(llm, fresh(args.prompt_tokens))  # with the one above: P off the GPU
    hits_before_suffix = tier.num_hits
    with stream_trace(args.trace if last else None, t):
        t.host_suffix.append(first_token_seconds(llm, prompt + fresh(args.suffix_tokens)))
    t.suffix_hits.append(tier.num_hits - hits_before_suffix)
    t.suffix_load.append(pool.last_load_seconds() or float("nan"))
    t.suffix_queue.append(pool.last_queue_seconds)


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-host-tier-") as model_dir:
        llm = build(args, model_dir)
        vocab = llm.engine.model_config.vocab_size
        rng = random.Random(0)

        def fresh(num_tokens: int) -> list[int]:
            return [rng.randrange(vocab) for _ in range(num_tokens)]

        warm = fresh(args.prompt_tokens)
        first_token_seconds(llm, warm)  # warm-up: kernels, graphs
        # ... and a suffix over a cached prompt of P's length: the first call of those
        # attention shapes (cuDNN plans, Triton compiles) is paid here, not in rep 1
        first_token_seconds(llm, warm + fresh(args.suffix_tokens))
        timings = Timings()
        for rep in range(args.reps):
            one_rep(llm, fresh, args, timings, last=rep == args.reps - 1)
        return report(args, llm.engine.runner, timings)


def report(args: argparse.Namespace, runner, t: Timings) -> dict:
    median = statistics.median
    pool = runner.host_kv
    loaded_bytes = min(t.hits) * pool.bytes_per_block
    host_s, recompute_s, load_s = median(t.host), median(t.recompute), median(t.load)
    plain_gbps = plain_copy_gbps(loaded_bytes, runner.device)
    gpu_suffix_s, host_suffix_s = median(t.gpu_suffix), median(t.host_suffix)
    return {
        "prompt_tokens": args.prompt_tokens,
        "device": torch.cuda.get_device_name() if runner.device.type == "cuda" else "cpu",
        "ttft_host_tier_ms": host_s * 1e3,
        "ttft_recompute_ms": recompute_s * 1e3,
        "speedup": recompute_s / host_s,
        "blocks_loaded": min(t.hits),
        "bytes_loaded": loaded_bytes,
        "load_copies": max(t.copies),  # host-to-device pieces (runs of slots x layers)
        "staging_mib": pool.staging_bytes / 2**20,  # both directions' buffers
        "load_ms": load_s * 1e3,  # the copy stream's time: copies and scatters
        "load_gbps": loaded_bytes / load_s / 1e9,
        "plain_pinned_copy_gbps": plain_gbps,
        "load_vs_plain_copy": loaded_bytes / load_s / 1e9 / plain_gbps,
        # the hit step's evictions, saved beside the load (device to host, their own stream)
        "blocks_offloaded_in_hit_step": min(t.offloaded),
        "offload_ms": median(t.offload) * 1e3,
        "plain_pinned_copy_both_ways_gbps": plain_copy_gbps(loaded_bytes, runner.device, both_ways=True),
        "host_tier_gbps": loaded_bytes / host_s / 1e9,  # whole TTFT, last block's compute included
        "suffix_tokens": args.suffix_tokens,
        "ttft_gpu_prefix_suffix_ms": gpu_suffix_s * 1e3,
        "ttft_host_prefix_suffix_ms": host_suffix_s * 1e3,
        "suffix_load_ms": median(t.suffix_load) * 1e3,
        # every block of P in every rep, or the suffix request recomputed part of P
        "suffix_blocks_loaded": min(t.suffix_hits),
        # host time to queue a step's copies: ~1 ms unless something in there waits for the GPU
        "copies_queue_ms": median(t.queue) * 1e3,
        "suffix_copies_queue_ms": median(t.suffix_queue) * 1e3,
        "suffix_stream_spans": t.stream_spans,
        "suffix_slow_runtime_calls": t.slow_runtime_calls,
        "suffix_allocator_counts": t.allocator_counts,
        # 1: the load cost nothing beyond the suffix's prefill; 0: none of it was overlapped
        # (NaN unless every rep's suffix request loaded all of P: else it also recomputed)
        "load_hidden_fraction": 1 - (host_suffix_s - gpu_suffix_s) / median(t.suffix_load)
        if min(t.suffix_hits) == args.prompt_tokens // runner.block_size
        else float("nan"),
        "reps": args.reps,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    for key, value in result.items():
        print(f"{key:>32}: {value:.2f}" if isinstance(value, float) else f"{key:>32}: {value}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
