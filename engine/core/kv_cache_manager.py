"""Per-request block tables over the block pool (pure Python).

The manager answers three questions for the scheduler: how much of a prompt is
already cached, can a request get slots for N more tokens, and which block ids
hold a request's tokens. It registers full blocks in the prefix cache once their
tokens are scheduled for computation (or, on the decode side, once their KV has
arrived).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.core.block_pool import NONE_HASH, BlockPool, KVEvent, hash_prompt_blocks
from pdserve.engine.core.host_tier import BlockCopies, HostTier
from pdserve.engine.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PrefixHit:
    """The cached start of a prompt: GPU blocks to reference, then host slots to copy back."""

    block_ids: list[int] = field(default_factory=list)
    host_slots: list[int] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids) + len(self.host_slots)

    def __len__(self) -> int:
        return self.num_blocks


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        record_events: bool = True,
        num_host_blocks: int = 0,
    ) -> None:
        self.block_size = block_size
        # A host tier keeps what the GPU pool evicts (needs prefix caching: blocks go by hash).
        self.host = HostTier(num_host_blocks, record_events) if num_host_blocks and enable_caching else None
        on_evict = self.host.offload if self.host is not None else None
        self.pool = BlockPool(num_blocks, enable_caching, record_events, on_evict)
        self.block_ids: dict[str, list[int]] = {}  # req_id -> block table
        self._num_cached_blocks: dict[str, int] = {}  # req_id -> blocks registered by hash

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def _update_hashes(self, request: Request) -> None:
        """Extend `request.block_hashes` to cover every full block of its tokens."""
        start = len(request.block_hashes)
        parent = request.block_hashes[-1] if start else NONE_HASH
        request.block_hashes.extend(
            hash_prompt_blocks(request.all_token_ids, self.block_size, start=start, parent_hash=parent)
        )

    def get_computed_blocks(self, request: Request) -> tuple[PrefixHit, int]:
        """Cached blocks for the start of a new request (GPU hits, then the host tier's
        continuation of them), and the tokens they cover.

        At least one prompt token is always left to compute, because the model must
        produce logits for the last position.
        """
        if not self.pool.enable_caching:
            return PrefixHit(), 0
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit = PrefixHit(self.pool.lookup(request.block_hashes[:max_blocks]))
        if self.host is not None:
            hit.host_slots = self.host.lookup(request.block_hashes[len(hit.block_ids) : max_blocks])
        return hit, hit.num_blocks * self.block_size

    def num_blocks_needed(
        self, request: Request, num_new_tokens: int, num_new_computed_blocks: int = 0
    ) -> int:
        have = len(self.block_ids.get(request.req_id, ())) + num_new_computed_blocks
        total_tokens = (
            request.num_computed_tokens + num_new_tokens + num_new_computed_blocks * self.block_size
        )
        return max(0, cdiv(total_tokens, self.block_size) - have)

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        hit: PrefixHit | None = None,
        cache: bool = True,
    ) -> list[int] | None:
        """Give `request` room for `num_new_tokens` more tokens, or return None.

        `hit` is the cached start of a request scheduled for the first time: its GPU
        blocks are referenced, its host slots are copied into the first new blocks (an
        onload the step runs before its forward). With `cache`, every block that will be
        full after this step is registered under its hash.
        """
        hit = hit or PrefixHit()
        hit_blocks = hit.block_ids
        # A hit on a free cached block takes it out of the free list, so count it.
        num_revived = sum(1 for b in hit_blocks if self.pool.ref_counts[b] == 0)
        num_loaded_tokens = len(hit.host_slots) * self.block_size  # computed, in new blocks
        need = self.num_blocks_needed(request, num_new_tokens + num_loaded_tokens, len(hit_blocks))
        if need + num_revived > self.pool.num_free_blocks:
            return None
        table = self.block_ids.setdefault(request.req_id, [])
        if hit_blocks:
            self.pool.touch(hit_blocks)
            table.extend(hit_blocks)
        new_blocks = self.pool.allocate(need)  # may evict: the host tier offloads first
        if hit.host_slots:
            self.host.onload(hit.host_slots, new_blocks[: len(hit.host_slots)])
        table.extend(new_blocks)
        if cache:
            num_computed_after = (
                request.num_computed_tokens + hit.num_blocks * self.block_size + num_new_tokens
            )
            self.cache_full_blocks(request, num_computed_after)
        return table

    def take_block_copies(self) -> BlockCopies:
        """The host-tier copies decided since the last call (run them before the next forward)."""
        return self.host.take_copies() if self.host is not None else BlockCopies()

    def take_events(self) -> list[KVEvent]:
        """GPU pool and host tier events, in that order: a block the GPU evicts and the host
        keeps shows as removed from "gpu", stored on "cpu"."""
        events = self.pool.take_events()
        if self.host is not None:
            events += self.host.take_events()
        return events

    def cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register the request's blocks that are full within its first `num_tokens`."""
        if not self.pool.enable_caching:
            return
        table = self.block_ids.get(request.req_id)
        if table is None:
            return
        self._update_hashes(request)
        num_full = min(num_tokens // self.block_size, len(request.block_hashes), len(table))
        done = self._num_cached_blocks.get(request.req_id, 0)
        if num_full <= done:
            return
        parent = request.block_hashes[done - 1] if done else NONE_HASH
        self.pool.cache_blocks(table[done:num_full], request.block_hashes[done:num_full], parent)
        self._num_cached_blocks[request.req_id] = num_full

    def free(self, request: Request) -> None:
        """Release every block of the request, tail first."""
        table = self.block_ids.pop(request.req_id, None)
        self._num_cached_blocks.pop(request.req_id, None)
        if table:
            self.pool.free(list(reversed(table)))

    def get_block_ids(self, req_id: str) -> list[int]:
        return self.block_ids.get(req_id, [])

    @property
    def usage(self) -> float:
        return self.pool.num_used_blocks / self.pool.num_blocks
