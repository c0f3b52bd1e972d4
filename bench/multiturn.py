"""The multi-turn workload of `pdserve bench serve --dataset multi-turn`.

    python -m pdserve.bench.serve --url 127.0.0.1:50051 --dataset multi-turn \\
        --multi-turn-num-conversations 16 --multi-turn-turns 6 --multi-turn-system-len 256 \\
        --multi-turn-user-len 128 --multi-turn-output-len 32 --max-concurrency 4

Every conversation is live from the start; its turns run in order, each one sending the
conversation so far (system prompt, earlier user messages and the replies exactly as the
server streamed them) plus a new user message, after an optional think time. --max-concurrency
bounds the requests in flight across conversations; the semaphore is first come, first
served, so a conversation's next turn queues behind the other conversations' turns and
every conversation stays in the working set, as when many users chat at once. The report
adds the prefix hit rate (cached / prompt tokens from each Complete's usage), overall and
per turn. Needs the gRPC backend: it streams token ids back, which the next turn resends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from pdserve.bench.datasets import (
    BenchRequest,
    Conversation,
    check_conversations_fit_model,
    sample_multi_turn,
)
from pdserve.bench.metrics import RequestResult, compute_metrics
from pdserve.engine.gc_heap import frozen_heap
from pdserve.router.client import ModelInfo


class RequestSender(Protocol):
    """What bench/serve.py's senders offer (wait_ready, send), as an async context manager."""

    async def __aenter__(self) -> RequestSender: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def wait_ready(self, timeout: float) -> None: ...

    async def send(self, request: BenchRequest, temperature: float, deadline: float) -> RequestResult: ...


def add_multi_turn_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-turn dataset")
    group.add_argument("--multi-turn-num-conversations", type=int, default=16)
    group.add_argument("--multi-turn-turns", type=int, default=6, help="turns per conversation")
    group.add_argument(
        "--multi-turn-system-len", type=int, default=256, help="system prompt shared by every conversation"
    )
    group.add_argument("--multi-turn-user-len", type=int, default=128, help="tokens per user message")
    group.add_argument("--multi-turn-output-len", type=int, default=32, help="tokens per reply")
    group.add_argument(
        "--multi-turn-think-time",
        type=float,
        default=0.0,
        help="mean seconds between a reply and the next turn (exponential; 0 = none)",
    )


def build_conversations(args: argparse.Namespace, info: ModelInfo) -> list[Conversation]:
    """The conversations named by the flags, sized to the model's vocabulary and context."""
    excluded = [info.eos_token_id] if info.eos_token_id is not None else []
    conversations = sample_multi_turn(
        args.multi_turn_num_conversations,
        args.multi_turn_turns,
        args.multi_turn_system_len,
        args.multi_turn_user_len,
        args.multi_turn_output_len,
        args.vocab_size or info.vocab_size,
        args.seed,
        excluded,
    )
    if info.max_model_len:
        check_conversations_fit_model(conversations, info.max_model_len)
    return conversations


def think_times(conversations: Sequence[Conversation], mean_s: float, seed: int) -> list[list[float]]:
    """Seconds to wait before each turn (none before the first), drawn once per run."""
    if mean_s < 0:
        raise ValueError(f"--multi-turn-think-time must be >= 0, got {mean_s}")
    rng = np.random.default_rng(seed)
    return [
        [0.0] + (rng.exponential(mean_s, c.num_turns - 1).tolist() if mean_s else [0.0] * (c.num_turns - 1))
        for c in conversations
    ]


def _not_sent(turn: int, reason: str) -> RequestResult:
    return RequestResult(prompt_len=0, error=f"turn {turn} not sent: {reason}")


async def _converse(
    sender: RequestSender,
    conversation: Conversation,
    pauses: list[float],
    limiter: asyncio.Semaphore | None,
    temperature: float,
    deadline: float,
    results: list[RequestResult],
) -> None:
    """The conversation's turns in order; a failed turn ends it (the next would not follow)."""
    prompt: list[int] = []
    output: list[int] = []
    for turn in range(conversation.num_turns):
        if pauses[turn]:
            await asyncio.sleep(pauses[turn])
        prompt = conversation.turn_prompt(turn, prompt, output)
        request = BenchRequest(prompt, conversation.output_len)
        async with limiter if limiter is not None else contextlib.nullcontext():
            result = await sender.send(request, temperature, deadline)
        results.append(result)
        if not result.success:
            return
        output = result.output_token_ids


def hit_rate_by_turn(conversation_results: Sequence[Sequence[RequestResult]]) -> list[float | None]:
    """Cached / prompt tokens of each turn index over the conversations' completed turns."""
    num_turns = max((len(turns) for turns in conversation_results), default=0)
    rates: list[float | None] = []
    for turn in range(num_turns):
        done = [t[turn] for t in conversation_results if len(t) > turn and t[turn].success]
        prompt = sum(r.prompt_len for r in done)
        rates.append(sum(r.cached_tokens for r in done) / prompt if prompt else None)
    return rates


async def run_multi_turn(
    make_sender: Callable[[], RequestSender],
    conversations: Sequence[Conversation],
    max_concurrency: int | None = None,
    think_time_s: float = 0.0,
    seed: int = 0,
    temperature: float = 0.0,
    percentile_metrics: Sequence[str] = ("ttft", "tpot", "itl"),
    metric_percentiles: Sequence[float] = (99.0,),
    timeout: float = 3600.0,
    goodput_slos_ms: dict[str, float] | None = None,
    warmup: Sequence[BenchRequest] = (),
) -> dict[str, object]:
    """Run every conversation through a sender from `make_sender` (made on this event loop,
    which gRPC's channel binds to) and return bench serve's metrics dict plus the
    multi-turn keys. Turns unfinished after `timeout` seconds count as failed. `warmup`
    requests are sent together, unmeasured, before the clock starts (kernels, graphs)."""
    if not conversations:
        raise ValueError("no conversations to run")
    pauses = think_times(conversations, think_time_s, seed)
    limiter = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    results: list[list[RequestResult]] = [[] for _ in conversations]
    deadline = time.monotonic() + timeout
    async with make_sender() as sender:
        await sender.wait_ready(timeout)  # connect before the clock starts (see run_benchmark)
        warmed = await asyncio.gather(*(sender.send(r, temperature, deadline) for r in warmup))
        if not all(r.success for r in warmed):
            raise RuntimeError(f"warm-up failed: {next(r.error for r in warmed if not r.success)}")

        async def run_all() -> None:
            await asyncio.gather(
                *(
                    _converse(sender, c, pauses[i], limiter, temperature, deadline, results[i])
                    for i, c in enumerate(conversations)
                )
            )

        with frozen_heap():  # no full collection inside the measured window (see run_benchmark)
            start = time.perf_counter()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(run_all(), timeout=timeout)
            duration = time.perf_counter() - start
    flat: list[RequestResult] = []
    for conversation, turns in zip(conversations, results, strict=True):
        flat += turns
        reason = "an earlier turn failed" if turns and not turns[-1].success else f"--timeout {timeout:g} s"
        flat += [_not_sent(t, reason) for t in range(len(turns), conversation.num_turns)]
    metrics = compute_metrics(flat, duration, goodput_slos_ms, percentile_metrics, metric_percentiles)
    by_turn = hit_rate_by_turn(results)
    later = [r for turns in results for r in turns[1:] if r.success]
    later_prompt = sum(r.prompt_len for r in later)
    metrics.update(
        max_concurrency=max_concurrency,
        num_prompts=len(flat),
        num_conversations=len(conversations),
        num_turns=max(c.num_turns for c in conversations),
        think_time_s=think_time_s,
        prefix_hit_rate_by_turn=by_turn,
        # Turns after the first: what a cache that keeps the conversations could serve.
        prefix_hit_rate_later_turns=sum(r.cached_tokens for r in later) / later_prompt
        if later_prompt
        else None,
    )
    return metrics


def format_multi_turn(metrics: dict[str, object]) -> str:
    """The lines bench serve prints under its summary for a multi-turn run."""
    by_turn = ", ".join("-" if r is None else f"{r:.2f}" for r in metrics["prefix_hit_rate_by_turn"])
    later = metrics["prefix_hit_rate_later_turns"]
    return "\n".join(
        [
            f"Conversations x turns: {metrics['num_conversations']} x {metrics['num_turns']}",
            f"Prefix hit rate, turns after the first: {'-' if later is None else f'{later:.3f}'}",
            f"Prefix hit rate by turn: {by_turn}",
        ]
    )
