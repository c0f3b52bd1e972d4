"""Where a sender reads a request's KV from: a `KVSource` hands out the packed buffer
`[num_layers, 2, n, block_size, Hkv, D]` (every KV head the transfer carries) layer range by
layer range, so a sender can pack, stage and ship it in layer pieces.

* `CacheBlocks(kv_cache, block_ids)`: blocks of a cache tensor that holds every head (a
  worker of one rank). Any range at any time, packed straight from the cache into the
  sender's buffer (`out`): nothing is copied that the sender did not ask for.
* `LayerPieces(fetch, shape, dtype, device, max_chunk_layers)`: pieces made on demand by
  `fetch(layers)`, each a fresh tensor, at most `max_chunk_layers` layers at a time (a
  tensor-parallel prefill worker gathers its ranks' heads of each piece on rank 0 just before
  it is sent: the whole request is never gathered at once). A sender holds at most two
  fetched pieces at a time (one on the wire, the next being fetched) and asks for them in
  layer order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from pdserve.transfer.contract import KVSource, KVTransferError
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.packing import layer_chunks, pack_blocks

__all__ = ["CacheBlocks", "KVSource", "LayerPieces", "PieceFiller", "chunk_plan", "source_layout"]


def source_layout(source: KVSource, model_name: str, tp_size: int = 1) -> KVLayout:
    """The layout of what `source` sends (a sending worker of `tp_size` ranks)."""
    num_layers, _, _, block_size, num_kv_heads, head_dim = source.shape
    return KVLayout(
        model_name=model_name,
        dtype=str(source.dtype),
        num_layers=int(num_layers),
        num_kv_heads=int(num_kv_heads),
        head_dim=int(head_dim),
        block_size=int(block_size),
        tp_size=tp_size,
    )


def chunk_plan(source: KVSource, chunk_layers: int) -> list[slice]:
    """The layer pieces a sender asks `source` for: `chunk_layers` each (0: all at once),
    never more than the source allows at a time."""
    num_layers = source.shape[0]
    if source.max_chunk_layers:
        limit = source.max_chunk_layers
        chunk_layers = limit if chunk_layers <= 0 else min(chunk_layers, limit)
    return layer_chunks(num_layers, chunk_layers)


class CacheBlocks:
    """`block_ids` (in order) of a cache `[num_layers, 2, num_blocks, block_size, Hkv, D]` that
    holds every KV head the transfer carries (a single-rank worker's own cache)."""

    max_chunk_layers = 0

    def __init__(self, kv_cache: torch.Tensor, block_ids: Sequence[int]) -> None:
        if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
            raise ValueError(
                "kv_cache must be [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], "
                f"got shape {tuple(kv_cache.shape)}"
            )
        self.kv_cache = kv_cache
        self.block_ids = list(block_ids)
        self.shape = (kv_cache.shape[0], 2, len(self.block_ids), *kv_cache.shape[3:])
        self.dtype = kv_cache.dtype
        self.device = kv_cache.device

    def layers(self, layers: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        return pack_blocks(self.kv_cache, self.block_ids, out=out, layers=layers)


class LayerPieces:
    """A packed buffer of `shape` made piece by piece: `fetch(layers)` returns the packed KV of a
    range of at most `max_chunk_layers` layers (> 0) as a fresh tensor of `dtype` on `device`,
    complete when returned (on CUDA its producer synchronized: senders read it from streams of
    their own, ordered after nothing of the producer's)."""

    def __init__(
        self,
        fetch: Callable[[slice], torch.Tensor],
        shape: Sequence[int],
        dtype: torch.dtype,
        device: str | torch.device,
        max_chunk_layers: int,
        block_ids: Sequence[int] = (),
    ) -> None:
        """`block_ids`: the worker's blocks the pieces are of (read by a rank-to-rank backend)."""
        if len(shape) != 6 or shape[1] != 2:
            raise ValueError(f"shape must be [num_layers, 2, n, block_size, Hkv, D], got {tuple(shape)}")
        if max_chunk_layers <= 0:
            raise ValueError(f"max_chunk_layers must be > 0, got {max_chunk_layers}")
        self._fetch = fetch
        self.shape = tuple(int(size) for size in shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_chunk_layers = max_chunk_layers
        self.block_ids = list(block_ids)

    def layers(self, layers: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        start, stop, step = layers.indices(self.shape[0])
        if step != 1 or stop <= start or stop - start > self.max_chunk_layers:
            raise ValueError(
                f"layers {layers}: a non-empty step-1 range of at most {self.max_chunk_layers} "
                f"of {self.shape[0]} layers"
            )
        piece = self._fetch(slice(start, stop))
        expected = (stop - start, *self.shape[1:])
        if tuple(piece.shape) != expected or piece.dtype != self.dtype or piece.device != self.device:
            raise ValueError(
                f"fetched KV piece {tuple(piece.shape)} {piece.dtype} on {piece.device} for layers "
                f"{start}..{stop - 1}: expected {expected} {self.dtype} on {self.device}"
            )
        if out is None:
            return piece
        return out.copy_(piece)


class PieceFiller:
    """Copies a bounded source's layer pieces, in order, into `host` (uint8, the packed buffer's
    bytes, layer-major: the pieces land one after the other) on a thread of its own, dropping
    each piece once it is on the host. `ready(end)` returns once the bytes before `end` are
    there (`end` < 0: every byte), raising `KVTransferError` if fetching a piece failed; `stop()`
    ends the thread early (after the piece in hand) and returns once nothing writes to `host`.

    On CUDA the copies go on a stream of the thread's own: on this thread's current stream (the
    device's default stream, which the engine runs on) each would queue behind the engine's
    work and hold up its next step behind the copy, and its blocking wait would wait for all
    of the engine's queued work. The pieces are complete when fetched (`LayerPieces`)."""

    def __init__(self, source: KVSource, host: torch.Tensor, req_id: str) -> None:
        self._source = source
        self._host = host
        self._req_id = req_id
        self._layer_nbytes = host.numel() // source.shape[0]
        self._filled = 0  # bytes of `host` in place
        self._error: BaseException | None = None
        self._stopping = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"kv-pieces-{req_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            device = self._source.device
            stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            for layers in chunk_plan(self._source, 0):
                with self._cv:
                    if self._stopping:
                        return
                start, stop = layers.start * self._layer_nbytes, layers.stop * self._layer_nbytes
                piece = self._source.layers(layers)
                host = self._host[start:stop].view(piece.dtype).view(piece.shape)
                if stream is None:
                    host.copy_(piece)
                else:
                    with torch.cuda.stream(stream):
                        host.copy_(piece, non_blocking=True)
                    stream.synchronize()  # on the host before the piece is dropped
                del piece, host  # before the next is fetched: one piece off the host at a time
                with self._cv:
                    self._filled = stop
                    self._cv.notify_all()
        except BaseException as exc:  # handed to whoever waits for the bytes
            with self._cv:
                self._error = exc
                self._cv.notify_all()

    def ready(self, end: int) -> None:
        want = self._host.numel() if end < 0 else end
        with self._cv:
            while self._filled < want and self._error is None and self._thread.is_alive():
                self._cv.wait(0.5)
            if self._filled >= want:
                return
            error = self._error
        if error is None:  # stopped early
            raise KVTransferError(f"request {self._req_id}: staging its KV stopped")
        raise KVTransferError(f"request {self._req_id}: fetching its KV failed: {error!r}") from error

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
        self._thread.join()
