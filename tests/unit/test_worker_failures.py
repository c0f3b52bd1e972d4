"""A worker that stops answering, over real in-process workers (gRPC KV transfer, no Ray).

decode-0's engine thread is held (a real hang: every call into the worker waits), so
its polls bring no answer: within `worker_timeout_s` it is out of routing, its streams
move to decode-1 and finish with exactly the offline engine's tokens; once it answers
again (same instance, not restarted) it rejoins routing, the aborted attempts free its
blocks, and new requests are served. With `max_migrations` 0 the streams it held end
UNAVAILABLE naming the cause. Ray's actor deaths are covered by tests/e2e/test_chaos.py.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.engine import LLM, SamplingParams
from pdserve.router.client import GenerateChunk, PdserveClient
from tests.inprocess import InProcessDeployment

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def dep():
    d = InProcessDeployment(
        num_prefill=1, num_decode=2, policy="round_robin", router_overrides={"worker_timeout_s": 3.0}
    )
    yield d
    d.close()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stream_all(url: str, prompts, progress: list[int]):
    results: list = [None] * len(prompts)

    def run(i: int) -> None:
        tokens, errors = [], []
        with PdserveClient(url) as client:
            try:
                for ev in client.generate(
                    prompts[i], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True
                ):
                    if isinstance(ev, GenerateChunk):
                        tokens += ev.token_ids
                        progress[i] = len(tokens)
            except Exception as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)
        results[i] = (tokens, errors)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    return threads, results


def test_hung_decode_worker_is_dropped_and_rejoins(dep):
    rng = random.Random(4)
    prompts = [[rng.randrange(256) for _ in range(30)] for _ in range(8)]
    expected = [
        o.token_ids
        for o in LLM("tiny", num_gpu_blocks=512).generate(
            prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        )
    ]
    progress = [0] * len(prompts)
    threads, results = stream_all(dep.url, prompts, progress)
    wait_for(lambda: min(progress) >= 2, 60, "every stream's first tokens")
    gate = threading.Event()
    dep.decode["decode-0"].loop.call(lambda engine: gate.wait(60))  # the engine thread hangs
    try:
        for t in threads:
            t.join(60)
        for i, (tokens, errors) in enumerate(results):
            assert not errors and tokens == expected[i], f"stream {i}: {errors}"
        status = dep.run(_status(dep))
        assert status["workers"]["decode-0"]["alive"] is False
        assert status["workers"]["decode-0"]["lost_reason"] == "no answer within 3 s"
        assert status["stats"]["num_worker_failures"] == 1 and status["stats"]["num_migrations"] >= 1
        assert status["serving"]
        metrics = scrape(dep)
        assert metrics[("pdserve:worker_failures_total", "")] == 1
        assert metrics[("pdserve:migrations_total", "")] == status["stats"]["num_migrations"]
        assert (
            metrics[("pdserve:worker_up", "decode-0")] == 0
            and metrics[("pdserve:worker_up", "decode-1")] == 1
        )
    finally:
        gate.set()
    status = wait_for(
        lambda: (s := dep.run(_status(dep)))["workers"]["decode-0"]["alive"] and s, 30, "decode-0 to rejoin"
    )
    assert status["workers"]["decode-0"]["num_restarts"] == 0
    assert status["stats"]["num_worker_recoveries"] == 1 and status["stats"]["num_worker_restarts"] == 0
    wait_for(dep.all_blocks_free, 20, "every block free")
    # Both decode workers serve again (round robin takes turns).
    progress = [0] * 2
    threads, results = stream_all(dep.url, prompts[:2], progress)
    for t in threads:
        t.join(60)
    assert [r[0] for r in results] == expected[:2]


def scrape(dep) -> dict[tuple[str, str], float]:
    """The router's /metrics samples by (name, worker label)."""
    text = dep.core.metrics.render().decode()
    return {
        (sample.name, sample.labels.get("worker", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _status(dep):
    return dep.core.status()


def test_past_max_migrations_the_stream_ends_unavailable_naming_the_cause():
    """router.max_migrations 0: a stream whose decode worker is lost is not moved; it ends
    with UNAVAILABLE naming the worker and the limit, after the tokens it already had."""
    d = InProcessDeployment(
        num_prefill=1,
        num_decode=2,
        policy="round_robin",
        router_overrides={"worker_timeout_s": 3.0, "max_migrations": 0},
    )
    gate = threading.Event()
    try:
        rng = random.Random(8)
        prompts = [[rng.randrange(256) for _ in range(30)] for _ in range(4)]
        progress = [0] * len(prompts)
        threads, results = stream_all(d.url, prompts, progress)
        wait_for(lambda: min(progress) >= 2, 60, "every stream's first tokens")
        d.decode["decode-0"].loop.call(lambda engine: gate.wait(60))
        for t in threads:
            t.join(60)
        failed = [errors[0] for _, errors in results if errors]
        assert 1 <= len(failed) < len(prompts)  # round robin: decode-0 held some, not all
        for exc in failed:
            assert exc.code.name == "UNAVAILABLE"
            assert "ended after 1 attempts (router.max_migrations=0)" in exc.message
            assert "worker decode-0 is gone: no answer within 3 s" in exc.message
        assert all(len(tokens) == MAX_TOKENS for tokens, errors in results if not errors)
        stats = d.core.stats
        assert stats.num_requests_failed_over_limit == len(failed) and stats.num_migrations == 0
    finally:
        gate.set()
        d.close()
