"""One KV connector per backend: a send side on each prefill worker, a receive side on each
decode worker, both made from the deploy's `TransferConfig`.

    connector = make_connector(config)               # config.backend picks the class
    # decode worker
    receive = connector.receive_side(sink, layout, device, decode_index)   # layout: whole KV heads
    # prefill worker; links: decode worker id -> DecodeLink, may be filled in later
    send = connector.send_side(model_name, links, tp_size)
    if connector.uses_process_group:                 # nccl: one torch.distributed group
        side.join_group(rank, world_size, init_method, device, ranks)   # every side at once
    credential = receive.expect(req_id, block_ids)   # decode worker's reserve()
    handle = KVHandle(..., peer=receive.peer(), credential=credential)
    send.send(handle, CacheBlocks(kv_cache, src_block_ids), first_token_id)   # transfer.source
    # -> receiver: checks the credential (once), then
    #    sink.on_kv_chunk(KVArrival(req_id, reserved block_ids, first_token_id, t), layers, chunk)
    receive.forget(req_id)                           # an abort or an expired lease: refuse it now

Both sides need `config.secret` (the deployment's; `transfer.credentials`) and take
`config.timeout_s` as the longest one transfer may take.

`handle.peer` is opaque outside the backend: only its own send side reads it (a handle
carrying another backend's descriptor is refused with ValueError).

Adding a backend: one module with a `KVConnector` subclass and its peer descriptor, and
one `CONNECTORS` entry (`transfer.config`). The registry names modules as strings, imported on first use, so
this module (like `transfer.contract` and `transfer.config`) imports no torch: the router
loads it.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pdserve.transfer.config import BACKENDS, CONNECTORS, TransferConfig
from pdserve.transfer.contract import KVHandle, KVSink, KVSource, TransferStats
from pdserve.transfer.credentials import KVGate
from pdserve.transfer.layout import KVLayout

if TYPE_CHECKING:
    import torch

    from pdserve.engine.rank_tasks import RankTasks


__all__ = [
    "DecodeLink",
    "GatedReceiveSide",
    "KVConnector",
    "KVReceiveSide",
    "KVSendSide",
    "Waitable",
    "make_connector",
]


class Waitable(Protocol):
    """Anything with `.result(timeout)`: a `concurrent.futures.Future`, a wrapped Ray ObjectRef."""

    def result(self, timeout: float | None = None) -> Any: ...


class DecodeLink(Protocol):
    """How a prefill worker reaches one decode worker's control plane. Supplied by the wiring
    layer (a wrapper around a Ray actor handle, or an in-process object)."""

    def notify_kv(self, notice: object) -> Waitable:
        """Hand the backend's notice to the decode worker's `KVReceiveSide.receive_notice`; the
        result resolves once the receiver has the data in place (or raises its error). nccl only."""
        ...

    def kv_failed(self, req_id: str, reason: str | None) -> None:
        """The request's KV will not arrive: `reason` says why; None = nothing was or will be sent,
        release the reservation quietly. Called by the prefill worker, not by the send side."""
        ...


class KVSendSide(Protocol):
    """A prefill worker's end of the connector. Thread-safe."""

    def send(self, handle: KVHandle, source: KVSource, first_token_id: int) -> TransferStats:
        """`KVSender.send`: returns once the receiver has the data in place (and its sink took
        it); KVLayoutMismatch / KVTransferError / ValueError (bad arguments, a peer of another
        backend) otherwise. `source` (`transfer.source`): the blocks to send, with every KV head,
        e.g. `CacheBlocks(kv_cache, src_block_ids)`; a tensor-parallel worker's `LayerPieces`
        gathers them piece by piece as they are sent."""
        ...

    def join_group(
        self,
        rank: int,
        world_size: int,
        init_method: str,
        device: str | torch.device,
        ranks: RankTasks | None = None,
    ) -> None:
        """Join the transfer process group (backends with `uses_process_group` only) at `rank`;
        `ranks`: the worker's tensor-parallel ranks (engine/rank_tasks.py), each joining at `rank`
        plus its own rank, so KV moves rank to rank (nccl; `transfer.nccl_direct`)."""
        ...

    def group_rank(self) -> int | None:
        """This side's rank in the transfer process group; None without one (grpc, or not joined)."""
        ...

    def broken_peers(self) -> dict[int, str]:
        """The ranks this side can no longer transfer with (a transfer between them failed
        part-way, so the pair may be out of step), each with why; {} without a group (grpc)."""
        ...

    def close(self) -> None: ...


class KVReceiveSide(Protocol):
    """A decode worker's end of the connector: receives KV and hands it to its `KVSink`."""

    def peer(self) -> object:
        """The descriptor senders need (goes into `KVHandle.peer`). nccl: only after `join_group`
        (RuntimeError before)."""
        ...

    def expect(self, req_id: str, block_ids: Sequence[int]) -> bytes:
        """Open `req_id`'s reservation of `block_ids`: its KV is accepted once, into exactly these
        blocks, from a sender presenting the returned credential (it goes in `KVHandle.credential`)."""
        ...

    def forget(self, req_id: str) -> None:
        """Close `req_id`'s reservation if still open: a transfer presenting it is refused."""
        ...

    def began_at(self, req_id: str) -> float | None:
        """time.monotonic() when `req_id`'s transfer presented its credential; None if not yet."""
        ...

    def receive_notice(self, notice: object) -> None:
        """nccl: the sender's notice (via `DecodeLink.notify_kv`); blocks until the data is in place
        and the sink took it, or raises. Backends with their own server raise TypeError."""
        ...

    def join_group(
        self,
        rank: int,
        world_size: int,
        init_method: str,
        device: str | torch.device,
        ranks: RankTasks | None = None,
    ) -> None:
        """As `KVSendSide.join_group`."""
        ...

    def group_rank(self) -> int | None:
        """As `KVSendSide.group_rank`."""
        ...

    def broken_peers(self) -> dict[int, str]:
        """As `KVSendSide.broken_peers`."""
        ...

    def close(self) -> None: ...


class GatedReceiveSide:
    """What every receive side shares: its open reservations (`KVGate`) and their byte counts."""

    def __init__(self, config: TransferConfig, layout: KVLayout) -> None:
        self.gate = KVGate(config.secret)  # ValueError when the deployment has no secret
        self.layout = layout

    def expect(self, req_id: str, block_ids: Sequence[int]) -> bytes:
        import torch  # only on a decode worker, which has it loaded anyway

        nbytes = (
            math.prod(self.layout.buffer_shape(len(block_ids))) * getattr(torch, self.layout.dtype).itemsize
        )
        return self.gate.issue(req_id, block_ids, nbytes)

    def forget(self, req_id: str) -> None:
        self.gate.revoke(req_id)

    def began_at(self, req_id: str) -> float | None:
        return self.gate.claimed_at(req_id)


class KVConnector(ABC):
    """A backend: makes the send and receive sides from one `TransferConfig`."""

    name: ClassVar[str]
    # True: the wiring forms one torch.distributed group over every prefill and decode worker
    # and calls `join_group` on each side (all at once) before the first transfer.
    uses_process_group: ClassVar[bool]

    def __init__(self, config: TransferConfig) -> None:
        self.config = config

    @abstractmethod
    def send_side(self, model_name: str, links: Mapping[str, DecodeLink], tp_size: int = 1) -> KVSendSide:
        """The prefill worker's side. `links`: decode worker id -> DecodeLink; held, not copied,
        so the wiring may fill it after this call (the side looks `handle.decode_worker_id` up
        when it needs it). `tp_size`: the worker's tensor-parallel size, named in its layout
        (the `kv_cache` it sends from carries every KV head: a tensor-parallel worker gathers
        them from its ranks first)."""

    @abstractmethod
    def receive_side(
        self, sink: KVSink, layout: KVLayout, device: str | torch.device, decode_index: int
    ) -> KVReceiveSide:
        """The decode worker's side, delivering to `sink` on `device`. `layout`: the decode cache's
        layout (anything else is refused); `decode_index`: this worker's index in the decode pool
        (picks its ports). `config.host` must be a concrete address by now ("auto" resolved)."""


def connector_class(backend: str) -> type[KVConnector]:
    """The registered `KVConnector` subclass for `backend`; ValueError naming the allowed ones."""
    if backend not in CONNECTORS:
        raise ValueError(f"unknown transfer backend {backend!r} (allowed: {', '.join(BACKENDS)})")
    module_name, _, class_name = CONNECTORS[backend].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, KVConnector)) or cls.name != backend:
        raise TypeError(f"{CONNECTORS[backend]} is not the KVConnector of backend {backend!r}")
    return cls


def make_connector(config: TransferConfig) -> KVConnector:
    """The connector of `config.backend`, after `config.validate()` (ValueError naming the field)."""
    config.validate()
    return connector_class(config.backend)(config)
