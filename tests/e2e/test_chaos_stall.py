"""A worker that stalls mid-transfer instead of dying: through the router's gRPC API with Ray
actors on CPU (the kills are tests/e2e/test_chaos.py, whose requests, offline engine and
checks these share).

- 2P1D, grpc: a stalled data connection. The prefill worker's process stops (SIGSTOP)
  in the middle of a KV push, header sent, payload not, with a short `transfer.timeout_s`:
  the decode worker's lease drops the reservations it stalled, the affected streams end
  ABORTED naming the timeout while that process is still stopped, the others are exact;
  once it resumes (SIGCONT) every block on both sides is free again;
- 2P1D, nccl (gloo): the same stall, between the KV notice and the bytes. The stalled
  worker's requests are retried once it is lost; the decode worker's receive from it
  times out, and a timed-out wait breaks every pair of the decode worker's rank for good
  (transfer/nccl_backend.py, "Failure"): the router never routes KV to it again, keeps
  both prefill workers out of routing (prefill-0 even once it resumes), and prefills every
  request not yet landed, and every new one, on the decode worker.
Afterwards, in each: every stream equals the offline engine's tokens (or, for a stream
whose transfer stalled, a prefix of them ending ABORTED), every live worker has all its KV
blocks free, and a new request succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from grpc_health.v1 import health_pb2

from pdserve.bench.chaos import run_with_kill
from pdserve.deploy.launcher import up
from pdserve.router.server import WORKER_HEALTH_PREFIX
from tests.e2e.test_chaos import (  # noqa: F401 (fixtures)
    MAX_TOKENS,
    NUM_STREAMS,
    chaos_config,
    check_new_request,
    make_requests,
    offline,
    one_node,
    wait_live_workers_free,
)
from tests.inprocess import health_of

ray = pytest.importorskip("ray")


def stop_mid_push_hook():
    """What `__ray_call__` runs in a prefill worker's actor: its real gRPC sender's next push
    sends the header, then the process stops itself (SIGSTOP) before the payload, a stalled
    data connection at a known point. Returns the process's PID (the test resumes it).
    Built here so that cloudpickle ships the function by value, not as an import of this file."""

    def arm(actor) -> int:
        import os
        import signal
        import time

        sender = actor.worker.send_side.sender
        chunks = sender._chunks  # (header, payload) -> header, then the payload's data chunks
        armed = [True]

        def header_then_stop(header: bytes, payload: memoryview):
            rest = chunks(header, payload)
            yield next(rest)
            if armed[0]:
                armed[0] = False
                time.sleep(0.3)  # the header reaches the decode worker: its transfer has begun
                os.kill(os.getpid(), signal.SIGSTOP)
                # The stop reaches every thread only at its next pass through the kernel: sleep
                # meanwhile, so that no payload byte leaves before it (this runs on after SIGCONT).
                time.sleep(0.5)
            yield from rest

        sender._chunks = header_then_stop
        return os.getpid()

    return arm


def process_state(pid: int) -> str:
    """The process's state letter from /proc (T: stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@dataclasses.dataclass
class Stall:
    """prefill-0's process, stopped by an armed hook; resumed once (by the test, its watchdog,
    or on the way out)."""

    pid: int
    resumed: bool = False

    def resume(self) -> None:
        if not self.resumed:
            self.resumed = True
            os.kill(self.pid, signal.SIGCONT)


@contextlib.contextmanager
def prefill_0_stalls(dep, hook) -> Iterator[Stall]:
    """Arms `hook` in prefill-0's actor (it SIGSTOPs its own process at the hooked moment)."""
    stall = Stall(ray.get(dep.workers["prefill-0"].__ray_call__.remote(hook), timeout=30))
    try:
        yield stall
    finally:
        stall.resume()


def run_streams_past_a_stall(dep, stall: Stall, lease_s: float, hooked: str):
    """16 streams while prefill-0 stops at its hook. A stream still open 4 leases + 10 s after
    the start is a hang: the watchdog then resumes the worker, which fails the test."""
    timer = threading.Timer(4 * lease_s + 10, stall.resume)
    timer.start()
    prompts, sampling = make_requests(400, seed=7)
    try:
        results, _ = asyncio.run(run_with_kill(dep.url, prompts, sampling, timeout_s=60))
    finally:
        timer.cancel()
    assert not stall.resumed, "a stream waited for the stalled worker to resume"
    assert process_state(stall.pid) == "T", f"the prefill worker never stopped: no {hooked} reached the hook"
    return prompts, sampling, results


STALL_TIMEOUT_S = 3.0  # transfer.timeout_s of the stalled-connection test


@pytest.mark.timeout(120)
def test_a_stalled_push_ends_by_the_lease_and_frees_both_sides(one_node, offline):  # noqa: F811
    """2P1D over grpc: prefill-0 stops in the middle of a push while 16 streams run. The
    router's own failure detection is pushed out of the way (worker_timeout_s 30 s), so
    what ends the affected requests is the decode worker's lease."""
    cfg = chaos_config(2, 1, "grpc")
    cfg.transfer = dataclasses.replace(cfg.transfer, timeout_s=STALL_TIMEOUT_S)
    cfg.router.worker_timeout_s = 30.0
    dep = up(cfg)
    try:
        with prefill_0_stalls(dep, stop_mid_push_hook()) as stall:
            prompts, sampling, results = run_streams_past_a_stall(dep, stall, STALL_TIMEOUT_S, "push")
            check_a_stalled_push(dep, offline, stall, prompts, sampling, results)
    finally:
        dep.down()


def check_a_stalled_push(dep, offline, stall: Stall, prompts, sampling, results) -> None:  # noqa: F811
    """What the stalled-push test checks once its streams have ended (prefill-0 still stopped)."""
    want = offline(prompts, sampling)
    failed = [i for i, r in enumerate(results) if r.error is not None]
    assert failed and len(failed) < NUM_STREAMS, [r.error for r in results]
    for i, r in enumerate(results):
        assert r.tokens == want[i][: len(r.tokens)], f"stream {i}: not a prefix of the offline tokens"
        if r.error is None:  # not on the stalled worker, or its KV had landed: exact
            assert r.tokens == want[i] and r.finish_reason == "length", f"stream {i}"
            assert r.completion_tokens == MAX_TOKENS, f"stream {i}"
        else:
            assert r.error.startswith("ABORTED: request "), r.error
            assert "KV transfer timed out" in r.error and "(transfer.timeout_s)" in r.error, r.error
    # The push that stopped mid-flight had begun: its lease counted from then.
    assert any("did not land within 3 s" in results[i].error for i in failed)

    status = dep.status()  # while prefill-0 is still stopped
    stats = status["stats"]
    assert stats["num_worker_failures"] == 0 and stats["num_migrations"] == 0
    assert stats["num_prefill_retries"] == 0
    messages = [e["message"] for e in status["events"]]
    failures = [m for m in messages if " failed: KV transfer timed out" in m]
    assert sorted(m.split()[1] for m in failures) == sorted(results[i].error.split()[2] for i in failed), (
        failures
    )  # each failed request logged once, and only those

    stall.resume()  # the stalled push goes on, finds its reservation gone
    status = wait_live_workers_free(dep)
    assert all(w["alive"] for w in status["workers"].values())
    assert open_credentials(dep, "decode-0") == 0
    check_new_request(dep, offline)


def stop_after_notice_hook():
    """What `__ray_call__` runs in a prefill worker's actor over nccl: its next KV notice
    reaches the decode worker (which posts its receives), then the process stops itself
    (SIGSTOP) before any byte is sent. Returns the process's PID."""

    def arm(actor) -> int:
        import os
        import signal
        import time

        links = actor.worker._links  # the send side holds this very dict
        armed = [True]

        class StopAfterNotice:
            def __init__(self, link) -> None:
                self.link = link

            def notify_kv(self, notice):
                waitable = self.link.notify_kv(notice)
                if armed[0]:
                    armed[0] = False
                    time.sleep(1.0)  # the notice reaches the decode worker: its receive has begun
                    os.kill(os.getpid(), signal.SIGSTOP)
                    time.sleep(0.5)  # no isend before the stop reaches every thread
                return waitable

            def kv_failed(self, req_id: str, reason: str | None) -> None:
                self.link.kv_failed(req_id, reason)

        for decode_worker_id, link in list(links.items()):
            links[decode_worker_id] = StopAfterNotice(link)
        return os.getpid()

    return arm


NCCL_STALL_TIMEOUT_S = 6.0  # transfer.timeout_s of the stalled nccl transfer test


def wait_broken_pairs(dep, timeout: float = 2 * NCCL_STALL_TIMEOUT_S) -> dict:
    """The router's status once broken transfer pairs are known (the decode worker reports
    its receive's timeout at its next poll)."""
    deadline = time.monotonic() + timeout
    while not (status := dep.status())["broken_transfer_pairs"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return status


def open_credentials(dep, decode_worker_id: str) -> int:
    """KV transfer credentials the decode worker has issued and not yet seen used or dropped."""
    return ray.get(
        dep.workers[decode_worker_id].__ray_call__.remote(lambda actor: len(actor.worker.receive_side.gate)),
        timeout=30,
    )


def worker_blocks_free(dep, worker_id: str) -> bool:
    """From the worker itself: a worker out of routing reports no load to the router."""
    load = ray.get(dep.workers[worker_id].__ray_call__.remote(lambda actor: actor.worker.load()), timeout=30)
    return load.num_free_blocks == load.num_total_blocks


def wait_every_worker_free(dep, timeout: float) -> None:
    """Every worker, routed or not, reports all its KV blocks free within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not all(worker_blocks_free(dep, w) for w in dep.workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(worker_blocks_free(dep, w) for w in dep.workers), "KV blocks still in use"


@pytest.mark.timeout(120)
def test_a_stalled_nccl_transfer_breaks_its_pairs_and_the_decode_worker_serves_alone(one_node, offline):  # noqa: F811
    """2P1D over nccl (gloo): prefill-0 stops between its KV notice and the bytes while 16
    streams run. Its requests are retried once it is lost (router.worker_timeout_s); the
    decode worker's receive from it times out, which breaks both pairs into the decode
    worker: the prefill workers leave routing for good and the decode worker prefills."""
    cfg = chaos_config(2, 1, "nccl")
    cfg.transfer = dataclasses.replace(cfg.transfer, timeout_s=NCCL_STALL_TIMEOUT_S)
    # Lost well before its requests' leases run out (it stops about 1 s in), and never while
    # it is only busy prefilling on a loaded machine
    cfg.router.worker_timeout_s = NCCL_STALL_TIMEOUT_S - 2
    dep = up(cfg)
    try:
        with prefill_0_stalls(dep, stop_after_notice_hook()) as stall:
            prompts, sampling, results = run_streams_past_a_stall(dep, stall, NCCL_STALL_TIMEOUT_S, "notice")
            pairs = check_broken_pairs_while_stalled(dep, offline, prompts, sampling, results)
            stall.resume()  # its send fails on the broken pair; it answers, but stays out
            check_broken_pairs_after_resume(dep, offline, pairs)
    finally:
        dep.down()


def check_broken_pairs_while_stalled(dep, offline, prompts, sampling, results) -> dict:  # noqa: F811
    """The streams, the router's status and health while prefill-0 is stopped; the broken pairs."""
    want = offline(prompts, sampling)
    for i, r in enumerate(results):
        assert r.tokens == want[i][: len(r.tokens)], f"stream {i}: not a prefix of the offline tokens"
        if r.error is None:
            assert r.tokens == want[i] and r.completion_tokens == MAX_TOKENS, f"stream {i}"
        else:  # only a reservation whose lease ran out before the pair was known broken
            assert r.error.startswith("ABORTED: request "), r.error
            assert "KV transfer timed out: it did not" in r.error, r.error

    status = wait_broken_pairs(dep)  # while prefill-0 is still stopped
    pairs = status["broken_transfer_pairs"]
    assert sorted(pairs) == ["prefill-0 -> decode-0", "prefill-1 -> decode-0"], pairs
    messages = [e["message"] for e in status["events"]]
    for pair, broken in pairs.items():
        assert broken.startswith(f"KV transfer {pair} broken (decode-0 reports: request "), broken
        assert "recv from rank 0" in broken and "Timed out waiting" in broken, broken
        assert sum(m.startswith(f"KV transfer {pair} broken") for m in messages) == 1, messages
        assert not status["workers"][pair.split()[0]]["alive"]
    assert status["workers"]["prefill-1"]["lost_reason"].startswith(
        "its KV transfer to every decode worker broke (last: KV transfer prefill-1 -> decode-0 broken "
    )
    assert status["workers"]["decode-0"]["alive"] and status["serving"]
    assert status["stats"]["num_transfer_pairs_broken"] == 2
    assert status["stats"]["num_prefill_retries"] >= 1
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    assert health_of(dep.url, "") == serving
    assert health_of(dep.url, WORKER_HEALTH_PREFIX + "decode-0") == serving
    deadline = time.monotonic() + 5  # health follows the router's state every 0.25 s
    while health_of(dep.url, WORKER_HEALTH_PREFIX + "prefill-1") != not_serving:
        assert time.monotonic() < deadline, "prefill-1's health still SERVING"
        time.sleep(0.1)
    check_new_request(dep, offline)  # prefilled on the decode worker
    return pairs


def check_broken_pairs_after_resume(dep, offline, pairs: dict) -> None:  # noqa: F811
    """Once prefill-0 runs again: every block free, new requests exact, both prefill workers out."""
    wait_every_worker_free(dep, timeout=30)
    check_new_request(dep, offline)
    status = wait_live_workers_free(dep)
    for worker_id in ("prefill-0", "prefill-1"):
        worker = status["workers"][worker_id]
        assert not worker["alive"], worker
        assert worker["lost_reason"].startswith("its KV transfer to every decode worker broke"), worker
    assert status["broken_transfer_pairs"] == pairs and status["stats"]["num_transfer_pairs_broken"] == 2
    assert sum(e["message"].startswith("KV transfer ") for e in status["events"]) == 2
    assert status["stats"]["num_worker_recoveries"] == 0
    assert open_credentials(dep, "decode-0") == 0
