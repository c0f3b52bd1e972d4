"""Ref-counted KV blocks with prefix caching (pure Python, no tensors).

A block is `block_size` token slots in the KV cache tensor. A full block gets a
hash that chains its parent's hash and its own token ids, so equal hashes mean
equal prefixes. Blocks whose ref count drops to zero go to the back of an LRU
free list but keep their hash: a later request with the same prefix revives
them. A block is evicted (its hash forgotten) only when the pool hands it out
again. Every hash registered or forgotten is recorded as a `BlockStored` /
`BlockRemoved` event for the router's cache index.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

NONE_HASH = 0  # parent hash of a prompt's first block


def hash_block_tokens(parent_hash: int, token_ids: Sequence[int]) -> int:
    """64-bit chained hash of one full block. Stable across processes and hosts."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<Q", parent_hash))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return int.from_bytes(h.digest(), "little")


def hash_prompt_blocks(
    token_ids: Sequence[int], block_size: int, start: int = 0, parent_hash: int = NONE_HASH
) -> list[int]:
    """Chained hashes of every full block of `token_ids`, from block index `start`."""
    hashes: list[int] = []
    for i in range(start * block_size, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block_tokens(parent_hash, token_ids[i : i + block_size])
        hashes.append(parent_hash)
    return hashes


@dataclass(frozen=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_hash: int | None
    medium: str = "gpu"  # which tier holds the blocks: "gpu" or "cpu" (the host tier)


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str = "gpu"


KVEvent = BlockStored | BlockRemoved


class BlockPool:
    """Hands out block ids, counts references, and remembers full blocks by hash."""

    def __init__(
        self,
        num_blocks: int,
        enable_caching: bool = True,
        record_events: bool = True,
        on_evict: Callable[[int, int, int | None], None] | None = None,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # Free blocks in eviction order (front = evicted first). Values unused.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.record_events = record_events  # off: `events` stays empty
        self.events: list[KVEvent] = []
        self.parent_of: dict[int, int] = {}  # cached block hash -> its parent's (for tier events)
        # on_evict(block id, hash, parent hash): a cached block is handed out again (the host
        # tier keeps a copy); called before the new owner can write it
        self.on_evict = on_evict

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def lookup(self, block_hashes: Sequence[int]) -> list[int]:
        """Block ids of the longest cached run of `block_hashes` from the start."""
        if not self.enable_caching:
            return []
        hits: list[int] = []
        for h in block_hashes:
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def allocate(self, num: int) -> list[int]:
        """Take `num` free blocks, evicting the least recently freed cached ones."""
        if num > len(self._free):
            raise RuntimeError(f"asked for {num} blocks, only {len(self._free)} free")
        block_ids = []
        removed = []
        for _ in range(num):
            block_id, _ = self._free.popitem(last=False)
            old_hash = self.block_hash[block_id]
            if old_hash is not None:
                self.block_hash[block_id] = None
                if self.cached.get(old_hash) == block_id:
                    del self.cached[old_hash]
                    removed.append(old_hash)
                    parent = self.parent_of.pop(old_hash, None)
                    if self.on_evict is not None:
                        self.on_evict(block_id, old_hash, parent)
            self.ref_counts[block_id] = 1
            block_ids.append(block_id)
        if removed and self.record_events:
            self.events.append(BlockRemoved(tuple(removed)))
        return block_ids

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference to cached blocks (a prefix hit), reviving free ones."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self._free[block_id]
            self.ref_counts[block_id] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block. Pass a request's blocks tail first,
        so its last blocks are evicted before its shared prefix."""
        for block_id in block_ids:
            if self.ref_counts[block_id] <= 0:
                raise RuntimeError(f"block {block_id} freed more often than taken")
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._free[block_id] = None

    def cache_blocks(self, block_ids: Sequence[int], block_hashes: Sequence[int], parent_hash: int) -> None:
        """Register full blocks under their hashes (first owner of a hash wins)."""
        if not self.enable_caching:
            return
        stored = []
        for i, (block_id, h) in enumerate(zip(block_ids, block_hashes, strict=True)):
            if self.block_hash[block_id] is not None:
                continue  # already registered (a prefix hit, or cached last step)
            if h in self.cached:
                continue  # the same content lives in another block; keep that one
            self.block_hash[block_id] = h
            self.cached[h] = block_id
            self.parent_of[h] = block_hashes[i - 1] if i else parent_hash
            stored.append(h)
        if stored and self.record_events:
            self.events.append(BlockStored(tuple(stored), parent_hash))

    def take_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash of free blocks (e.g. after weights change)."""
        removed = []
        for block_id in self._free:
            h = self.block_hash[block_id]
            if h is not None:
                self.block_hash[block_id] = None
                self.cached.pop(h, None)
                self.parent_of.pop(h, None)
                removed.append(h)
        if removed and self.record_events:
            self.events.append(BlockRemoved(tuple(removed)))
