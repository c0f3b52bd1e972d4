"""Moving a request's KV blocks between workers: contract, connectors, packing, and the
nccl/gloo and gRPC backends.

Importing this package loads only the torch-free pieces (layout, contract, config, the
connector interface and its registry); `make_connector(config)` loads the chosen backend.
Import `transfer.packing`, `transfer.source` (what a sender reads: `CacheBlocks`, `LayerPieces`),
`transfer.nccl_backend`, `transfer.grpc_backend` (sender) or `transfer.grpc_server` (receiver)
for the lower layers.
"""

from pdserve.transfer.config import TransferConfig
from pdserve.transfer.connector import (
    BACKENDS,
    DecodeLink,
    KVConnector,
    KVReceiveSide,
    KVSendSide,
    make_connector,
)
from pdserve.transfer.contract import KVArrival, KVHandle, KVSender, KVSink, KVTransferError, TransferStats
from pdserve.transfer.layout import KVLayout, KVLayoutMismatch

__all__ = [
    "BACKENDS",
    "DecodeLink",
    "KVArrival",
    "KVConnector",
    "KVHandle",
    "KVLayout",
    "KVLayoutMismatch",
    "KVReceiveSide",
    "KVSendSide",
    "KVSender",
    "KVSink",
    "KVTransferError",
    "TransferConfig",
    "TransferStats",
    "make_connector",
]
