"""The nccl backend as a `KVConnector` (NCCL between GPUs, gloo on CPU): `NcclKVSender` on
the prefill side, `NcclKVReceiver` on the decode side, over one torch.distributed group that
every worker joins (`uses_process_group`); `NcclPeer(rank)` is the decode worker's descriptor.

    prefill: send_side.send(handle, ...)
               -> links[handle.decode_worker_id].notify_kv(notice)   (the wiring's DecodeLink)
    decode:        -> receive_side.receive_notice(notice)            (blocks until the KV is in)
             isend chunks ------------------------------------------> irecv chunks -> sink

Both sides build their backend object in `join_group` (the sender needs its rank, the
peer descriptor is the receiver's rank), and `close` leaves the group they joined. The
protocol is described in `transfer.nccl_backend`. This module imports no torch at load
time (the backend loads in `join_group`), so a router unpickling a handle with an
`NcclPeer` in it stays torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from pdserve.transfer.config import TransferConfig
from pdserve.transfer.connector import (
    DecodeLink,
    GatedReceiveSide,
    KVConnector,
    KVReceiveSide,
    KVSendSide,
    Waitable,
)
from pdserve.transfer.contract import KVHandle, KVSink, KVSource, KVTransferError, TransferStats
from pdserve.transfer.credentials import secret_bytes
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.peers import NcclPeer, check_peer

if TYPE_CHECKING:
    import torch

    from pdserve.engine.rank_tasks import RankTasks
    from pdserve.transfer.nccl_backend import NcclKVReceiver, NcclKVSender
    from pdserve.transfer.nccl_direct import DirectReceiver, DirectSender

__all__ = ["NcclConnector"]


class NcclSendSide:
    """Prefill side: an `NcclKVSender` from `join_group` on, notifying through `links`."""

    def __init__(
        self, model_name: str, links: Mapping[str, DecodeLink], config: TransferConfig, tp_size: int = 1
    ) -> None:
        secret_bytes(config.secret)  # no side without the deployment's secret (ValueError)
        self.model_name = model_name
        self.tp_size = tp_size
        self.config = config
        self.links = links  # held, not copied: the wiring may fill it later
        self.sender: NcclKVSender | None = None
        self.direct: DirectSender | None = None  # rank-to-rank sends (transfer.nccl_direct)

    def join_group(
        self,
        rank: int,
        world_size: int,
        init_method: str,
        device: str | torch.device,
        ranks: RankTasks | None = None,
    ) -> None:
        from pdserve.transfer.nccl_backend import NcclKVSender
        from pdserve.transfer.nccl_direct import DirectSender

        join_with_ranks(rank, world_size, init_method, device, ranks, self.config.timeout_s)
        self.sender = NcclKVSender(
            rank, self.model_name, self.config.secret, timeout_s=self.config.timeout_s, tp_size=self.tp_size
        )
        if ranks is not None:
            self.direct = DirectSender(self.sender, ranks, secret_bytes(self.config.secret))

    def send(self, handle: KVHandle, source: KVSource, first_token_id: int) -> TransferStats:
        peer = check_peer(handle, NcclPeer)
        if self.sender is None:
            raise RuntimeError("nccl send side: send before join_group (it needs its rank in the group)")

        def notify(notice: object) -> Waitable:
            link = self.links.get(handle.decode_worker_id)
            if link is None:  # raised before any byte moves: the sender reports a KVTransferError
                raise KVTransferError(f"no link to decode worker {handle.decode_worker_id!r}")
            return link.notify_kv(notice)

        if self.tp_size > 1 or peer.tp_size > 1:  # rank to rank: every rank sends its heads
            if self.direct is None:
                raise RuntimeError(
                    "nccl send side: a tensor-parallel pair needs the worker's ranks (join_group)"
                )
            from pdserve.transfer.source import source_layout

            layout = source_layout(source, self.model_name, self.tp_size)
            return self.direct.send(handle, source.block_ids, layout, first_token_id, notify)
        return self.sender.send(handle, source, first_token_id, notify=notify)

    def group_rank(self) -> int | None:
        return None if self.sender is None else self.sender.rank

    def broken_peers(self) -> dict[int, str]:
        return {} if self.sender is None else self.sender.broken_peers()

    def close(self) -> None:
        if self.sender is not None:
            from pdserve.transfer.nccl_group import destroy_transfer_group

            self.sender.close()
            self.sender = None
            self.direct = None
            destroy_transfer_group()


class NcclReceiveSide(GatedReceiveSide):
    """Decode side: an `NcclKVReceiver` from `join_group` on, fed by `receive_notice`, admitting
    notices through this side's gate."""

    def __init__(
        self, config: TransferConfig, sink: KVSink, layout: KVLayout, device: str | torch.device
    ) -> None:
        super().__init__(config, layout)
        self.timeout_s = config.timeout_s
        self.sink = sink
        self.device = device  # where the chunks land (the cache's device)
        self.rank: int | None = None
        self.receiver: NcclKVReceiver | None = None
        self.direct: DirectReceiver | None = None  # rank-to-rank receives (transfer.nccl_direct)

    def join_group(
        self,
        rank: int,
        world_size: int,
        init_method: str,
        device: str | torch.device,
        ranks: RankTasks | None = None,
    ) -> None:
        from pdserve.transfer.nccl_backend import NcclKVReceiver
        from pdserve.transfer.nccl_direct import DirectReceiver

        join_with_ranks(rank, world_size, init_method, device, ranks, self.timeout_s)
        self.receiver = NcclKVReceiver(
            self.sink, self.layout, self.device, self.gate, timeout_s=self.timeout_s
        )
        if ranks is not None:
            self.direct = DirectReceiver(self.receiver, ranks, self.sink)
        self.rank = rank

    def peer(self) -> NcclPeer:
        if self.rank is None:
            raise RuntimeError("nccl receive side: peer() before join_group (the descriptor is its rank)")
        return NcclPeer(self.rank, 1 if self.direct is None else self.direct.ranks.size)

    def receive_notice(self, notice: object) -> None:
        """Blocks until the request's KV is in place and the sink took every chunk, or raises."""
        from pdserve.transfer.nccl_backend import NcclTransferNotice
        from pdserve.transfer.nccl_direct import NcclDirectNotice

        if self.receiver is None:
            raise RuntimeError("nccl receive side: receive_notice before join_group")
        if isinstance(notice, NcclDirectNotice):
            if self.direct is None:
                raise TypeError(
                    "nccl receive side: a rank-to-rank notice, but the worker's ranks were not given"
                )
            self.direct.recv(notice)
            return
        if not isinstance(notice, NcclTransferNotice):
            raise TypeError(f"nccl receive side: expected an NcclTransferNotice, got {type(notice).__name__}")
        self.receiver.recv(notice)

    def group_rank(self) -> int | None:
        return self.rank

    def broken_peers(self) -> dict[int, str]:
        return {} if self.receiver is None else self.receiver.broken_peers()

    def close(self) -> None:
        if self.receiver is not None:
            from pdserve.transfer.nccl_group import destroy_transfer_group

            self.receiver = None
            self.direct = None
            destroy_transfer_group()


def join_with_ranks(
    rank: int,
    world_size: int,
    init_method: str,
    device: str | torch.device,
    ranks: RankTasks | None,
    timeout_s: float,
) -> None:
    """Join the transfer group at `rank`, and each of the worker's child ranks at `rank` plus its
    rank (on their own threads: every member joins at once); raises if one of them failed."""
    from pdserve.transfer.nccl_group import init_transfer_group
    from pdserve.transfer.nccl_ranks import JoinTransferGroup

    size = 1 if ranks is None else ranks.size
    joins = [ranks.submit(r, JoinTransferGroup(rank + r, world_size, init_method)) for r in range(1, size)]
    init_transfer_group(rank, world_size, init_method, device)
    for child, join in enumerate(joins, start=1):
        try:
            join.result(timeout=max(timeout_s, 120.0))
        except Exception as exc:
            raise RuntimeError(
                f"tensor-parallel rank {child} did not join the transfer group: {exc}"
            ) from exc


class NcclConnector(KVConnector):
    name: ClassVar[str] = "nccl"
    uses_process_group: ClassVar[bool] = True

    def send_side(self, model_name: str, links: Mapping[str, DecodeLink], tp_size: int = 1) -> KVSendSide:
        return NcclSendSide(model_name, links, self.config, tp_size)

    def receive_side(
        self, sink: KVSink, layout: KVLayout, device: str | torch.device, decode_index: int
    ) -> KVReceiveSide:
        return NcclReceiveSide(self.config, sink, layout, device)
