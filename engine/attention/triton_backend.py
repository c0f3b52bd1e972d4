"""Triton attention over the paged KV cache: the fast GPU backend.

Same contract as `ReferenceAttention.forward`. Three kernels:

* `_store_kv_kernel`: scatters this step's K/V rows into the cache at `slot_mapping`
  (one program per token and head chunk). Slots < 0 are skipped, so a CUDA graph can
  pad a batch with dummy tokens whose slot is -1. The model skips it: its RoPE kernel
  writes the rotated K and V into the cache (`forward(..., kv_stored=True)`).
* `_decode_kernel` (every query length is 1): flash-decoding. Each sequence's context is
  split into `decode_num_partitions` partitions (whole tiles, sized from the sequence's own
  length in the kernel); one program per (sequence, KV head, partition)
  reads each K/V tile of its KV head once for all the query heads of that GQA group (the
  group is the M dimension of `tl.dot`, padded to 16) and writes a partial result with its
  running max and sum. The last program of a (sequence, KV head) to finish, found with an
  atomic ticket, merges the partitions: no second kernel, which at batch 1 saves a launch
  per layer (~3.5 us inside a CUDA graph, a few % of a decode step). With one partition the
  program writes the output directly. In a mixed step the leading one-token rows (the
  runner puts decode rows first) take this kernel too: in the prefill kernel each would
  cost a whole row tile (`AttentionMetadata.num_decodes`).
* `_prefill_kernel` (any query lengths, mixed batches included): flash attention reading
  K/V from the paged cache through the block table. Rows of a tile are
  (query token, query head of the group) pairs, so a tile of K/V is loaded once per GQA
  group and decode rows in a mixed batch cost one group-sized tile.

A prefill of a few sequences (`sdpa_prefill.MAX_SEQS`) none of which has a cached prefix
(after a mixed step's decode rows) skips `_prefill_kernel`: torch's `scaled_dot_product_attention`
(FlashAttention on CUDA) runs causally on each sequence's new q/k/v (see `sdpa_prefill`),
~3 ms on an H100 where the paged kernel takes 4.8 ms (2,048-token Llama-3-8B prefill).
PDSERVE_DISABLE_SDPA_PREFILL=1 turns this path off.

CUDA graphs (decode). Every size the kernels need on the device comes from tensors
(`seq_lens`, `block_tables`, `slot_mapping`); the grid comes from host values:
`len(seq_lens_cpu)` (the padded batch size) and `meta.max_seq_len`, which must be the
upper bound that replays will not exceed (e.g. the model's max length) when capturing.
Static across replays: batch size, number of tokens, `block_tables` width, `max_seq_len`
(which caps the number of partitions), dtypes and head shapes.
Padding sequences may have seq_len 0 (their output rows are zeros) and slot -1.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from engine.attention.metadata import AttentionMetadata
from engine.attention.sdpa_prefill import sdpa_prefill, use_sdpa_prefill

_LOG2_E = 1.4426950408889634
# Partitions the split-K merge reads per iteration ([GQA group, MERGE_CHUNK, head_dim] float32).
MERGE_CHUNK = 8


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


# The partition count and a fixed partition size are plain runtime values (no specialization on
# their value): a mixed step's decode part picks its count from how many decode rows it has, and
# one compiled kernel must serve every count, or each new one would compile mid-serving.
@triton.jit(do_not_specialize=["fixed_partition_size", "num_partitions"])
def _decode_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, out_ptr, partial_out_ptr, partial_max_ptr, partial_sum_ptr,
    counters_ptr, block_tables_ptr, seq_lens_ptr, scale_log2, stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cache_block, stride_cache_tok, stride_cache_head, stride_bt_seq, num_q_heads, num_kv_heads,
    fixed_partition_size, num_partitions,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
    GROUP_P2: tl.constexpr, P_CHUNK: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    ctx_len = tl.load(seq_lens_ptr + seq)
    # Tokens per partition: fixed by the caller, or split from this sequence's own length, so a
    # CUDA graph captured for the model's max length still splits a short context num_partitions
    # ways (whole BLOCK_N tiles each) instead of leaving it to one program.
    if fixed_partition_size > 0:
        part_size = fixed_partition_size
    else:
        # at least two tiles per program past 1,024 tokens, so each one pipelines its loads
        min_tiles = tl.where(ctx_len > 1024, 2, 1)
        part_size = tl.maximum(tl.cdiv(tl.cdiv(ctx_len, num_partitions), BLOCK_N), min_tiles) * BLOCK_N
    part_start = part * part_size
    group_rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + group_rows  # [GROUP_PAD] query heads sharing this KV head
    head_mask = group_rows < GROUP
    dims = tl.arange(0, HEAD_DIM)
    seq64 = seq.to(tl.int64)
    if part_start >= ctx_len:
        if part == 0:  # empty (padding) sequence: defined zeros, no NaN
            zeros = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=out_ptr.dtype.element_ty)
            tl.store(
                out_ptr + seq64 * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                zeros,
                mask=head_mask[:, None],
            )
        return
    part_end = tl.minimum(part_start + part_size, ctx_len)

    # q: [GROUP_PAD, D]; one query token per sequence, row `seq` of the packed batch.
    q = tl.load(
        query_ptr + seq64 * stride_qt + heads[:, None] * stride_qh + dims[None, :],
        mask=head_mask[:, None],
        other=0.0,
    )
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    block_row = block_tables_ptr + seq64 * stride_bt_seq
    head_off = kv_head * stride_cache_head
    for tile_start in range(part_start, part_end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)  # [BLOCK_N] token positions
        valid = pos < part_end
        block_ids = tl.load(block_row + pos // BLOCK_SIZE, mask=valid, other=0)
        if WIDE_OFFSETS:
            block_ids = block_ids.to(tl.int64)
        # [BLOCK_N] offsets of each token's row for this KV head
        offs = block_ids * stride_cache_block + (pos % BLOCK_SIZE) * stride_cache_tok + head_off
        k = tl.load(key_cache_ptr + offs[None, :] + dims[:, None], mask=valid[None, :], other=0.0)  # [D, N]
        v = tl.load(value_cache_ptr + offs[:, None] + dims[None, :], mask=valid[:, None], other=0.0)  # [N, D]
        scores = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * scale_log2  # [G, N]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    if not SPLIT:  # one partition: the program writes the output itself
        tl.store(
            out_ptr + seq64 * stride_ot + heads[:, None] * stride_oh + dims[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=head_mask[:, None],
        )
    else:
        # partial buffers: out [S, Hq, P, D], max/sum [S, Hq, P], all float32
        base = (seq64 * num_q_heads + heads) * num_partitions  # [GROUP_PAD] row of partition 0
        row = base + part
        tl.store(partial_out_ptr + row[:, None] * HEAD_DIM + dims[None, :], acc, mask=head_mask[:, None])
        tl.store(partial_max_ptr + row, m_i, mask=head_mask)
        tl.store(partial_sum_ptr + row, l_i, mask=head_mask)
        # Every thread's partial stores happen before the ticket (barrier, then a release
        # atomic); the program that draws the last ticket merges what all of them wrote.
        tl.debug_barrier()
        counter = counters_ptr + seq64 * num_kv_heads + kv_head
        num_used = tl.cdiv(ctx_len, part_size)
        ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if ticket == num_used - 1:
            tl.store(counter, 0)  # reset for the next call (next layer, next graph replay)
            # Merge P_CHUNK partitions at a time for the GROUP real heads ([G, P, D] tiles): the
            # loads of a chunk are issued together, not one partition after another (at batch 1
            # this merge is on the critical path of every layer).
            g = tl.arange(0, GROUP_P2)
            g_mask = g < GROUP
            rows_g = (seq64 * num_q_heads + kv_head * GROUP + g) * num_partitions  # [G] partition 0
            run_max = tl.full([GROUP_P2], float("-inf"), dtype=tl.float32)
            total = tl.zeros([GROUP_P2], dtype=tl.float32)
            merged = tl.zeros([GROUP_P2, HEAD_DIM], dtype=tl.float32)
            for p0 in range(0, num_used, P_CHUNK):
                parts = p0 + tl.arange(0, P_CHUNK)
                mask = g_mask[:, None] & (parts < num_used)[None, :]  # [G, P]
                idx = rows_g[:, None] + parts[None, :]  # [G, P]
                # .cg: read from L2, where the other programs' stores are, never a stale L1 line
                p_max = tl.load(partial_max_ptr + idx, mask=mask, other=float("-inf"), cache_modifier=".cg")
                p_sum = tl.load(partial_sum_ptr + idx, mask=mask, other=0.0, cache_modifier=".cg")
                p_out = tl.load(
                    partial_out_ptr + idx[:, :, None] * HEAD_DIM + dims[None, None, :],
                    mask=mask[:, :, None],
                    other=0.0,
                    cache_modifier=".cg",
                )  # [G, P, D], each normalised by its own sum
                new_max = tl.maximum(run_max, tl.max(p_max, axis=1))
                new_max = tl.where(g_mask, new_max, 0.0)  # padding heads: no -inf - -inf
                alpha = tl.exp2(run_max - new_max)
                weight = p_sum * tl.exp2(p_max - new_max[:, None])  # [G, P]; 0 where masked
                merged = merged * alpha[:, None] + tl.sum(p_out * weight[:, :, None], axis=1)
                total = total * alpha + tl.sum(weight, axis=1)
                run_max = new_max
            merged = merged / tl.maximum(total, 1e-30)[:, None]
            tl.store(
                out_ptr + seq64 * stride_ot + (kv_head * GROUP + g)[:, None] * stride_oh + dims[None, :],
                merged.to(out_ptr.dtype.element_ty),
                mask=g_mask[:, None],
            )


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


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter on CPU: pretend to be an H100 so grids match
    return torch.cuda.get_device_properties(device).multi_processor_count


# Tickets for the split-K merge, int32 per (sequence, KV head), zero between calls (the last
# program resets its own). Never freed: captured CUDA graphs hold their address; a larger batch
# allocates a larger one next to them. One engine per process runs one stream at a time.
_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def _partition_counters(device: torch.device, size: int) -> torch.Tensor:
    buffers = _COUNTERS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < size:
        buffers.append(torch.zeros(max(size, 4096), dtype=torch.int32, device=device))
    return buffers[-1]


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 must stay exact to 1e-4 against the reference: no TF32 tensor-core rounding.
    return "ieee" if dtype == torch.float32 else "tf32"


def _needs_wide_offsets(key_cache: torch.Tensor) -> bool:
    # Element offsets inside one layer's K (or V) cache fit int32 up to 2^31 elements; int32
    # address math halves the registers the gathered [N, D] pointer tiles need.
    return key_cache.stride(0) * key_cache.shape[0] >= 2**31


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


def decode_num_partitions(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device, block_n: int
) -> int:
    """Split-K partitions per (sequence, KV head): the smallest power of two that gives about two
    programs per SM, and no more than the `max_seq_len` bound has tiles. Each sequence splits its
    own length that many ways in the kernel (whole tiles, two at least past 1,024 tokens). Swept
    on an H200 in a 32-layer CUDA graph captured for 8,192 tokens (`bench.attention_kernels
    --sweep-small-batch`): this gives the fastest fixed size at batch 1 (ctx 512: 64-token
    partitions; ctx 4,096: 128) and at batch 4 (64, where a split sized from the 8,192 bound
    left one 512-token partition: 17.7 -> 8.9 us per layer). From 33 sequences on (8 KV heads)
    there is one partition: no merge at all."""
    num_partitions, max_partitions = 1, max(1, triton.cdiv(max_seq_len, block_n))
    target = 2 * _num_sms(device)
    while num_seqs * num_kv_heads * num_partitions < target and num_partitions < max_partitions:
        num_partitions *= 2
    return min(num_partitions, max_partitions)


class TritonAttention:
    """Paged attention with Triton kernels; drop-in for ReferenceAttention on CUDA."""

    name = "triton"

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
        # or 128-row tile); the rest through SDPA when no sequence has a cached prefix, else the
        # paged prefill kernel.
        nd = meta.num_decodes
        sdpa = use_sdpa_prefill(query, key, value, kv_cache_layer, meta, first_seq=nd)
        if sdpa and nd == 0:
            return sdpa_prefill(query, key, value, meta.query_lens_cpu, scale)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if nd:
            max_decode_len = max(meta.seq_lens_cpu[:nd])
            self.decode(
                query[:nd], kv_cache_layer, meta.block_tables[:nd], meta.seq_lens[:nd], max_decode_len, scale,
                out[:nd],
            )  # fmt: skip
        if sdpa:  # one token per decode row: the prefill rows start at row nd
            out[nd:] = sdpa_prefill(query[nd:], key[nd:], value[nd:], meta.query_lens_cpu[nd:], scale)
        else:
            self.prefill(query, kv_cache_layer, meta, scale, out, first_seq=nd)
        return out

    @staticmethod
    def decode(
        query: torch.Tensor,  # [S, Hq, D], one token per sequence
        kv_cache_layer: torch.Tensor,
        block_tables: torch.Tensor,  # [S, B] int32
        seq_lens: torch.Tensor,  # [S] int32, <= max_seq_len
        max_seq_len: int,  # host upper bound: fixes the grid (capture with the largest value)
        scale: float,
        out: torch.Tensor,  # [S, Hq, D]
        block_n: int | None = None,
        partition_size: int | None = None,
        num_warps: int = 4,
        num_stages: int | None = None,
    ) -> None:
        num_seqs, num_q_heads, head_dim = query.shape
        key_cache, value_cache = kv_cache_layer[0], kv_cache_layer[1]
        _, block_size, num_kv_heads, _ = key_cache.shape
        group = num_q_heads // num_kv_heads
        block_n = block_n or (64 if head_dim <= 128 else 32)
        if partition_size:  # a fixed split (tests, sweeps)
            num_partitions = max(1, triton.cdiv(max_seq_len, partition_size))
        else:
            num_partitions = decode_num_partitions(num_seqs, num_kv_heads, max_seq_len, query.device, block_n)
        if num_stages is None:
            # H200 sweep (32-layer graph): with about 8 programs per SM (batch 128), 2 stages leave
            # room for more resident programs: 141 -> 134 us per layer at ctx 1,024, 0.94 of copy;
            # with about 2 per SM (batch 32, ctx 2,048) 3 stages are faster (78 vs 84 us).
            many = num_seqs * num_kv_heads * num_partitions >= 4 * _num_sms(query.device)
            num_stages = 2 if many else 3
        if num_partitions > 1:
            partial_out = torch.empty(
                (num_seqs, num_q_heads, num_partitions, head_dim), dtype=torch.float32, device=query.device
            )
            partial_max = torch.empty(
                (num_seqs, num_q_heads, num_partitions), dtype=torch.float32, device=query.device
            )
            partial_sum = torch.empty_like(partial_max)
            counters = _partition_counters(query.device, num_seqs * num_kv_heads)
        else:  # the kernel writes `out` directly; pass placeholders
            partial_out = partial_max = partial_sum = out
            counters = seq_lens
        # fmt: off
        _decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
            query, key_cache, value_cache, out, partial_out, partial_max, partial_sum, counters, block_tables,
            seq_lens, scale * _LOG2_E, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
            num_q_heads, num_kv_heads, partition_size or 0, num_partitions, GROUP=group,
            GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
            BLOCK_N=block_n, SPLIT=num_partitions > 1, DOT_PRECISION=_dot_precision(query.dtype),
            WIDE_OFFSETS=_needs_wide_offsets(key_cache), GROUP_P2=triton.next_power_of_2(group),
            P_CHUNK=MERGE_CHUNK, num_warps=num_warps,
            num_stages=num_stages,
        )
        # fmt: on

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
            default_m = 128 if programs_at_128 >= 3 * _num_sms(query.device) else 64
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
            scale * _LOG2_E, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), meta.block_tables.stride(0),
            GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q,
            BLOCK_N=block_n or default_n, DOT_PRECISION=_dot_precision(query.dtype),
            WIDE_OFFSETS=_needs_wide_offsets(key_cache), num_warps=num_warps or default_warps,
            num_stages=num_stages or default_stages,
        )
        # fmt: on


__all__ = ["TritonAttention", "decode_num_partitions", "store_kv"]
