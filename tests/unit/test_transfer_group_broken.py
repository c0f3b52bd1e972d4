"""The router's handling of a broken KV transfer group, over real in-process workers (gRPC
KV transfer, no Ray).

A worker whose nccl transfer group broke says so in its poll (`StepBatch.transfer_broken`)
and the monitor hands that to `RouterCore.on_transfer_broken`; here the report is handed
to it directly (the gRPC backend has no group to break; tests/e2e/test_chaos.py breaks a
real one over gloo). prefill-0's engine thread is held meanwhile, so the requests routed
to it are still in prefill: they must be prefilled again on the decode worker and end
with exactly the offline engine's tokens. Both prefill workers then stay out of routing
while they answer polls again, new requests are served by the decode worker alone, and
the status, health, counters and lifecycle log name the cause once.
"""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.engine import LLM, SamplingParams
from pdserve.router.server import WORKER_HEALTH_PREFIX
from tests.inprocess import InProcessDeployment
from tests.unit.test_worker_failures import MAX_TOKENS, scrape, stream_all, wait_for

REASON = "request r1: recv from rank 0 (layers 0..1): Timed out waiting 3000ms for recv operation to complete"
BROKEN = f"KV transfer group broken (decode-0: {REASON}); restart the deployment (pdserve down / up)"


def health_of(url: str, service: str) -> int:
    with grpc.insecure_channel(url) as channel:
        return (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status
        )


def report_broken(dep: InProcessDeployment, worker_id: str, reason: str) -> None:
    """What the monitor does with a poll that carries `transfer_broken`, on the router's loop."""
    done = threading.Event()

    def report() -> None:
        dep.core.on_transfer_broken(worker_id, reason)
        done.set()

    dep.loop.call_soon_threadsafe(report)
    assert done.wait(10)


@pytest.mark.timeout(120)
def test_a_broken_transfer_group_moves_prefill_to_the_decode_worker_for_good():
    dep = InProcessDeployment(
        num_prefill=2, num_decode=1, policy="round_robin", router_overrides={"worker_timeout_s": 30.0}
    )
    gate = threading.Event()
    try:
        rng = random.Random(11)
        all_prompts = [[rng.randrange(256) for _ in range(30)] for _ in range(8)]
        all_expected = [
            o.token_ids
            for o in LLM("tiny", num_gpu_blocks=512).generate(
                all_prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
            )
        ]
        prompts, expected = all_prompts[:6], all_expected[:6]
        dep.prefill["prefill-0"].loop.call(lambda engine: gate.wait(60))  # its prefills wait
        progress = [0] * len(prompts)
        threads, results = stream_all(dep.url, prompts, progress)
        # prefill-1's half streams; prefill-0's half waits in prefill
        wait_for(lambda: sum(p >= 2 for p in progress) >= len(prompts) // 2, 60, "prefill-1's streams")
        report_broken(dep, "decode-0", REASON + "\n  a second line that is not repeated")
        report_broken(dep, "prefill-1", "sends to rank 2 failed: later news")  # said once
        for t in threads:
            t.join(60)
        for i, (tokens, errors) in enumerate(results):
            assert not errors and tokens == expected[i], f"stream {i}: {errors}"

        status = dep.core.status()
        assert status["transfer_broken"] == BROKEN
        for worker_id in ("prefill-0", "prefill-1"):
            worker = status["workers"][worker_id]
            assert not worker["alive"] and worker["lost_reason"] == BROKEN, worker
        assert status["workers"]["decode-0"]["alive"] and status["serving"]
        stats = status["stats"]
        assert stats["num_transfer_group_failures"] == 1
        assert stats["num_prefill_retries"] == len(prompts) // 2  # prefill-0's, not yet landed
        messages = [e["message"] for e in status["events"]]
        assert (
            messages.count(
                f"{BROKEN}; until then the prefill workers are out of routing and requests are "
                "prefilled on the decode workers"
            )
            == 1
        )
        assert not any("later news" in m for m in messages)
        metrics = scrape(dep)
        assert metrics[("pdserve:transfer_group_failures_total", "")] == 1
        assert (
            metrics[("pdserve:worker_up", "prefill-1")] == 0
            and metrics[("pdserve:worker_up", "decode-0")] == 1
        )
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        assert health_of(dep.url, "") == serving
        wait_for(
            lambda: health_of(dep.url, WORKER_HEALTH_PREFIX + "prefill-0") == not_serving,
            5,
            "prefill-0's health to follow",
        )
        assert health_of(dep.url, WORKER_HEALTH_PREFIX + "decode-0") == serving
    finally:
        gate.set()
    try:
        # prefill-0 answers again, and both keep answering polls: neither rejoins routing.
        time.sleep(1.0)
        status = dep.core.status()
        assert not status["workers"]["prefill-0"]["alive"] and not status["workers"]["prefill-1"]["alive"]
        assert status["stats"]["num_worker_recoveries"] == 0
        wait_for(dep.all_blocks_free, 20, "every block free")
        cached_before = [set(w.kv_snapshot().block_hashes) for w in dep.prefill.values()]
        progress = [0] * 2
        threads, results = stream_all(dep.url, all_prompts[6:], progress)  # new prompts
        for t in threads:
            t.join(60)
        assert [r[0] for r in results] == all_expected[6:] and not any(r[1] for r in results)
        # prefilled on the decode worker: no prefill worker's cache saw them
        assert [set(w.kv_snapshot().block_hashes) for w in dep.prefill.values()] == cached_before
        wait_for(dep.all_blocks_free, 20, "every block free")
    finally:
        dep.close()
