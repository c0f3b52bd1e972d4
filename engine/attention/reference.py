"""Reference paged attention in plain torch: the CPU path and the oracle for GPU kernels.

For each sequence it gathers the context's K/V from the paged cache through the
block table and runs causal attention of the new tokens against it. The new
tokens sit at the end of the context, so query i of a sequence with q new tokens
and context length L is at position L - q + i and sees keys [0, L - q + i].
"""

from __future__ import annotations

import torch

from pdserve.engine.attention.metadata import AttentionMetadata, write_kv


class ReferenceAttention:
    name = "reference"

    @staticmethod
    def warm_up_decode_rows(num_kv_heads: int, device: torch.device) -> tuple[int, ...]:
        return ()  # nothing to compile

    def forward(
        self,
        query: torch.Tensor,  # [T, Hq, D]
        key: torch.Tensor,  # [T, Hkv, D]
        value: torch.Tensor,  # [T, Hkv, D]
        kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
        meta: AttentionMetadata,
        scale: float,
        kv_stored: bool = False,  # the caller already wrote this step's key/value into the cache
    ) -> torch.Tensor:  # [T, Hq, D]
        if not kv_stored:
            write_kv(key, value, kv_cache_layer, meta.slot_mapping)
        block_size = kv_cache_layer.shape[2]
        num_q_heads, num_kv_heads = query.shape[1], key.shape[1]
        group = num_q_heads // num_kv_heads
        out = torch.empty_like(query)
        start = 0
        for i, (q_len, ctx_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
            q = query[start : start + q_len]  # [q, Hq, D]
            num_blocks = -(-ctx_len // block_size)
            blocks = meta.block_tables[i, :num_blocks].long()
            # [num_blocks, block_size, Hkv, D] -> [ctx, Hkv, D]
            k = kv_cache_layer[0].index_select(0, blocks).flatten(0, 1)[:ctx_len]
            v = kv_cache_layer[1].index_select(0, blocks).flatten(0, 1)[:ctx_len]
            # The oracle computes in float32 whatever the cache dtype (bf16 scores would
            # round before the softmax); on the float32 CPU path this changes nothing.
            q32 = q.float()
            k = k.float().repeat_interleave(group, dim=1)  # GQA: share each KV head
            v = v.float().repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q32, k) * scale  # [Hq, q, ctx]
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
            k_pos = torch.arange(ctx_len, device=q.device)
            mask = k_pos[None, :] > q_pos[:, None]  # [q, ctx], True = future key
            scores.masked_fill_(mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[start : start + q_len] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
            start += q_len
        return out
