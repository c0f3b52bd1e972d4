"""KVIndexSync on its own: event order and resync, hit touches, routing-history prediction."""

from pdserve.engine.core.block_pool import BlockRemoved, BlockStored
from pdserve.engine.core.outputs import KVSnapshot
from pdserve.router.kv_index import KVIndex
from pdserve.router.kv_sync import KVEventBatch, KVIndexSync


def stored(*hashes: int) -> BlockStored:
    return BlockStored(tuple(hashes), 0)


def test_in_order_batches_store_and_remove() -> None:
    sync = KVIndexSync()
    assert sync.apply(KVEventBatch("w", "i0", 0, [stored(1, 2, 3)]))
    assert sync.apply(KVEventBatch("w", "i0", 1, [BlockRemoved((3,))]))
    assert sync.index.overlaps([1, 2, 3]) == {"w": 2}
    assert sync.workers_needing_resync() == []


def test_gap_refuses_batches_until_a_snapshot() -> None:
    sync = KVIndexSync()
    assert sync.apply(KVEventBatch("w", "i0", 0, [stored(1)]))
    assert not sync.apply(KVEventBatch("w", "i0", 2, [stored(2)]))
    assert sync.needs_resync("w") and sync.index.overlaps([1]) == {}
    assert not sync.apply(KVEventBatch("w", "i0", 3, [stored(3)]))
    sync.apply_snapshot(KVSnapshot("w", "i0", 3, [1, 2, 3]))
    assert not sync.needs_resync("w")
    assert sync.apply(KVEventBatch("w", "i0", 4, [stored(4)]))
    assert sync.index.overlaps([1, 2, 3, 4]) == {"w": 4}


def test_forget_worker_drops_entries_and_stream() -> None:
    sync = KVIndexSync()
    assert sync.apply(KVEventBatch("w", "i0", 0, [stored(1)]))
    assert not sync.apply(KVEventBatch("w", "i0", 5, [stored(2)]))
    sync.forget_worker("w")
    assert not sync.needs_resync("w") and 1 not in sync.index
    assert sync.apply(KVEventBatch("w", "i1", 0, [stored(7)]))  # a fresh stream from seq 0


def test_routed_hits_count_as_recently_used() -> None:
    sync = KVIndexSync(KVIndex(max_entries=3))
    assert sync.apply(KVEventBatch("w", "i0", 0, [stored(1, 2), stored(3)]))
    sync.on_routed(["w"], [1, 2, 3], num_hit_blocks=1)  # touches block 1 only
    assert sync.apply(KVEventBatch("w", "i0", 1, [stored(4)]))  # evicts the least recently used
    assert 1 in sync.index and 2 not in sync.index


def test_history_predicts_holders_with_a_per_worker_lru_bound() -> None:
    totals = {"p": 4}
    sync = KVIndexSync(use_kv_events=False, total_blocks_of=totals.get)
    assert sync.apply(KVEventBatch("p", "i0", 9, [stored(99)]))  # ignored when events are off
    assert 99 not in sync.index
    sync.on_routed(["p", "d"], [1, 2, 3], num_hit_blocks=0)
    sync.on_routed(["p", "d"], [4, 5], num_hit_blocks=0)
    assert sync.index.overlaps([1, 2, 3]) == {"d": 3}  # p holds at most 4 blocks: 1 was evicted
    assert sync.index.overlaps([2, 3]) == {"p": 2, "d": 2}
    assert sync.index.overlaps([4, 5]) == {"p": 2, "d": 2}
