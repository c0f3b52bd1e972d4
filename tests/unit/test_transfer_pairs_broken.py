"""The router's handling of broken KV transfer pairs, over real in-process workers (gRPC KV
transfer, no Ray), and the policies' choice of pairs.

A worker in an nccl transfer group reports its rank and the peers it can no longer transfer
with in every poll; the monitor hands that to `RouterCore.on_transfer_report`. Here the
reports are handed to it directly (the gRPC backend has no group to break;
tests/e2e/test_chaos_stall.py breaks a real one over gloo). prefill-0's engine thread is held
meanwhile, so the requests routed to it are still in prefill: they must be prefilled again
through the pair that still works and end with exactly the offline engine's tokens. A
prefill worker with no working pair stays out of routing while it answers polls again;
with no pair left the decode worker prefills alone; status, health, counters and the
lifecycle log name each broken pair once.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from grpc_health.v1 import health_pb2

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.core.outputs import LoadReport
from pdserve.router.policy import make_policy
from pdserve.router.routing import RouteRequest
from pdserve.router.server import WORKER_HEALTH_PREFIX
from pdserve.router.worker_state import WorkerStateTracker
from tests.inprocess import InProcessDeployment, health_of
from tests.unit.test_worker_failures import MAX_TOKENS, scrape, stream_all, wait_for

REASON = "request r1: recv from rank 0 (layers 0..1): Timed out waiting 3000ms for recv operation to complete"
PAIR0 = f"KV transfer prefill-0 -> decode-0 broken (decode-0 reports: {REASON})"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def on_router_loop(dep: InProcessDeployment, call) -> None:
    """Run `call()` on the router's event loop, as the worker monitor does, and wait for it."""
    done = threading.Event()
    dep.loop.call_soon_threadsafe(lambda: (call(), done.set()))
    assert done.wait(10)


def cached(dep: InProcessDeployment) -> list[set[int]]:
    """Every prefill worker's cached block hashes."""
    return [set(w.kv_snapshot().block_hashes) for w in dep.prefill.values()]


def run_streams(dep: InProcessDeployment, prompts, expected) -> None:
    threads, results = stream_all(dep.url, prompts, [0] * len(prompts))
    for t in threads:
        t.join(60)
    for i, (tokens, errors) in enumerate(results):
        assert not errors and tokens == expected[i], f"stream {i}: {errors}"


def check_first_pair_reported(dep: InProcessDeployment) -> None:
    """prefill-0 -> decode-0 broken, said once: status, counters, log, metrics and health."""
    status = dep.core.status()
    assert status["broken_transfer_pairs"] == {"prefill-0 -> decode-0": PAIR0}
    prefill0 = status["workers"]["prefill-0"]
    assert not prefill0["alive"] and prefill0["lost_reason"].startswith(
        f"its KV transfer to every decode worker broke (last: {PAIR0}); restart the deployment"
    ), prefill0
    assert status["workers"]["prefill-1"]["alive"] and status["serving"]
    stats = status["stats"]
    assert stats["num_transfer_pairs_broken"] == 1 and stats["num_prefill_retries"] == 3
    messages = [e["message"] for e in status["events"]]
    assert sum(m.startswith("KV transfer prefill-0 -> decode-0 broken") for m in messages) == 1
    assert sum(" retried (attempt 2, " in m and PAIR0.split(" (")[0] in m for m in messages) == 3
    metrics = scrape(dep)
    assert metrics[("pdserve:transfer_pairs_broken_total", "")] == 1
    assert (
        metrics[("pdserve:worker_up", "prefill-0")] == 0 and metrics[("pdserve:worker_up", "prefill-1")] == 1
    )
    wait_for(
        lambda: health_of(dep.url, WORKER_HEALTH_PREFIX + "prefill-0") == NOT_SERVING,
        5,
        "health to follow",
    )
    assert health_of(dep.url, "") == SERVING
    assert health_of(dep.url, WORKER_HEALTH_PREFIX + "prefill-1") == SERVING


@pytest.mark.timeout(120)
def test_broken_pairs_are_routed_around_and_their_requests_move():
    dep = InProcessDeployment(
        num_prefill=2, num_decode=1, policy="round_robin", router_overrides={"worker_timeout_s": 30.0}
    )
    gate = threading.Event()
    try:
        rng = random.Random(11)
        prompts = [[rng.randrange(256) for _ in range(30)] for _ in range(10)]
        expected = [
            o.token_ids
            for o in LLM("tiny", num_gpu_blocks=512).generate(
                prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
            )
        ]
        dep.prefill["prefill-0"].loop.call(lambda engine: gate.wait(60))  # its prefills wait
        progress = [0] * 6
        threads, results = stream_all(dep.url, prompts[:6], progress)
        # round robin: prefill-1's half streams, prefill-0's half waits in prefill
        wait_for(lambda: sum(p >= 2 for p in progress) >= 3, 60, "prefill-1's streams")
        for _ in range(2):  # said and counted once
            on_router_loop(
                dep, lambda: dep.core.on_pair_broken("prefill-0", "decode-0", f"decode-0 reports: {REASON}")
            )
        for t in threads:
            t.join(60)
        for i, (tokens, errors) in enumerate(results):
            assert not errors and tokens == expected[i], f"stream {i}: {errors}"

        check_first_pair_reported(dep)
    finally:
        gate.set()
    try:
        # prefill-0 answers polls again and stays out; new requests go through prefill-1.
        time.sleep(1.0)
        status = dep.core.status()
        assert not status["workers"]["prefill-0"]["alive"] and status["stats"]["num_worker_recoveries"] == 0
        wait_for(dep.all_blocks_free, 20, "every block free")
        before = cached(dep)
        run_streams(dep, prompts[6:8], expected[6:8])
        after = cached(dep)
        assert after[0] == before[0] and after[1] > before[1]

        # decode-0 reports that prefill-1's rank is broken too (ranks as the workers report them):
        # no pair is left, so decode-0 prefills alone.
        on_router_loop(dep, lambda: dep.core.on_transfer_report("prefill-1", 1, {}))
        on_router_loop(
            dep, lambda: dep.core.on_transfer_report("decode-0", 2, {1: "recv failed\nsecond line"})
        )
        status = dep.core.status()
        assert status["broken_transfer_pairs"]["prefill-1 -> decode-0"] == (
            "KV transfer prefill-1 -> decode-0 broken (decode-0 reports: recv failed)"
        )
        assert not status["workers"]["prefill-1"]["alive"] and status["serving"]
        before = cached(dep)
        run_streams(dep, prompts[8:], expected[8:])
        assert cached(dep) == before  # prefilled on the decode worker
        wait_for(dep.all_blocks_free, 20, "every block free")
    finally:
        dep.close()


def test_policies_never_pick_a_broken_pair():
    tracker = WorkerStateTracker()
    for worker_id, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode")):
        tracker.update_load(LoadReport(worker_id, "i0", role, 1000, 1000, 16, 0, 0, 0, time.time()))
    tracker.broken_pairs.add(("p0", "d0"))
    for name in ("round_robin", "least_loaded", "cache_aware"):
        policy = make_policy(name, **({"local_prefill_threshold_tokens": 0} if name == "cache_aware" else {}))
        pairs = set()
        for i in range(40):
            decision = policy.route(RouteRequest(f"r{i}", 64, [i, i + 1000, i + 2000, i + 3000], 8), tracker)
            pairs.add((decision.prefill_worker_id, decision.decode_worker_id))
        assert ("p0", "d0") not in pairs and ("p1", "d0") in pairs, (name, pairs)
    tracker.broken_pairs.add(("p1", "d0"))  # d0 has no pair left: it prefills itself
    for name in ("round_robin", "least_loaded", "cache_aware"):
        policy = make_policy(name, **({"local_prefill_threshold_tokens": 0} if name == "cache_aware" else {}))
        for i in range(20):
            decision = policy.route(RouteRequest(f"r{i}", 64, [i, i + 1000, i + 2000, i + 3000], 8), tracker)
            if decision.decode_worker_id == "d0":
                assert decision.prefill_worker_id is None, name
