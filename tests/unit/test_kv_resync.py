"""KV events from a real engine loop keep the router's index exact; after a lost
batch the router resyncs from a snapshot."""

from __future__ import annotations

import time

from pdserve.engine.config import EngineConfig
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.llm_engine import LLMEngine
from pdserve.router.kv_sync import KVEventBatch
from pdserve.router.worker_state import WorkerStateTracker


def run_request(loop: EngineLoop, req_id: str, prompt: list[int]) -> None:
    loop.call_sync(lambda e: e.add_request(req_id, prompt, SamplingParams(max_tokens=2, ignore_eos=True)))
    deadline = time.monotonic() + 10
    while loop.call_sync(lambda e: e.has_unfinished()):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def poll_batch(loop: EngineLoop) -> KVEventBatch:
    batch = loop.poll(0.2)
    return KVEventBatch("w", batch.instance_id, batch.event_seq, batch.kv_events)


def indexed(tracker: WorkerStateTracker, loop: EngineLoop) -> set[int]:
    cached = loop.call_sync(lambda e: list(e.kv_manager.pool.cached))
    return {h for h in cached if "w" in tracker.index.holders(h)}, set(cached)


def test_events_track_the_pool_and_a_gap_resyncs():
    engine = LLMEngine(EngineConfig(model="tiny", num_gpu_blocks=12, block_size=4))
    loop = EngineLoop(engine, "w")
    loop.start()
    try:
        tracker = WorkerStateTracker()
        run_request(loop, "a", list(range(20)))
        assert tracker.apply(poll_batch(loop))
        held, cached = indexed(tracker, loop)
        assert held == cached and cached
        run_request(loop, "b", list(range(100, 130)))  # evicts some of "a"
        poll_batch(loop)  # this batch is lost
        run_request(loop, "c", list(range(200, 216)))
        assert not tracker.apply(poll_batch(loop))  # the gap is noticed
        assert tracker.needs_resync("w")
        tracker.apply_snapshot(loop.kv_snapshot())
        held, cached = indexed(tracker, loop)
        assert held == cached
        run_request(loop, "d", list(range(220, 250)))
        assert tracker.apply(poll_batch(loop))  # back in step
        held, cached = indexed(tracker, loop)
        assert held == cached
    finally:
        loop.stop()
