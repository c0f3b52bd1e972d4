"""How KV moves between workers: the `transfer:` section of a deploy config.

`make_connector(config)` (`transfer.connector`) turns it into the chosen backend's
connector, found in `CONNECTORS`. This module imports no torch (the router and the deploy config load it).
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field

# The connectors: backend name -> "module:class", imported on first use (they may import
# torch). Adding a backend is one module with a `KVConnector` subclass and one entry here.
CONNECTORS: dict[str, str] = {
    "grpc": "pdserve.transfer.grpc_connector:GrpcConnector",
    "nccl": "pdserve.transfer.nccl_connector:NcclConnector",
}
BACKENDS: tuple[str, ...] = tuple(CONNECTORS)
MAX_DATA_STREAMS = 64


@dataclass
class TransferConfig:
    backend: str = "grpc"
    # address the decode workers' KV servers bind (grpc backend); "auto": each one's node address
    host: str = "auto"
    # grpc backend: 0 = free ports; else decode-i's KV server takes gRPC port port_base + 2i and its
    # data port port_base + 2i + 1, a fixed range a firewall can open between the hosts
    port_base: int = 0
    # grpc backend: a large KV buffer comes in over up to this many parallel data connections (one
    # TCP stream tops out at what one core copies; a fast NIC needs several)
    data_streams: int = 4
    # The transfer lease: a decode worker drops a reservation whose KV has not begun to arrive this
    # long after `reserve`, or has not landed this long after it began, and a sender gives up on a
    # transfer after it; either way the blocks are freed on both sides and the request fails with
    # a status naming the timeout.
    timeout_s: float = 30.0
    # The per-deployment secret every KV transfer is authenticated with (`transfer.credentials`).
    # Empty: `pdserve up` generates one per deployment (`with_secret`). Never logged (repr=False).
    secret: str = field(default="", repr=False)
    # nccl backend: the port of the process group's rendezvous store on rank 0's node (prefill-0);
    # 0 = a free one. gloo and NCCL then connect the ranks on ports of their own choosing.
    rendezvous_port: int = 0

    def with_secret(self) -> TransferConfig:
        """This config, with a fresh random secret if it has none."""
        if self.secret:
            return self
        return dataclasses.replace(self, secret=secrets.token_hex(32))

    def kv_server_ports(self, decode_index: int) -> tuple[int, int]:
        """(gRPC port, data port) of decode worker `decode_index`'s KV server; (0, 0) = free ports."""
        if not self.port_base:
            return (0, 0)
        return (self.port_base + 2 * decode_index, self.port_base + 2 * decode_index + 1)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.backend not in BACKENDS:
            raise ValueError(
                f"TransferConfig.backend: unknown backend {self.backend!r} (allowed: {', '.join(BACKENDS)})"
            )
        if not _is_int(self.data_streams) or not 1 <= self.data_streams <= MAX_DATA_STREAMS:
            raise ValueError(
                f"TransferConfig.data_streams: must be an integer in [1, {MAX_DATA_STREAMS}], "
                f"got {self.data_streams!r}"
            )
        if not _is_int(self.rendezvous_port) or not 0 <= self.rendezvous_port <= 65535:
            raise ValueError(
                "TransferConfig.rendezvous_port: must be an integer in [0, 65535], "
                f"got {self.rendezvous_port!r}"
            )
        if not _is_int(self.port_base) or not 0 <= self.port_base <= 65535:
            raise ValueError(
                f"TransferConfig.port_base: must be an integer in [0, 65535], got {self.port_base!r}"
            )
        timeout = self.timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
            raise ValueError(f"TransferConfig.timeout_s: must be a number in (0, 3600], got {timeout!r}")
        if not isinstance(self.secret, str):
            raise ValueError("TransferConfig.secret: must be a string")  # the value is never echoed


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = ["TransferConfig"]
