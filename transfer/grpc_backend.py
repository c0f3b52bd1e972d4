"""KV transfer over gRPC: works between any two hosts and on CPU.

The sender packs the request's blocks into one buffer
`[num_layers, 2, n, block_size, Hkv, D]` on host and pushes it with one
client-streaming `PushKV` call whose first chunk is the header (req_id, layout,
block ids, dtype, shape, total bytes, and the prefill's first sampled token). The
server checks the layout before reading any data (a mismatch aborts the call with
FAILED_PRECONDITION, which the sender re-raises as `KVLayoutMismatch`), receives the
bytes into one preallocated host buffer, and hands the whole buffer to its `KVSink`
as one chunk of all layers (`sink.on_kv_chunk(arrival, slice(0, num_layers), tensor)`,
the `KVArrival` carrying the first token and when the header came in): on the host,
or on the server's CUDA `device`, to which socket-plane bytes are copied in 8 MiB
pieces as they land. The call returns only after the sink returns, so when `send`
returns the data is in place. The bytes take one of two routes:

* in band (buffers under `socket_min_bytes`, or `socket_min_bytes=None`): raw-byte
  `KVChunk` data chunks of `chunk_bytes` follow the header on the stream;
* over the socket data plane (larger buffers): the call carries the invocation
  metadata `pdserve-data-plane: socket` and only the header. Each server opens ONE
  data port when it starts, on its bind host (`data_port`; a firewall must allow it
  as well as the gRPC port). After the layout check the server answers with initial
  metadata `pdserve-data-port` and `pdserve-data-token`: comma-separated fresh one-time
  tokens, one per stripe of the buffer (`grpc_data.stripe_bounds`; up to the server's
  `max_data_streams`, 4 by default, each stripe at least 32 MiB). For each stripe the
  sender connects there, writes its token then exactly that stripe's bytes, and
  half-closes; the stripes travel in parallel.
  Every error still comes back as the call's status. If the data port cannot be
  reached at all, that transfer fails (its one-time credential went to the call) and
  the sender goes in band for that address from then on. gRPC's own
  path costs three user-space copies of every byte plus HTTP/2 framing; the socket
  costs none (`transfer.grpc_data` has the details).

On either route a short stream aborts the call with DATA_LOSS and extra bytes with
INVALID_ARGUMENT, naming the request.

On CUDA the sender copies the packed buffer to host through a reused pinned
staging buffer with non-blocking copies (one buffer per send in flight); over the
data plane the copy goes in 8 MiB pieces, in the order the stripes send them, and
each piece goes on its socket as soon as it lands, so the copy overlaps the send.
CPU caches are packed straight into a reused host buffer. A source of pieces made on demand
(`transfer.source.LayerPieces`: a tensor-parallel worker's gathered pieces) is staged into the
host buffer piece by piece on a thread of its own, each piece dropped once it is there, while
the stripes send the bytes already staged; a piece that fails to come fails the push (the
server sees a short stream: nothing is delivered).

This module holds the protocol's shared constants and the sender (`GrpcKVSender`);
the receiving side is `transfer.grpc_server.GrpcKVServer`, and `transfer.grpc_connector`
wraps both as the grpc `KVConnector` (decode worker descriptor: `GrpcPeer(address)`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import torch

from pdserve.internal import kv_transfer_pb2
from pdserve.internal.kv_transfer_pb2 import KVHeader
from pdserve.transfer.contract import KVHandle, KVTransferError, TransferStats, check_send_args
from pdserve.transfer.credentials import auth_tag, secret_bytes
from pdserve.transfer.grpc_data import (
    DataConnectError,
    encode_data_chunk,
    interleaved,
    send_stripes,
    split_host_port,
    stripe_bounds,
    stripe_pieces,
)
from pdserve.transfer.layout import KVLayout, KVLayoutMismatch
from pdserve.transfer.packing import buffer_nbytes, to_bytes
from pdserve.transfer.peers import GrpcPeer, check_peer
from pdserve.transfer.source import KVSource, PieceFiller, source_layout
from pdserve.transfer.staging import StagingPool

log = logging.getLogger(__name__)

# 4 MiB per in-band message: measured best on loopback (1 MiB and 16 MiB were both slower; messages
# over glibc's mmap threshold pay fresh page faults on every allocation).
DEFAULT_CHUNK_BYTES = 4 << 20
# Buffers of more than one in-band chunk take the socket data plane.
DEFAULT_SOCKET_MIN_BYTES = DEFAULT_CHUNK_BYTES + 1
# Room for one data chunk plus a header with many block ids; both ends use it.
MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_TIMEOUT_S = 60.0
DATA_CONNECT_TIMEOUT_S = 10.0
# Trailing-metadata key/value the server sets when it refuses a layout, so the sender can
# tell a layout mismatch from other FAILED_PRECONDITION errors without parsing text.
ERROR_KIND_KEY = "pdserve-error-kind"
LAYOUT_MISMATCH = "kv-layout-mismatch"
# Socket data plane handshake (invocation metadata from the sender, initial metadata back).
DATA_PLANE_KEY = "pdserve-data-plane"
DATA_PLANE_SOCKET = "socket"
DATA_PORT_KEY = "pdserve-data-port"
DATA_TOKEN_KEY = "pdserve-data-token"
# Who may push (invocation metadata, checked before the server reads or allocates anything;
# `transfer.credentials`): the request, its credential (hex) from the decode worker's reserve,
# and the HMAC tag of both under the deployment secret.
REQ_ID_KEY = "pdserve-kv-request"
CREDENTIAL_KEY = "pdserve-kv-credential"
AUTH_KEY = "pdserve-kv-auth"
# How much longer than the server's transfer timeout a call's own deadline may be (slack for the
# sender's packing before its clock and the server's start).
DEADLINE_SLACK_S = 5.0

SERVICE = "pdserve.internal.KVTransfer"
PUSH_KV = f"/{SERVICE}/PushKV"

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # HTTP/2 flow control: let a stream run 64 MiB ahead of the reader. BDP probing sizes the window
    # to bandwidth x RTT, tiny on loopback or a LAN, so 4 MiB messages kept stalling on WINDOW_UPDATEs
    # (raw 268 MB stream on loopback: 1.2 GB/s with the defaults, 2.0 with this alone).
    ("grpc.http2.lookahead_bytes", 64 << 20),
    ("grpc.http2.write_buffer_size", 16 << 20),
    ("grpc.http2.max_frame_size", (1 << 24) - 1),  # the HTTP/2 maximum, vs the 16 KiB default
    # Read the socket in large pieces rather than growing from 8 KiB.
    ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
    ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20),
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
        tp_size=info.tp_size or 1,
        kv_head_start=info.kv_head_start,
    )


def encode_header(handle: KVHandle, layout: KVLayout, nbytes: int, first_token_id: int) -> bytes:
    """The serialized header `KVChunk` of a push of `handle`'s blocks, packed in `layout`."""
    header = KVHeader(
        req_id=handle.req_id,
        layout=layout_to_proto(layout),
        block_ids=handle.block_ids,
        dtype=layout.dtype,
        shape=list(layout.buffer_shape(len(handle.block_ids))),  # [L, 2, n, block_size, Hkv, D]
        total_bytes=nbytes,
        num_tokens=handle.num_tokens,
        first_token_id=int(first_token_id),
    )
    return kv_transfer_pb2.KVChunk(header=header).SerializeToString()


class _Staged:
    """The host buffer one send's payload sits in, and its way back to its pool: a CUDA cache's
    bytes copied piece by piece (`start`), a source's layer pieces staged as they are fetched
    (`fill`), or a buffer packed on the host (`hold`)."""

    def __init__(self) -> None:
        self._held: tuple[StagingPool, torch.Tensor] | None = None
        self._stop: Callable[[], None] | None = None  # returns once nothing writes into the buffer

    def start(
        self, pool: StagingPool, packed: torch.Tensor, num_streams: int
    ) -> tuple[memoryview, Callable[[int], None]]:
        nbytes = packed.numel() * packed.element_size()
        order = interleaved(stripe_pieces(stripe_bounds(nbytes, num_streams)))
        host, buffer, ready = pool.copy_to_host_in_pieces(packed, order)
        self._held, self._stop = (pool, buffer), lambda: ready(-1)
        return memoryview(host.numpy()), ready

    def fill(
        self, pool: StagingPool, source: KVSource, req_id: str, num_streams: int
    ) -> tuple[memoryview, Callable[[int], None]]:
        """Stage `source`'s layer pieces into a pooled host buffer, in order, on a thread of their
        own: the bytes of piece i go out while piece i+1 is fetched."""
        nbytes = math.prod(source.shape) * source.dtype.itemsize
        buffer = pool.acquire(nbytes)
        filler = PieceFiller(source, buffer[:nbytes], req_id)
        self._held, self._stop = (pool, buffer), filler.stop
        ends = {
            start: end
            for stripe in stripe_pieces(stripe_bounds(nbytes, num_streams))
            for start, end in stripe
        }

        def ready(start: int) -> None:  # the stripes' piece at `start`, whole
            filler.ready(-1 if start < 0 else ends[start])

        return memoryview(buffer[:nbytes].numpy()), ready

    def hold(self, pool: StagingPool, buffer: torch.Tensor) -> None:
        self._held = (pool, buffer)

    def release(self) -> None:
        if self._stop is not None:
            self._stop()  # no copy may still be writing into the buffer we give back
        if self._held is not None:
            pool, buffer = self._held
            pool.release(buffer)
            self._held = None


class GrpcKVSender:
    """Prefill side. Thread-safe; one cached channel per decode address.

    `socket_min_bytes`: buffers of at least this many bytes go over the socket data plane,
    smaller ones in band; None keeps every byte on the gRPC stream. `secret`: the deployment's
    (`transfer.secret`); each push presents its handle's credential signed with it.
    `timeout_s`: the longest one transfer may take (`transfer.timeout_s`), its call's deadline.
    """

    def __init__(
        self,
        model_name: str,
        secret: str | bytes,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        socket_min_bytes: int | None = DEFAULT_SOCKET_MIN_BYTES,
        tp_size: int = 1,
    ) -> None:
        """`tp_size`: the sending worker's tensor-parallel size, for its layout (its `kv_cache`
        arguments carry every KV head: a tensor-parallel worker gathers them first)."""
        if not 0 < chunk_bytes <= MAX_MESSAGE_BYTES - (1 << 20):
            raise ValueError(
                f"chunk_bytes must be in (0, {MAX_MESSAGE_BYTES - (1 << 20)}], got {chunk_bytes}"
            )
        self.model_name = model_name
        self.tp_size = tp_size
        self._secret = secret_bytes(secret)  # the deployment's; signs each push (never logged)
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self.socket_min_bytes = socket_min_bytes
        self._channels: dict[str, grpc.Channel] = {}
        self._rpcs: dict[str, grpc.StreamUnaryMultiCallable] = {}
        self._inband_only: set[str] = set()  # addresses whose data port could not be reached
        self._staging = StagingPool(pin_memory=True)  # CUDA caches: the device-to-host copy's target
        # CPU caches pack straight into a reused buffer: a fresh 268 MB one page-faulted in as the
        # gather wrote it (90 ms against 10 ms for the gather itself on the 2-core CI box).
        self._cpu_staging = StagingPool(pin_memory=False)
        self._lock = threading.Lock()

    def _rpc_for(self, address: str) -> grpc.StreamUnaryMultiCallable:
        with self._lock:
            if address not in self._rpcs:
                # Its own subchannel pool: a channel that replaces a retired one connects anew
                # instead of sharing the old connection's reconnect backoff.
                options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
                channel = grpc.insecure_channel(address, options=options)
                self._channels[address] = channel
                # Requests go out as bytes we encoded ourselves (no serializer).
                self._rpcs[address] = channel.stream_unary(
                    PUSH_KV, response_deserializer=kv_transfer_pb2.PushKVReply.FromString
                )
            return self._rpcs[address]

    def _retire_channel(self, address: str, rpc: grpc.StreamUnaryMultiCallable) -> None:
        """Forget `address`'s channel (if `rpc` is still its) and what was learnt of its data port:
        the next push opens a new connection. Closed once every call it may carry is past its
        deadline (closing it now would cancel other threads' pushes on it)."""
        with self._lock:
            if self._rpcs.get(address) is not rpc:
                return  # another thread retired it already
            del self._rpcs[address]
            channel = self._channels.pop(address)
            self._inband_only.discard(address)
        closer = threading.Timer(self.timeout_s + 1.0, channel.close)
        closer.daemon = True
        closer.start()

    def _auth_metadata(self, handle: KVHandle) -> tuple[tuple[str, str], ...]:
        """The push's credentials: the decode worker's one-time credential, signed with the secret."""
        if not handle.credential:
            raise ValueError(f"request {handle.req_id}: the handle carries no transfer credential")
        tag = auth_tag(self._secret, handle.req_id, handle.credential)
        return (
            (REQ_ID_KEY, handle.req_id),
            (CREDENTIAL_KEY, handle.credential.hex()),
            (AUTH_KEY, tag),
        )

    def _use_socket(self, address: str, nbytes: int) -> bool:
        with self._lock:
            inband_only = address in self._inband_only
        return self.socket_min_bytes is not None and nbytes >= self.socket_min_bytes and not inband_only

    def send(self, handle: KVHandle, source: KVSource, first_token_id: int) -> TransferStats:
        """Send `source`'s KV (e.g. `CacheBlocks(kv_cache, src_block_ids)`) to `handle.peer`, a
        GrpcPeer.

        A push that finds its address unreachable (UNAVAILABLE) is tried once more on a fresh
        channel: a decode worker restarted on an address a dead one had (the OS hands the free
        port out again) is reached at once, not after the old channel's reconnect backoff.
        Never a double write: the credential is single use, so a push that had reached a
        server is refused the second time."""
        try:
            return self._send_once(handle, source, first_token_id)
        except KVTransferError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, grpc.RpcError) and cause.code() == grpc.StatusCode.UNAVAILABLE):
                raise
        log.warning(
            "request %s: KV push to %s unreachable: once more on a new channel", handle.req_id, handle.peer
        )
        return self._send_once(handle, source, first_token_id)

    def _send_once(self, handle: KVHandle, source: KVSource, first_token_id: int) -> TransferStats:
        address = check_peer(handle, GrpcPeer).address
        local_layout = source_layout(source, self.model_name, self.tp_size)
        check_send_args(handle, range(source.shape[2]), local_layout, first_token_id)
        nbytes = buffer_nbytes(local_layout, source.shape[2])
        header = encode_header(handle, local_layout, nbytes, first_token_id)
        rpc = self._rpc_for(address)
        auth = self._auth_metadata(handle)
        start = time.perf_counter()
        deadline = start + self.timeout_s
        call = None
        if self._use_socket(address, nbytes):
            # Header first: the server checks the layout and readies its buffer while we pack.
            call = rpc.future(
                iter([header]), timeout=self.timeout_s, metadata=(*auth, (DATA_PLANE_KEY, DATA_PLANE_SOCKET))
            )
        staged = _Staged()
        try:
            stage = self._stager(handle.req_id, source, staged, call is not None)
            packed = time.perf_counter()
            if call is not None:
                self._send_socket(handle.req_id, address, call, stage, deadline)
                call.result()
            else:  # in band
                payload, ready = stage(1)
                if ready is not None:
                    ready(-1)
                remaining = max(deadline - time.perf_counter(), 0.001)
                rpc(self._chunks(header, payload), timeout=remaining, metadata=auth)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._retire_channel(address, rpc)
            raise self._translate(handle.req_id, address, exc, self.timeout_s) from exc
        finally:
            if call is not None:
                call.cancel()  # no-op once it finished; stops the server waiting on an error path
            staged.release()
        done = time.perf_counter()
        return TransferStats(nbytes=nbytes, pack_ms=(packed - start) * 1e3, send_ms=(done - packed) * 1e3)

    def _stager(
        self, req_id: str, source: KVSource, staged: _Staged, socket: bool
    ) -> Callable[[int], tuple[memoryview, Callable[[int], None] | None]]:
        """`stage(num_streams)` -> (payload, its pieces' `ready`; None: all there already). A whole
        buffer packed here first (a CPU cache, or a CUDA one in band); a CUDA cache's packed
        buffer copied to host once the server's stripe count is known, piece by piece in the
        order the stripes send them (the copy overlaps the send); a bounded source's pieces
        fetched and staged one by one as the send goes (only one held off the host at a time)."""
        if source.max_chunk_layers:
            pool = self._staging if source.device.type == "cuda" else self._cpu_staging
            return lambda streams: staged.fill(pool, source, req_id, streams)
        if socket and source.device.type == "cuda":
            packed_on_device = source.layers(slice(0, source.shape[0]))  # [L, 2, n, bs, Hkv, D]
            return lambda streams: staged.start(self._staging, packed_on_device, streams)
        host_buffer, staging = self._to_host(source)  # [L, 2, n, bs, Hkv, D], CPU
        staged.hold(*staging)
        payload = to_bytes(host_buffer)
        return lambda streams: (payload, None)

    def _to_host(self, source: KVSource) -> tuple[torch.Tensor, tuple[StagingPool, torch.Tensor]]:
        """(packed buffer on host, (pool, staging buffer) to release it to afterwards)."""
        every_layer = slice(0, source.shape[0])
        if source.device.type == "cpu":  # packed straight into a pooled host buffer, no copy
            nbytes = math.prod(source.shape) * source.dtype.itemsize
            staging = self._cpu_staging.acquire(nbytes)  # uint8 [>= nbytes], ours until released
            try:
                out = staging[:nbytes].view(source.dtype).view(source.shape)
                return source.layers(every_layer, out=out), (self._cpu_staging, staging)
            except BaseException:
                self._cpu_staging.release(staging)
                raise
        packed = source.layers(every_layer)  # [L, 2, n, bs, Hkv, D] on the cache's device
        host, staging = self._staging.copy_to_host(packed)
        return host, (self._staging, staging)

    def _send_socket(
        self,
        req_id: str,
        address: str,
        call: grpc.Future,
        stage: Callable[[int], tuple[memoryview, Callable[[int], None] | None]],
        deadline: float,
    ) -> None:
        """Ship the payload over the server's data connections. `stage(num_streams)` gives the payload
        and its pieces' `ready` (None: all there). An unreachable data port fails this transfer (its
        one-time credential is spent on the call) and sends later ones to `address` in band."""
        metadata = dict(call.initial_metadata() or ())  # blocks until the server took the header
        if DATA_PORT_KEY not in metadata:
            call.result()  # the server refused the header: raises its error
            raise KVTransferError(f"request {req_id}: {address} opened no data port")
        host, port = split_host_port(address)[0], int(metadata[DATA_PORT_KEY])
        tokens = [bytes.fromhex(token) for token in metadata[DATA_TOKEN_KEY].split(",")]  # one per stripe
        payload, ready = stage(len(tokens))
        remaining = max(deadline - time.perf_counter(), 0.001)
        try:
            send_stripes(
                host, port, tokens, payload, min(remaining, DATA_CONNECT_TIMEOUT_S), remaining, ready
            )
        except DataConnectError as exc:
            # The data port is open for as long as the server is: if the call failed meanwhile (the
            # server stopping), its status is the real error. A port that is unreachable while the
            # call is alive is the network's doing (a firewall): fall back to in band.
            self._raise_call_failure(call, exc)
            log.warning("%s; sending KV to %s in band from now on", exc, address)
            with self._lock:
                self._inband_only.add(address)
            raise KVTransferError(
                f"request {req_id}: {exc}; this transfer fails (its credential is spent), later ones to "
                f"{address} go in band"
            ) from exc
        except OSError as exc:
            self._raise_call_failure(call, exc)  # the server's error says more than a broken pipe
            raise KVTransferError(
                f"request {req_id}: data connection to {host}:{port} failed: {exc!r}"
            ) from exc

    @staticmethod
    def _raise_call_failure(call: grpc.Future, cause: BaseException, wait_s: float = 0.5) -> None:
        """Raise the call's RpcError if it fails within `wait_s`; return if it is still running."""
        try:
            failure = call.exception(timeout=wait_s)
        except grpc.FutureTimeoutError:
            return
        if failure is not None:
            raise failure from cause

    def _chunks(self, header: bytes, payload: memoryview) -> Iterator[bytes]:
        yield header
        for offset in range(0, payload.nbytes, self.chunk_bytes):
            yield encode_data_chunk(payload[offset : offset + self.chunk_bytes])

    @staticmethod
    def _translate(req_id: str, address: str, exc: grpc.RpcError, timeout_s: float) -> Exception:
        code, details = exc.code(), exc.details()
        trailing = dict(exc.trailing_metadata() or ())
        if code == grpc.StatusCode.FAILED_PRECONDITION and trailing.get(ERROR_KIND_KEY) == LAYOUT_MISMATCH:
            return KVLayoutMismatch(f"request {req_id} refused by {address}: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return KVTransferError(
                f"request {req_id}: KV transfer to {address} timed out after {timeout_s:g} s "
                f"(transfer.timeout_s): {details}"
            )
        return KVTransferError(f"request {req_id}: PushKV to {address} failed: {code.name}: {details}")

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._rpcs.clear()
        self._staging.clear()
        self._cpu_staging.clear()
