"""The peer descriptors the decode workers' receive sides publish, one per backend.

A `KVHandle` carries one to the prefill worker's send side; only the matching backend
reads it. Plain frozen dataclasses, no torch: the router unpickles handles.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.transfer.contract import KVHandle

__all__ = ["GrpcPeer", "NcclPeer", "check_grpc_peer", "check_nccl_peer"]


@dataclass(frozen=True)
class GrpcPeer:
    """Where a decode worker's KV server listens."""

    address: str  # "host:port" of its GrpcKVServer (the data port comes back in the call)


@dataclass(frozen=True)
class NcclPeer:
    """A decode worker's rank in the transfer process group."""

    rank: int


def check_grpc_peer(handle: KVHandle) -> str:
    """The handle's server address; ValueError when its peer belongs to another backend."""
    if not isinstance(handle.peer, GrpcPeer):
        raise ValueError(
            f"request {handle.req_id}: the grpc backend needs a GrpcPeer, but the handle's peer is "
            f"{handle.peer!r}"
        )
    return handle.peer.address


def check_nccl_peer(handle: KVHandle) -> int:
    """The handle's destination rank; ValueError when its peer belongs to another backend."""
    if not isinstance(handle.peer, NcclPeer):
        raise ValueError(
            f"request {handle.req_id}: the nccl backend needs an NcclPeer, but the handle's peer is "
            f"{handle.peer!r}"
        )
    return handle.peer.rank
