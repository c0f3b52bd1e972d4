"""Keeps the router's `KVIndex` in step with what each worker's cache holds.

With KV events on, workers send `KVEventBatch`es of their block pool's
`BlockStored`/`BlockRemoved` events, numbered by `seq` per worker instance. They
are applied in order; a gap or a restarted worker (new `instance_id`) drops that
worker's index entries and marks it as needing a `KVSnapshot` before its events
are trusted again.

With KV events off (`use_kv_events=False`), the index is filled from routing
history instead: the prompt blocks of a request routed to a worker are recorded
as held by it, evicting that worker's least recently routed blocks beyond its
total blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.engine.core.block_pool import BlockRemoved, BlockStored
from pdserve.engine.core.outputs import KVSnapshot
from pdserve.router.kv_index import KVIndex


@dataclass(frozen=True)
class KVEventBatch:
    worker_id: str
    instance_id: str  # changes when the worker restarts
    seq: int  # 0, 1, 2, ... per instance
    events: list[BlockStored | BlockRemoved]


class KVIndexSync:
    """The KV index plus what it takes to trust it: event order per worker, or
    routing history when there are no events."""

    def __init__(
        self,
        index: KVIndex | None = None,
        use_kv_events: bool = True,
        total_blocks_of: Callable[[str], int | None] = lambda worker_id: None,
    ) -> None:
        """`total_blocks_of(worker_id)` bounds a worker's routing history (None: unbounded)."""
        self.index = index if index is not None else KVIndex()
        # blocks in workers' host tiers ("cpu" medium): a hit there is a copy, not a compute
        self.host_index = KVIndex()
        self.use_kv_events = use_kv_events
        self._total_blocks_of = total_blocks_of
        self._event_stream: dict[str, tuple[str, int]] = {}  # worker -> (instance_id, next seq)
        self._needs_resync: set[str] = set()
        self._history: dict[str, OrderedDict[int, None]] = {}  # worker -> LRU of routed hashes

    def apply(self, batch: KVEventBatch) -> bool:
        """Apply one event batch. False: it was not applied and the caller must
        fetch a `KVSnapshot` of this worker and pass it to `apply_snapshot`.

        A worker seen for the first time may start at seq 0 (nothing was missed);
        any other first seq, a skipped seq, or a new instance_id needs a resync.
        Until the snapshot arrives the worker's index entries are dropped, so the
        router underestimates (never overestimates) what it holds.
        """
        if not self.use_kv_events:
            return True
        worker_id = batch.worker_id
        stream = self._event_stream.get(worker_id)
        if stream is None and worker_id not in self._needs_resync and batch.seq == 0:
            stream = (batch.instance_id, 0)
        if stream is None or stream != (batch.instance_id, batch.seq):
            if worker_id not in self._needs_resync:
                self._needs_resync.add(worker_id)
                self._event_stream.pop(worker_id, None)
                self.index.remove_worker(worker_id)
                self.host_index.remove_worker(worker_id)
            return False
        for event in batch.events:
            index = self.host_index if getattr(event, "medium", "gpu") == "cpu" else self.index
            if hasattr(event, "parent_hash"):  # BlockStored (BlockRemoved has no parent)
                index.store(worker_id, event.block_hashes)
            else:
                index.remove(worker_id, event.block_hashes)
        self._event_stream[worker_id] = (batch.instance_id, batch.seq + 1)
        return True

    def apply_snapshot(self, snapshot: KVSnapshot) -> None:
        """Replace everything indexed for the worker with the snapshot's contents."""
        self.index.remove_worker(snapshot.worker_id)
        self.index.store(snapshot.worker_id, snapshot.block_hashes)
        self.host_index.remove_worker(snapshot.worker_id)
        self.host_index.store(snapshot.worker_id, snapshot.host_block_hashes)
        self._needs_resync.discard(snapshot.worker_id)
        self._event_stream[snapshot.worker_id] = (snapshot.instance_id, snapshot.seq + 1)

    def needs_resync(self, worker_id: str) -> bool:
        return worker_id in self._needs_resync

    def workers_needing_resync(self) -> list[str]:
        return sorted(self._needs_resync)

    def on_routed(self, worker_ids: Sequence[str], block_hashes: Sequence[int], num_hit_blocks: int) -> None:
        """A prompt was routed to `worker_ids` (the prefill worker first, then the
        decode worker if another). With events on, its first `num_hit_blocks`
        blocks hit the cache and count as recently used; with events off, the
        workers are predicted to hold all of its blocks from now on."""
        if self.use_kv_events:
            self.index.touch(block_hashes[:num_hit_blocks])
            return
        for worker_id in worker_ids:
            self._record_history(worker_id, block_hashes)

    def forget_worker(self, worker_id: str) -> None:
        """Drop the worker's index entries, event stream, resync mark and history."""
        self.index.remove_worker(worker_id)
        self.host_index.remove_worker(worker_id)
        self._event_stream.pop(worker_id, None)
        self._needs_resync.discard(worker_id)
        self._history.pop(worker_id, None)

    def _record_history(self, worker_id: str, block_hashes: Sequence[int]) -> None:
        history = self._history.setdefault(worker_id, OrderedDict())
        for h in block_hashes:
            history[h] = None
            history.move_to_end(h)
        self.index.store(worker_id, block_hashes)
        capacity = self._total_blocks_of(worker_id)
        if capacity is None:
            capacity = len(history)
        evicted = []
        while len(history) > capacity:
            evicted.append(history.popitem(last=False)[0])
        if evicted:
            self.index.remove(worker_id, evicted)
