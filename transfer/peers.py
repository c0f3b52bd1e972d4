"""The peer descriptors the decode workers' receive sides publish, one per backend.

A `KVHandle` carries one to the prefill worker's send side; only the matching backend
reads it. Plain frozen dataclasses, no torch: the router unpickles handles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TypeVar

from pdserve.transfer.contract import KVHandle

__all__ = ["GrpcPeer", "NcclPeer", "check_peer"]


@dataclass(frozen=True)
class GrpcPeer:
    """Where a decode worker's KV server listens."""

    address: str  # "host:port" of its GrpcKVServer (the data port comes back in the call)
    backend: ClassVar[str] = "grpc"


@dataclass(frozen=True)
class NcclPeer:
    """A decode worker's rank in the transfer process group: its first, with `tp_size` ranks at
    `rank` .. `rank + tp_size - 1` (transfer/nccl_direct.py)."""

    rank: int
    tp_size: int = 1
    backend: ClassVar[str] = "nccl"


PeerT = TypeVar("PeerT", GrpcPeer, NcclPeer)


def check_peer(handle: KVHandle, peer_type: type[PeerT]) -> PeerT:
    """The handle's peer as `peer_type`; ValueError when it belongs to another backend."""
    if not isinstance(handle.peer, peer_type):
        name = peer_type.__name__
        raise ValueError(
            f"request {handle.req_id}: the {peer_type.backend} backend needs "
            f"{'an' if name.startswith('N') else 'a'} {name}, but the handle's peer is {handle.peer!r}"
        )
    return handle.peer
