"""Moving a request's KV blocks between workers: contract, packing, and the nccl/gloo and gRPC backends.

Importing this package loads only the torch-free pieces (layout, contract); import
`transfer.packing`, `transfer.nccl_backend` or `transfer.grpc_backend` (sender) and
`transfer.grpc_server` (receiver) for the rest.
"""

from transfer.contract import KVHandle, KVReceiverCallback, KVSender, KVTransferError, TransferStats
from transfer.layout import KVLayout, KVLayoutMismatch

__all__ = [
    "KVHandle",
    "KVLayout",
    "KVLayoutMismatch",
    "KVReceiverCallback",
    "KVSender",
    "KVTransferError",
    "TransferStats",
]
