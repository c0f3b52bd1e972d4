"""Per-request block tables over the block pool (pure Python).

The manager answers three questions for the scheduler: how much of a prompt is
already cached, can a request get slots for N more tokens, and which block ids
hold a request's tokens. It registers full blocks in the prefix cache once their
tokens are scheduled for computation (or, on the decode side, once their KV has
arrived).
"""

from __future__ import annotations

from pdserve.engine.core.block_pool import NONE_HASH, BlockPool, hash_prompt_blocks
from pdserve.engine.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool = True, record_events: bool = True
    ) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching, record_events)
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

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Cached blocks for the start of a new request, and the tokens they cover.

        At least one prompt token is always left to compute, because the model must
        produce logits for the last position.
        """
        if not self.pool.enable_caching:
            return [], 0
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = self.pool.lookup(request.block_hashes[:max_blocks])
        return hits, len(hits) * self.block_size

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
        new_computed_blocks: list[int] | None = None,
        cache: bool = True,
    ) -> list[int] | None:
        """Give `request` room for `num_new_tokens` more tokens, or return None.

        `new_computed_blocks` are prefix-cache hits for a request scheduled for the
        first time; they are referenced, not copied. With `cache`, every block that
        will be full after this step is registered under its hash.
        """
        new_computed_blocks = new_computed_blocks or []
        # A hit on a free cached block takes it out of the free list, so count it.
        num_revived = sum(1 for b in new_computed_blocks if self.pool.ref_counts[b] == 0)
        need = self.num_blocks_needed(request, num_new_tokens, len(new_computed_blocks))
        if need + num_revived > self.pool.num_free_blocks:
            return None
        table = self.block_ids.setdefault(request.req_id, [])
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            table.extend(new_computed_blocks)
        table.extend(self.pool.allocate(need))
        if cache:
            num_computed_after = (
                request.num_computed_tokens + len(new_computed_blocks) * self.block_size + num_new_tokens
            )
            self.cache_full_blocks(request, num_computed_after)
        return table

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
