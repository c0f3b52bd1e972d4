"""The two-sided KV transfer contract shared by every backend.

Decode side: reserves blocks for a request and answers with a `KVHandle` (where to
send, which of its block ids to fill, the layout fingerprint). It runs a receiver
(`NcclKVReceiver` or `GrpcKVServer`) that calls `on_kv_received(req_id, block_ids,
buffer)` once a request's buffer has fully arrived; `transfer.packing.unpack_into`
builds the usual callback (scatter into the cache, then mark the request ready).

Prefill side: calls `sender.send(handle, src_block_ids, kv_cache)` once per request.
`src_block_ids[i]` (prefill cache) lands in `handle.block_ids[i]` (decode cache).
Ownership: the blocks stay the caller's; the sender only reads them while `send`
runs, so the caller frees them when `send` returns or raises. `send` returns once
the receiver has the data in place (or raises `KVTransferError`, or
`KVLayoutMismatch` when the layouts differ).

This module imports no torch at load time: handles are built and pickled by the
router and by Ray without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from transfer.layout import KVLayout, KVLayoutMismatch

if TYPE_CHECKING:
    import torch

__all__ = [
    "KVHandle",
    "KVLayoutMismatch",
    "KVReceiverCallback",
    "KVSender",
    "KVTransferError",
    "TransferStats",
    "check_send_args",
]


class KVTransferError(RuntimeError):
    """A transfer failed (peer unreachable, timed out, rejected); the caller may free its blocks."""


@dataclass
class KVHandle:
    """Where and how to ship one request's KV blocks. Plain data: picklable, no tensors."""

    req_id: str
    decode_worker_id: str
    block_ids: list[int]  # decode-side blocks to fill, in order
    num_tokens: int  # prompt tokens these blocks cover
    layout: KVLayout  # the decode side's cache layout
    layout_fingerprint: str = ""  # filled from `layout` when empty; checked against it otherwise
    nccl_rank: int | None = None  # decode worker's rank in the transfer process group
    grpc_address: str | None = None  # "host:port" of the decode worker's GrpcKVServer

    def __post_init__(self) -> None:
        self.block_ids = [int(block_id) for block_id in self.block_ids]
        expected = self.layout.fingerprint()
        if not self.layout_fingerprint:
            self.layout_fingerprint = expected
        elif self.layout_fingerprint != expected:
            raise KVLayoutMismatch(
                f"KVHandle for {self.req_id}: fingerprint {self.layout_fingerprint} does not match "
                f"its layout {self.layout} (fingerprint {expected})"
            )
        if self.num_tokens < 0:
            raise ValueError(f"KVHandle for {self.req_id}: num_tokens must be >= 0, got {self.num_tokens}")
        if self.nccl_rank is None and self.grpc_address is None:
            raise ValueError(f"KVHandle for {self.req_id}: give nccl_rank or grpc_address (or both)")


@dataclass
class TransferStats:
    """What one `send` cost, for logs and benchmarks."""

    nbytes: int  # payload bytes moved
    pack_ms: float  # gather (+ copy to host on the gRPC path); on CUDA, host time to enqueue
    send_ms: float  # from the end of pack until the receiver confirmed the data is in place
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def total_ms(self) -> float:
        return self.pack_ms + self.send_ms


@runtime_checkable
class KVSender(Protocol):
    """Prefill side of a backend."""

    def send(self, handle: KVHandle, src_block_ids: Sequence[int], kv_cache: torch.Tensor) -> TransferStats:
        """Ship `kv_cache` blocks `src_block_ids` into the decode blocks `handle.block_ids`.

        Blocks until the receiver has the data in place. Raises `KVLayoutMismatch` when
        the layouts differ, `KVTransferError` on any other failure.
        """
        ...

    def close(self) -> None: ...


# Decode side: called once per request, after its whole buffer has arrived.
# (req_id, block_ids, buffer [num_layers, 2, len(block_ids), block_size, Hkv, D]) -> None.
# Runs on a receiver thread; raising reports the failure back to the sender.
KVReceiverCallback = Callable[[str, list[int], "torch.Tensor"], None]


def check_send_args(handle: KVHandle, src_block_ids: Sequence[int], local_layout: KVLayout) -> None:
    """Checks every sender does before moving a byte."""
    if len(src_block_ids) != len(handle.block_ids):
        raise ValueError(
            f"request {handle.req_id}: {len(src_block_ids)} source blocks but the handle asks for "
            f"{len(handle.block_ids)} decode blocks"
        )
    if len(src_block_ids) == 0:
        raise ValueError(f"request {handle.req_id}: no blocks to send")
    local_layout.check_compatible(handle.layout, "prefill", "decode")
