"""A request's KV with all the model's KV heads, from and into tensor-parallel ranks' caches.

Each rank's cache `[num_layers, 2, num_blocks, block_size, Hkv_rank, D]` holds its slice of
the KV heads (`sharding.kv_head_range`), or a replica of one head when there are fewer heads
than ranks. The KV a worker ships or receives is whole: `[L, 2, n, block_size, Hkv, D]` with
every head once, in the model's order, so a prefill worker of any TP size can feed a decode
worker of any other. `assemble_heads` builds it from the ranks' packed blocks (one copy of
each head: `sharding.kv_head_sources`), `rank_heads` is one rank's view of it.

The ranks run these through their `TPGroup` (engine/tensor_parallel.py): on the send side
every rank packs its heads and rank 0 gathers them; on the receive side rank 0 scatters a
whole chunk's heads, and every rank writes its own into its blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.model.sharding import kv_head_range, kv_head_sources

HEAD_DIM = 4  # the KV-head dimension of a cache or packed buffer


def check_block_ids(num_blocks: int, block_ids: Sequence[int]) -> None:
    """ValueError on an empty, out-of-range or repeated id (checked before any rank indexes:
    a bad index on CUDA kills the process, and one rank failing alone would stall the others)."""
    if not block_ids:
        raise ValueError("no block ids")
    bad = [b for b in block_ids if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"block id {bad[0]} out of range for a cache of {num_blocks} blocks")
    if len(set(block_ids)) != len(block_ids):
        raise ValueError(f"duplicate block ids in {list(block_ids)}")


def check_layers(num_layers: int, layers: slice | None) -> slice | None:
    """`layers` as a concrete `slice(start, stop)` of `num_layers` (None stays None: every layer);
    ValueError on an empty or strided one (checked on rank 0 before any rank slices with it)."""
    if layers is None:
        return None
    start, stop, step = layers.indices(num_layers)
    if step != 1 or stop <= start:
        raise ValueError(f"layers must be a non-empty step-1 slice of {num_layers} layers, got {layers}")
    return slice(start, stop)


def pack_local(kv_cache: torch.Tensor, block_ids: Sequence[int], layers: slice | None = None) -> torch.Tensor:
    """This rank's heads of `block_ids` (in order): [L', 2, n, block_size, Hkv_rank, D]."""
    index = torch.as_tensor(list(block_ids), dtype=torch.long, device=kv_cache.device)
    cache = kv_cache if layers is None else kv_cache[layers]
    return torch.index_select(cache, 2, index)


def unpack_local(
    kv_cache: torch.Tensor, buffer: torch.Tensor, block_ids: Sequence[int], layers: slice | None = None
) -> None:
    """Write `buffer` [L', 2, n, block_size, Hkv_rank, D] into this rank's `block_ids`."""
    index = torch.as_tensor(list(block_ids), dtype=torch.long, device=kv_cache.device)
    cache = kv_cache if layers is None else kv_cache[layers]
    cache.index_copy_(2, index, buffer.to(kv_cache.device))


def pack_heads(
    kv_cache: torch.Tensor, block_ids: Sequence[int], layers: slice, head_offset: int, count: int
) -> torch.Tensor:
    """Heads [head_offset, head_offset + count) of this rank's cache (local indices) of `block_ids`
    in `layers`: a fresh contiguous [L', 2, n, block_size, count, D] (what one rank ships to one
    peer rank)."""
    index = torch.as_tensor(list(block_ids), dtype=torch.long, device=kv_cache.device)
    return torch.index_select(kv_cache[layers].narrow(HEAD_DIM, head_offset, count), 2, index)


def unpack_heads(
    kv_cache: torch.Tensor, buffer: torch.Tensor, block_ids: Sequence[int], layers: slice, head_offset: int
) -> None:
    """Write `buffer` [L', 2, n, block_size, count, D] into heads [head_offset, head_offset + count)
    (local indices) of this rank's `block_ids` in `layers`."""
    index = torch.as_tensor(list(block_ids), dtype=torch.long, device=kv_cache.device)
    target = kv_cache[layers].narrow(HEAD_DIM, head_offset, buffer.shape[HEAD_DIM])
    target.index_copy_(2, index, buffer.to(kv_cache.device))


def assemble_heads(parts: Sequence[torch.Tensor], num_kv_heads: int) -> torch.Tensor:
    """Every rank's packed heads (`parts[r]`: rank r's, same shape but for the head dim) ->
    the whole buffer with each of the model's `num_kv_heads` heads once, in order."""
    whole = torch.cat([parts[r] for r in kv_head_sources(num_kv_heads, len(parts))], dim=HEAD_DIM)
    if whole.shape[HEAD_DIM] != num_kv_heads:
        raise ValueError(f"assembled {whole.shape[HEAD_DIM]} KV heads, the model has {num_kv_heads}")
    return whole


def rank_heads(whole: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank` of `size`'s heads of a whole buffer [..., Hkv, D] (a view)."""
    start, count = kv_head_range(whole.shape[HEAD_DIM], rank, size)
    return whole.narrow(HEAD_DIM, start, count)


@dataclass(frozen=True)
class HeadPair:
    """KV heads [head_start, head_start + count) of the model that sending rank `src` (of its
    worker's ranks) ships straight to receiving rank `dst` (of the other worker's)."""

    src: int
    dst: int
    head_start: int
    count: int


def head_pairs(num_kv_heads: int, src_size: int, dst_size: int) -> list[HeadPair]:
    """Which sending rank gives which receiving rank which heads, rank to rank: every receiving
    rank gets exactly the heads of its range (`kv_head_range`), each from the one sending rank
    that is its source (`kv_head_sources`: the lowest rank holding a replicated head), so every
    head a receiver needs travels once to it. Sorted by (src, dst)."""
    owned = []  # (src rank, first head, count) of the heads each source ships
    for src in kv_head_sources(num_kv_heads, src_size):
        start, count = kv_head_range(num_kv_heads, src, src_size)
        owned.append((src, start, count))
    pairs = []
    for src, src_start, src_count in owned:
        for dst in range(dst_size):
            dst_start, dst_count = kv_head_range(num_kv_heads, dst, dst_size)
            start = max(src_start, dst_start)
            stop = min(src_start + src_count, dst_start + dst_count)
            if start < stop:
                pairs.append(HeadPair(src, dst, start, stop - start))
    return pairs
