"""Workloads for the policy simulator (bench/policy_sim.py): request streams with
chained block hashes, and the oracle prefix hit count (an infinite, perfectly routed cache)."""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field

from pdserve.router.routing import RouteDecision

BLOCK_SIZE = 16


@dataclass
class SimRequest:
    req_id: str
    arrival: float
    num_prompt_tokens: int
    block_hashes: list[int]
    output_len: int
    max_tokens: int
    decision: RouteDecision | None = None
    hit_tokens: int = 0  # prompt tokens reused on the worker that prefilled it
    first_token: float = -1.0
    finish: float = -1.0
    blocks: list[int] = field(default_factory=list)  # decode-side block table
    prefill_blocks: list[int] = field(default_factory=list)
    generated: int = 0  # tokens produced so far (the first comes from prefill)
    kv_ready: bool = False
    needs_local_prefill: bool = False
    local_prefill_tokens: int = 0
    decode_hit_tokens: int = 0  # prompt tokens already cached on the decode worker


# ---- workloads -----------------------------------------------------------------------


def make_workload(args: argparse.Namespace, rng: random.Random) -> list[SimRequest]:
    new_hash = lambda: rng.getrandbits(64)
    shared_blocks = args.shared_prefix_len // BLOCK_SIZE
    group_prefixes = [[new_hash() for _ in range(shared_blocks)] for _ in range(args.num_groups)]
    prompt_suffixes: dict[tuple[int, int], list[int]] = {}
    conversations: list[tuple[list[int], int, int]] = []  # (stream hashes, prompt tokens, turns)
    requests = []
    now = 0.0
    for i in range(args.num_requests):
        now += rng.expovariate(args.request_rate)
        output_len = args.output_len
        if args.workload == "random":
            mean_tokens = args.shared_prefix_len + args.question_len
            tokens = rng.randint(mean_tokens // 2, 3 * mean_tokens // 2)
            hashes = [new_hash() for _ in range(tokens // BLOCK_SIZE)]
            output_len = rng.randint(max(1, args.output_len // 2), args.output_len)
        elif args.workload == "prefix-sharing":
            key = (rng.randrange(args.num_groups), rng.randrange(args.prompts_per_group))
            tokens = args.shared_prefix_len + args.question_len
            if key not in prompt_suffixes:
                prompt_suffixes[key] = [new_hash() for _ in range(tokens // BLOCK_SIZE - shared_blocks)]
            hashes = group_prefixes[key[0]] + prompt_suffixes[key]
        else:  # multi-turn: a turn's prompt is the previous prompt + its answer + a new question
            if len(conversations) < args.num_groups or rng.random() < 1 / args.prompts_per_group:
                conversations.append((list(group_prefixes[0]), args.shared_prefix_len, 0))
                if len(conversations) > args.num_groups:
                    conversations.pop(rng.randrange(len(conversations) - 1))
            slot = rng.randrange(len(conversations))
            stream, tokens, turns = conversations[slot]
            tokens += args.question_len + (args.output_len if turns else 0)
            stream.extend(new_hash() for _ in range(tokens // BLOCK_SIZE - len(stream)))
            conversations[slot] = (stream, tokens, turns + 1)
            hashes = stream[: tokens // BLOCK_SIZE]
        requests.append(SimRequest(f"r{i}", now, tokens, hashes, output_len, args.output_len))
    return requests


def oracle_hit_tokens(requests: list[SimRequest]) -> int:
    """Prompt tokens that repeat an earlier prompt's block-aligned prefix (infinite cache)."""
    seen: set[int] = set()
    hits = 0
    for r in requests:
        cap = (r.num_prompt_tokens - 1) // BLOCK_SIZE
        n = 0
        while n < cap and r.block_hashes[n] in seen:
            n += 1
        hits += n * BLOCK_SIZE
        seen.update(r.block_hashes)
    return hits
