"""Gather a request's KV blocks into one contiguous buffer and scatter them back.

The engine's cache is one tensor per worker,
`kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`, so a
request's blocks for every layer, K and V, are one `index_select` on dim 2 into
`buffer: [num_layers, 2, n, block_size, num_kv_heads, head_dim]` and one
`index_copy_` on dim 2 on arrival. One buffer per request is what gets sent:
sending block by block is an order of magnitude slower (see DESIGN.md).

On CUDA (when triton imports) both directions run `transfer.triton_packing`'s block
copy kernel instead: index_select/index_copy_ on dim 2 reach about a third of a plain
device copy, the kernel close to it. CPU tensors always take the torch path.
`layers=slice(a, b)` packs or unpacks only layers a..b-1, so a sender can pipeline a
request layer-chunk by layer-chunk (`layer_chunks`).

Block ids are checked on the host before indexing, because an out-of-range index
on CUDA is a device-side assert that kills the process rather than an exception.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from types import ModuleType

import torch

from pdserve.transfer.contract import KVArrival
from pdserve.transfer.layout import KV_CACHE_NDIM, KVLayout, normalize_dtype_name


def dtype_from_name(name: str) -> torch.dtype:
    """`"bfloat16"` (or `"torch.bfloat16"`) -> `torch.bfloat16`; anything else raises ValueError."""
    dtype = getattr(torch, normalize_dtype_name(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype name {name!r}")
    return dtype


def _check_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != KV_CACHE_NDIM or kv_cache.shape[1] != 2:
        raise ValueError(
            "kv_cache must be [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], "
            f"got shape {tuple(kv_cache.shape)}"
        )


def _check_block_ids(kv_cache: torch.Tensor, block_ids: Sequence[int], unique: bool) -> None:
    if len(block_ids) == 0:
        raise ValueError("block_ids is empty: nothing to pack or unpack")
    num_blocks = kv_cache.shape[2]
    low, high = min(block_ids), max(block_ids)
    if low < 0 or high >= num_blocks:
        bad = low if low < 0 else high
        raise ValueError(f"block id {bad} out of range for a cache of {num_blocks} blocks")
    # index_copy_ with a repeated index writes one of the rows nondeterministically.
    if unique and len(set(block_ids)) != len(block_ids):
        raise ValueError(f"duplicate block ids in {list(block_ids)}")


def block_index(kv_cache: torch.Tensor, block_ids: Sequence[int]) -> torch.Tensor:
    """Block ids as an int64 tensor on the cache's device (one small host-to-device copy)."""
    return torch.as_tensor(list(block_ids), dtype=torch.long).to(kv_cache.device, non_blocking=True)


@functools.cache
def _triton_module() -> ModuleType | None:
    """`transfer.triton_packing`, or None when triton is not importable."""
    try:
        from pdserve.transfer import triton_packing
    except ImportError:
        return None
    return triton_packing


def _triton_for(kv_cache: torch.Tensor, n_blocks: int) -> ModuleType | None:
    """The Triton path for a CUDA cache it supports, else None (torch path)."""
    if kv_cache.device.type != "cuda":
        return None
    module = _triton_module()
    return module if module is not None and module.supports(kv_cache, n_blocks) else None


def layer_range(num_layers: int, layers: slice | None) -> slice:
    """`layers` as a concrete `slice(start, stop)` (step 1, non-empty) over `num_layers`."""
    if layers is None:
        return slice(0, num_layers)
    start, stop, step = layers.indices(num_layers)
    if step != 1 or stop <= start:
        raise ValueError(f"layers must be a non-empty step-1 slice of {num_layers} layers, got {layers}")
    return slice(start, stop)


def layer_chunks(num_layers: int, chunk_layers: int) -> list[slice]:
    """Split `num_layers` into consecutive slices of `chunk_layers` (the last may be shorter).

    chunk_layers <= 0 or >= num_layers -> one slice of every layer.
    """
    if chunk_layers <= 0 or chunk_layers >= num_layers:
        return [slice(0, num_layers)]
    return [slice(a, min(a + chunk_layers, num_layers)) for a in range(0, num_layers, chunk_layers)]


# Default chunking: the fewest layers per chunk that make a chunk at least this big (NCCL
# sends well under ~16 MiB lose rate to per-op overhead, and so does each gather of a
# tensor-parallel worker's piece); smaller requests go in one chunk.
MIN_CHUNK_BYTES = 32 << 20
# Overrides the default chunking (senders built with chunk_layers=None, a tensor-parallel
# prefill worker's gathered pieces): tests, benchmarks.
CHUNK_LAYERS_ENV = "PDSERVE_KV_CHUNK_LAYERS"


def default_chunk_layers(num_layers: int, layer_nbytes: int, min_chunk_bytes: int = MIN_CHUNK_BYTES) -> int:
    """Layers per chunk so that a chunk is >= `min_chunk_bytes`; 0 (one chunk) if that is all of them."""
    chunk = max(1, -(-min_chunk_bytes // max(1, layer_nbytes)))
    return 0 if chunk >= num_layers else chunk


def configured_chunk_layers() -> int | None:
    """$PDSERVE_KV_CHUNK_LAYERS if set (0 = one chunk), else None; ValueError if negative."""
    value = os.environ.get(CHUNK_LAYERS_ENV)
    if not value:
        return None
    if int(value) < 0:
        raise ValueError(f"{CHUNK_LAYERS_ENV} must be >= 0 (0 = one chunk), got {value}")
    return int(value)


def pack_blocks(
    kv_cache: torch.Tensor,
    block_ids: Sequence[int],
    out: torch.Tensor | None = None,
    layers: slice | None = None,
) -> torch.Tensor:
    """Gather `block_ids` (in order) into one contiguous buffer.

    kv_cache: [num_layers, 2, num_blocks, block_size, Hkv, D]
    returns:  [L', 2, len(block_ids), block_size, Hkv, D], same dtype and device, where L' is
              num_layers, or b - a for `layers=slice(a, b)` (only those layers are read).
    `out`, if given (e.g. a pooled buffer, or a layer slice of one), must have exactly that
    shape, dtype and device.
    """
    _check_cache(kv_cache)
    _check_block_ids(kv_cache, block_ids, unique=False)
    cache = kv_cache[layer_range(kv_cache.shape[0], layers)]  # [L', 2, num_blocks, ...], a view
    if out is not None:
        _check_buffer(cache, out, len(block_ids))
    index = block_index(kv_cache, block_ids)
    triton_packing = _triton_for(cache, len(block_ids))
    if triton_packing is not None:
        if out is None:
            out = torch.empty((*cache.shape[:2], len(block_ids), *cache.shape[3:]),
                              dtype=cache.dtype, device=cache.device)  # fmt: skip
        if out.is_contiguous():
            return triton_packing.gather_blocks(cache, index, out)
    if out is None:
        return torch.index_select(cache, 2, index)
    return torch.index_select(cache, 2, index, out=out)


def _check_buffer(kv_cache: torch.Tensor, buffer: torch.Tensor, n_blocks: int) -> None:
    expected = (*kv_cache.shape[:2], n_blocks, *kv_cache.shape[3:])
    if tuple(buffer.shape) != expected:
        raise ValueError(
            f"KV buffer shape {tuple(buffer.shape)} does not match the cache: expected {expected} "
            f"for {n_blocks} blocks of a cache shaped {tuple(kv_cache.shape)}"
        )
    if buffer.dtype != kv_cache.dtype:
        raise ValueError(f"KV buffer dtype {buffer.dtype} != cache dtype {kv_cache.dtype}")
    if buffer.device != kv_cache.device:
        raise ValueError(f"KV buffer is on {buffer.device} but the cache is on {kv_cache.device}")


def unpack_blocks(
    kv_cache: torch.Tensor, buffer: torch.Tensor, block_ids: Sequence[int], layers: slice | None = None
) -> None:
    """Scatter `buffer` into `kv_cache` at `block_ids` (buffer block i -> cache block block_ids[i]).

    buffer: [L', 2, len(block_ids), block_size, Hkv, D], same dtype and device as the cache;
            L' = num_layers, or b - a for `layers=slice(a, b)` (only those layers are written).
    """
    _check_cache(kv_cache)
    _check_block_ids(kv_cache, block_ids, unique=True)
    cache = kv_cache[layer_range(kv_cache.shape[0], layers)]  # [L', 2, num_blocks, ...], a view
    _check_buffer(cache, buffer, len(block_ids))
    index = block_index(kv_cache, block_ids)
    triton_packing = _triton_for(cache, len(block_ids))
    if triton_packing is not None:
        triton_packing.scatter_blocks(cache, buffer.contiguous(), index)
    else:
        cache.index_copy_(2, index, buffer)


def buffer_nbytes(layout: KVLayout, n_blocks: int) -> int:
    """Bytes in a packed buffer of `n_blocks` blocks."""
    numel = 1
    for size in layout.buffer_shape(n_blocks):
        numel *= size
    return numel * dtype_from_name(layout.dtype).itemsize


def to_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, bfloat16 included)."""
    if tensor.device.type != "cpu":
        raise ValueError(f"to_bytes needs a CPU tensor, got one on {tensor.device}; copy it to host first")
    if not tensor.is_contiguous():
        raise ValueError("to_bytes needs a contiguous tensor")
    # view(torch.uint8) reinterprets the bytes without going through numpy's dtypes (numpy has no bfloat16).
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def from_bytes(
    data: bytes | bytearray | memoryview, dtype: str | torch.dtype, shape: Sequence[int]
) -> torch.Tensor:
    """The inverse of `to_bytes`: a CPU tensor of `shape` and `dtype` over `data`.

    Shares memory with a writable `data` (bytearray, writable memoryview); read-only data
    (bytes) is copied once, because torch tensors over read-only memory are unsafe to write.
    """
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else dtype_from_name(dtype)
    view = memoryview(data)
    if view.readonly:
        view = memoryview(bytearray(view))
    numel = 1
    for size in shape:
        numel *= int(size)
    expected_nbytes = numel * torch_dtype.itemsize
    if view.nbytes != expected_nbytes:
        raise ValueError(
            f"got {view.nbytes} bytes, but shape {tuple(shape)} of {torch_dtype} needs {expected_nbytes}"
        )
    if expected_nbytes == 0:
        return torch.empty(tuple(shape), dtype=torch_dtype)
    raw = torch.frombuffer(view, dtype=torch.uint8)
    return raw.view(torch_dtype).reshape(tuple(shape))


class UnpackSink:
    """A `KVSink` that scatters each arrived layer chunk into `kv_cache`
    [num_layers, 2, num_blocks, block_size, Hkv, D], then calls `on_ready(req_id)` once a
    request's last layer is in (what a decode worker does, minus its bookkeeping).

    A chunk on another device (the gRPC path delivers host tensors in band) is copied to
    the cache's device first.
    """

    def __init__(self, kv_cache: torch.Tensor, on_ready: Callable[[str], None] | None = None) -> None:
        self.kv_cache = kv_cache
        self.on_ready = on_ready

    def on_kv_chunk(self, arrival: KVArrival, layers: slice, chunk: torch.Tensor) -> None:
        """chunk: [layers.stop - layers.start, 2, len(arrival.block_ids), block_size, Hkv, D]."""
        block_ids = list(arrival.block_ids)
        unpack_blocks(self.kv_cache, chunk.to(self.kv_cache.device), block_ids, layers=layers)
        if self.on_ready is not None and layers.stop == self.kv_cache.shape[0]:
            self.on_ready(arrival.req_id)


def unpack_into(kv_cache: torch.Tensor, on_ready: Callable[[str], None] | None = None) -> UnpackSink:
    """The `KVSink` that scatters into `kv_cache` (`UnpackSink`)."""
    return UnpackSink(kv_cache, on_ready)
