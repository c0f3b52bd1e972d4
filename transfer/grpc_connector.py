"""The grpc backend as a `KVConnector`: `GrpcKVSender` on the prefill side, a started
`GrpcKVServer` on the decode side; `GrpcPeer(address)` is the decode worker's descriptor.

The protocol itself is described in `transfer.grpc_backend`. This module imports no torch
at load time (the backends load when a side is made), so a router unpickling a handle
with a `GrpcPeer` in it stays torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from pdserve.transfer.config import TransferConfig
from pdserve.transfer.connector import DecodeLink, GatedReceiveSide, KVConnector, KVReceiveSide, KVSendSide
from pdserve.transfer.contract import KVHandle, KVSink, KVSource, TransferStats
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.peers import GrpcPeer

if TYPE_CHECKING:
    import torch

    from pdserve.engine.rank_tasks import RankTasks
    from pdserve.transfer.grpc_backend import GrpcKVSender
    from pdserve.transfer.grpc_server import GrpcKVServer

__all__ = ["GrpcConnector"]


class GrpcSendSide:
    """Prefill side: one `GrpcKVSender` (a channel per decode address). Needs no links."""

    def __init__(self, model_name: str, config: TransferConfig, tp_size: int = 1) -> None:
        from pdserve.transfer.grpc_backend import GrpcKVSender

        self.sender: GrpcKVSender = GrpcKVSender(
            model_name, config.secret, timeout_s=config.timeout_s, tp_size=tp_size
        )

    def send(self, handle: KVHandle, source: KVSource, first_token_id: int) -> TransferStats:
        return self.sender.send(handle, source, first_token_id)

    def join_group(
        self,
        rank: int,
        world_size: int,
        init_method: str,
        device: str | torch.device,
        ranks: RankTasks | None = None,
    ) -> None:
        """Nothing to join: the grpc backend uses no process group."""

    def group_rank(self) -> int | None:
        return None

    def broken_peers(self) -> dict[int, str]:
        """{}: each push has its own streams, so a failed one leaves nothing broken behind."""
        return {}

    def close(self) -> None:
        self.sender.close()


class GrpcReceiveSide(GatedReceiveSide):
    """Decode side: a `GrpcKVServer` admitting pushes through this side's gate, bound and serving
    from construction until `close`."""

    def __init__(
        self, config: TransferConfig, sink: KVSink, layout: KVLayout, device: str | torch.device, index: int
    ) -> None:
        from pdserve.transfer.grpc_server import GrpcKVServer

        super().__init__(config, layout)
        grpc_port, data_port = config.kv_server_ports(index)
        host = config.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 address
        self.server: GrpcKVServer = GrpcKVServer(
            f"{host}:{grpc_port}",
            sink,
            layout,
            gate=self.gate,
            timeout_s=config.timeout_s,
            data_port=data_port,
            max_data_streams=config.data_streams,
            device=device,
        )
        self.server.start()

    def peer(self) -> GrpcPeer:
        return GrpcPeer(self.server.address)

    def receive_notice(self, notice: object) -> None:
        raise TypeError("the grpc backend takes no notices: senders push to its own KV server")

    def join_group(
        self,
        rank: int,
        world_size: int,
        init_method: str,
        device: str | torch.device,
        ranks: RankTasks | None = None,
    ) -> None:
        """Nothing to join: the grpc backend uses no process group."""

    def group_rank(self) -> int | None:
        return None

    def broken_peers(self) -> dict[int, str]:
        """{}: each push has its own streams, so a failed one leaves nothing broken behind."""
        return {}

    def close(self) -> None:
        self.server.stop()


class GrpcConnector(KVConnector):
    name: ClassVar[str] = "grpc"
    uses_process_group: ClassVar[bool] = False

    def send_side(self, model_name: str, links: Mapping[str, DecodeLink], tp_size: int = 1) -> KVSendSide:
        return GrpcSendSide(model_name, self.config, tp_size)

    def receive_side(
        self, sink: KVSink, layout: KVLayout, device: str | torch.device, decode_index: int
    ) -> KVReceiveSide:
        """Binds `config.host` on the ports `config.kv_server_ports(decode_index)` (0 = free ones);
        on a CUDA `device`, socket-plane bytes go on to it as they land."""
        return GrpcReceiveSide(self.config, sink, layout, device, decode_index)
