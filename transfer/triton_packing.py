"""Triton gather/scatter of whole KV blocks: the CUDA fast path of `transfer.packing`.

A cache `[L, 2, num_blocks, block_size, Hkv, D]` is viewed as rows of blocks,
`[L*2, num_blocks, block_elems]` (block_elems = block_size*Hkv*D, contiguous per block),
and a packed buffer as `[L*2, n, block_elems]`. Every program copies one contiguous
chunk of one block of one row, so the loads and stores are wide and coalesced:

    grid = (cdiv(block_elems, CHUNK), n, L*2)
    gather (pack):   buffer[row, i, chunk]        = cache[row, ids[i], chunk]
    scatter (unpack): cache[row, ids[i], chunk]   = buffer[row, i, chunk]

Bytes are moved as same-width integers (bf16 -> int16, ...), so the copy is bit-exact
for every dtype (NaN payloads included) and Triton's CPU interpreter handles bf16.
Callers (`transfer.packing`) check block ids on the host first: an out-of-range id here
would be an out-of-bounds access on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_CHUNK = 4096  # elements per program: 8 KiB of bf16, 16 B vectors x 4 per thread at 4 warps
MAX_GRID_YZ = 65535  # CUDA's limit on grid dims 1 and 2 (n blocks, L*2 rows)

# Same-width integer dtypes: the kernel never interprets the bits.
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
    src_base = row * src_row_stride + src_block * block_elems + start
    dst_base = row * dst_row_stride + dst_block * block_elems + start
    offs = tl.arange(0, CHUNK)
    mask = offs < block_elems - start
    values = tl.load(src_ptr + src_base + offs, mask=mask)
    tl.store(dst_ptr + dst_base + offs, values, mask=mask)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """[L, 2, B, block_size, Hkv, D] (contiguous) -> integer view [L*2, B, block_elems]."""
    num_layers, two, num_blocks = tensor.shape[:3]
    ints = tensor.view(_INT_VIEW[tensor.element_size()])
    return ints.view(num_layers * two, num_blocks, -1)


def supports(kv_cache: torch.Tensor, n_blocks: int) -> bool:
    """Whether the kernel can take this cache (the caller falls back to torch otherwise)."""
    return (
        kv_cache.is_contiguous()
        and kv_cache.element_size() in _INT_VIEW
        and 0 < n_blocks <= MAX_GRID_YZ
        and kv_cache.shape[0] * kv_cache.shape[1] <= MAX_GRID_YZ
    )


def _launch(cache: torch.Tensor, buffer: torch.Tensor, index: torch.Tensor, gather: bool) -> None:
    cache_rows, buffer_rows = _rows(cache), _rows(buffer)  # [R, num_blocks, E], [R, n, E]
    num_rows, n, block_elems = buffer_rows.shape
    chunk = min(MAX_CHUNK, triton.next_power_of_2(block_elems))
    grid = (triton.cdiv(block_elems, chunk), n, num_rows)
    src, dst = (cache_rows, buffer_rows) if gather else (buffer_rows, cache_rows)
    _copy_blocks_kernel[grid](
        src, dst, index, src.stride(0), dst.stride(0), block_elems, GATHER=gather, CHUNK=chunk, num_warps=4
    )


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
