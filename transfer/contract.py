"""The KV transfer contract shared by every backend: a send side and a receive side.

Receive side (decode worker): reserves blocks for a request and answers with a
`KVHandle`: which of its block ids to fill, its layout (and fingerprint), and `peer`,
the opaque descriptor its receive side publishes (`GrpcPeer(address)`,
`NcclPeer(rank)`; only the matching send side reads it). When a request's KV
arrives (with the handle's one-time `credential`, checked before anything is read:
`transfer.credentials`), the receiver hands it to a `KVSink` in layer chunks, in layer order, with a
`KVArrival` that carries the prefill's first sampled token: once the last chunk is
in, the decode worker can start the request by itself.

Send side (prefill worker): calls `send(handle, src_block_ids, kv_cache,
first_token_id)` once per request. `src_block_ids[i]` (prefill cache) lands in
`handle.block_ids[i]` (decode cache). Ownership: the blocks stay the caller's; the
sender only reads them while `send` runs, so the caller frees them when `send`
returns or raises. `send` returns once the receiver has the data in place and its
sink took it (or raises `KVTransferError`, or `KVLayoutMismatch` when the layouts
differ).

`transfer.connector` builds both sides of the configured backend. This module
imports no torch at load time: handles are built and pickled by the router and by
Ray without it.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from pdserve.transfer.layout import KVLayout, KVLayoutMismatch

if TYPE_CHECKING:
    import torch

__all__ = [
    "KVArrival",
    "KVHandle",
    "KVLayoutMismatch",
    "KVSender",
    "KVSource",
    "KVSink",
    "KVTransferError",
    "TransferStats",
    "check_send_args",
    "check_token_id",
]

# Token ids travel as uint32 (the gRPC header's field).
MAX_TOKEN_ID = (1 << 32) - 1


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
    # The decode worker's receive side's descriptor (`KVReceiveSide.peer()`): a picklable frozen
    # dataclass only its backend's send side reads, e.g. GrpcPeer(address) or NcclPeer(rank).
    peer: object
    layout_fingerprint: str = ""  # filled from `layout` when empty; checked against it otherwise
    # The decode worker's one-time credential for this reservation (`transfer.credentials`): the
    # sender presents it, signed with the deployment secret; the receiver accepts it once.
    credential: bytes = field(default=b"", repr=False)

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
        if self.peer is None:
            raise ValueError(f"KVHandle for {self.req_id}: give the decode worker's peer descriptor")


@dataclass(frozen=True)
class KVArrival:
    """One request's KV as its receiver announces it to the sink. Plain data."""

    req_id: str
    block_ids: tuple[int, ...]  # the blocks reserved for the request (never a header's), in buffer order
    first_token_id: int  # the prefill's first sampled token
    started_at: float  # time.perf_counter() on the receiver when the header / notice arrived


@dataclass
class TransferStats:
    """What one `send` cost, for logs and benchmarks."""

    nbytes: int  # payload bytes moved
    pack_ms: float  # gather (+ copy to host on the gRPC path); on CUDA, host time to enqueue
    send_ms: float  # from the end of pack until the receiver confirmed the data is in place
    extra: dict[str, float] = field(default_factory=dict)


class KVSource(Protocol):
    """A request's packed KV, by layer range: what a sender reads (`transfer.source` has the
    implementations: a cache's blocks, pieces gathered on demand)."""

    shape: tuple[int, ...]  # the whole packed buffer's [num_layers, 2, n, block_size, Hkv, D]
    dtype: torch.dtype
    device: torch.device
    # 0: any layer range may be asked for at once (a view of a cache: nothing extra is held);
    # k > 0: at most k layers per call, each a fresh tensor the sender should drop once sent.
    max_chunk_layers: int
    # The sending worker's blocks, in order (a backend moving KV rank to rank reads each rank's
    # heads of them from that rank's cache itself: transfer.nccl_direct).
    block_ids: list[int]

    def layers(self, layers: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        """The packed KV of `layers` (a step-1 slice): [stop - start, 2, n, block_size, Hkv, D] on
        `device`; written into `out` (that exact shape, dtype and device) when given."""
        ...


@runtime_checkable
class KVSender(Protocol):
    """Prefill side of a backend."""

    def send(self, handle: KVHandle, source: KVSource, first_token_id: int) -> TransferStats:
        """Ship `source`'s blocks (`transfer.source`: e.g. `CacheBlocks(kv_cache, src_block_ids)`)
        into the decode blocks `handle.block_ids`, with the request's first sampled token.

        Blocks until the receiver has the data in place. Raises `KVLayoutMismatch` when
        the layouts differ, `KVTransferError` on any other failure, ValueError on bad
        arguments (including a `handle.peer` of another backend) before moving a byte.
        """
        ...

    def close(self) -> None: ...


@runtime_checkable
class KVSink(Protocol):
    """Decode side: where a receiver puts what arrived (the decode worker implements it)."""

    def on_kv_chunk(self, arrival: KVArrival, layers: slice, chunk: torch.Tensor) -> None:
        """Layers `layers` of request `arrival.req_id`'s blocks.

        chunk: [layers.stop - layers.start, 2, len(arrival.block_ids), block_size, Hkv, D], on any
        device; valid only during the call. Chunks of one request come in layer order, from one
        thread; the request is complete once `layers.stop == num_layers`. Raising refuses the KV:
        the sender's `send` fails (the receiver still drains the rest of the request's bytes).
        """
        ...


def check_token_id(req_id: str, token_id: object) -> int:
    """`token_id` as an int in [0, 2**32); ValueError otherwise (bools and floats included)."""
    try:
        value = operator.index(token_id)  # ints and integer scalars (numpy, 0-dim torch) only
    except TypeError:
        value = None
    if value is None or isinstance(token_id, bool) or not 0 <= value <= MAX_TOKEN_ID:
        raise ValueError(f"request {req_id}: first_token_id must be an int in [0, 2**32), got {token_id!r}")
    return value


def check_send_args(
    handle: KVHandle, src_block_ids: Sequence[int], local_layout: KVLayout, first_token_id: int | None = None
) -> None:
    """Checks every sender does before moving a byte."""
    if len(src_block_ids) != len(handle.block_ids):
        raise ValueError(
            f"request {handle.req_id}: {len(src_block_ids)} source blocks but the handle asks for "
            f"{len(handle.block_ids)} decode blocks"
        )
    if len(src_block_ids) == 0:
        raise ValueError(f"request {handle.req_id}: no blocks to send")
    if first_token_id is not None:
        check_token_id(handle.req_id, first_token_id)
    local_layout.check_compatible(handle.layout, "prefill", "decode")
