"""The prefix cache's host tier: time to first token of a long prompt whose blocks sit only
in host memory, against computing it again, in the same run.

    python -m pdserve.bench.host_tier                       # Llama-3-8B shape, 8,000 tokens, CUDA
    python -m pdserve.bench.host_tier --prompt-tokens 32000 --max-position 131072
    python -m pdserve.bench.host_tier --small               # tiny model on CPU (seconds)

The GPU cache holds one prompt and a bit; two more prompts evict the first into the host tier.
Then the first prompt again (its full blocks copied back, the last partial block computed)
against a fresh prompt of the same length (computed whole), each the median of --reps. The
copy rate is set against a plain pinned host-to-device copy of the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile

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
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    args.prompt_tokens = args.prompt_tokens or (256 if args.small else 8000)
    return args


def build(args: argparse.Namespace, model_dir: str):
    from pdserve.engine import LLM

    cfg = dict(TINY if args.small else LLAMA3_8B)
    if args.max_position:
        cfg["max_position_embeddings"] = args.max_position
    with open(os.path.join(model_dir, "config.json"), "w") as file:
        json.dump(cfg, file)
    blocks_per_prompt = -(-(args.prompt_tokens + 1) // 16)
    return LLM(
        model_dir,
        device="cpu" if args.small else "cuda",
        dtype="float32" if args.small else "bfloat16",
        attention_backend="reference" if args.small else "auto",
        num_gpu_blocks=blocks_per_prompt + blocks_per_prompt // 4,  # one prompt and a bit
        num_host_blocks=2 * blocks_per_prompt + blocks_per_prompt // 2,  # LRU keeps the last two
        max_num_batched_tokens=8192,
        load_format="dummy",
    )


def first_token_seconds(llm, prompt: list[int]) -> float:
    from pdserve.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    return timed_seconds(lambda: llm.generate([prompt], params), llm.engine.runner.device)


def plain_copy_gbps(num_bytes: int, device: torch.device) -> float:
    """A pinned host buffer of the same bytes copied to the device in one piece."""
    if device.type != "cuda":
        return float("nan")
    host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    times = [timed_seconds(lambda: dev.copy_(host, non_blocking=True), device) for _ in range(5)]
    return num_bytes / min(times) / 1e9


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-host-tier-") as model_dir:
        llm = build(args, model_dir)
        vocab = llm.engine.model_config.vocab_size
        rng = random.Random(0)

        def fresh() -> list[int]:
            return [rng.randrange(vocab) for _ in range(args.prompt_tokens)]

        first_token_seconds(llm, fresh())  # warm-up: kernels, graphs
        host_times, recompute_times, hits = [], [], []
        tier = llm.engine.kv_manager.host
        for _ in range(args.reps):
            prompt = fresh()
            first_token_seconds(llm, prompt)  # computed, its blocks cached on the GPU
            for _ in range(2):  # two more prompts evict every block of it into the host tier
                first_token_seconds(llm, fresh())
            before = tier.num_hits
            host_times.append(first_token_seconds(llm, prompt))
            hits.append(tier.num_hits - before)
            recompute_times.append(first_token_seconds(llm, fresh()))
        runner = llm.engine.runner
        loaded_bytes = min(hits) * runner.host_kv.bytes_per_block
        host_s, recompute_s = statistics.median(host_times), statistics.median(recompute_times)
        return {
            "prompt_tokens": args.prompt_tokens,
            "device": torch.cuda.get_device_name() if runner.device.type == "cuda" else "cpu",
            "ttft_host_tier_ms": host_s * 1e3,
            "ttft_recompute_ms": recompute_s * 1e3,
            "speedup": recompute_s / host_s,
            "blocks_loaded": min(hits),
            "bytes_loaded": loaded_bytes,
            "host_tier_gbps": loaded_bytes / host_s / 1e9,  # whole TTFT, last block's compute included
            "plain_pinned_copy_gbps": plain_copy_gbps(loaded_bytes, runner.device),
            "reps": args.reps,
        }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    for key, value in result.items():
        print(f"{key:>24}: {value:.2f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
