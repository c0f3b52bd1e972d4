"""Workers die mid-stream: through the router's gRPC API with Ray actors on CPU.

16 streams (half greedy, half seeded sampling) run while a worker is killed (`ray.kill`):
- 2P2D, both transfer backends: a prefill worker while requests are in prefill, in
  transfer and decoding (the ones whose KV had not landed are prefilled again on the
  other one), then a decode worker (its requests move to the other one);
- 1P1D: the only decode worker, which Ray restarts (grpc; with nccl workers are not
  restarted, see deploy/launcher.py `worker_max_restarts`): its requests wait for the
  new instance and move to it; then the only prefill worker, restarted too: it is linked
  to the decode worker again and serves new requests.
A worker that stalls instead of dying: tests/e2e/test_chaos_stall.py.
Afterwards, in each: every stream equals the offline engine's tokens (no token missing,
none repeated; seeded streams too), the router shows the loss (status, health, counters),
every live worker has all its KV blocks free, and a new request succeeds.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from grpc_health.v1 import health_pb2

from pdserve.bench.chaos import run_with_kill
from pdserve.deploy.launcher import up
from pdserve.engine import LLM, SamplingParams
from pdserve.router.server import WORKER_HEALTH_PREFIX
from tests.e2e.conftest import one_node_cluster, tiny_config
from tests.inprocess import health_of

ray = pytest.importorskip("ray")

NUM_STREAMS = 16
MAX_TOKENS = 48


def make_requests(prompt_len: int, seed: int) -> tuple[list[list[int]], list[dict]]:
    rng = random.Random(seed)
    prompts = [[256] + [rng.randrange(256) for _ in range(prompt_len)] for _ in range(NUM_STREAMS)]
    sampling = [
        {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0.0}
        if i % 2 == 0
        else {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 1.0, "seed": 1000 + i}
        for i in range(NUM_STREAMS)
    ]
    return prompts, sampling


@pytest.fixture(scope="module")
def offline():
    llm = LLM("tiny", num_gpu_blocks=2048)

    def expected(prompts: list[list[int]], sampling: list[dict]) -> list[list[int]]:
        # One batch: greedy and seeded tokens do not depend on the batch.
        return [o.token_ids for o in llm.generate(prompts, [SamplingParams(**s) for s in sampling])]

    return expected


@pytest.fixture(scope="module")
def one_node():
    with one_node_cluster("pdserve-test-chaos"):
        yield


def chaos_config(num_prefill: int, num_decode: int, backend: str, max_wait_s: float = 30.0):
    cfg = tiny_config(num_prefill, num_decode, backend)
    cfg.router.max_wait_s = max_wait_s  # how long a request waits for a decode worker
    return cfg


def run_and_kill(dep, victim: str, prompts, sampling, kill_after_tokens: int, restart: bool = False):
    handle = dep.workers[victim]
    return asyncio.run(
        run_with_kill(
            dep.url,
            prompts,
            sampling,
            kill=lambda: ray.kill(handle, no_restart=not restart),
            kill_after_tokens=kill_after_tokens,
            timeout_s=90,
        )
    )


def check_streams(results, want, killed_at) -> None:
    assert killed_at is not None, "every stream ended before the kill"
    for i, r in enumerate(results):
        assert r.error is None, f"stream {i}: {r.error}"
        assert r.tokens == want[i], f"stream {i} differs from the offline engine"
        assert r.finish_reason == "length" and r.completion_tokens == MAX_TOKENS, f"stream {i}"


def check_ended_unavailable(results, want, killed_at) -> None:
    assert killed_at is not None, "every stream ended before the kill"
    for i, r in enumerate(results):
        assert r.tokens == want[i][: len(r.tokens)], f"stream {i}: not a prefix of the offline tokens"
        if r.error is None:  # ended before the kill reached it
            assert r.tokens == want[i] and r.finish_reason == "length", f"stream {i}"
        else:
            assert r.error.startswith("UNAVAILABLE: request "), r.error
            assert "lost its worker and no decode worker had room within max_wait_s=3" in r.error, r.error
    assert any(r.error for r in results)


def wait_live_workers_free(dep, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    status = {}
    while time.monotonic() < deadline:
        status = dep.status()
        live = [w for w in status["workers"].values() if w["alive"]]
        if not status["num_streams"] and all(w["num_free_blocks"] == w["num_total_blocks"] for w in live):
            return status
        time.sleep(0.2)
    raise AssertionError(f"KV blocks still in use: {status}")


def check_new_request(dep, offline) -> None:
    prompts, sampling = make_requests(20, seed=99)
    results, _ = asyncio.run(run_with_kill(dep.url, prompts[:2], sampling[:2], timeout_s=60))
    want = offline(prompts[:2], sampling[:2])
    errors = [r.error for r in results]
    assert [r.tokens for r in results] == want and errors == [None] * len(results), errors


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["grpc", "nccl"])
def test_prefill_then_decode_worker_killed(one_node, offline, backend):
    """2P2D: prefill-0 dies while requests are in prefill, in transfer and decoding; then
    decode-0 dies while 16 streams decode. One deployment for both keeps the file short."""
    dep = up(chaos_config(2, 2, backend, max_wait_s=3.0))
    try:
        # Long prompts: at the first streamed token most requests are still in prefill.
        prompts, sampling = make_requests(400, seed=3)
        results, killed_at = run_and_kill(dep, "prefill-0", prompts, sampling, kill_after_tokens=1)
        check_streams(results, offline(prompts, sampling), killed_at)
        status = wait_live_workers_free(dep)
        assert not status["workers"]["prefill-0"]["alive"]
        assert status["stats"]["num_worker_failures"] == 1
        assert status["stats"]["num_prefill_retries"] >= 1

        prompts, sampling = make_requests(40, seed=1)
        results, killed_at = run_and_kill(dep, "decode-0", prompts, sampling, NUM_STREAMS * 6)
        check_streams(results, offline(prompts, sampling), killed_at)
        status = wait_live_workers_free(dep)
        lost = status["workers"]["decode-0"]
        assert not lost["alive"] and "ActorDiedError" in lost["lost_reason"]
        assert status["stats"]["num_worker_failures"] == 2
        assert status["stats"]["num_migrations"] >= 1
        assert status["serving"]
        # Each lifecycle event logged once, with the request id.
        messages = [e["message"] for e in status["events"]]
        assert sum(m.startswith("worker decode-0 lost: ") for m in messages) == 1
        assert sum(m.startswith("worker prefill-0 lost: ") for m in messages) == 1
        migrated = [m.split()[1] for m in messages if " migrated (attempt " in m]
        retried = [m.split()[1] for m in messages if " retried (attempt " in m]
        assert len(migrated) == status["stats"]["num_migrations"]
        assert len(retried) == status["stats"]["num_prefill_retries"]
        assert len(set(migrated)) == len(migrated)  # one request moved once by one kill
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        assert health_of(dep.url, "") == serving
        assert health_of(dep.url, WORKER_HEALTH_PREFIX + "decode-0") == not_serving
        assert health_of(dep.url, WORKER_HEALTH_PREFIX + "prefill-0") == not_serving
        assert health_of(dep.url, WORKER_HEALTH_PREFIX + "decode-1") == serving
        check_new_request(dep, offline)

        # The last decode worker dies: streams end UNAVAILABLE naming the cause once no
        # worker took them within max_wait_s, never hang, and hold the tokens they got.
        prompts, sampling = make_requests(40, seed=6)
        results, killed_at = run_and_kill(dep, "decode-1", prompts, sampling, NUM_STREAMS * 6)
        check_ended_unavailable(results, offline(prompts, sampling), killed_at)
        status = wait_live_workers_free(dep)
        assert not status["serving"] and health_of(dep.url, "") == not_serving
        results, _ = asyncio.run(run_with_kill(dep.url, prompts[:1], sampling[:1], timeout_s=30))
        assert results[0].error.startswith("UNAVAILABLE: no decode worker had room within max_wait_s=3")
        assert "lost: decode-0 (" in results[0].error and "; decode-1 (" in results[0].error
    finally:
        dep.down()


@pytest.mark.timeout(180)
def test_only_workers_restart_and_streams_resume_on_them(one_node, offline):
    dep = up(chaos_config(1, 1, "grpc"))
    try:
        prompts, sampling = make_requests(40, seed=2)
        results, killed_at = run_and_kill(dep, "decode-0", prompts, sampling, NUM_STREAMS * 6, restart=True)
        check_streams(results, offline(prompts, sampling), killed_at)
        status = wait_live_workers_free(dep)
        worker = status["workers"]["decode-0"]
        assert worker["alive"] and worker["num_restarts"] == 1
        stats = status["stats"]
        assert stats["num_worker_failures"] == 1 and stats["num_worker_restarts"] == 1
        assert stats["num_migrations"] >= 1
        check_new_request(dep, offline)

        # The prefill worker crashes too: its requests are retried (prefilled on the decode
        # worker while no prefill worker is up); restarted, it is linked to the decode
        # worker again and new requests take the KV path through it.
        prompts, sampling = make_requests(400, seed=5)
        results, killed_at = run_and_kill(
            dep, "prefill-0", prompts, sampling, kill_after_tokens=1, restart=True
        )
        check_streams(results, offline(prompts, sampling), killed_at)
        deadline = time.monotonic() + 60
        while not (worker := dep.status()["workers"]["prefill-0"])["alive"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert worker["alive"] and worker["num_restarts"] == 1
        check_new_request(dep, offline)
        status = wait_live_workers_free(dep)
        assert status["stats"]["num_worker_restarts"] == 2
        assert status["workers"]["prefill-0"]["num_queued_prefill_tokens"] == 0
    finally:
        dep.down()
