"""Triton attention over the paged KV cache: the fast GPU backend.

Same contract as `ReferenceAttention.forward`. Three kernels:

* `_store_kv_kernel`: scatters this step's K/V rows into the cache at `slot_mapping`
  (one program per token and head chunk). Slots < 0 are skipped, so a CUDA graph can
  pad a batch with dummy tokens whose slot is -1. The model skips it: its RoPE kernel
  writes the rotated K and V into the cache (`forward(..., kv_stored=True)`).
* `triton_decode._decode_kernel` (every query length is 1): split-K flash-decoding that
  merges its own partitions (see that module). In a mixed step the leading one-token rows
  (the runner puts decode rows first) take it too: in the prefill kernel each would cost a
  whole row tile (`AttentionMetadata.num_decodes`).
* `_prefill_kernel` (any query lengths, mixed batches included): flash attention reading
  K/V from the paged cache through the block table. Rows of a tile are
  (query token, query head of the group) pairs, so a tile of K/V is loaded once per GQA
  group and decode rows in a mixed batch cost one group-sized tile.

A prefill of a few sequences (`sdpa_prefill.MAX_SEQS`, after a mixed step's decode rows) skips
`_prefill_kernel` when each has no cached prefix or is a chunk of at least
`sdpa_prefill.MIN_QUERY_WITH_PREFIX` tokens over one: torch's `scaled_dot_product_attention`
(cuDNN / FlashAttention on CUDA) runs causally on each sequence's new q/k/v, and a cached prefix
is attended through cuDNN's fused kernel on gathered K/V, merged by log-sum-exp (see
`sdpa_prefill`, `lse_attention`). ~3 ms on an H100 where the paged kernel takes 4.8 ms (2,048-token
Llama-3-8B prefill). PDSERVE_DISABLE_SDPA_PREFILL=1 turns this path off,
PDSERVE_DISABLE_PREFIX_SDPA=1 only its cached-prefix part.

CUDA graphs (decode). Every size the kernels need on the device comes from tensors
(`seq_lens`, `block_tables`, `slot_mapping`); the grid comes from host values:
`len(seq_lens_cpu)` (the padded batch size) and `meta.max_seq_len`, which must be the
upper bound that replays will not exceed (e.g. the model's max length) when capturing.
Static across replays: batch size, number of tokens, `block_tables` width, `max_seq_len`
(which caps the number of partitions), dtypes and head shapes.
Padding sequences may have seq_len 0 (their output rows are zeros) and slot -1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.attention.sdpa_prefill import disable_prefix_path, sdpa_prefill, use_sdpa_prefill
from pdserve.engine.attention.triton_common import LOG2_E, dot_precision, needs_wide_offsets, num_sms
from pdserve.engine.attention.triton_decode import decode_attention, decode_variant_batch_sizes


# Kernel argument lists are packed by role; `ruff format` would put one per line.
# fmt: off
@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr, stride_kt, stride_kh, stride_vt,
    stride_vh, stride_cache_slot, stride_cache_head, num_kv_heads, HEAD_DIM: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr,
):
    token = tl.program_id(0)
    head_chunk = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token of a captured batch
        return
    heads = head_chunk * HEADS_PER_PROGRAM + tl.arange(0, HEADS_PER_PROGRAM)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads < num_kv_heads)[:, None]
    token64 = token.to(tl.int64)
    k = tl.load(key_ptr + token64 * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(value_ptr + token64 * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    dst = slot * stride_cache_slot + heads[:, None] * stride_cache_head + dims[None, :]
    tl.store(key_cache_ptr + dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


# A mixed step passes its prefill part as slices starting after the decode rows: int32 pointers
# whose 16-byte alignment varies with the number of decode rows, so no specialization on it.
@triton.jit(do_not_specialize_on_alignment=["block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr"])
def _prefill_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr,
    query_start_loc_ptr, scale_log2, stride_qt, stride_qh, stride_ot, stride_oh, stride_cache_block,
    stride_cache_tok, stride_cache_head, stride_bt_seq, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
):
    q_tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_tok = q_tile * BLOCK_Q
    if first_tok >= q_len:  # grid is sized by the longest query of the batch
        return
    ctx_len = tl.load(seq_lens_ptr + seq)
    prefix_len = ctx_len - q_len  # cached tokens before this step's queries

    # Row r of the tile is query token first_tok + r // GROUP, query head kv_head*GROUP + r % GROUP.
    rows = tl.arange(0, BLOCK_M)
    tok = first_tok + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = prefix_len + tok  # [BLOCK_M] position of each row's token in its sequence
    dims = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        query_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
        mask=row_valid[:, None],
        other=0.0,
    )  # [BLOCK_M, D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    block_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    head_off = kv_head * stride_cache_head
    last_tok = tl.minimum(first_tok + BLOCK_Q, q_len) - 1
    kv_end = prefix_len + last_tok + 1  # keys any row of this tile may see
    # Keys below `full_end` are visible to every row: no causal mask needed there.
    full_end = ((prefix_len + first_tok + 1) // BLOCK_N) * BLOCK_N
    for tile_start in range(0, full_end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        block_ids = tl.load(block_row + pos // BLOCK_SIZE)
        if WIDE_OFFSETS:
            block_ids = block_ids.to(tl.int64)
        offs = block_ids * stride_cache_block + (pos % BLOCK_SIZE) * stride_cache_tok + head_off
        k = tl.load(key_cache_ptr + offs[None, :] + dims[:, None])  # [D, N]
        scores = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * scale_log2  # [M, N]
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(value_cache_ptr + offs[:, None] + dims[None, :])  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new
    # Diagonal tiles: causal mask per row. Key 0 is visible to every row, so m_i is finite
    # after the first tile and fully masked rows in a later tile cannot produce NaN.
    for tile_start in range(full_end, kv_end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        in_range = pos < kv_end
        block_ids = tl.load(block_row + pos // BLOCK_SIZE, mask=in_range, other=0)
        if WIDE_OFFSETS:
            block_ids = block_ids.to(tl.int64)
        offs = block_ids * stride_cache_block + (pos % BLOCK_SIZE) * stride_cache_tok + head_off
        k = tl.load(key_cache_ptr + offs[None, :] + dims[:, None], mask=in_range[None, :], other=0.0)
        scores = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * scale_log2
        visible = (pos[None, :] <= q_pos[:, None]) & in_range[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(value_cache_ptr + offs[:, None] + dims[None, :], mask=in_range[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None],
    )


# fmt: on


def _check_shapes(query: torch.Tensor, kv_cache_layer: torch.Tensor) -> None:
    head_dim = query.shape[-1]
    block_size = kv_cache_layer.shape[2]
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise ValueError(f"triton attention needs a power-of-two head_dim in 16..256, got {head_dim}")
    if block_size & (block_size - 1) or block_size < 8:
        raise ValueError(f"triton attention needs a power-of-two block_size >= 8, got {block_size}")
    if query.shape[1] % kv_cache_layer.shape[3]:
        raise ValueError(f"query heads {query.shape[1]} not a multiple of kv heads {kv_cache_layer.shape[3]}")


def store_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter key/value [T, Hkv, D] into kv_cache_layer [2, blocks, block_size, Hkv, D]; slot < 0 skipped."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    key_cache, value_cache = kv_cache_layer[0], kv_cache_layer[1]  # [blocks, block_size, Hkv, D]
    heads_per_program = min(triton.next_power_of_2(num_kv_heads), max(1, 4096 // head_dim))
    grid = (num_tokens, triton.cdiv(num_kv_heads, heads_per_program))
    # fmt: off
    _store_kv_kernel[grid](
        key, value, key_cache, value_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), key_cache.stride(1), key_cache.stride(2), num_kv_heads, HEAD_DIM=head_dim,
        HEADS_PER_PROGRAM=heads_per_program, num_warps=4,
    )
    # fmt: on


class TritonAttention:
    """Paged attention with Triton kernels; drop-in for ReferenceAttention on CUDA."""

    name = "triton"
    decode = staticmethod(decode_attention)  # triton_decode: split-K flash-decoding

    @staticmethod
    def warm_up_decode_rows(num_kv_heads: int, device: torch.device) -> tuple[int, ...]:
        """Decode-row counts of a mixed step that reach every compiled decode-kernel variant."""
        return decode_variant_batch_sizes(num_kv_heads, device)

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
        _check_shapes(query, kv_cache_layer)
        if not kv_stored:  # the cache holds this step's K/V on every path below
            store_kv(key, value, kv_cache_layer, meta.slot_mapping)
        query = query if query.stride(-1) == 1 else query.contiguous()
        if query.shape[0] == 0:
            return torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if meta.is_decode_only:
            out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
            self.decode(query, kv_cache_layer, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale, out)
            return out
        # Prefill or mixed step: the leading decode rows (the runner puts them first) go through the
        # decode kernel (split-K, no padded tiles: in the prefill kernel each would cost a whole 64-
        # or 128-row tile); the rest through fused SDPA-class kernels when they are a few sequences
        # without a cached prefix or long chunks over one (sdpa_prefill), else the paged prefill kernel.
        nd = meta.num_decodes
        fused = None
        if use_sdpa_prefill(query, key, value, kv_cache_layer, meta, first_seq=nd):
            fused = self._fused_prefill(query[nd:], key[nd:], value[nd:], kv_cache_layer, meta, scale, nd)
        if fused is not None and nd == 0:
            return fused
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if nd:
            self.decode(
                query[:nd], kv_cache_layer, meta.block_tables[:nd], meta.seq_lens[:nd],
                meta.max_decode_seq_len, scale, out[:nd],
            )  # fmt: skip
        if fused is not None:  # one token per decode row: the prefill rows start at row nd
            out[nd:] = fused
        else:
            self.prefill(query, kv_cache_layer, meta, scale, out, first_seq=nd)
        return out

    @staticmethod
    def _fused_prefill(
        query: torch.Tensor,  # [T', Hq, D] the prefill rows (after the step's nd decode rows)
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache_layer: torch.Tensor,  # already holds this step's K/V
        meta: AttentionMetadata,
        scale: float,
        first_seq: int,
    ) -> torch.Tensor | None:  # None: the paged kernel must run these rows
        """`sdpa_prefill`, except that a failure of the private cuDNN op on a chunk over a cached
        prefix (a shape its one-time check did not cover) turns that path off for the process,
        with one warning, and leaves the step to the paged kernel: the K/V are already cached."""
        try:
            return sdpa_prefill(query, key, value, kv_cache_layer, meta, scale, first_seq=first_seq)
        except RuntimeError as error:
            if meta.seq_lens_cpu[first_seq:] == meta.query_lens_cpu[first_seq:]:
                raise  # no cached prefix: plain SDPA failed, nothing to fall back from
            disable_prefix_path(error)
            return None

    @staticmethod
    def prefill(
        query: torch.Tensor,  # [T, Hq, D]
        kv_cache_layer: torch.Tensor,  # already holds this step's K/V
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,  # [T, Hq, D]
        block_m: int | None = None,
        block_n: int | None = None,
        num_warps: int | None = None,
        num_stages: int | None = None,
        first_seq: int = 0,
    ) -> None:
        """Flash attention for sequences [first_seq, S) of `meta` (rows found via query_start_loc)."""
        _, num_q_heads, head_dim = query.shape
        num_seqs = meta.num_seqs - first_seq
        key_cache, value_cache = kv_cache_layer[0], kv_cache_layer[1]
        _, block_size, num_kv_heads, _ = key_cache.shape
        group = num_q_heads // num_kv_heads
        # Measured on H100 (bench/results/ATTENTION.md): 4 warps, 3 stages, 64-key tiles; 128-row
        # tiles are faster (~10%) once they still give about 3 programs per SM, else 64-row tiles.
        if head_dim <= 128:
            programs_at_128 = triton.cdiv(meta.max_query_len, max(1, 128 // group)) * num_seqs * num_kv_heads
            default_m = 128 if programs_at_128 >= 3 * num_sms(query.device) else 64
            default_n, default_warps, default_stages = 64, 4, 3
        else:
            default_m, default_n, default_warps, default_stages = 64, 32, 4, 2
        block_m = max(block_m or default_m, triton.next_power_of_2(group))
        block_q = block_m // group  # query tokens per tile
        grid = (triton.cdiv(meta.max_query_len, block_q), num_seqs, num_kv_heads)
        # fmt: off
        _prefill_kernel[grid](
            query, key_cache, value_cache, out, meta.block_tables[first_seq:], meta.seq_lens[first_seq:],
            meta.query_start_loc[first_seq:],
            scale * LOG2_E, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), meta.block_tables.stride(0),
            GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q,
            BLOCK_N=block_n or default_n, DOT_PRECISION=dot_precision(query.dtype),
            WIDE_OFFSETS=needs_wide_offsets(key_cache), num_warps=num_warps or default_warps,
            num_stages=num_stages or default_stages,
        )
        # fmt: on


__all__ = ["TritonAttention", "store_kv"]
