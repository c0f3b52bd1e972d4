"""Per-step attention inputs, built once by the model runner and shared by all layers.

Shapes use T = new tokens in the step (all sequences packed together), S = number
of sequences, B = max blocks per sequence in this step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (block_id * block_size + offset)
    query_start_loc: torch.Tensor  # [S + 1] int32: new tokens of seq i are rows [qsl[i], qsl[i+1])
    seq_lens: torch.Tensor  # [S] int32: context length of seq i after this step (cached + new)
    block_tables: torch.Tensor  # [S, B] int32, rows padded with 0 past the sequence's blocks
    query_lens_cpu: list[int]  # host copies for the reference backend and for picking kernels
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @cached_property
    def num_decodes(self) -> int:
        """Leading sequences with one new token (the runner puts decode rows first in a mixed
        step, so the fast backend runs them through its decode kernel and the rest as prefill)."""
        n = 0
        for q_len in self.query_lens_cpu:
            if q_len != 1:
                break
            n += 1
        return n

    @cached_property
    def max_decode_seq_len(self) -> int:
        """Longest context among the leading decode rows (0 without any): the decode kernel's bound."""
        return max(self.seq_lens_cpu[: self.num_decodes], default=0)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter this step's keys/values into the paged cache of one layer.

    key, value: [T, Hkv, D]; kv_cache_layer: [2, num_blocks, block_size, Hkv, D].
    A flat view over (num_blocks * block_size) slots makes it one index_copy_.
    """
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache_layer.shape
    flat = kv_cache_layer.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, key.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(flat.dtype))
