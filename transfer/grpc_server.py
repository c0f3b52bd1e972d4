"""KV transfer over gRPC, the decode side: `GrpcKVServer` receives pushed KV buffers.

The protocol (header chunk, layout check, in-band chunks or the socket data plane) is
described in `transfer.grpc_backend`, which also holds the sender and the constants both
ends share. The server is the synchronous `grpc.server` over a thread pool, so it can live
inside a Ray actor next to the engine loop; the sink runs on a server thread, once per
request, with the whole buffer (`slice(0, num_layers)`) and a `KVArrival` that carries the
header's first token and `started_at`, when the header came in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import torch
from google.protobuf.message import DecodeError

from pdserve.internal import kv_transfer_pb2
from pdserve.internal.kv_transfer_pb2 import KVHeader
from pdserve.transfer.contract import KVArrival, KVSink, KVTransferError
from pdserve.transfer.credentials import KVAuthError, KVGate, Reservation
from pdserve.transfer.grpc_backend import (
    AUTH_KEY,
    CHANNEL_OPTIONS,
    CREDENTIAL_KEY,
    DATA_PLANE_KEY,
    DATA_PLANE_SOCKET,
    DATA_PORT_KEY,
    DATA_TOKEN_KEY,
    DEADLINE_SLACK_S,
    DEFAULT_TIMEOUT_S,
    ERROR_KIND_KEY,
    LAYOUT_MISMATCH,
    REQ_ID_KEY,
    SERVICE,
    layout_from_proto,
)
from pdserve.transfer.grpc_data import (
    DATA_STREAM_MIN_BYTES,
    MAX_DATA_STREAMS,
    DataListener,
    num_data_streams,
    parse_chunk,
    recv_payload,
    run_parallel,
    split_host_port,
    stripe_bounds,
)
from pdserve.transfer.layout import KVLayout, KVLayoutMismatch, normalize_dtype_name
from pdserve.transfer.packing import dtype_from_name
from pdserve.transfer.staging import host_buffer

# A failed socket transfer's status, by what went wrong first (one stripe's failure cancels the
# others, whose own failures then follow from it).
_FAILURE_STATUS = {
    "long": grpc.StatusCode.INVALID_ARGUMENT,
    "loss": grpc.StatusCode.DATA_LOSS,
    "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


class _KVTransferServicer:
    """`PushKV` over raw request bytes (no per-chunk protobuf parse; see `grpc_data.parse_chunk`)."""

    def __init__(
        self,
        sink: KVSink,
        expected_layout: KVLayout,
        pin_memory: bool,
        max_data_streams: int = MAX_DATA_STREAMS,
        data_stream_min_bytes: int = DATA_STREAM_MIN_BYTES,
        device: torch.device | None = None,
    ) -> None:
        self.sink = sink
        self.expected_layout = expected_layout
        self.pin_memory = pin_memory
        self.max_data_streams = max_data_streams  # stripes per socket transfer, each >= the min bytes
        self.data_stream_min_bytes = data_stream_min_bytes
        self.data_listener: DataListener | None = None  # the server's data port, set by start()
        self.gate: KVGate  # who may push where; set by GrpcKVServer
        self.timeout_s = DEFAULT_TIMEOUT_S  # the longest a transfer may take (transfer.timeout_s)
        # A CUDA device: socket-plane bytes go on to it piece by piece as they land (one copy
        # stream for the server: the transfers share the host-to-device link anyway).
        self.device = device if device is not None and device.type == "cuda" else None
        self._copy_stream = torch.cuda.Stream(self.device) if self.device is not None else None

    def PushKV(  # noqa: N802 (gRPC method name)
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> kv_transfer_pb2.PushKVReply:
        reservation = self._admit(context)  # from the call's metadata, before reading a byte
        first = next(request_iterator, None)
        started_at = time.perf_counter()  # the header is in: the receiver's clock for this transfer
        header = None if first is None else self._parse(first, reservation.req_id, context)[0]
        if header is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PushKV: the first chunk must carry the header")
        shape = self._check_header(header, reservation, context)  # sizes checked before allocating
        # The reserved blocks, whatever the header says (`_check_header` refused any other).
        arrival = KVArrival(reservation.req_id, reservation.block_ids, header.first_token_id, started_at)
        buffer = host_buffer(reservation.nbytes, self.pin_memory)  # uint8 [nbytes]
        metadata = dict(context.invocation_metadata())
        arrived = buffer  # uint8 [total_bytes]: the host buffer, or its copy on `self.device`
        if metadata.get(DATA_PLANE_KEY) == DATA_PLANE_SOCKET:
            arrived = self._receive_socket(header, buffer, request_iterator, context)
        else:
            self._receive_inband(header, buffer, request_iterator, context)
        # [num_layers, 2, n, block_size, Hkv, D], sharing `arrived`
        tensor = arrived.view(dtype_from_name(header.dtype)).view(shape)
        try:
            self.sink.on_kv_chunk(arrival, slice(0, shape[0]), tensor)
        except Exception as exc:  # report it to the sender rather than as an opaque UNKNOWN
            context.abort(grpc.StatusCode.INTERNAL, f"{header.req_id}: the KV sink refused it: {exc!r}")
        # Drop the buffer only once the call is over: freeing a few hundred MB (munmap) takes ~15 ms,
        # which the reply, and with it the sender, need not wait for.
        context.add_callback(lambda: buffer)
        return kv_transfer_pb2.PushKVReply(req_id=header.req_id, received_bytes=header.total_bytes)

    def _admit(self, context: grpc.ServicerContext) -> Reservation:
        """The reservation this call's credentials open (consumed), or abort: UNAUTHENTICATED /
        PERMISSION_DENIED (`KVGate.claim`), INVALID_ARGUMENT for a call without a deadline within
        the transfer timeout (so no call, even a stalled one, holds a server thread for longer)."""
        metadata = dict(context.invocation_metadata())
        req_id = str(metadata.get(REQ_ID_KEY, ""))
        try:
            credential = bytes.fromhex(str(metadata.get(CREDENTIAL_KEY, "")))
        except ValueError:
            credential = b""
        try:
            reservation = self.gate.claim(req_id, credential, metadata.get(AUTH_KEY))
        except KVAuthError as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), f"PushKV refused: {exc}")
        longest = self.timeout_s + DEADLINE_SLACK_S
        if context.time_remaining() > longest:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{req_id}: PushKV needs a deadline of at most {longest:g} s (transfer.timeout_s)",
            )
        return reservation

    @staticmethod
    def _parse(raw: bytes, req_id: str, context: grpc.ServicerContext) -> tuple[KVHeader | None, memoryview]:
        try:
            return parse_chunk(raw)
        except DecodeError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{req_id or 'PushKV'}: bad KVChunk: {exc}")

    def _prefault(self, buffer: torch.Tensor) -> None:
        # Fault fresh pageable pages in now, with torch's threads: 268 MB took ~45 ms this way then
        # ~50 ms to recv into, against 120-190 ms when recv faulted them in one by one (2-core VM).
        # Pinned memory is resident already.
        if not self.pin_memory:
            buffer.zero_()

    def _receive_inband(
        self, header: KVHeader, buffer: torch.Tensor, chunks: Iterator[bytes], context: grpc.ServicerContext
    ) -> None:
        self._prefault(buffer)
        view = memoryview(buffer.numpy())
        received = 0
        for raw in chunks:
            second_header, data = self._parse(raw, header.req_id, context)
            if second_header is not None:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{header.req_id}: second header in one stream"
                )
            end = received + data.nbytes
            if end > header.total_bytes:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{header.req_id}: more than the announced {header.total_bytes} bytes",
                )
            view[received:end] = data  # the one copy out of gRPC's message
            received = end
        if received != header.total_bytes:
            context.abort(
                grpc.StatusCode.DATA_LOSS,
                f"{header.req_id}: stream ended after {received} of {header.total_bytes} bytes",
            )

    def _receive_socket(
        self, header: KVHeader, buffer: torch.Tensor, chunks: Iterator[bytes], context: grpc.ServicerContext
    ) -> torch.Tensor:
        """Receive the stripes into `buffer`; returns it, or on a CUDA server its copy on the device,
        made piece by piece while later pieces are still arriving."""
        req_id, total, listener = header.req_id, header.total_bytes, self.data_listener
        if listener is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{req_id}: the server has no data port open")
        timeout_s = min(context.time_remaining() or self.timeout_s, self.timeout_s)
        streams = num_data_streams(total, self.max_data_streams, self.data_stream_min_bytes)
        bounds = stripe_bounds(total, streams)
        tickets = [listener.expect() for _ in bounds]  # fresh one-time tokens, one per stripe's connection
        view = memoryview(buffer.numpy())
        first_failure: list[tuple[str, str]] = []  # (kind, why) of the stripe that failed first
        lock = threading.Lock()
        on_device = None
        if self.device is not None:
            on_device = torch.empty(total, dtype=torch.uint8, device=self.device)
            # Allocated on this thread's stream, which the engine shares (the legacy default
            # stream): the memory may have been freed by work still queued there, so the copy
            # stream starts after it before it writes.
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            on_device.record_stream(self._copy_stream)  # freed (on an error path) only after its copies

        def copy_piece(start: int, end: int) -> None:  # absolute byte range, complete on the host
            with torch.cuda.stream(self._copy_stream):
                on_device[start:end].copy_(buffer[start:end], non_blocking=True)

        def cancel_all() -> None:
            for ticket in tickets:
                listener.cancel(ticket)

        def receive(i: int) -> None:
            failure = receive_stripe(i)
            if failure is not None:
                with lock:
                    first_failure.append(failure)
                cancel_all()  # wake the other stripes' waits and recvs: this transfer has failed

        def receive_stripe(i: int) -> tuple[str, str] | None:
            (start, end), ticket = bounds[i], tickets[i]
            try:
                conn = listener.wait(ticket, timeout_s)
            except TimeoutError as exc:
                return "timeout", f"no data connection: {exc}"
            except OSError as exc:  # cancelled, or the server is stopping
                return "unavailable", f"no data connection: {exc}"
            on_piece = None if on_device is None else lambda a, b: copy_piece(start + a, start + b)
            try:
                received, extra = recv_payload(conn, view[start:end], timeout_s, on_piece)
            except OSError as exc:
                return "loss", f"data connection failed: {exc!r}"
            if received != end - start:
                part = f" (stripe {i} of {len(bounds)})" if len(bounds) > 1 else ""
                return "loss", f"data connection closed after {received} of {end - start} bytes{part}"
            if extra:
                return "long", f"more than the announced {total} bytes"
            return None

        try:
            # A cancelled or expired call frees its tokens and wakes these threads out of wait/recv.
            if not context.add_callback(cancel_all):
                context.abort(grpc.StatusCode.CANCELLED, f"{req_id}: call ended before the data connection")
            tokens = ",".join(ticket.token.hex() for ticket in tickets)
            context.send_initial_metadata(((DATA_PORT_KEY, str(listener.port)), (DATA_TOKEN_KEY, tokens)))
            self._prefault(buffer)  # while the sender packs and connects
            run_parallel([lambda i=i: receive(i) for i in range(len(bounds))])
        finally:
            for ticket in tickets:
                listener.release(ticket)  # closes its connection
            if self._copy_stream is not None:
                self._copy_stream.synchronize()  # every piece on the device; `buffer` free to go
        if first_failure:
            kind, why = first_failure[0]
            context.abort(_FAILURE_STATUS[kind], f"{req_id}: {why}")
        if next(chunks, None) is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{req_id}: in-band chunk in a socket transfer")
        return buffer if on_device is None else on_device

    def _check_header(
        self, header: KVHeader, reservation: Reservation, context: grpc.ServicerContext
    ) -> tuple[int, ...]:
        """The buffer's shape, once the header matches the layout and the reservation exactly."""
        if header.req_id != reservation.req_id or tuple(header.block_ids) != reservation.block_ids:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{reservation.req_id}: the header names request {header.req_id!r}, blocks "
                f"{list(header.block_ids)[:8]}..., not the {len(reservation.block_ids)} reserved for it",
            )
        try:
            incoming = layout_from_proto(header.layout)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{header.req_id}: bad layout: {exc}")
        if incoming.fingerprint() != header.layout.fingerprint:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{header.req_id}: layout fingerprint {header.layout.fingerprint} does not match its fields",
            )
        try:
            incoming.check_compatible(self.expected_layout, "prefill", "decode")
        except KVLayoutMismatch as exc:
            context.set_trailing_metadata(((ERROR_KIND_KEY, LAYOUT_MISMATCH),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        shape = tuple(int(size) for size in header.shape)
        expected_shape = self.expected_layout.buffer_shape(len(header.block_ids))
        if shape != expected_shape or normalize_dtype_name(header.dtype) != self.expected_layout.dtype:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{header.req_id}: buffer {header.dtype}{list(shape)} != expected "
                f"{self.expected_layout.dtype}{list(expected_shape)} for {len(header.block_ids)} blocks",
            )
        if header.total_bytes != reservation.nbytes:  # what the buffer about to be allocated holds
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{header.req_id}: total_bytes {header.total_bytes} != the reservation's "
                f"{reservation.nbytes} for shape {list(shape)}",
            )
        return shape


class GrpcKVServer:
    """Decode side: receives pushed KV buffers and hands each to `sink.on_kv_chunk` in one piece.

    `pin_memory` (default: whether CUDA is available) receives into pinned host memory, so a
    sink that copies the buffer to the GPU does it at full link speed; torch's caching host
    allocator recycles those buffers once the sink has dropped them.

    `data_port`: the one TCP port, on the bind host, that every socket-plane transfer's bytes come
    in on (0 picks a free one at `start`; the bound one is then `self.data_port`). Opened by `start`,
    closed by `stop`; give it a fixed value to open it in a firewall.

    `max_data_streams`: a socket transfer's bytes come in over up to this many connections at
    once, each a contiguous stripe of at least `data_stream_min_bytes` (the server decides and
    sends the sender one token per stripe).

    `gate`: the decode worker's open reservations (`transfer.credentials`): a call is admitted
    only with the credentials of one, checked from its metadata before any byte is read or
    allocated, and it writes only that reservation's blocks. `timeout_s`: the longest a transfer
    may take (`transfer.timeout_s`); a call whose deadline is later, or that has none, is refused,
    so a stalled sender holds one of the `max_workers` threads for that long at most.

    `device`: where the sink wants the bytes. A CUDA device gets each socket-plane piece
    (8 MiB) copied to it as soon as it has arrived, so the sink receives a tensor on that
    device and the host-to-device copy overlaps the receive; otherwise (and in band) it gets the
    host buffer.
    """

    def __init__(
        self,
        bind: str,
        sink: KVSink,
        expected_layout: KVLayout,
        gate: KVGate,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_workers: int = 32,
        pin_memory: bool | None = None,
        data_port: int = 0,
        max_data_streams: int = MAX_DATA_STREAMS,
        data_stream_min_bytes: int = DATA_STREAM_MIN_BYTES,
        device: str | torch.device | None = None,
    ) -> None:
        if max_data_streams < 1:
            raise ValueError(f"max_data_streams must be >= 1, got {max_data_streams}")
        self.bind = bind  # "host:port"; port 0 picks a free one
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kv-recv"),
            options=CHANNEL_OPTIONS,
        )
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._data_address = (split_host_port(bind)[0], data_port)  # data connections come in on it only
        self._servicer = _KVTransferServicer(
            sink,
            expected_layout,
            self.pin_memory,
            max_data_streams,
            data_stream_min_bytes,
            None if device is None else torch.device(device),
        )
        self._servicer.gate = gate
        self._servicer.timeout_s = timeout_s
        # Requests stay raw bytes (no deserializer): the servicer slices the payload out itself.
        push_kv = grpc.stream_unary_rpc_method_handler(
            self._servicer.PushKV, response_serializer=kv_transfer_pb2.PushKVReply.SerializeToString
        )
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"PushKV": push_kv}),)
        )
        self.port: int | None = None
        self.data_port: int | None = None
        self._data_listener: DataListener | None = None

    def start(self) -> int:
        """Open the data port, bind and start serving; returns the bound gRPC port."""
        host, port = self._data_address
        try:
            self._data_listener = DataListener(host, port)
        except OSError as exc:
            raise KVTransferError(f"GrpcKVServer could not open data port {host}:{port}: {exc!r}") from exc
        self.port = self._server.add_insecure_port(self.bind)
        if self.port == 0:
            self._data_listener.close()
            raise KVTransferError(f"GrpcKVServer could not bind {self.bind}")
        self.data_port = self._data_listener.port
        self._servicer.data_listener = self._data_listener
        self._server.start()
        return self.port

    @property
    def address(self) -> str:
        """ "host:port" for this server's `GrpcPeer` (the bind host, with the real port)."""
        if self.port is None:
            raise RuntimeError("GrpcKVServer.address before start()")
        host = self.bind.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def stop(self, grace_s: float | None = 1.0) -> None:
        """Stop serving (calls still running after `grace_s` are cancelled), then close the data port."""
        self._server.stop(grace_s).wait()
        if self._data_listener is not None:
            self._data_listener.close()


__all__ = ["GrpcKVServer"]
