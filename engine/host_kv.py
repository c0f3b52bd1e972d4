"""The host tier's memory and copies: block slots in (pinned, on CUDA) host memory.

KV cache on the device: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim].
Host slots: [num_host_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], so each
slot is one contiguous piece and a run of consecutive slots one copy. Copies run on the
engine's stream in the order the scheduler decided (offloads, then onloads), before the
step's forward: a block is saved before its new owner writes it, and loaded before any
attention reads it.
"""

from __future__ import annotations

import torch

from pdserve.engine.core.host_tier import BlockCopies
from pdserve.engine.host_tensors import host_to_device


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(first, second) pairs -> (i, j, n) runs where both ids ascend by one together:
    pairs[k][0] == i + k and pairs[k][1] == j + k; consecutive slots move in one copy."""
    runs: list[tuple[int, int, int]] = []
    for a, b in pairs:
        if runs and runs[-1][0] + runs[-1][2] == a and runs[-1][1] + runs[-1][2] == b:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((a, b, 1))
    return runs


class HostKVPool:
    def __init__(self, kv_cache: torch.Tensor, num_slots: int) -> None:
        self.kv_cache = kv_cache
        num_layers, two, _, block_size, num_heads, head_dim = kv_cache.shape
        shape = (num_slots, num_layers, two, block_size, num_heads, head_dim)
        pin = kv_cache.device.type == "cuda"
        self.slots = torch.zeros(shape, dtype=kv_cache.dtype, pin_memory=pin)
        self.bytes_per_block = self.slots[0].numel() * self.slots.element_size()

    def run(self, copies: BlockCopies) -> None:
        """Queue the copies on the current stream (offloads first)."""
        if copies.offloads:
            self._offload(copies.offloads)
        if copies.onloads:
            self._onload(copies.onloads)

    def _offload(self, pairs: list[tuple[int, int]]) -> None:
        block_ids = host_to_device([b for b, _ in pairs], torch.int64, self.kv_cache.device)
        # [N, L, 2, bs, H, D]: the evicted blocks gathered into one contiguous device buffer
        staged = self.kv_cache.index_select(2, block_ids).permute(2, 0, 1, 3, 4, 5).contiguous()
        non_blocking = self.kv_cache.device.type == "cuda"
        for i, slot, n in _runs([(i, slot) for i, (_, slot) in enumerate(pairs)]):
            self.slots[slot : slot + n].copy_(staged[i : i + n], non_blocking=non_blocking)

    def _onload(self, pairs: list[tuple[int, int]]) -> None:
        device = self.kv_cache.device
        staged = torch.empty((len(pairs), *self.slots.shape[1:]), dtype=self.slots.dtype, device=device)
        non_blocking = device.type == "cuda"
        for slot, i, n in _runs([(slot, i) for i, (slot, _) in enumerate(pairs)]):
            staged[i : i + n].copy_(self.slots[slot : slot + n], non_blocking=non_blocking)
        block_ids = host_to_device([b for _, b in pairs], torch.int64, device)
        self.kv_cache.index_copy_(2, block_ids, staged.permute(1, 2, 0, 3, 4, 5))
