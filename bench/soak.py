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
    tokens: list[int] | None = None  # kept for the anomalies (lost, duplicated, mismatched, undocumented)


@dataclass
class SoakReport:
    counts: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # "CODE: message" (request ids cut) -> count
    anomalies: list[dict[str, Any]] = field(default_factory=list)  # what a wrong outcome got, to debug it
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
            "anomalies": self.anomalies,
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
        out = classify_outcome(req, tokens, completes, error)
    else:
        task.cancel()  # leaving the stream cancels the gRPC call
        await asyncio.gather(task, return_exceptions=True)
        # Cancelled by us (a stream that ended just as we cancelled counts as it ended),
        # or no end within the bound.
        cancelled = waiter in done
        out = (
            classify_outcome(req, tokens, completes, error, cancelled)
            if cancelled
            else SoakOutcome("lost", 0)
        )
    out.num_tokens, out.tokens = len(tokens), tokens
    return out


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
            if out.outcome not in ("ok", "cancelled", "failed_with_status"):
                report.anomalies.append(
                    {
                        "request_id": f"{id_prefix}-{i}",
                        "outcome": out.outcome,
                        "error": out.error,
                        "cancel_after_tokens": req.cancel_after_tokens,
                        "tokens": out.tokens,
                        "expected": req.expected,
                    }
                )
            if on_progress is not None:
                maybe = on_progress(i, report)
                if maybe is not None:
                    await maybe

    started = time.perf_counter()
    async with AsyncPdserveClient(url) as client:
        await asyncio.gather(*(sender(client) for _ in range(concurrency)))
    report.wall_s = time.perf_counter() - started
    return report


# --- The Ray soak: `python -m pdserve.bench.chaos --soak N` -------------------------------


def tiny_pd_config(backend: str, num_prefill: int, num_decode: int, **ray: Any) -> Any:
    """The tiny model split over `num_prefill` prefill and `num_decode` decode workers on the
    local Ray node, `ray` keys (namespace, max_worker_restarts) added: the chaos runs' deployment."""
    from pdserve.deploy.config import parse_config

    return parse_config(
        {
            "model": "tiny",
            "engine": {"num_gpu_blocks": 1024, "max_num_seqs": 64, "max_num_batched_tokens": 1024},
            "prefill": {"count": num_prefill},
            "decode": {"count": num_decode},
            "transfer": {"backend": backend},
            "router": {"port": 0, "policy_params": {"local_prefill_threshold_tokens": 0}},
            "ray": {"num_cpus": 2, **ray},
        }
    )


def soak_config(backend: str, num_prefill: int = 2, num_decode: int = 2) -> Any:
    """2P2D tiny model; Ray restarts a killed worker as often as it dies."""
    return tiny_pd_config(backend, num_prefill, num_decode, namespace="pdserve-soak", max_worker_restarts=-1)


@dataclass
class RouterEvents:
    """The router's lifecycle events about requests, collected as the soak goes (the
    router keeps only its latest), to tell what happened to an anomalous request."""

    last_seq: int = 0
    by_request: dict[str, list[str]] = field(default_factory=dict)

    def add(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self.last_seq = max(self.last_seq, event["seq"])
            words = event["message"].split()
            if len(words) > 1 and words[0] == "request":
                self.by_request.setdefault(words[1], []).append(event["message"])


async def kill_workers_periodically(
    dep: Any, every_s: float, rng: random.Random, kills: list[dict], events: RouterEvents
) -> None:
    """Every `every_s` seconds `ray.kill` one random live worker (Ray restarts it)."""
    import ray

    started = time.perf_counter()
    while True:
        await asyncio.sleep(every_s)
        status = await asyncio.to_thread(dep.status, events.last_seq)
        events.add(status["events"])
        alive = sorted(w for w, s in status["workers"].items() if s.get("alive"))
        if not alive:
            continue
        victim = rng.choice(alive)
        ray.kill(dep.workers[victim], no_restart=False)
        kills.append({"at_s": round(time.perf_counter() - started, 2), "worker": victim})
        print(f"[soak] killed {victim} at {kills[-1]['at_s']} s", flush=True)


def quiesce(dep: Any, timeout_s: float = 120.0) -> tuple[dict[str, Any], dict[str, int]]:
    """Wait until every worker is alive again, no stream is open and every worker's blocks
    are free (or `timeout_s`). Returns the last status and each worker's blocks in use."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = dep.status()
        workers = status["workers"]
        in_use = {w: s.get("num_total_blocks", 0) - s.get("num_free_blocks", 0) for w, s in workers.items()}
        settled = all(s.get("alive") for s in workers.values()) and not status["num_streams"]
        if (settled and not any(in_use.values())) or time.monotonic() > deadline:
            return status, in_use
        time.sleep(0.5)


def soak_main(args: Any, command: str) -> dict[str, Any]:
    from pdserve.deploy.launcher import up
    from pdserve.engine import LLM, SamplingParams

    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(256) for _ in range(rng.randrange(8, args.prompt_len + 1))]
        for _ in range(args.num_prompts)
    ]
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    expected = [o.token_ids for o in LLM("tiny", num_gpu_blocks=2048).generate(prompts, greedy)]
    requests = make_requests(args.soak, prompts, expected, args.cancel_fraction, args.max_tokens, args.seed)
    dep = up(soak_config(args.backend))
    kills: list[dict] = []
    events = RouterEvents()

    async def progress(i: int, report: SoakReport) -> None:
        done = sum(report.counts.values())
        if done % 500 == 0:
            print(f"[soak] {done} done: {dict(report.counts)}", flush=True)

    async def soak() -> SoakReport:
        killer = asyncio.ensure_future(kill_workers_periodically(dep, args.kill_every, rng, kills, events))
        try:
            return await run_soak(dep.url, requests, args.max_tokens, args.concurrency, on_progress=progress)
        finally:
            killer.cancel()
            await asyncio.gather(killer, return_exceptions=True)

    try:
        warm = make_requests(8, prompts, expected, 0.0, args.max_tokens)
        asyncio.run(run_soak(dep.url, warm, args.max_tokens, id_prefix="warm"))  # not counted
        report = asyncio.run(soak())
        status, in_use = quiesce(dep)
        events.add(dep.status(events.last_seq)["events"])
        fresh = make_requests(4, prompts, expected, 0.0, args.max_tokens)
        after = asyncio.run(run_soak(dep.url, fresh, args.max_tokens, id_prefix="after"))
    finally:
        dep.down()
    result = report.as_dict()
    for anomaly in result["anomalies"]:
        anomaly["router_events"] = events.by_request.get(anomaly["request_id"], [])
    counts = result["counts"]
    return {
        "command": command,
        "args": vars(args),
        "lost": counts["lost"],
        "duplicated": counts["duplicated"],
        "failed_with_status": counts["failed_with_status"],
        "leaked_blocks": sum(in_use.values()),
        **result,
        "leaked_blocks_per_worker": in_use,
        "workers_alive_after": {w: s.get("alive") for w, s in status["workers"].items()},
        "worker_restarts": {w: s.get("num_restarts") for w, s in status["workers"].items()},
        "new_requests_ok_after": after.counts.get("ok", 0),
        "kills": kills,
        "router_stats": status["stats"],
    }
