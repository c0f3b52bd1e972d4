"""The gRPC backend's byte path: the raw chunk codec, the socket data plane's protocol and
failure modes (one persistent data listener per server), the staging pool, and (with CUDA
only) the pinned staging copy."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch

import transfer.grpc_backend as grpc_backend
import transfer.grpc_data as grpc_data
from pdserve.internal import kv_transfer_pb2, kv_transfer_pb2_grpc
from tests.unit.threads import run_in_threads
from transfer.contract import KVHandle, KVTransferError
from transfer.grpc_backend import (
    DATA_PLANE_KEY,
    DATA_PLANE_SOCKET,
    DATA_PORT_KEY,
    DATA_TOKEN_KEY,
    GrpcKVSender,
    layout_to_proto,
)
from transfer.grpc_data import (
    TOKEN_BYTES,
    DataConnectError,
    DataListener,
    StagingPool,
    encode_data_chunk,
    encode_varint,
    interleaved,
    num_data_streams,
    parse_chunk,
    recv_payload,
    split_host_port,
    stripe_bounds,
    stripe_pieces,
)
from transfer.grpc_server import GrpcKVServer
from transfer.layout import KVLayout
from transfer.packing import buffer_nbytes, pack_blocks, unpack_into

MODEL = "tiny"


def make_cache(
    num_blocks: int, dtype: torch.dtype = torch.float32, seed: int = 0, **dims: int
) -> torch.Tensor:
    # [num_layers, 2, num_blocks, block_size, Hkv, head_dim]
    layers, block_size, heads = dims.get("layers", 2), dims.get("block_size", 4), dims.get("heads", 2)
    shape = (layers, 2, num_blocks, block_size, heads, dims.get("head_dim", 16))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


# ---- the raw chunk codec -------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 127, 128, 300, 16383, 16384, 4 << 20, (1 << 32) + 5])
def test_varint_matches_protobuf(value: int) -> None:
    assert encode_varint(value) == kv_transfer_pb2.PushKVReply(received_bytes=value).SerializeToString()[1:]
    assert encode_varint(0) == b"\x00"  # (protobuf leaves a zero field out altogether)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 5000])
def test_data_chunk_round_trips_with_protobuf(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    raw = encode_data_chunk(memoryview(data))
    assert raw == kv_transfer_pb2.KVChunk(data=data).SerializeToString()
    header, view = parse_chunk(raw)
    assert header is None and bytes(view) == data
    header, view = parse_chunk(kv_transfer_pb2.KVChunk(data=data).SerializeToString())
    assert header is None and bytes(view) == data


def test_parse_chunk_header_and_other_encodings() -> None:
    layout = KVLayout.from_cache(make_cache(4), MODEL)
    header = kv_transfer_pb2.KVHeader(req_id="h", layout=layout_to_proto(layout), block_ids=[3, 1])
    parsed, view = parse_chunk(kv_transfer_pb2.KVChunk(header=header).SerializeToString())
    assert parsed == header and view.nbytes == 0
    # A data field followed by an unknown field: not our fast-path shape, still parsed by protobuf.
    raw = kv_transfer_pb2.KVChunk(data=b"abc").SerializeToString() + b"\x18\x07"
    assert parse_chunk(raw) == (None, memoryview(b"abc"))
    with pytest.raises(Exception, match="(?i)error|truncat"):
        parse_chunk(b"\x12\x05ab")  # announces 5 bytes, carries 2


def test_split_host_port() -> None:
    assert split_host_port("127.0.0.1:5") == ("127.0.0.1", 5)
    assert split_host_port("[::1]:50051") == ("::1", 50051)
    with pytest.raises(ValueError):
        split_host_port("no-port")


# ---- the staging pool -----------------------------------------------------------------------


def test_staging_pool_reuses_and_bounds_its_buffers() -> None:
    pool = StagingPool(pin_memory=False, max_free=2)
    a = pool.acquire(3 << 20)
    b = pool.acquire(3 << 20)  # a is still held: b must be another buffer
    assert a.numel() == b.numel() == 4 << 20 and a.data_ptr() != b.data_ptr()
    pool.release(a)
    assert pool.acquire(1 << 20).data_ptr() == a.data_ptr()  # the free one fits: reused
    assert StagingPool.capacity_for(100 << 20) == 128 << 20
    assert StagingPool.capacity_for(1) == 1 << 20
    big = pool.acquire(100 << 20)
    for buffer in (a, b, big):
        pool.release(buffer)
    assert sorted(t.numel() for t in pool._free) == [4 << 20, 128 << 20]  # the smallest went


# ---- the socket data plane --------------------------------------------------------------------


class Server:
    """A decode side with a cache, scattering into it, recording ready request ids."""

    def __init__(
        self, num_blocks: int = 32, dtype: torch.dtype = torch.float32, data_port: int = 0, **dims: int
    ) -> None:
        self.cache = torch.zeros_like(make_cache(num_blocks, dtype, **dims))
        self.layout = KVLayout.from_cache(self.cache, MODEL)
        self.ready: list[str] = []
        callback = unpack_into(self.cache, self.ready.append)
        self.server = GrpcKVServer("127.0.0.1:0", callback, self.layout, data_port=data_port)
        self.server.start()

    def pending_tokens(self) -> int:
        listener = self.server._data_listener
        assert listener is not None
        return listener.pending_tokens()

    def handle(self, req_id: str, block_ids: list[int]) -> KVHandle:
        n_tokens = len(block_ids) * self.layout.block_size
        return KVHandle(
            req_id, "decode-0", block_ids, n_tokens, self.layout, grpc_address=self.server.address
        )


@pytest.fixture
def server() -> Iterator[Server]:
    decode = Server()
    yield decode
    decode.server.stop()


def test_multi_chunk_buffers_arrive_exactly_both_ways() -> None:
    # 8 layers x 2 x 13 blocks x 16 x 8 x 128 x 4 B = 13.6 MB: three full 4 MiB chunks and a partial one.
    dims = {"layers": 8, "block_size": 16, "heads": 8, "head_dim": 128}
    decode = Server(num_blocks=32, **dims)
    source = make_cache(24, seed=3, **dims)
    src_ids, dst_ids = list(range(23, 10, -1)), [5 * i % 32 for i in range(13)]
    try:
        for req_id, socket_min_bytes in (("inband", None), ("socket", 1)):
            decode.cache.zero_()
            sender = GrpcKVSender(MODEL, socket_min_bytes=socket_min_bytes)
            try:
                stats = sender.send(decode.handle(req_id, dst_ids), src_ids, source)
            finally:
                sender.close()
            assert stats.nbytes == buffer_nbytes(decode.layout, 13) > 3 * grpc_backend.DEFAULT_CHUNK_BYTES
            assert torch.equal(bits(decode.cache[:, :, dst_ids]), bits(source[:, :, src_ids]))
        assert decode.ready == ["inband", "socket"]
    finally:
        decode.server.stop()


def test_concurrent_socket_sends_from_two_threads(server: Server) -> None:
    sender = GrpcKVSender(MODEL, socket_min_bytes=0)
    sources = [make_cache(16, seed=10 + i) for i in range(2)]

    def push(i: int) -> None:
        for round_ in range(5):  # several sends per thread, interleaving on the server
            dst_ids = [i * 16 + (j + round_) % 16 for j in range(16)]
            sender.send(server.handle(f"t{i}-{round_}", dst_ids), list(range(16)), sources[i])

    errors = run_in_threads(push, 2, timeout_s=30)
    sender.close()
    assert not errors
    assert sorted(server.ready) == sorted(f"t{i}-{r}" for i in range(2) for r in range(5))
    for i, source in enumerate(sources):
        dst_ids = [i * 16 + (j + 4) % 16 for j in range(16)]  # the last round wrote these
        assert torch.equal(bits(server.cache[:, :, dst_ids]), bits(source))


def open_socket_call(
    server: Server, req_id: str, timeout: float = 5, block_id: int = 0
) -> tuple[grpc.Future, tuple[str, int], bytes]:
    """Start a socket-plane PushKV of one block by hand: (call, (host, data port), token)."""
    channel = grpc.insecure_channel(server.server.address)
    stub = kv_transfer_pb2_grpc.KVTransferStub(channel)
    header = kv_transfer_pb2.KVHeader(
        req_id=req_id, layout=layout_to_proto(server.layout), block_ids=[block_id], dtype="float32",
        shape=list(server.layout.buffer_shape(1)), total_bytes=buffer_nbytes(server.layout, 1),
    )  # fmt: skip
    call = stub.PushKV.future(
        iter([kv_transfer_pb2.KVChunk(header=header)]),
        timeout=timeout,
        metadata=((DATA_PLANE_KEY, DATA_PLANE_SOCKET),),
    )
    metadata = dict(call.initial_metadata())
    call.add_done_callback(lambda _: channel.close())
    return call, ("127.0.0.1", int(metadata[DATA_PORT_KEY])), bytes.fromhex(metadata[DATA_TOKEN_KEY])


def test_socket_plane_refuses_short_and_long_streams(server: Server) -> None:
    nbytes = buffer_nbytes(server.layout, 1)
    payload = bits(pack_blocks(make_cache(4, seed=1), [2])).numpy().tobytes()
    for req_id, data, code in (
        ("short", payload[:-1], grpc.StatusCode.DATA_LOSS),
        ("long", payload + b"!", grpc.StatusCode.INVALID_ARGUMENT),
    ):
        call, address, token = open_socket_call(server, req_id)
        with socket.create_connection(address) as conn:
            conn.sendall(token + data)
        with pytest.raises(grpc.RpcError) as info:
            call.result()
        assert info.value.code() == code and req_id in info.value.details()
        assert str(nbytes) in info.value.details()
    assert server.ready == [] and torch.count_nonzero(server.cache) == 0


def assert_closed_by_server(conn: socket.socket) -> None:
    """The server closed `conn`: EOF, or a reset where it left bytes of ours unread."""
    conn.settimeout(3)
    try:
        assert conn.recv(1) == b""
    except ConnectionResetError:
        pass


def test_socket_plane_skips_strays_and_times_out_without_a_sender(server: Server) -> None:
    payload = bits(pack_blocks(make_cache(4, seed=1), [2])).numpy().tobytes()
    call, address, token = open_socket_call(server, "stray")
    assert address[1] == server.server.data_port and server.pending_tokens() == 1
    with socket.create_connection(address) as stray:
        stray.sendall(b"x" * len(token))  # the wrong token: closed, and the server keeps listening
        assert_closed_by_server(stray)
    with socket.create_connection(address) as conn:
        conn.sendall(token + payload)
    assert call.result().received_bytes == len(payload) and server.ready == ["stray"]
    with socket.create_connection(address) as replay:  # the token was one-time: now unknown
        replay.sendall(token + payload)
        assert_closed_by_server(replay)
    call, _, _ = open_socket_call(server, "nobody", timeout=1)
    with pytest.raises(grpc.RpcError) as info:
        call.result()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and server.ready == ["stray"]
    wait_until(lambda: server.pending_tokens() == 0)  # the server's side of the deadline freed it


def test_a_cancelled_socket_call_frees_its_server_thread() -> None:
    decode = Server()
    decode.server.stop()
    decode.server = GrpcKVServer("127.0.0.1:0", unpack_into(decode.cache, decode.ready.append),
                                 decode.layout, max_workers=1)  # fmt: skip
    decode.server.start()
    sender = GrpcKVSender(MODEL, timeout_s=5, socket_min_bytes=0)
    try:
        call, _, _ = open_socket_call(decode, "abandoned", timeout=60)
        assert decode.pending_tokens() == 1
        call.cancel()  # the one server thread waits for its connection until this wakes it
        wait_until(lambda: decode.pending_tokens() == 0)  # and the token is gone
        source = make_cache(4, seed=2)
        start = time.monotonic()
        sender.send(decode.handle("next", [7]), [1], source)
        assert time.monotonic() - start < 5 and decode.ready == ["next"]
        assert decode.pending_tokens() == 0
        assert torch.equal(bits(decode.cache[:, :, 7]), bits(source[:, :, 1]))
    finally:
        sender.close()
        decode.server.stop()


def wait_until(condition: Callable[[], bool], timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_fixed_data_port_is_honoured_and_a_taken_one_is_an_error() -> None:
    port = free_port()
    decode = Server(data_port=port)
    sender = GrpcKVSender(MODEL, socket_min_bytes=0)
    try:
        assert decode.server.data_port == port
        source = make_cache(4, seed=4)
        sender.send(decode.handle("fixed", [3]), [2], source)
        assert decode.ready == ["fixed"] and torch.equal(bits(decode.cache[:, :, 3]), bits(source[:, :, 2]))
        with pytest.raises(KVTransferError, match=f"data port 127.0.0.1:{port}"):
            Server(data_port=port)  # taken by the first server's listener
    finally:
        sender.close()
        decode.server.stop()
    with pytest.raises(ConnectionRefusedError):  # stop() closed it
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_two_transfers_through_one_listener_get_their_own_bytes(server: Server) -> None:
    source = make_cache(4, seed=6)
    payloads = [bits(pack_blocks(source, [i])).numpy().tobytes() for i in (1, 3)]
    (call_a, address_a, token_a), (call_b, address_b, token_b) = (
        open_socket_call(server, "a", block_id=10),
        open_socket_call(server, "b", block_id=20),
    )
    assert address_a == address_b == ("127.0.0.1", server.server.data_port) and token_a != token_b
    assert server.pending_tokens() == 2
    conn_a, conn_b = socket.create_connection(address_a), socket.create_connection(address_b)
    with conn_a, conn_b:  # both open at once, b's bytes first, a's in two halves around them
        half = len(payloads[0]) // 2
        conn_a.sendall(token_a + payloads[0][:half])
        conn_b.sendall(token_b + payloads[1])
        conn_b.shutdown(socket.SHUT_WR)
        assert call_b.result(timeout=5).req_id == "b"
        conn_a.sendall(payloads[0][half:])
        conn_a.shutdown(socket.SHUT_WR)
        assert call_a.result(timeout=5).req_id == "a"
    assert server.ready == ["b", "a"] and server.pending_tokens() == 0
    assert torch.equal(bits(server.cache[:, :, 10]), bits(source[:, :, 1]))
    assert torch.equal(bits(server.cache[:, :, 20]), bits(source[:, :, 3]))


def test_silent_and_wrong_strays_do_not_delay_a_transfer(server: Server) -> None:
    address = ("127.0.0.1", server.server.data_port)
    silent = socket.create_connection(address)  # connects, never sends a byte
    partial = socket.create_connection(address)
    partial.sendall(b"\x00" * (TOKEN_BYTES - 1))  # one byte short of a token
    sender = GrpcKVSender(MODEL, timeout_s=10, socket_min_bytes=0)
    try:
        source = make_cache(8, seed=8)
        start = time.monotonic()
        for i in range(3):
            sender.send(server.handle(f"r{i}", [i, 8 + i]), [i, 4 + i], source)
        assert time.monotonic() - start < 5
        assert server.ready == ["r0", "r1", "r2"]
        assert torch.equal(bits(server.cache[:, :, [0, 8, 2, 10]]), bits(source[:, :, [0, 4, 2, 6]]))
        silent.settimeout(0.2)
        with pytest.raises(TimeoutError):  # the strays are still open: nothing waited for them
            silent.recv(1)
    finally:
        sender.close()
        silent.close()
        partial.close()


def test_stop_returns_promptly_with_a_stray_connection_open() -> None:
    decode = Server()
    stray = socket.create_connection(("127.0.0.1", decode.server.data_port))
    stray.sendall(b"abc")
    try:
        listener = decode.server._data_listener
        assert listener is not None
        wait_until(lambda: len(listener._unclaimed) == 1)  # accepted, its reader waiting for a token
        start = time.monotonic()
        decode.server.stop()
        assert time.monotonic() - start < 2 and not listener._unclaimed
        assert_closed_by_server(stray)
    finally:
        stray.close()


def test_data_listener_closes_unknown_and_late_connections() -> None:
    listener = DataListener("127.0.0.1", 0, token_timeout_s=0.3)
    try:
        address = ("127.0.0.1", listener.port)
        ticket = listener.expect()
        with socket.create_connection(address) as silent:
            start = time.monotonic()
            silent.settimeout(3)
            assert silent.recv(1) == b""  # no token within token_timeout_s: closed
            assert 0.2 < time.monotonic() - start < 2.5
        with pytest.raises(TimeoutError):
            listener.wait(ticket, 0.05)
        assert listener.pending_tokens() == 0  # given up: the token is gone
        with socket.create_connection(address) as late:
            late.sendall(ticket.token)
            late.settimeout(3)
            assert late.recv(1) == b""
        ticket = listener.expect()
        with socket.create_connection(address) as conn:
            conn.sendall(ticket.token + b"payload")
            accepted = listener.wait(ticket, 3)
            assert accepted.recv(7, socket.MSG_WAITALL) == b"payload"
        listener.release(ticket)
        assert accepted.fileno() == -1 and listener.pending_tokens() == 0
        waiting = listener.expect()
        threading.Timer(0.1, listener.close).start()
        with pytest.raises(ConnectionAbortedError):  # close() wakes waiters
            listener.wait(waiting, 5)
        assert listener.expect().ended  # closed: nothing more is registered
    finally:
        listener.close()


def test_unreachable_data_port_falls_back_to_in_band(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[int] = []

    def refuse(host: str, port: int, *args: object, **kwargs: object) -> None:
        attempts.append(port)
        raise DataConnectError(f"cannot connect to the data port {host}:{port}: firewalled")

    monkeypatch.setattr(grpc_data, "connect_and_send", refuse)  # every stripe
    sender = GrpcKVSender(MODEL, socket_min_bytes=0)
    source = make_cache(8, seed=5)
    try:
        sender.send(server.handle("a", [1, 2]), [3, 4], source)
        sender.send(server.handle("b", [5]), [6], source)  # remembered: straight in band
    finally:
        sender.close()
    assert len(attempts) == 1 and server.ready == ["a", "b"]
    assert torch.equal(bits(server.cache[:, :, [1, 2, 5]]), bits(source[:, :, [3, 4, 6]]))


# ---- CUDA: pinned staging on the sender, pinned receive buffers ---------------------------------


def push_and_check_from_two_threads(
    sender: GrpcKVSender, decode: Server, sources: list[torch.Tensor]
) -> None:
    """Two threads each send 4 rounds of their source's 32 blocks to rotating destinations in
    `decode`'s cache, at once; then the last round's blocks must equal the sources, bit for bit."""

    def push(i: int) -> None:
        for round_ in range(4):
            dst_ids = [i * 32 + (j + round_) % 32 for j in range(32)]
            sender.send(decode.handle(f"t{i}-{round_}", dst_ids), list(range(32)), sources[i])

    assert not run_in_threads(push, len(sources), timeout_s=60)
    for i, source in enumerate(sources):
        dst_ids = [i * 32 + (j + 3) % 32 for j in range(32)]  # the last round wrote these
        assert torch.equal(bits(decode.cache[:, :, dst_ids].cpu()), bits(source.cpu()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("socket_min_bytes", [None, 0])
def test_cuda_sends_stage_through_reused_pinned_buffers(socket_min_bytes: int | None) -> None:
    dims = {"layers": 4, "block_size": 16, "head_dim": 64}
    decode = Server(num_blocks=64, dtype=torch.bfloat16, **dims)
    assert decode.server.pin_memory  # CUDA is there: receive buffers are pinned by default
    decode.cache = decode.cache.cuda()
    received: list[bool] = []
    callback = unpack_into(decode.cache, decode.ready.append)

    def on_kv(req_id: str, block_ids: list[int], buffer: torch.Tensor) -> None:
        received.append(buffer.device.type == "cpu" and buffer.is_pinned())
        callback(req_id, block_ids, buffer)

    decode.server.stop()
    decode.server = GrpcKVServer("127.0.0.1:0", on_kv, decode.layout)
    decode.server.start()
    sender = GrpcKVSender(MODEL, socket_min_bytes=socket_min_bytes)
    sources = [make_cache(32, torch.bfloat16, seed=20 + i, **dims).cuda() for i in range(2)]
    try:
        push_and_check_from_two_threads(sender, decode, sources)
        assert len(received) == 8 and all(received)
        free = sender._staging._free
        assert 1 <= len(free) <= 2 and all(buffer.is_pinned() for buffer in free)
    finally:
        sender.close()
        decode.server.stop()


# ---- striped socket transfers: several data connections per buffer -----------------------------


@pytest.mark.parametrize("nbytes", [1, 65536, 65537, 200_000, 268_435_456, 268_435_456 + 12_345])
@pytest.mark.parametrize("max_streams", [1, 3, 4])
def test_stripes_cover_the_payload_in_order_without_empties(nbytes: int, max_streams: int) -> None:
    streams = num_data_streams(nbytes, max_streams, min_bytes=1)
    bounds = stripe_bounds(nbytes, streams)
    assert len(bounds) == streams <= max_streams
    assert bounds[0][0] == 0 and bounds[-1][1] == nbytes
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))  # contiguous
    assert all(end > start for start, end in bounds)
    assert all(start % 65536 == 0 for start, _ in bounds)
    assert num_data_streams(268_435_456, 4) == 4 and num_data_streams(40 << 20, 4) == 1  # 32 MiB each


def striped_server(max_streams: int = 3) -> Server:
    """8 KiB blocks, and every buffer of 3 x 64 KiB or more in `max_streams` stripes."""
    decode = Server(num_blocks=64, head_dim=64)
    decode.server.stop()
    callback = unpack_into(decode.cache, decode.ready.append)
    decode.server = GrpcKVServer(
        "127.0.0.1:0", callback, decode.layout, max_data_streams=max_streams, data_stream_min_bytes=1
    )
    decode.server.start()
    return decode


def test_a_striped_transfer_arrives_bit_exact_over_one_connection_per_stripe() -> None:
    decode = striped_server(max_streams=3)
    sender = GrpcKVSender(MODEL, socket_min_bytes=0)
    source = make_cache(64, seed=9, head_dim=64)
    src_ids, dst_ids = list(range(0, 60, 2)), list(range(30, 60))  # 30 blocks: 240 KiB, 3 stripes
    accepted: list[int] = []
    listener = decode.server._data_listener
    original_wait = listener.wait
    listener.wait = lambda ticket, timeout_s: accepted.append(1) or original_wait(ticket, timeout_s)
    try:
        stats = sender.send(decode.handle("striped", dst_ids), src_ids, source)
        assert stats.nbytes == buffer_nbytes(decode.layout, 30) == 245_760
        assert len(accepted) == 3 and decode.ready == ["striped"] and decode.pending_tokens() == 0
        assert torch.equal(bits(decode.cache[:, :, dst_ids]), bits(source[:, :, src_ids]))
        small = sender.send(decode.handle("one-stripe", [0]), [1], source)  # 8 KiB: one connection
        assert small.nbytes == 8192 and len(accepted) == 4 and decode.ready[-1] == "one-stripe"
    finally:
        sender.close()
        decode.server.stop()


def test_a_striped_transfer_with_a_short_or_missing_stripe_fails_and_frees_every_token() -> None:
    decode = striped_server(max_streams=3)
    channel = grpc.insecure_channel(decode.server.address)
    stub = kv_transfer_pb2_grpc.KVTransferStub(channel)
    block_ids = list(range(30))
    nbytes = buffer_nbytes(decode.layout, 30)
    payload = bits(pack_blocks(make_cache(64, seed=3, head_dim=64), block_ids)).numpy().tobytes()
    header = kv_transfer_pb2.KVHeader(
        req_id="x", layout=layout_to_proto(decode.layout), block_ids=block_ids, dtype="float32",
        shape=list(decode.layout.buffer_shape(30)), total_bytes=nbytes,
    )  # fmt: skip
    try:
        for case, code in (
            ("short", grpc.StatusCode.DATA_LOSS),
            ("missing", grpc.StatusCode.DEADLINE_EXCEEDED),
        ):
            header.req_id = case
            call = stub.PushKV.future(
                iter([kv_transfer_pb2.KVChunk(header=header)]), timeout=2,
                metadata=((DATA_PLANE_KEY, DATA_PLANE_SOCKET),),
            )  # fmt: skip
            metadata = dict(call.initial_metadata())
            tokens = [bytes.fromhex(t) for t in metadata[DATA_TOKEN_KEY].split(",")]
            address = ("127.0.0.1", int(metadata[DATA_PORT_KEY]))
            assert len(tokens) == 3
            bounds = stripe_bounds(nbytes, 3)
            conns = []
            for i, (token, (start, end)) in enumerate(zip(tokens, bounds, strict=True)):
                if case == "missing" and i == 1:
                    continue  # this stripe never connects: the deadline ends the call
                conn = socket.create_connection(address)
                conn.sendall(token + payload[start : end - (1 if case == "short" and i == 2 else 0)])
                conn.shutdown(socket.SHUT_WR)
                conns.append(conn)
            with pytest.raises(grpc.RpcError) as info:
                call.result()
            # (a deadline's details may be the client's own: "Deadline Exceeded")
            assert info.value.code() == code and (case == "missing" or case in info.value.details())
            for conn in conns:
                assert_closed_by_server(conn)
                conn.close()
            wait_until(lambda: decode.pending_tokens() == 0)
        assert decode.ready == [] and torch.count_nonzero(decode.cache) == 0
    finally:
        channel.close()
        decode.server.stop()


def test_recv_payload_fills_blocking_and_bounds_a_stalled_sender() -> None:
    """recv_payload receives with blocking MSG_WAITALL calls (no GIL round trip per packet) and
    still honours its timeout when the sender stalls mid-payload, or finds extra bytes."""
    payload = bytes(range(256)) * 4096  # 1 MiB
    for extra, stall in ((b"", False), (b"!", False), (b"", True)):
        sender, receiver = socket.socketpair()
        with sender, receiver:

            def send(sender: socket.socket = sender, extra: bytes = extra, stall: bool = stall) -> None:
                try:
                    sender.sendall(payload[: len(payload) // 2] if stall else payload + extra)
                    if not stall:
                        sender.shutdown(socket.SHUT_WR)
                except OSError:  # the stalled case: the receiver gave up and closed
                    pass

            threading.Thread(target=send, daemon=True).start()
            view = memoryview(bytearray(len(payload)))
            if stall:
                began = time.monotonic()
                with pytest.raises(TimeoutError):
                    recv_payload(receiver, view, timeout_s=0.3)
                assert time.monotonic() - began < 2.0
                continue
            received, more = recv_payload(receiver, view, timeout_s=5)
            assert received == len(payload) and bytes(view) == payload and more == bool(extra)


def test_stripe_pieces_cover_each_stripe_and_interleave_across_stripes() -> None:
    bounds = stripe_bounds(20 << 20, 3)  # ~6.7 MiB stripes
    pieces = stripe_pieces(bounds, piece_bytes=4 << 20)
    assert [len(p) for p in pieces] == [2, 2, 2]
    for (start, end), stripe in zip(bounds, pieces, strict=True):
        assert stripe[0][0] == start and stripe[-1][1] == end
        assert all(a[1] == b[0] for a, b in zip(stripe, stripe[1:], strict=False))
    order = interleaved(pieces)
    assert order == [pieces[0][0], pieces[1][0], pieces[2][0], pieces[0][1], pieces[1][1], pieces[2][1]]
    assert interleaved(stripe_pieces([(0, 10), (10, 30)], piece_bytes=10)) == [(0, 10), (10, 20), (20, 30)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_server_gets_each_piece_to_the_gpu_as_it_lands(monkeypatch: pytest.MonkeyPatch) -> None:
    """`device="cuda"`: the callback receives a CUDA tensor, copied to the GPU piece by piece
    (64 KiB pieces here, so each of the 3 stripes has several) while the sender's copy to host
    also goes piece by piece; the bytes arrive exact, over and over from two threads."""
    monkeypatch.setattr(grpc_data, "PIECE_BYTES", 1 << 16)
    dims = {"layers": 4, "block_size": 16, "head_dim": 64}
    decode = Server(num_blocks=64, dtype=torch.bfloat16, **dims)
    decode.server.stop()
    decode.cache = decode.cache.cuda()
    devices: list[str] = []
    callback = unpack_into(decode.cache, decode.ready.append)

    def on_kv(req_id: str, block_ids: list[int], buffer: torch.Tensor) -> None:
        devices.append(buffer.device.type)
        callback(req_id, block_ids, buffer)

    decode.server = GrpcKVServer(
        "127.0.0.1:0", on_kv, decode.layout, max_data_streams=3, data_stream_min_bytes=1, device="cuda"
    )
    decode.server.start()
    sender = GrpcKVSender(MODEL, socket_min_bytes=0)
    sources = [make_cache(32, torch.bfloat16, seed=40 + i, **dims).cuda() for i in range(2)]
    try:
        assert buffer_nbytes(decode.layout, 32) == 1 << 20  # 3 stripes of 5, 5 and 6 pieces
        push_and_check_from_two_threads(sender, decode, sources)
        assert devices == ["cuda"] * 8
    finally:
        sender.close()
        decode.server.stop()
