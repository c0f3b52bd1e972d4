"""The host-memory tier of the prefix cache (pure Python: slots and hashes, no tensors).

Full blocks that the GPU pool evicts are copied into host slots, keeping their chained
hashes; a later prompt whose prefix continues past its GPU hits into the host tier gets
those blocks copied back instead of recomputed. The pool only decides: the copies are
`BlockCopies` the scheduler hands to the model runner with the step that needs them
(a GPU block is saved before its new owner writes it, by a load or the forward: the runner
orders that, engine/host_kv.py).

A slot that an onload of the current step reads, or an offload writes, is pinned until
the step's copies are taken, so no other offload of the same step can overwrite it; across
steps the runner orders the copies (a load waits for earlier offloads to end, an offload
for earlier loads).

Slots are chosen so that blocks evicted one after another (a prompt's, tail first) land in
consecutive slots: the runner moves each run of consecutive slots in one copy per layer
(engine/host_kv.py), so a long prompt comes back in large pieces. The next slot after the
last one taken is preferred when it is free, or holds a block in the older half of the
tier by last use (evicted for it); otherwise a new run starts at the lowest free slot, or
at the least recently used block's slot.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.engine.core.block_pool import BlockRemoved, BlockStored, KVEvent


@dataclass
class BlockCopies:
    """Copies between the GPU cache and the host tier that a step must run before its forward."""

    offloads: list[tuple[int, int]] = field(default_factory=list)  # (GPU block id, host slot)
    onloads: list[tuple[int, int]] = field(default_factory=list)  # (host slot, GPU block id)

    def __bool__(self) -> bool:
        return bool(self.offloads or self.onloads)


class HostTier:
    """LRU host slots keyed by block hash."""

    def __init__(self, num_slots: int, record_events: bool = True) -> None:
        if num_slots < 1:
            raise ValueError(f"num_host_blocks must be >= 1 for a host tier, got {num_slots}")
        self.num_slots = num_slots
        self.cached: OrderedDict[int, int] = OrderedDict()  # block hash -> slot, least recent first
        self._free_slots = set(range(num_slots))
        self._free_heap = list(range(num_slots))  # the free slots, lowest first (stale entries skipped)
        self._hash_in: list[int | None] = [None] * num_slots  # slot -> the hash it holds
        self._used_at: dict[int, int] = {}  # block hash -> tick of its last use
        self._tick = 0
        self._last_slot = -1  # the slot the latest offload took: the next one is preferred
        self._pinned: set[int] = set()
        self.copies = BlockCopies()
        self.record_events = record_events
        self.events: list[KVEvent] = []
        self.num_hits = 0  # blocks served from this tier (metric)

    @property
    def num_used_slots(self) -> int:
        return self.num_slots - len(self._free_slots)

    def _use(self, block_hash: int) -> None:
        self.cached.move_to_end(block_hash)
        self._tick += 1
        self._used_at[block_hash] = self._tick

    def lookup(self, block_hashes: Sequence[int]) -> list[int]:
        """Slots of the longest run of `block_hashes` held here; they are pinned for this step."""
        slots = []
        for h in block_hashes:
            slot = self.cached.get(h)
            if slot is None:
                break
            self._use(h)
            slots.append(slot)
        self._pinned.update(slots)
        return slots

    def onload(self, slots: Sequence[int], block_ids: Sequence[int]) -> None:
        """Hits that a request took: copy these slots into its new GPU blocks."""
        self.copies.onloads.extend(zip(slots, block_ids, strict=True))
        self.num_hits += len(slots)

    def offload(self, block_id: int, block_hash: int, parent_hash: int | None) -> None:
        """The GPU pool evicts a cached block: keep a copy here (unless one is already kept)."""
        if block_hash in self.cached:
            self._use(block_hash)
            return
        slot = self._take_slot()
        if slot is None:
            return  # every slot is being read this step: the block is dropped
        self.cached[block_hash] = slot
        self._hash_in[slot] = block_hash
        self._last_slot = slot
        self._use(block_hash)
        self._pinned.add(slot)  # written this step: no later eviction of the step takes it
        self.copies.offloads.append((block_id, slot))
        if self.record_events:
            self.events.append(BlockStored((block_hash,), parent_hash, medium="cpu"))

    def _take_slot(self) -> int | None:
        """A slot for an offload: the one after the last taken if it is free or old (a run
        goes on), else the lowest free one, else the least recently used unpinned one."""
        prefer = self._last_slot + 1
        if prefer < self.num_slots and prefer not in self._pinned:
            held = self._hash_in[prefer]
            if held is None:
                self._free_slots.discard(prefer)
                return prefer
            if self._is_old(held):
                self._evict(held)
                return prefer
        while self._free_heap:
            slot = heapq.heappop(self._free_heap)
            if slot in self._free_slots:
                self._free_slots.discard(slot)
                return slot
        for h, slot in self.cached.items():  # least recently used first
            if slot not in self._pinned:
                self._evict(h)
                return slot
        return None

    def _is_old(self, block_hash: int) -> bool:
        """Last used in the older half of the span between the LRU block's use and now."""
        oldest = self._used_at[next(iter(self.cached))]
        return self._used_at[block_hash] <= (oldest + self._tick) // 2

    def _evict(self, block_hash: int) -> None:
        """Forget a block whose slot is taken over at once (not returned to the free set)."""
        slot = self.cached.pop(block_hash)
        del self._used_at[block_hash]
        self._hash_in[slot] = None
        if self.record_events:
            self.events.append(BlockRemoved((block_hash,), medium="cpu"))

    def take_copies(self) -> BlockCopies:
        """The copies decided since the last call (the step's); unpins their slots."""
        copies, self.copies = self.copies, BlockCopies()
        self._pinned.clear()
        return copies

    def take_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events
