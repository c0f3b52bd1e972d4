"""WorkerStateTracker: event streams and resync, load reports, promises, history."""

from pdserve.engine.core.block_pool import BlockRemoved, BlockStored
from pdserve.engine.core.outputs import KVSnapshot, LoadReport
from pdserve.router.kv_sync import KVEventBatch
from pdserve.router.routing import RouteDecision, RouteRequest
from pdserve.router.worker_state import WorkerStateTracker


def report(
    worker_id: str,
    role: str = "decode",
    free: int = 100,
    total: int = 100,
    ts: float = 0.0,
    instance: str = "i0",
    queued: int = 0,
) -> LoadReport:
    return LoadReport(worker_id, instance, role, free, total, 4, 0, 0, queued, ts)


def stored(*hashes: int) -> BlockStored:
    return BlockStored(tuple(hashes), 0)


def test_in_order_batches_apply() -> None:
    tracker = WorkerStateTracker()
    assert tracker.apply(KVEventBatch("p", "i0", 0, [stored(1, 2, 3)]))
    assert tracker.apply(KVEventBatch("p", "i0", 1, [BlockRemoved((3,))]))
    assert tracker.index.overlaps([1, 2, 3]) == {"p": 2}
    assert not tracker.needs_resync("p")


def test_seq_gap_asks_for_snapshot_and_snapshot_restores() -> None:
    tracker = WorkerStateTracker()
    assert tracker.apply(KVEventBatch("p", "i0", 0, [stored(1, 2)]))
    assert not tracker.apply(KVEventBatch("p", "i0", 2, [stored(3)]))  # seq 1 lost
    assert tracker.needs_resync("p") and tracker.workers_needing_resync() == ["p"]
    assert tracker.index.overlaps([1, 2]) == {}  # untrusted entries dropped
    assert not tracker.apply(KVEventBatch("p", "i0", 3, [stored(4)]))  # still waiting
    tracker.apply_snapshot(KVSnapshot("p", "i0", 3, [1, 2, 3, 4]))
    assert not tracker.needs_resync("p")
    assert tracker.apply(KVEventBatch("p", "i0", 4, [stored(5)]))
    assert tracker.index.overlaps([1, 2, 3, 4, 5]) == {"p": 5}


def test_restart_with_new_instance_id_needs_resync() -> None:
    tracker = WorkerStateTracker()
    assert tracker.apply(KVEventBatch("p", "i0", 0, [stored(1, 2)]))
    assert not tracker.apply(KVEventBatch("p", "i1", 0, [stored(9)]))
    assert tracker.index.overlaps([1, 2]) == {}
    tracker.apply_snapshot(KVSnapshot("p", "i1", -1, []))
    assert tracker.apply(KVEventBatch("p", "i1", 0, [stored(9)]))
    assert tracker.index.overlaps([9]) == {"p": 1}


def test_first_batch_not_at_zero_needs_resync() -> None:
    tracker = WorkerStateTracker()
    assert not tracker.apply(KVEventBatch("p", "i0", 5, [stored(1)]))
    assert tracker.needs_resync("p")


def test_pending_reservation_until_newer_report_and_committed_until_release() -> None:
    tracker = WorkerStateTracker()
    tracker.update_load(report("d", free=100, total=100, ts=1.0))
    tracker.update_load(report("p", role="prefill", ts=1.0))
    request = RouteRequest("r1", num_prompt_tokens=16, block_hashes=[1, 2, 3, 4], max_tokens=16)
    tracker.on_routed(request, RouteDecision("p", "d", 0), now=2.0)
    assert tracker.blocks_needed("d", request) == 8  # nothing to share before its KV landed
    tracker.on_kv_landed("r1")
    assert tracker.blocks_needed("d", request) == 5  # 3 of its prompt blocks (not the last token's)
    assert tracker.available_blocks("d") == 92  # 100 free - 8 pending
    assert tracker.pending_prefill_tokens("p") == 16
    tracker.update_load(report("d", free=100, total=100, ts=1.5))  # taken before the route
    assert tracker.available_blocks("d") == 92
    tracker.update_load(report("d", free=96, total=100, ts=3.0))  # shows the 4 prompt blocks
    tracker.update_load(report("p", role="prefill", ts=3.0))
    assert tracker.pending_prefill_tokens("p") == 0
    assert tracker.available_blocks("d") == 92  # total - committed: output may still grow
    tracker.release("r1")
    assert tracker.committed_blocks("d") == 0 and tracker.available_blocks("d") == 96
    tracker.release("r1")  # idempotent


def test_shared_prompt_blocks_are_committed_once_their_kv_landed() -> None:
    tracker = WorkerStateTracker()
    tracker.update_load(report("d", ts=0.0))
    tracker.on_routed(RouteRequest("a", 16, [1, 2, 3, 4], 4), RouteDecision(None, "d", 0), now=1.0)
    tracker.on_routed(RouteRequest("early", 16, [1, 2, 3, 5], 4), RouteDecision(None, "d", 12), now=1.0)
    assert tracker.committed_blocks("d") == 5 + 5  # before a's KV landed each holds its own copy
    tracker.release("early")
    tracker.on_kv_landed("a")
    tracker.on_routed(RouteRequest("b", 16, [1, 2, 3, 5], 4), RouteDecision(None, "d", 12), now=1.0)
    assert tracker.committed_blocks("d") == 5 + 2  # 5 distinct prompt blocks + 1 output block each
    tracker.release("a")
    assert tracker.committed_blocks("d") == 5
    tracker.release("b")
    assert tracker.committed_blocks("d") == 0


def test_history_fallback_records_routed_prefixes_with_lru_bound() -> None:
    tracker = WorkerStateTracker(use_kv_events=False)
    tracker.update_load(report("d", total=6))
    tracker.update_load(report("p", role="prefill", total=6))
    assert tracker.apply(KVEventBatch("p", "i0", 7, [stored(99)]))  # ignored when events are off
    tracker.on_routed(RouteRequest("a", 16, [1, 2, 3, 4], 4), RouteDecision("p", "d", 0), now=1.0)
    assert tracker.index.overlaps([1, 2, 3, 4]) == {"p": 4, "d": 4}
    tracker.on_routed(RouteRequest("b", 16, [5, 6, 7, 8], 4), RouteDecision("p", "d", 0), now=1.0)
    # 6 blocks per worker: the oldest two of the first prompt were evicted.
    assert tracker.index.overlaps([1, 2, 3, 4]) == {}
    assert tracker.index.overlaps([5, 6, 7, 8]) == {"p": 4, "d": 4}
    assert 99 not in tracker.index


def test_remove_worker_and_restart_forget_everything() -> None:
    tracker = WorkerStateTracker()
    tracker.update_load(report("d"))
    tracker.apply(KVEventBatch("d", "i0", 0, [stored(1)]))
    tracker.on_routed(RouteRequest("a", 16, [1, 2, 3, 4], 4), RouteDecision(None, "d", 0), now=1.0)
    tracker.update_load(report("d", instance="i1", ts=2.0))  # restarted: its requests died
    assert tracker.committed_blocks("d") == 0 and tracker.num_in_flight() == 0
    tracker.remove_worker("d")
    assert "d" not in tracker.loads and tracker.index.overlaps([1]) == {}
