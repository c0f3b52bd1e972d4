"""A soak of many short greedy requests with random client cancels (and, on Ray, random
worker kills), accounting for every request against the offline engine's tokens.

`run_soak` is the driver: `python -m pdserve.bench.chaos --soak N` runs it on a Ray
deployment with a killer task, `tests/unit/test_cancel_storm.py` on an in-process one.
Each request ends as exactly one of:
- ok: Complete, tokens equal the offline engine's (`ignore_eos`, fixed `max_tokens`);
- cancelled: we cancelled the gRPC stream before its Complete (tokens so far must be a
  prefix of the expected ones, else it counts as mismatched too);
- failed_with_status: ended with a documented status (UNAVAILABLE, ABORTED,
  RESOURCE_EXHAUSTED with a message), tokens so far a prefix of the expected ones;
- failed_undocumented: any other status, or a documented one with an empty message;
- lost: ended without Complete and without error, or did not end within `request_timeout_s`;
- duplicated: more tokens than expected, or a second Complete;
- mismatched: tokens that are not a prefix of the expected ones (a token missing or
  changed), or a Complete with fewer tokens than expected (a silent truncation).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pdserve.router.client import AsyncPdserveClient, GenerateChunk, GenerateComplete, PdserveError

DOCUMENTED_CODES = ("UNAVAILABLE", "ABORTED", "RESOURCE_EXHAUSTED")
OUTCOMES = (
    "ok",
    "cancelled",
    "failed_with_status",
    "failed_undocumented",
    "lost",
    "duplicated",
    "mismatched",
)


@dataclass
class SoakRequest:
    prompt: list[int]
    expected: list[int]  # the offline engine's greedy tokens for `prompt`
    cancel_after_tokens: int | None  # cancel once this many tokens arrived (0: before the first)
    cancel_delay_s: float = 0.0  # with cancel_after_tokens 0: how long after sending


@dataclass
class SoakOutcome:
    outcome: str
    num_tokens: int
    error: str | None = None


@dataclass
class SoakReport:
    counts: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # "CODE: message" (request ids cut) -> count
    num_tokens: int = 0
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "counts": {k: self.counts.get(k, 0) for k in OUTCOMES},
            "num_requests": sum(self.counts.values()),
            "num_tokens_delivered": self.num_tokens,
            "wall_s": self.wall_s,
            "requests_per_s": sum(self.counts.values()) / self.wall_s if self.wall_s else None,
            "tokens_per_s": self.num_tokens / self.wall_s if self.wall_s else None,
            "errors": dict(self.errors.most_common()),
        }


def make_requests(
    num_requests: int,
    prompts: list[list[int]],
    expected: list[list[int]],
    cancel_fraction: float,
    max_tokens: int,
    seed: int = 0,
) -> list[SoakRequest]:
    """`num_requests` requests cycling through `prompts`; `cancel_fraction` of them cancelled
    at a random moment: before the first token (after a random delay) or after k tokens."""
    rng = random.Random(seed)
    requests = []
    for i in range(num_requests):
        cancel_after = rng.randrange(max_tokens) if rng.random() < cancel_fraction else None
        delay = rng.uniform(0.0, 0.2) if cancel_after == 0 else 0.0
        j = i % len(prompts)
        requests.append(SoakRequest(prompts[j], expected[j], cancel_after, delay))
    return requests


def classify_outcome(
    req: SoakRequest, tokens: list[int], completes: int, error: PdserveError | None, cancelled: bool = False
) -> SoakOutcome:
    n = len(tokens)
    if completes > 1 or n > len(req.expected):
        return SoakOutcome("duplicated", n)
    if tokens != req.expected[:n]:
        return SoakOutcome("mismatched", n)
    if error is not None:
        text = f"{error.code.name}: {error.message}"
        documented = error.code.name in DOCUMENTED_CODES and error.message.strip()
        return SoakOutcome("failed_with_status" if documented else "failed_undocumented", n, text)
    if completes == 1:
        return SoakOutcome("ok" if n == len(req.expected) else "mismatched", n)
    return SoakOutcome("cancelled" if cancelled else "lost", n)


async def _one_request(
    client: AsyncPdserveClient, req: SoakRequest, request_id: str, max_tokens: int, timeout_s: float
) -> SoakOutcome:
    tokens: list[int] = []
    completes = 0
    error: PdserveError | None = None
    cancel = asyncio.Event()

    async def consume() -> None:
        nonlocal completes, error
        try:
            async for event in client.generate(
                req.prompt, request_id=request_id, max_tokens=max_tokens, temperature=0.0, ignore_eos=True
            ):
                if isinstance(event, GenerateChunk):
                    tokens.extend(event.token_ids)
                    if req.cancel_after_tokens is not None and len(tokens) >= req.cancel_after_tokens:
                        cancel.set()
                        await asyncio.sleep(3600)  # held here until cancelled
                elif isinstance(event, GenerateComplete):
                    completes += 1
        except PdserveError as exc:
            error = exc

    task = asyncio.ensure_future(consume())
    if req.cancel_after_tokens == 0:
        asyncio.get_running_loop().call_later(req.cancel_delay_s, cancel.set)
    waiter = asyncio.ensure_future(cancel.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task in done:
        return classify_outcome(req, tokens, completes, error)
    task.cancel()  # leaving the stream cancels the gRPC call
    await asyncio.gather(task, return_exceptions=True)
    if waiter not in done:
        return SoakOutcome("lost", len(tokens))  # no end within the bound
    # Cancelled by us (a stream that ended just as we cancelled counts as it ended).
    return classify_outcome(req, tokens, completes, error, cancelled=True)


async def run_soak(
    url: str,
    requests: list[SoakRequest],
    max_tokens: int,
    concurrency: int = 64,
    request_timeout_s: float = 120.0,
    id_prefix: str = "soak",
    on_progress: Callable[[int, SoakReport], Awaitable[None] | None] | None = None,
) -> SoakReport:
    """Send every request with at most `concurrency` in flight; account for each."""
    report = SoakReport()
    queue = iter(enumerate(requests))

    async def sender(client: AsyncPdserveClient) -> None:
        for i, req in queue:  # one shared iterator: each request taken once
            out = await _one_request(client, req, f"{id_prefix}-{i}", max_tokens, request_timeout_s)
            report.counts[out.outcome] += 1
            report.num_tokens += out.num_tokens
            if out.error is not None:
                report.errors[out.error.replace(f"{id_prefix}-{i}", "<id>")] += 1
            if on_progress is not None:
                maybe = on_progress(i, report)
                if maybe is not None:
                    await maybe

    started = time.perf_counter()
    async with AsyncPdserveClient(url) as client:
        await asyncio.gather(*(sender(client) for _ in range(concurrency)))
    report.wall_s = time.perf_counter() - started
    return report
