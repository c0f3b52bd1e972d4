"""Triton gather/scatter of whole KV blocks: the CUDA fast path of `transfer.packing`.

A cache `[L, 2, num_blocks, block_size, Hkv, D]` is viewed as rows of blocks,
`[L*2, num_blocks, block_elems]` (block_elems = block_size*Hkv*D, contiguous per block),
and a packed buffer as `[L*2, n, block_elems]`. Every program copies one contiguous
chunk of one block of one row, so the loads and stores are wide and coalesced:

    grid = (cdiv(block_elems, CHUNK), n, L*2)
    gather (pack):   buffer[row, i, chunk]        = cache[row, ids[i], chunk]
    scatter (unpack): cache[row, ids[i], chunk]   = buffer[row, i, chunk]

Bytes are moved as integers (the widest of int64/int32/int16/int8 that divides a row of
the cache), so the copy is bit-exact for every dtype (NaN payloads included), Triton's CPU
interpreter handles bf16, and each thread moves 16-byte vectors: with 8-byte elements and
the `ALIGN` hint (every chunk starts at a multiple of ALIGN elements) the compiler can
prove the alignment that 2-byte bf16 elements at a runtime offset would not give it.
Callers (`transfer.packing`) check block ids on the host first: an out-of-range id here
would be an out-of-bounds access on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Bytes per program and warps: the best of {8, 16, 32} KiB x {4, 8, 16} warps on an H100 for a
# 2,048-token Llama-3-8B prompt (268 MB): 0.79 of a same-size copy for pack + unpack.
MAX_CHUNK_BYTES = 8192
NUM_WARPS = 4
MAX_GRID_YZ = 65535  # CUDA's limit on grid dims 1 and 2 (n blocks, L*2 rows)

# Integer dtypes by width: the kernel never interprets the bits.
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _copy_blocks_kernel(
    src_ptr,  # gather: cache rows [R, num_blocks, E]; scatter: buffer rows [R, n, E]
    dst_ptr,  # gather: buffer rows [R, n, E];          scatter: cache rows [R, num_blocks, E]
    ids_ptr,  # [n] block ids into the cache side
    src_row_stride,  # elements between rows of src (num_blocks*E or n*E)
    dst_row_stride,  # elements between rows of dst
    block_elems,  # E
    GATHER: tl.constexpr,  # True: ids index src (pack); False: ids index dst (unpack)
    CHUNK: tl.constexpr,
    ALIGN: tl.constexpr,  # a power of two dividing block_elems and both row strides
):
    chunk = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    row = tl.program_id(2).to(tl.int64)
    block_id = tl.load(ids_ptr + i).to(tl.int64)
    if GATHER:
        src_block = block_id
        dst_block = i
    else:
        src_block = i
        dst_block = block_id
    start = chunk.to(tl.int64) * CHUNK
    # 64-bit scalar bases (a cache can exceed 2**31 elements); 32-bit lane offsets.
    src_base = tl.multiple_of(row * src_row_stride + src_block * block_elems + start, ALIGN)
    dst_base = tl.multiple_of(row * dst_row_stride + dst_block * block_elems + start, ALIGN)
    offs = tl.arange(0, CHUNK)
    mask = offs < block_elems - start
    values = tl.load(src_ptr + src_base + offs, mask=mask)
    tl.store(dst_ptr + dst_base + offs, values, mask=mask)


def _word_bytes(tensor: torch.Tensor) -> int:
    """The widest integer (<= 8 bytes) whose size divides the last dimension's bytes."""
    row_bytes = tensor.shape[-1] * tensor.element_size()
    return next(w for w in (8, 4, 2, 1) if w >= tensor.element_size() and row_bytes % w == 0)


def _rows(tensor: torch.Tensor, word_bytes: int) -> torch.Tensor:
    """[L, 2, B, block_size, Hkv, D] (contiguous) -> integer view [L*2, B, block_words]."""
    num_layers, two, num_blocks = tensor.shape[:3]
    ints = tensor.view(_INT_VIEW[word_bytes])
    return ints.view(num_layers * two, num_blocks, -1)


def supports(kv_cache: torch.Tensor, n_blocks: int) -> bool:
    """Whether the kernel can take this cache (the caller falls back to torch otherwise)."""
    return (
        kv_cache.is_contiguous()
        and kv_cache.element_size() in _INT_VIEW
        and 0 < n_blocks <= MAX_GRID_YZ
        and kv_cache.shape[0] * kv_cache.shape[1] <= MAX_GRID_YZ
    )


def _launch(
    cache: torch.Tensor,
    buffer: torch.Tensor,
    index: torch.Tensor,
    gather: bool,
    chunk_bytes: int | None = None,
    num_warps: int | None = None,
) -> None:
    chunk_bytes, num_warps = chunk_bytes or MAX_CHUNK_BYTES, num_warps or NUM_WARPS
    word = _word_bytes(cache)
    cache_rows, buffer_rows = _rows(cache, word), _rows(buffer, word)  # [R, num_blocks, E], [R, n, E]
    num_rows, n, block_elems = buffer_rows.shape
    chunk = min(max(1, chunk_bytes // word), triton.next_power_of_2(block_elems))
    align = min(16, block_elems & -block_elems, chunk)
    grid = (triton.cdiv(block_elems, chunk), n, num_rows)
    src, dst = (cache_rows, buffer_rows) if gather else (buffer_rows, cache_rows)
    # fmt: off
    _copy_blocks_kernel[grid](
        src, dst, index, src.stride(0), dst.stride(0), block_elems, GATHER=gather, CHUNK=chunk, ALIGN=align,
        num_warps=num_warps,
    )
    # fmt: on


def _check(cache: torch.Tensor, buffer: torch.Tensor, index: torch.Tensor) -> None:
    if not (cache.is_contiguous() and buffer.is_contiguous()):
        raise ValueError("triton packing needs a contiguous cache (layer slice) and buffer")
    if index.dim() != 1 or index.numel() != buffer.shape[2] or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"index must be 1-D int32/int64 with {buffer.shape[2]} ids, got {tuple(index.shape)}"
        )
    if not (cache.device == buffer.device == index.device):
        raise ValueError(f"cache, buffer and index must share a device: {cache.device}, {buffer.device}, "
                         f"{index.device}")  # fmt: skip
    if (
        buffer.dtype != cache.dtype
        or buffer.shape[:2] != cache.shape[:2]
        or buffer.shape[3:] != cache.shape[3:]
    ):
        raise ValueError(f"buffer {tuple(buffer.shape)} {buffer.dtype} does not fit cache "
                         f"{tuple(cache.shape)} {cache.dtype}")  # fmt: skip


def gather_blocks(cache: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[:, :, i] = cache[:, :, index[i]]; returns `out`.

    cache: [L', 2, num_blocks, block_size, Hkv, D] contiguous (a layer slice of the full cache is fine)
    index: [n] int32/int64 on the same device, every id in range (checked by the caller)
    out:   [L', 2, n, block_size, Hkv, D] contiguous, same dtype
    """
    _check(cache, out, index)
    _launch(cache, out, index, gather=True)
    return out


def scatter_blocks(cache: torch.Tensor, buffer: torch.Tensor, index: torch.Tensor) -> None:
    """cache[:, :, index[i]] = buffer[:, :, i] (ids must be unique; shapes as in `gather_blocks`)."""
    _check(cache, buffer, index)
    _launch(cache, buffer, index, gather=False)
