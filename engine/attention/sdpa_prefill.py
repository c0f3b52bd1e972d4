"""Prefill without a cached prefix through torch SDPA, for `TritonAttention`.

When no sequence of a prefill step has cached tokens (every query length equals its sequence
length), this step's new K/V are each sequence's whole context, so attention needs no paged
reads: causal `scaled_dot_product_attention` (FlashAttention on CUDA) on the contiguous new
q/k/v beats the paged `_prefill_kernel` (about 3 ms against 4.8 ms on an H100 for a
2,048-token Llama-3-8B prefill). The K/V are still written to the cache first by the caller.
One SDPA call per sequence from a host loop, so only for a few sequences. Every decision and
slice uses host values: no device-to-host sync inside the forward pass.
"""

from __future__ import annotations

import os

import torch
from torch.nn import functional as F

from pdserve.engine.attention.metadata import AttentionMetadata

# PDSERVE_DISABLE_SDPA_PREFILL=1 keeps every prefill on the Triton kernel (to compare, or rule SDPA out).
ENABLED = os.environ.get("PDSERVE_DISABLE_SDPA_PREFILL") != "1"
# Past a few sequences the host loop of SDPA calls loses to the one Triton launch over all of them.
MAX_SEQS = 8
MAX_HEAD_DIM = 256  # the largest head_dim torch's FlashAttention kernel supports


def use_sdpa_prefill(
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    meta: AttentionMetadata,
    first_seq: int = 0,
) -> bool:
    """True when sequences [first_seq, S) are at most MAX_SEQS prefills, none with a cached prefix
    (a mixed step's leading decode rows, one token each, go to the decode kernel instead)."""
    if not ENABLED or not 0 < meta.num_seqs - first_seq <= MAX_SEQS:
        return False  # before any per-sequence work: this runs once per layer
    query_lens, seq_lens = meta.query_lens_cpu[first_seq:], meta.seq_lens_cpu[first_seq:]
    return (
        query.shape[-1] <= MAX_HEAD_DIM
        # The Triton path reads K/V back from the cache; equal dtypes make the new K/V the same values.
        and query.dtype == key.dtype == value.dtype == kv_cache_layer.dtype
        and query_lens == seq_lens  # no cached prefix anywhere
        and max(query_lens) > 1
        and first_seq + sum(query_lens) == query.shape[0]  # no padding rows past the sequences
    )


def causal_sdpa(
    query: torch.Tensor,  # [n, Hq, D] one sequence's tokens
    key: torch.Tensor,  # [n, Hkv, D]
    value: torch.Tensor,  # [n, Hkv, D]
    scale: float,
) -> torch.Tensor:  # [n, Hq, D]; contiguous when SDPA ran FlashAttention (its output is token-major)
    """Causal self-attention of one sequence's tokens (query i sees keys 0..i)."""
    # [n, H, D] -> [1, H, n, D] views: FlashAttention reads this (token, head) layout without a copy.
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    # GQA without expanding K/V: on an H100 (torch 2.11, cuDNN backend) 87 us per Llama-3-8B layer
    # at 2,048 tokens against 131 us with repeat_interleave'd heads, identical outputs.
    gqa = query.shape[1] != key.shape[1]
    # [1, Hq, n, D]
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return attn[0].transpose(0, 1)


def sdpa_prefill(
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D] this step's keys: the whole context of every sequence
    value: torch.Tensor,  # [T, Hkv, D]
    query_lens: list[int],  # host lengths; sequence i is the next query_lens[i] rows
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    """Attention for a step that `use_sdpa_prefill` accepted, one SDPA call per sequence."""
    if len(query_lens) == 1:  # the result is the whole output: no copy into a buffer
        return causal_sdpa(query, key, value, scale).contiguous()
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    start = 0
    for q_len in query_lens:
        if q_len > 0:
            rows = slice(start, start + q_len)  # host offsets: no sync
            out[rows] = causal_sdpa(query[rows], key[rows], value[rows], scale)
        start += q_len
    return out


__all__ = ["ENABLED", "MAX_SEQS", "causal_sdpa", "sdpa_prefill", "use_sdpa_prefill"]
