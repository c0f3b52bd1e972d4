"""Prefill of a few long sequences through FlashAttention-class kernels, for `TritonAttention`.

When a prefill step holds a few sequences (`MAX_SEQS`), attention needs no paged kernel:

* a sequence without a cached prefix (its query length equals its context length) runs causal
  `scaled_dot_product_attention` (cuDNN / FlashAttention on CUDA) on its contiguous new q/k/v:
  about 3 ms against 4.8 ms for the paged `_prefill_kernel` on an H100 (2,048-token Llama-3-8B);
* a sequence with a cached prefix (a later chunk of a chunked prefill, or a prefix-cache hit)
  attends to its new tokens causally and to its prefix without a mask, each through one fused
  kernel call that also returns the log-sum-exp, and the two are merged exactly
  (`lse_attention`). The prefix's K/V are gathered from the paged cache into a contiguous
  buffer, `PREFIX_PIECE` tokens at a time (bounding that buffer at 128k contexts); for a chunk
  of 8,192 queries the gather costs about 1% of the attention's time (Llama-3-8B shape). Only
  chunks of at least `MIN_QUERY_WITH_PREFIX` tokens take this path: below that the paged kernel
  wins (per-call overheads, bench.long_prefill).

The K/V are still written to the cache first by the caller. One call per sequence from a host
loop, so only for a few sequences. Every decision and slice uses host values: no device-to-host
sync inside the forward pass (after the one-time check of the cuDNN op, see `lse_attention`).
"""

from __future__ import annotations

import logging
import os

import torch
from torch.nn import functional as F

from pdserve.engine.attention.lse_attention import attention_with_lse, lse_attention_supported, merge_partials
from pdserve.engine.attention.metadata import AttentionMetadata

# PDSERVE_DISABLE_SDPA_PREFILL=1 keeps every prefill on the Triton kernel (to compare, or rule SDPA out).
ENABLED = os.environ.get("PDSERVE_DISABLE_SDPA_PREFILL") != "1"
# PDSERVE_DISABLE_PREFIX_SDPA=1 keeps chunks with a cached prefix on the paged Triton kernel only.
PREFIX_ENABLED = os.environ.get("PDSERVE_DISABLE_PREFIX_SDPA") != "1"
# Past a few sequences the host loop of SDPA calls loses to the one Triton launch over all of them.
MAX_SEQS = 8
MAX_HEAD_DIM = 256  # the largest head_dim torch's FlashAttention kernel supports
logger = logging.getLogger(__name__)
MIN_QUERY_WITH_PREFIX = 1024  # shorter chunks over a cached prefix stay on the paged kernel
PREFIX_PIECE = 65536  # prefix tokens gathered per fused call (Llama-3-8B: 256 MiB of K/V per layer)


def disable_prefix_path(error: Exception) -> None:
    """Turn the cached-prefix path off for this process (its fused op failed at a real shape)."""
    global PREFIX_ENABLED
    if PREFIX_ENABLED:
        logger.warning(
            "fused attention over a cached prefix failed (%s); using the paged kernel from now on", error
        )
    PREFIX_ENABLED = False


def _prefix_path_fits(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query_lens: list[int], prefix_lens: list[int]
) -> bool:
    """Every sequence with a cached prefix is a long enough chunk, and the fused kernel runs here."""
    with_prefix = [q for q, p in zip(query_lens, prefix_lens, strict=True) if p > 0]
    if not with_prefix:
        return True
    return (
        PREFIX_ENABLED
        and min(with_prefix) >= MIN_QUERY_WITH_PREFIX
        and lse_attention_supported(query, key, value)
    )


def use_sdpa_prefill(
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    meta: AttentionMetadata,
    first_seq: int = 0,
) -> bool:
    """True when sequences [first_seq, S) are at most MAX_SEQS prefills, each without a cached prefix
    or a chunk of at least MIN_QUERY_WITH_PREFIX tokens over one (a mixed step's leading decode
    rows, one token each, go to the decode kernel instead)."""
    if not ENABLED or not 0 < meta.num_seqs - first_seq <= MAX_SEQS:
        return False  # before any per-sequence work: this runs once per layer
    query_lens, seq_lens = meta.query_lens_cpu[first_seq:], meta.seq_lens_cpu[first_seq:]
    prefix_lens = [s - q for q, s in zip(query_lens, seq_lens, strict=True)]
    return (
        query.shape[-1] <= MAX_HEAD_DIM
        # New K/V are read from this step's tensors, prefixes from the cache: equal dtypes keep them alike.
        and query.dtype == key.dtype == value.dtype == kv_cache_layer.dtype
        and max(query_lens) > 1
        and first_seq + sum(query_lens) == query.shape[0]  # no padding rows past the sequences
        and _prefix_path_fits(query, key, value, query_lens, prefix_lens)
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


def gather_prefix(
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    block_row: torch.Tensor,  # [B] int32: the sequence's block table row
    start: int,  # first prefix token, a multiple of block_size
    end: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # key, value [end - start, Hkv, D], contiguous
    """The cached K/V of tokens [start, end) of one sequence, gathered out of the paged cache."""
    block_size = kv_cache_layer.shape[2]
    blocks = block_row[start // block_size : -(-end // block_size)]  # host bounds: no sync
    kv = kv_cache_layer.index_select(1, blocks).flatten(1, 2)[:, : end - start]  # [2, n, Hkv, D]
    return kv[0], kv[1]


def prefix_chunk_attention(
    query: torch.Tensor,  # [n, Hq, D] a chunk's new tokens
    key: torch.Tensor,  # [n, Hkv, D] their keys (also in the cache)
    value: torch.Tensor,  # [n, Hkv, D]
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D] holds the prefix
    block_row: torch.Tensor,  # [B] int32
    prefix_len: int,  # cached tokens before the chunk (> 0)
    scale: float,
    out: torch.Tensor | None = None,  # [n, Hq, D] in query's dtype: where to write the result
) -> torch.Tensor:  # [n, Hq, D] in query's dtype (`out` when given)
    """Causal attention of a chunk that follows `prefix_len` cached tokens: its own keys causally,
    the prefix in pieces of PREFIX_PIECE keys without a mask, merged by log-sum-exp (a float32
    accumulator between pieces; the last merge writes the result in query's dtype)."""
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    merged, lse = attention_with_lse(query, key, value, scale, causal=True)
    starts = range(0, prefix_len, PREFIX_PIECE)
    for start in starts:
        prefix_key, prefix_value = gather_prefix(
            kv_cache_layer, block_row, start, min(prefix_len, start + PREFIX_PIECE)
        )
        piece_out, piece_lse = attention_with_lse(query, prefix_key, prefix_value, scale, causal=False)
        # the last merge writes the result; earlier ones update a float32 accumulator in place
        # (the first one's input is the attention's own output, in query's dtype: a new one)
        accumulator = merged if merged.dtype == torch.float32 else None
        into = out if start == starts[-1] else accumulator
        merged, lse = merge_partials(merged, lse, piece_out, piece_lse, out=into)
    return merged


def sdpa_prefill(
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D] this step's new keys
    value: torch.Tensor,  # [T, Hkv, D]
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]: cached prefixes
    meta: AttentionMetadata,
    scale: float,
    first_seq: int = 0,  # sequences [first_seq, S) are the prefills; row 0 of query is their first token
) -> torch.Tensor:  # [T, Hq, D]
    """Attention for a step that `use_sdpa_prefill` accepted, one sequence at a time."""
    query_lens = meta.query_lens_cpu[first_seq:]
    prefix_lens = [s - q for q, s in zip(query_lens, meta.seq_lens_cpu[first_seq:], strict=True)]
    if len(query_lens) == 1 and prefix_lens[0] == 0:  # the result is the whole output: no copy
        return causal_sdpa(query, key, value, scale).contiguous()
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    start = 0
    for i, (q_len, prefix_len) in enumerate(zip(query_lens, prefix_lens, strict=True)):
        rows = slice(start, start + q_len)  # host offsets: no sync
        if prefix_len:
            block_row = meta.block_tables[first_seq + i]
            prefix_chunk_attention(
                query[rows], key[rows], value[rows], kv_cache_layer, block_row, prefix_len, scale, out[rows]
            )
        elif q_len > 0:
            out[rows] = causal_sdpa(query[rows], key[rows], value[rows], scale)
        start += q_len
    return out


__all__ = [
    "ENABLED",
    "MAX_SEQS",
    "MIN_QUERY_WITH_PREFIX",
    "PREFIX_ENABLED",
    "causal_sdpa",
    "disable_prefix_path",
    "gather_prefix",
    "prefix_chunk_attention",
    "sdpa_prefill",
    "use_sdpa_prefill",
]
