"""The byte-moving half of the gRPC KV backend (`transfer.grpc_backend`).

Each piece is there to take a copy or a page fault off the host path:

* The in-band codec. `KVChunk` messages travel as raw bytes, with no protobuf object per
  chunk: a data chunk is built straight in its wire form `0x12 <varint length> <bytes>`
  with one copy out of the packed buffer, and the server reads the bytes straight out of
  the received message. Any other valid `KVChunk` encoding still parses, through protobuf.
* The socket data plane. For large buffers the gRPC call carries only the control, and
  the bytes go over one plain TCP connection: `sendall(memoryview)` of the packed buffer
  on one side, `recv_into` the preallocated destination on the other. That is no
  user-space copy at all, where the in-band path makes three (ours plus gRPC's own
  slice copy on each side) and pushes them through HTTP/2 framing and flow control.
  Each server has one `DataListener`, opened when it starts on one data port of its bind
  host, which a firewall between prefill and decode must let through. Every connection
  presents a one-time token first, which routes it to its waiting call. A large buffer is
  split into contiguous stripes, each on a connection (and token) of its own, sent and
  received in parallel (`stripe_bounds`): one TCP stream tops out at what one core can
  copy through the kernel (3.7 GB/s over loopback on the 2-core CI box, against 7.3 with
  four), and a fast NIC likewise needs several streams to fill.
* Host buffers on either side (`host_buffer`, `StagingPool`) live in `transfer.staging`.
"""

from __future__ import annotations

import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from pdserve.internal import kv_transfer_pb2

log = logging.getLogger(__name__)

# KVChunk.data is field 2, wire type 2 (length-delimited): its tag byte is (2 << 3) | 2.
DATA_FIELD_TAG = b"\x12"
TOKEN_BYTES = 16  # per-transfer secret the sender presents first on its data connection
TOKEN_TIMEOUT_S = 10.0  # how long a new data connection may take to present its token
MAX_UNCLAIMED_CONNECTIONS = 64  # connections still presenting their token; more close the oldest
_MAX_VARINT_BYTES = 10
MAX_DATA_STREAMS = 4  # data connections (stripes) per transfer, at most
DATA_STREAM_MIN_BYTES = 32 << 20  # a stripe carries at least this much: small buffers use fewer
_STRIPE_ALIGN = 1 << 16  # inner stripe boundaries fall on multiples of this many bytes
PIECE_BYTES = 8 << 20  # a stripe is sent (and, from a GPU, staged to host) in pieces of this size


def num_data_streams(nbytes: int, max_streams: int, min_bytes: int = DATA_STREAM_MIN_BYTES) -> int:
    """How many stripes a buffer of `nbytes` travels in (the receiving server decides): each gets
    at least `min_bytes` (and 64 KiB), so none is empty."""
    return max(1, min(max_streams, nbytes // max(min_bytes, _STRIPE_ALIGN)))


def stripe_bounds(nbytes: int, num_streams: int) -> list[tuple[int, int]]:
    """The payload's byte ranges [start, end), one per data connection: in order, contiguous, the
    inner boundaries rounded down to 64 KiB (so with `num_data_streams`' count none is empty)."""
    cuts = [i * nbytes // num_streams // _STRIPE_ALIGN * _STRIPE_ALIGN for i in range(num_streams)]
    return list(zip(cuts, cuts[1:] + [nbytes], strict=True))


def stripe_pieces(
    bounds: list[tuple[int, int]], piece_bytes: int | None = None
) -> list[list[tuple[int, int]]]:
    """Each stripe's byte range cut into consecutive pieces of at most `piece_bytes` (PIECE_BYTES)."""
    piece_bytes = piece_bytes or PIECE_BYTES
    return [[(s, min(s + piece_bytes, end)) for s in range(start, end, piece_bytes)] for start, end in bounds]


def interleaved(pieces: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """Piece 0 of every stripe, then piece 1 of every stripe, ...: the order a staged copy to host
    goes in, so that every stripe has its first bytes early and all of them start sending at once."""
    return [
        stripe[j] for j in range(max(map(len, pieces), default=0)) for stripe in pieces if j < len(stripe)
    ]


def run_parallel(calls: list[Callable[[], object]]) -> list[BaseException | None]:
    """Run each call on a thread of its own (the first on this one); each one's exception or None."""
    errors: list[BaseException | None] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            calls[i]()
        except BaseException as exc:  # handed back to the caller, which decides what it means
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(1, len(calls))]
    for thread in threads:
        thread.start()
    if calls:
        run(0)
    for thread in threads:
        thread.join()
    return errors


def encode_varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    if value < 0:
        raise ValueError(f"varint of a negative number {value}")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_data_chunk(data: memoryview) -> bytes:
    """The wire bytes of `KVChunk(data=data)`, copying `data` once (bytes + memoryview)."""
    return DATA_FIELD_TAG + encode_varint(data.nbytes) + data


def parse_chunk(raw: bytes) -> tuple[kv_transfer_pb2.KVHeader | None, memoryview]:
    """One serialized `KVChunk` -> (header, empty view) or (None, its data as a view of `raw`).

    Raises google.protobuf.message.DecodeError when `raw` is no KVChunk.
    """
    if raw[:1] == DATA_FIELD_TAG:
        # The common case, our own encoding: read the length and slice, without a protobuf parse
        # (which would copy the payload into the message, and `.data` would copy it again).
        length, shift, pos = 0, 0, 1
        while pos < len(raw) and pos <= _MAX_VARINT_BYTES:
            byte = raw[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if pos + length == len(raw):
                    return None, memoryview(raw)[pos:]
                break
    chunk = kv_transfer_pb2.KVChunk.FromString(raw)  # anything else (a header, other encodings)
    if chunk.HasField("header"):
        return chunk.header, memoryview(b"")
    return None, memoryview(chunk.data)


def split_host_port(address: str) -> tuple[str, int]:
    """ "host:port" or "[v6 host]:port" -> (host without brackets, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def shutdown_quietly(sockets: Iterable[socket.socket]) -> None:
    """Wake any thread blocked in accept/recv on these sockets (close() alone does not on Linux).

    The owning thread still closes them, so a file descriptor is never reused under it.
    """
    for sock in list(sockets):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # not connected, or already shut: nothing is blocked on it
            pass


class DataTicket:
    """One expected data connection: its one-time token, then the connection that presented it."""

    __slots__ = ("token", "arrived", "conn", "ended")

    def __init__(self, token: bytes) -> None:
        self.token = token
        self.arrived = threading.Event()  # set on delivery, on cancel, and when the listener closes
        self.conn: socket.socket | None = None
        self.ended = False  # cancelled, given up or released: no connection is wanted any more


class DataListener:
    """A server's one data port: a TCP listener whose every connection starts with a token.

    Opened once, on the server's bind host, at a fixed port or a free one (`port=0`); a firewall
    between the two sides must allow it. An acceptor thread accepts, and each new connection reads
    its `TOKEN_BYTES` token on a short-lived thread of its own, within `token_timeout_s`, so a slow or
    silent peer never holds up the acceptor or anyone else's transfer. The connection then goes to
    the one `wait`er that registered that token with `expect`; an unknown token, a short read or a
    timeout closes it. Tokens are one-time: dropped when claimed, cancelled, given up or released.
    """

    def __init__(self, host: str, port: int = 0, token_timeout_s: float = TOKEN_TIMEOUT_S) -> None:
        """Raises OSError when `host:port` cannot be bound."""
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self._sock = socket.socket(family, kind, proto)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart despite TIME_WAIT
            self._sock.bind(sockaddr)
            self._sock.listen(128)
        except OSError:
            self._sock.close()
            raise
        self.port: int = self._sock.getsockname()[1]
        self.token_timeout_s = token_timeout_s
        self._lock = threading.Lock()
        self._pending: dict[bytes, DataTicket] = {}  # token -> its waiter, until claimed or ended
        self._unclaimed: dict[socket.socket, threading.Thread] = {}  # connections reading their token
        self._closed = False
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"kv-data-accept-{self.port}", daemon=True
        )
        self._acceptor.start()

    def expect(self) -> DataTicket:
        """Register a fresh random token; its connection goes to `wait(ticket)`. Always `release` it.

        On a closed listener the ticket comes back ended (its `wait` raises at once).
        """
        ticket = DataTicket(secrets.token_bytes(TOKEN_BYTES))
        with self._lock:
            if self._closed:
                ticket.ended = True
                ticket.arrived.set()
            else:
                self._pending[ticket.token] = ticket
        return ticket

    def wait(self, ticket: DataTicket, timeout_s: float) -> socket.socket:
        """The connection that presented `ticket.token` (still the ticket's: `release` closes it).

        Raises TimeoutError when none came within `timeout_s`, ConnectionAbortedError when the
        ticket was cancelled or the listener closed first; either way the token is gone.
        """
        arrived = ticket.arrived.wait(timeout_s)
        with self._lock:
            if ticket.conn is not None and not ticket.ended:
                return ticket.conn
            self._pending.pop(ticket.token, None)
            ticket.ended = True
        if not arrived:
            raise TimeoutError(f"no data connection with the right token within {timeout_s:.1f} s")
        raise ConnectionAbortedError("the transfer was cancelled, or the data listener closed")

    def cancel(self, ticket: DataTicket) -> None:
        """End `ticket` from any thread: drop its token, wake its `wait`, wake a `recv` on its connection."""
        with self._lock:
            self._pending.pop(ticket.token, None)
            ticket.ended = True
            if ticket.conn is not None:  # under the lock: `release` cannot close it meanwhile
                shutdown_quietly([ticket.conn])
        ticket.arrived.set()

    def release(self, ticket: DataTicket) -> None:
        """Done with `ticket` (the waiting thread): drop its token if still there, close its connection."""
        with self._lock:
            self._pending.pop(ticket.token, None)
            ticket.ended = True
            conn, ticket.conn = ticket.conn, None
        if conn is not None:
            conn.close()

    def pending_tokens(self) -> int:
        with self._lock:
            return len(self._pending)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                if self._closed:
                    return
                log.warning("data port %d: accept failed: %r", self.port, exc)
                time.sleep(0.05)  # e.g. out of file descriptors: do not spin
                continue
            with self._lock:
                accepted = not self._closed
                if accepted:
                    if len(self._unclaimed) >= MAX_UNCLAIMED_CONNECTIONS:
                        # Full of connections still silent: drop the oldest (its reader closes it) rather
                        # than the newcomer, so idle peers cannot lock real senders out of the port.
                        shutdown_quietly([next(iter(self._unclaimed))])
                    reader = threading.Thread(target=self._read_token, args=(conn,), daemon=True)
                    self._unclaimed[conn] = reader
                    reader.start()  # under the lock, so `close` never joins a thread not started
            if not accepted:
                conn.close()

    def _read_token(self, conn: socket.socket) -> None:
        """Hand `conn` to the waiter of the token it presents, or close it."""
        token = None
        try:
            conn.settimeout(self.token_timeout_s)
            presented = bytearray(TOKEN_BYTES)
            if recv_exactly(conn, memoryview(presented)) == TOKEN_BYTES:
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                token = bytes(presented)
        except OSError:  # timed out, reset, or shut by `close`
            pass
        with self._lock:
            self._unclaimed.pop(conn, None)
            # A dict lookup on a 16-byte random secret: nothing to learn from its timing.
            ticket = self._pending.pop(token, None) if token and not self._closed else None
            if ticket is not None:
                ticket.conn = conn
        if ticket is None:
            conn.close()
        else:
            ticket.arrived.set()

    def close(self) -> None:
        """Stop accepting, close the connections not yet claimed, wake every waiter. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            tickets = list(self._pending.values())
            self._pending.clear()
            for ticket in tickets:
                ticket.ended = True
            readers = list(self._unclaimed.values())
            shutdown_quietly(self._unclaimed)  # their reader threads close them
        for ticket in tickets:
            ticket.arrived.set()
        shutdown_quietly([self._sock])  # wakes the acceptor's accept() on Linux
        self._acceptor.join(timeout=5)
        self._sock.close()
        for reader in readers:
            reader.join(timeout=5)


def recv_exactly(conn: socket.socket, view: memoryview) -> int:
    """Fill `view` from `conn`; returns the bytes received, fewer than asked when the peer closed."""
    received, total = 0, view.nbytes
    while received < total:
        n = conn.recv_into(view[received:])  # the kernel copies straight into the destination
        if n == 0:
            break
        received += n
    return received


def _kernel_timeout(conn: socket.socket, option: int, seconds: float) -> None:
    """SO_RCVTIMEO / SO_SNDTIMEO: how long one blocking recv / send may wait in the kernel."""
    whole = int(seconds)
    conn.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", whole, int((seconds - whole) * 1e6)))


def recv_payload(
    conn: socket.socket,
    view: memoryview,
    timeout_s: float,
    on_piece: Callable[[int, int], None] | None = None,
    piece_bytes: int | None = None,
) -> tuple[int, bool]:
    """Fill `view` from `conn`, then look for its end: (bytes received, whether more followed).
    `on_piece(start, end)` runs as each `piece_bytes` piece of `view` is complete (e.g. to start
    its copy to the GPU while the rest arrives).

    Blocking receives with MSG_WAITALL: the kernel fills the view in as few calls as the data's
    pace allows, with the GIL released throughout. A socket with a Python timeout is non-blocking
    underneath and returns whatever has arrived (often 64 KiB), so each stripe's thread took the GIL
    back thousands of times per transfer, and the engine thread of the same process waited on it:
    a decode worker's p99 ITL went from 28 to 61 ms under four such threads (H200, 1P1D sweep).
    Each call waits at most a second in the kernel (SO_RCVTIMEO); the whole, `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    piece_bytes = piece_bytes or PIECE_BYTES
    conn.settimeout(None)
    _kernel_timeout(conn, socket.SO_RCVTIMEO, min(1.0, timeout_s))
    received, total = 0, view.nbytes
    while received < total:
        piece_end = min((received // piece_bytes + 1) * piece_bytes, total)
        try:
            n = conn.recv_into(view[received:piece_end], 0, socket.MSG_WAITALL)
        except BlockingIOError:  # nothing arrived within SO_RCVTIMEO
            n = None
        if n == 0:
            return received, False  # the peer closed early
        received += n or 0
        if on_piece is not None and received == piece_end:
            on_piece((piece_end - 1) // piece_bytes * piece_bytes, piece_end)
        if received < total and time.monotonic() > deadline:
            raise TimeoutError(f"{received} of {total} bytes within {timeout_s:.1f} s")
    conn.settimeout(max(deadline - time.monotonic(), 0.001))
    return received, conn.recv(1) != b""  # the sender half-closes after its last byte


def send_stripes(
    host: str,
    port: int,
    tokens: list[bytes],
    payload: memoryview,
    connect_timeout_s: float,
    timeout_s: float,
    ready: Callable[[int], None] | None = None,
) -> None:
    """`connect_and_send` each stripe of `payload` (`stripe_bounds` for len(tokens) streams) with its
    token, all at once, piece by piece (`stripe_pieces`); `ready(start)`, if given, returns once the
    piece starting at byte `start` is in `payload` (a staged copy still landing). Raises a
    `DataConnectError` if any stripe could not connect (nothing may have been sent on it: the caller
    falls back), else the first stripe's failure."""

    def pieces(stripe: list[tuple[int, int]]) -> Iterator[memoryview]:
        for start, end in stripe:
            if ready is not None:
                ready(start)
            yield payload[start:end]

    bounds = stripe_bounds(payload.nbytes, len(tokens))
    errors = run_parallel(
        [
            lambda token=token, stripe=stripe: connect_and_send(
                host, port, token, pieces(stripe), connect_timeout_s, timeout_s
            )
            for token, stripe in zip(tokens, stripe_pieces(bounds), strict=True)
        ]
    )
    not_connected = [e for e in errors if isinstance(e, DataConnectError)]
    failed = not_connected or [e for e in errors if e is not None]
    if failed:
        raise failed[0]


def connect_and_send(
    host: str,
    port: int,
    token: bytes,
    payload: memoryview | Iterable[memoryview],
    connect_timeout_s: float,
    timeout_s: float,
) -> None:
    """Open the data connection, present `token`, send all of `payload` (one buffer, or pieces in
    order, which may each wait for their bytes) and half-close.

    Raises ConnectionError subclasses / OSError; a failed connect is a `DataConnectError`.
    """
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout_s)
    except OSError as exc:
        raise DataConnectError(f"cannot connect to the data port {host}:{port}: {exc!r}") from exc
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Blocking sends: one send() call moves the whole payload, the GIL released throughout (a
        # socket with a Python timeout sends a socket buffer's worth per call, and takes the GIL
        # back between calls: see `recv_payload`). A receiver that takes nothing for `timeout_s`
        # fails the send (SO_SNDTIMEO).
        sock.settimeout(None)
        _kernel_timeout(sock, socket.SO_SNDTIMEO, timeout_s)
        sock.sendall(token)
        for piece in [payload] if isinstance(payload, memoryview) else payload:
            sock.sendall(piece)  # from the packed (or pinned staging) buffer itself: no copy here
        sock.shutdown(socket.SHUT_WR)  # the receiver reads EOF right after the last byte


class DataConnectError(OSError):
    """The sender could not open the data connection at all (nothing was sent on it)."""
