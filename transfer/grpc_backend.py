"""KV transfer over gRPC: works between any two hosts and on CPU.

The sender packs the request's blocks into one buffer
`[num_layers, 2, n, block_size, Hkv, D]`, copies it to host once, and streams it
as one client-streaming `PushKV` call: a header chunk (req_id, layout, block ids,
dtype, shape, total bytes), then raw-byte chunks of `chunk_bytes`. The server
checks the layout before reading any data (a mismatch aborts the call with
FAILED_PRECONDITION, which the sender re-raises as `KVLayoutMismatch`),
reassembles the bytes into one preallocated host buffer, and calls
`on_kv_received(req_id, block_ids, tensor)` with a CPU tensor of that shape.
The call returns only after the callback returns, so when `send` returns the
data is in place.

The server is the synchronous `grpc.server` over a thread pool, so it can live
inside a Ray actor next to the engine loop; the callback runs on a server thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures

import grpc
import torch

from pdserve.internal import kv_transfer_pb2, kv_transfer_pb2_grpc
from transfer.contract import KVHandle, KVReceiverCallback, KVTransferError, TransferStats, check_send_args
from transfer.layout import KVLayout, KVLayoutMismatch, normalize_dtype_name
from transfer.packing import dtype_from_name, from_bytes, pack_blocks, to_bytes

DEFAULT_CHUNK_BYTES = 4 << 20  # 4 MiB per message
# Room for one data chunk plus a header with many block ids; both ends use it.
MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_TIMEOUT_S = 60.0
# Trailing-metadata key/value the server sets when it refuses a layout, so the sender can
# tell a layout mismatch from other FAILED_PRECONDITION errors without parsing text.
ERROR_KIND_KEY = "pdserve-error-kind"
LAYOUT_MISMATCH = "kv-layout-mismatch"

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def layout_to_proto(layout: KVLayout) -> kv_transfer_pb2.KVLayoutInfo:
    return kv_transfer_pb2.KVLayoutInfo(fingerprint=layout.fingerprint(), **layout.to_dict())


def layout_from_proto(info: kv_transfer_pb2.KVLayoutInfo) -> KVLayout:
    return KVLayout(
        model_name=info.model_name,
        dtype=info.dtype,
        num_layers=info.num_layers,
        num_kv_heads=info.num_kv_heads,
        head_dim=info.head_dim,
        block_size=info.block_size,
    )


class _KVTransferServicer(kv_transfer_pb2_grpc.KVTransferServicer):
    def __init__(self, on_kv_received: KVReceiverCallback, expected_layout: KVLayout) -> None:
        self.on_kv_received = on_kv_received
        self.expected_layout = expected_layout

    def PushKV(  # noqa: N802 (gRPC method name)
        self, request_iterator: Iterator[kv_transfer_pb2.KVChunk], context: grpc.ServicerContext
    ) -> kv_transfer_pb2.PushKVReply:
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PushKV: the first chunk must carry the header")
        header = first.header
        shape = self._check_header(header, context)
        payload = bytearray(header.total_bytes)  # [total_bytes], filled chunk by chunk
        view = memoryview(payload)
        received = 0
        for chunk in request_iterator:
            if chunk.HasField("header"):
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{header.req_id}: second header in one stream"
                )
            end = received + len(chunk.data)
            if end > header.total_bytes:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{header.req_id}: more than the announced {header.total_bytes} bytes",
                )
            view[received:end] = chunk.data
            received = end
        if received != header.total_bytes:
            context.abort(
                grpc.StatusCode.DATA_LOSS,
                f"{header.req_id}: stream ended after {received} of {header.total_bytes} bytes",
            )
        tensor = from_bytes(payload, header.dtype, shape)  # CPU, shares `payload`
        try:
            self.on_kv_received(header.req_id, list(header.block_ids), tensor)
        except Exception as exc:  # report it to the sender rather than as an opaque UNKNOWN
            context.abort(grpc.StatusCode.INTERNAL, f"{header.req_id}: on_kv_received failed: {exc!r}")
        return kv_transfer_pb2.PushKVReply(req_id=header.req_id, received_bytes=received)

    def _check_header(
        self, header: kv_transfer_pb2.KVHeader, context: grpc.ServicerContext
    ) -> tuple[int, ...]:
        try:
            incoming = layout_from_proto(header.layout)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{header.req_id}: bad layout: {exc}")
        if incoming.fingerprint() != header.layout.fingerprint:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{header.req_id}: layout fingerprint {header.layout.fingerprint} does not match its fields",
            )
        differences = incoming.differences(self.expected_layout, "prefill", "decode")
        if differences:
            context.set_trailing_metadata(((ERROR_KIND_KEY, LAYOUT_MISMATCH),))
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "KV cache layout mismatch: " + "; ".join(differences)
            )
        shape = tuple(int(size) for size in header.shape)
        expected_shape = self.expected_layout.buffer_shape(len(header.block_ids))
        if shape != expected_shape or normalize_dtype_name(header.dtype) != self.expected_layout.dtype:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{header.req_id}: buffer {header.dtype}{list(shape)} != expected "
                f"{self.expected_layout.dtype}{list(expected_shape)} for {len(header.block_ids)} blocks",
            )
        itemsize = dtype_from_name(self.expected_layout.dtype).itemsize
        numel = 1
        for size in shape:
            numel *= size
        if header.total_bytes != numel * itemsize:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{header.req_id}: total_bytes {header.total_bytes} != {numel * itemsize} "
                f"for shape {list(shape)}",
            )
        return shape


class GrpcKVServer:
    """Decode side: receives pushed KV buffers and hands them to `on_kv_received`."""

    def __init__(
        self,
        bind: str,
        on_kv_received: KVReceiverCallback,
        expected_layout: KVLayout,
        max_workers: int = 4,
    ) -> None:
        self.bind = bind  # "host:port"; port 0 picks a free one
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kv-recv"),
            options=_CHANNEL_OPTIONS,
        )
        kv_transfer_pb2_grpc.add_KVTransferServicer_to_server(
            _KVTransferServicer(on_kv_received, expected_layout), self._server
        )
        self.port: int | None = None

    def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        self.port = self._server.add_insecure_port(self.bind)
        if self.port == 0:
            raise KVTransferError(f"GrpcKVServer could not bind {self.bind}")
        self._server.start()
        return self.port

    @property
    def address(self) -> str:
        """ "host:port" to put in `KVHandle.grpc_address` (the bind host, with the real port)."""
        if self.port is None:
            raise RuntimeError("GrpcKVServer.address before start()")
        host = self.bind.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def stop(self, grace_s: float | None = 1.0) -> None:
        self._server.stop(grace_s).wait()


class GrpcKVSender:
    """Prefill side. Thread-safe; one cached channel per decode address."""

    def __init__(
        self,
        model_name: str,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if not 0 < chunk_bytes <= MAX_MESSAGE_BYTES - (1 << 20):
            raise ValueError(
                f"chunk_bytes must be in (0, {MAX_MESSAGE_BYTES - (1 << 20)}], got {chunk_bytes}"
            )
        self.model_name = model_name
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, kv_transfer_pb2_grpc.KVTransferStub] = {}
        self._lock = threading.Lock()

    def _stub_for(self, address: str) -> kv_transfer_pb2_grpc.KVTransferStub:
        with self._lock:
            if address not in self._stubs:
                channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
                self._channels[address] = channel
                self._stubs[address] = kv_transfer_pb2_grpc.KVTransferStub(channel)
            return self._stubs[address]

    def send(self, handle: KVHandle, src_block_ids: Sequence[int], kv_cache: torch.Tensor) -> TransferStats:
        if not handle.grpc_address:
            raise ValueError(f"request {handle.req_id}: the handle has no grpc_address for the grpc backend")
        local_layout = KVLayout.from_cache(kv_cache, self.model_name)
        check_send_args(handle, src_block_ids, local_layout)
        start = time.perf_counter()
        # [L, 2, n, block_size, Hkv, D]; .cpu() is the one device-to-host copy (a no-op on CPU).
        host_buffer = pack_blocks(kv_cache, src_block_ids).cpu()
        payload = to_bytes(host_buffer)
        packed = time.perf_counter()
        header = kv_transfer_pb2.KVHeader(
            req_id=handle.req_id,
            layout=layout_to_proto(local_layout),
            block_ids=handle.block_ids,
            dtype=local_layout.dtype,
            shape=list(host_buffer.shape),
            total_bytes=payload.nbytes,
            num_tokens=handle.num_tokens,
        )
        try:
            self._stub_for(handle.grpc_address).PushKV(self._chunks(header, payload), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise self._translate(handle, exc) from exc
        done = time.perf_counter()
        return TransferStats(
            nbytes=payload.nbytes, pack_ms=(packed - start) * 1e3, send_ms=(done - packed) * 1e3
        )

    def _chunks(
        self, header: kv_transfer_pb2.KVHeader, payload: memoryview
    ) -> Iterator[kv_transfer_pb2.KVChunk]:
        yield kv_transfer_pb2.KVChunk(header=header)
        for offset in range(0, payload.nbytes, self.chunk_bytes):
            yield kv_transfer_pb2.KVChunk(data=payload[offset : offset + self.chunk_bytes].tobytes())

    @staticmethod
    def _translate(handle: KVHandle, exc: grpc.RpcError) -> Exception:
        code, details = exc.code(), exc.details()
        trailing = dict(exc.trailing_metadata() or ())
        if code == grpc.StatusCode.FAILED_PRECONDITION and trailing.get(ERROR_KIND_KEY) == LAYOUT_MISMATCH:
            return KVLayoutMismatch(f"request {handle.req_id} refused by {handle.grpc_address}: {details}")
        return KVTransferError(
            f"request {handle.req_id}: PushKV to {handle.grpc_address} failed: {code.name}: {details}"
        )

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._stubs.clear()
