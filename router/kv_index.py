"""The router's cache index: block hash -> the workers that hold that block.

Block hashes are chained (a block's hash covers its whole prefix, see
`engine.core.block_pool.hash_block_tokens`), so "worker W holds the first k blocks
of this prompt" is answered by walking the prompt's hashes from the front and
dropping W at its first miss. That walk is linear in the prompt's blocks.

Memory bound: at most `max_entries` block hashes are indexed (across all
workers). Eviction rule: least recently touched hash first, where a hash is
touched when a worker reports storing it (`store`) or when a routed prompt hits
it (`touch`). An evicted hash is forgotten for every worker, so the router may
underestimate a worker's cache, never overestimate it beyond what workers
reported. With ~100 bytes per entry plus ~60 per holder, 1,000,000 entries cost
about 200 MB of router memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

DEFAULT_MAX_ENTRIES = 2_000_000


class KVIndex:
    """Block hash -> set of worker ids, LRU-bounded by number of hashes."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        # Insertion/touch order is eviction order: front = least recently touched.
        self._holders: OrderedDict[int, set[str]] = OrderedDict()
        # Reverse map so a worker can be dropped without scanning every hash.
        self._by_worker: dict[str, set[int]] = {}
        self.num_evicted = 0

    def __len__(self) -> int:
        return len(self._holders)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._holders

    def workers(self) -> list[str]:
        return list(self._by_worker)

    def num_blocks_of(self, worker_id: str) -> int:
        return len(self._by_worker.get(worker_id, ()))

    def holders(self, block_hash: int) -> frozenset[str]:
        return frozenset(self._holders.get(block_hash, ()))

    def store(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """Record that `worker_id` now holds these blocks (and touch them)."""
        holders_by_hash = self._holders
        owned = self._by_worker.setdefault(worker_id, set())
        for h in block_hashes:
            holders = holders_by_hash.get(h)
            if holders is None:
                holders_by_hash[h] = {worker_id}
            else:
                holders.add(worker_id)
                holders_by_hash.move_to_end(h)
            owned.add(h)
        self._evict_to_cap()

    def remove(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """Record that `worker_id` dropped these blocks. Unknown hashes are ignored."""
        owned = self._by_worker.get(worker_id)
        if owned is None:
            return
        for h in block_hashes:
            if h not in owned:
                continue
            owned.discard(h)
            holders = self._holders[h]
            holders.discard(worker_id)
            if not holders:
                del self._holders[h]

    def remove_worker(self, worker_id: str) -> None:
        """Forget everything `worker_id` holds (it left, restarted or must resync)."""
        owned = self._by_worker.pop(worker_id, None)
        if not owned:
            return
        for h in owned:
            holders = self._holders[h]
            holders.discard(worker_id)
            if not holders:
                del self._holders[h]

    def touch(self, block_hashes: Sequence[int]) -> None:
        """Mark indexed hashes as recently used (a routed prompt hit them)."""
        holders_by_hash = self._holders
        for h in block_hashes:
            if h in holders_by_hash:
                holders_by_hash.move_to_end(h)

    def overlaps(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """Worker id -> number of leading blocks of `block_hashes` it holds.

        Workers that hold no leading block are absent. Cost: one dict lookup per
        block plus set work proportional to the holders that drop out, so linear
        in the prompt's blocks for a bounded number of holders.
        """
        if not block_hashes:
            return {}
        holders_by_hash = self._holders
        first = holders_by_hash.get(block_hashes[0])
        if not first:
            return {}
        active = set(first)
        matched: dict[str, int] = {}
        for i in range(1, len(block_hashes)):
            holders = holders_by_hash.get(block_hashes[i])
            if holders is None:
                for worker_id in active:
                    matched[worker_id] = i
                return matched
            # Fast path: every still-matching worker holds this block too.
            if active <= holders:
                continue
            dropped = active - holders
            for worker_id in dropped:
                matched[worker_id] = i
            active -= dropped
            if not active:
                return matched
        for worker_id in active:
            matched[worker_id] = len(block_hashes)
        return matched

    def _evict_to_cap(self) -> None:
        excess = len(self._holders) - self.max_entries
        if excess <= 0:
            return
        holders_by_hash = self._holders
        by_worker = self._by_worker
        for _ in range(excess):
            h, holders = holders_by_hash.popitem(last=False)
            for worker_id in holders:
                by_worker[worker_id].discard(h)
        self.num_evicted += excess
