"""The host-memory tier of the prefix cache (pure Python: slots and hashes, no tensors).

Full blocks that the GPU pool evicts are copied into host slots, keeping their chained
hashes; a later prompt whose prefix continues past its GPU hits into the host tier gets
those blocks copied back instead of recomputed. The pool only decides: the copies are
`BlockCopies` the scheduler hands to the model runner with the step that needs them
(offloads first, so a GPU block is saved before its new owner writes it; then onloads).

A slot that an onload of the current step reads, or an offload writes, is pinned until
the step's copies are taken, so no other offload of the same step can overwrite it; across
steps the runner's copies run in order on one stream.
"""

from __future__ import annotations

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
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._pinned: set[int] = set()
        self.copies = BlockCopies()
        self.record_events = record_events
        self.events: list[KVEvent] = []
        self.num_hits = 0  # blocks served from this tier (metric)

    @property
    def num_used_slots(self) -> int:
        return self.num_slots - len(self._free_slots)

    def lookup(self, block_hashes: Sequence[int]) -> list[int]:
        """Slots of the longest run of `block_hashes` held here; they are pinned for this step."""
        slots = []
        for h in block_hashes:
            slot = self.cached.get(h)
            if slot is None:
                break
            self.cached.move_to_end(h)
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
            self.cached.move_to_end(block_hash)
            return
        slot = self._take_slot()
        if slot is None:
            return  # every slot is being read this step: the block is dropped
        self.cached[block_hash] = slot
        self._pinned.add(slot)  # written this step: no later eviction of the step takes it
        self.copies.offloads.append((block_id, slot))
        if self.record_events:
            self.events.append(BlockStored((block_hash,), parent_hash, medium="cpu"))

    def _take_slot(self) -> int | None:
        if self._free_slots:
            return self._free_slots.pop()
        for h, slot in self.cached.items():  # least recently used first
            if slot not in self._pinned:
                del self.cached[h]
                if self.record_events:
                    self.events.append(BlockRemoved((h,), medium="cpu"))
                return slot
        return None

    def take_copies(self) -> BlockCopies:
        """The copies decided since the last call (the step's); unpins their slots."""
        copies, self.copies = self.copies, BlockCopies()
        self._pinned.clear()
        return copies

    def take_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events
