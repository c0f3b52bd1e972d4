"""The split-K flash-decoding kernel over the paged KV cache, and its launcher.

Every query length is 1. Each sequence's context is split into `decode_num_partitions`
partitions (whole tiles, sized from the sequence's own length in the kernel); one program
per (sequence, KV head, partition) reads each K/V tile of its KV head once for all the query
heads of that GQA group (the group is the M dimension of `tl.dot`, padded to 16) and writes a
partial result with its running max and sum. The last program of a (sequence, KV head) to
finish, found with an atomic ticket, merges the partitions: no second kernel, which at batch
1 saves a launch per layer (~3.5 us inside a CUDA graph). With one partition the program
writes the output directly.

CUDA graphs: the grid comes from host values, the batch size and `max_seq_len`, which must be
the upper bound replays will not exceed (e.g. the model's max length) when capturing; every
other size comes from device tensors (`seq_lens`, `block_tables`). Padding sequences may have
seq_len 0 (their output rows are zeros).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.engine.attention.triton_common import LOG2_E, dot_precision, needs_wide_offsets, num_sms

# Partitions the split-K merge reads per iteration ([GQA group, MERGE_CHUNK, head_dim] float32).
MERGE_CHUNK = 8


# Kernel argument lists are packed by role; `ruff format` would put one per line.
# fmt: off
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
# fmt: on


# Tickets for the split-K merge, int32 per (sequence, KV head), zero between calls (the last
# program resets its own). Never freed: captured CUDA graphs hold their address; a larger batch
# allocates a larger one next to them. One engine per process runs one stream at a time.
_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def _partition_counters(device: torch.device, size: int) -> torch.Tensor:
    buffers = _COUNTERS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < size:
        buffers.append(torch.zeros(max(size, 4096), dtype=torch.int32, device=device))
    return buffers[-1]


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
    target = 2 * num_sms(device)
    while num_seqs * num_kv_heads * num_partitions < target and num_partitions < max_partitions:
        num_partitions *= 2
    return min(num_partitions, max_partitions)


def decode_num_stages(num_programs: int, device: torch.device) -> int:
    """Pipeline stages of the kernel's tile loop. H200 sweep (32-layer graph): with about 8
    programs per SM (batch 128), 2 stages leave room for more resident programs: 141 -> 134 us
    per layer at ctx 1,024, 0.94 of copy; with about 2 per SM (batch 32, ctx 2,048) 3 stages are
    faster (78 vs 84 us)."""
    return 2 if num_programs >= 4 * num_sms(device) else 3


def decode_variant_batch_sizes(num_kv_heads: int, device: torch.device) -> tuple[int, ...]:
    """One batch size (decode rows) per compiled variant of the kernel, for warm-up: split-K (given
    a context of a few tiles), one partition with 3 pipeline stages, and with 2 (the thresholds
    of `decode_num_partitions` and `decode_num_stages`)."""
    sms = num_sms(device)
    return (1, triton.cdiv(2 * sms, num_kv_heads), triton.cdiv(4 * sms, num_kv_heads))


def decode_attention(
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
    """Flash-decoding of one query token per sequence into `out` (see the module docstring)."""
    num_seqs, num_q_heads, head_dim = query.shape
    key_cache, value_cache = kv_cache_layer[0], kv_cache_layer[1]
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_q_heads // num_kv_heads
    block_n = block_n or (64 if head_dim <= 128 else 32)
    if partition_size:  # a fixed split (tests, sweeps)
        num_partitions = max(1, triton.cdiv(max_seq_len, partition_size))
    else:
        num_partitions = decode_num_partitions(num_seqs, num_kv_heads, max_seq_len, query.device, block_n)
    num_stages = num_stages or decode_num_stages(num_seqs * num_kv_heads * num_partitions, query.device)
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
        seq_lens, scale * LOG2_E, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        num_q_heads, num_kv_heads, partition_size or 0, num_partitions, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, SPLIT=num_partitions > 1, DOT_PRECISION=dot_precision(query.dtype),
        WIDE_OFFSETS=needs_wide_offsets(key_cache), GROUP_P2=triton.next_power_of_2(group),
        P_CHUNK=MERGE_CHUNK, num_warps=num_warps,
        num_stages=num_stages,
    )
    # fmt: on


__all__ = [
    "MERGE_CHUNK",
    "decode_attention",
    "decode_num_partitions",
    "decode_num_stages",
    "decode_variant_batch_sizes",
]
