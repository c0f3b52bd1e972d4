"""The gRPC backend's byte path: the raw chunk codec, the socket data plane's protocol and
failure modes (one persistent data listener per server), the staging pool, and (with CUDA
only) the pinned staging copy. Striping is in test_transfer_grpc_stripes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

import pdserve.transfer.grpc_backend as grpc_backend
import pdserve.transfer.grpc_data as grpc_data
from pdserve.internal import kv_transfer_pb2, kv_transfer_pb2_grpc
from pdserve.transfer.contract import KVTransferError
from pdserve.transfer.grpc_backend import (
    DATA_PLANE_KEY,
    DATA_PLANE_SOCKET,
    DATA_PORT_KEY,
    DATA_TOKEN_KEY,
    GrpcKVSender,
    layout_to_proto,
)
from pdserve.transfer.grpc_data import (
    TOKEN_BYTES,
    DataConnectError,
    DataListener,
    encode_data_chunk,
    encode_varint,
    parse_chunk,
    split_host_port,
)
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.packing import buffer_nbytes, pack_blocks
from pdserve.transfer.source import CacheBlocks
from pdserve.transfer.staging import StagingPool
from tests.unit.grpc_kv import (
    FIRST_TOKEN,
    MODEL,
    SECRET,
    Server,
    assert_closed_by_server,
    bits,
    make_cache,
    push_and_check_from_two_threads,
    server_auth,
    wait_until,
)
from tests.unit.threads import run_in_threads

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
            sender = GrpcKVSender(MODEL, SECRET, socket_min_bytes=socket_min_bytes)
            try:
                stats = sender.send(decode.handle(req_id, dst_ids), CacheBlocks(source, src_ids), FIRST_TOKEN)
            finally:
                sender.close()
            assert stats.nbytes == buffer_nbytes(decode.layout, 13) > 3 * grpc_backend.DEFAULT_CHUNK_BYTES
            assert torch.equal(bits(decode.cache[:, :, dst_ids]), bits(source[:, :, src_ids]))
        assert decode.ready == ["inband", "socket"]
    finally:
        decode.server.stop()


def test_concurrent_socket_sends_from_two_threads(server: Server) -> None:
    sender = GrpcKVSender(MODEL, SECRET, socket_min_bytes=0)
    sources = [make_cache(16, seed=10 + i) for i in range(2)]

    def push(i: int) -> None:
        for round_ in range(5):  # several sends per thread, interleaving on the server
            dst_ids = [i * 16 + (j + round_) % 16 for j in range(16)]
            sender.send(
                server.handle(f"t{i}-{round_}", dst_ids),
                CacheBlocks(sources[i], list(range(16))),
                FIRST_TOKEN,
            )

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
        metadata=(*server_auth(server, req_id, [block_id]), (DATA_PLANE_KEY, DATA_PLANE_SOCKET)),
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
    decode = Server(server_options={"max_workers": 1})
    sender = GrpcKVSender(MODEL, SECRET, timeout_s=5, socket_min_bytes=0)
    try:
        call, _, _ = open_socket_call(decode, "abandoned", timeout=60)
        assert decode.pending_tokens() == 1
        call.cancel()  # the one server thread waits for its connection until this wakes it
        wait_until(lambda: decode.pending_tokens() == 0)  # and the token is gone
        source = make_cache(4, seed=2)
        start = time.monotonic()
        sender.send(decode.handle("next", [7]), CacheBlocks(source, [1]), FIRST_TOKEN)
        assert time.monotonic() - start < 5 and decode.ready == ["next"]
        assert decode.pending_tokens() == 0
        assert torch.equal(bits(decode.cache[:, :, 7]), bits(source[:, :, 1]))
    finally:
        sender.close()
        decode.server.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_fixed_data_port_is_honoured_and_a_taken_one_is_an_error() -> None:
    port = free_port()
    decode = Server(data_port=port)
    sender = GrpcKVSender(MODEL, SECRET, socket_min_bytes=0)
    try:
        assert decode.server.data_port == port
        source = make_cache(4, seed=4)
        sender.send(decode.handle("fixed", [3]), CacheBlocks(source, [2]), FIRST_TOKEN)
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
    sender = GrpcKVSender(MODEL, SECRET, timeout_s=10, socket_min_bytes=0)
    try:
        source = make_cache(8, seed=8)
        start = time.monotonic()
        for i in range(3):
            sender.send(server.handle(f"r{i}", [i, 8 + i]), CacheBlocks(source, [i, 4 + i]), FIRST_TOKEN)
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


def test_a_flood_of_silent_connections_does_not_lock_senders_out(server: Server) -> None:
    address = ("127.0.0.1", server.server.data_port)
    flood = [socket.create_connection(address) for _ in range(grpc_data.MAX_UNCLAIMED_CONNECTIONS + 4)]
    sender = GrpcKVSender(MODEL, SECRET, timeout_s=10, socket_min_bytes=0)
    try:
        source = make_cache(8, seed=9)
        start = time.monotonic()
        sender.send(server.handle("after-flood", [3, 5]), CacheBlocks(source, [1, 2]), FIRST_TOKEN)
        assert time.monotonic() - start < 5  # long before the strays' 10 s token timeout
        assert torch.equal(bits(server.cache[:, :, [3, 5]]), bits(source[:, :, [1, 2]]))
    finally:
        sender.close()
        for conn in flood:
            conn.close()


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


def test_unreachable_data_port_fails_that_transfer_then_goes_in_band(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[int] = []

    def refuse(host: str, port: int, *args: object, **kwargs: object) -> None:
        attempts.append(port)
        raise DataConnectError(f"cannot connect to the data port {host}:{port}: firewalled")

    monkeypatch.setattr(grpc_data, "connect_and_send", refuse)  # every stripe
    sender = GrpcKVSender(MODEL, SECRET, socket_min_bytes=0)
    source = make_cache(8, seed=5)
    try:
        # The call that found the port unreachable spent the one-time credential: that transfer fails.
        with pytest.raises(KVTransferError, match="firewalled; this transfer fails"):
            sender.send(server.handle("a", [1, 2]), CacheBlocks(source, [3, 4]), FIRST_TOKEN)
        sender.send(
            server.handle("b", [5]), CacheBlocks(source, [6]), FIRST_TOKEN
        )  # remembered: straight in band
    finally:
        sender.close()
    assert len(attempts) == 1 and server.ready == ["b"]
    assert torch.equal(bits(server.cache[:, :, [5]]), bits(source[:, :, [6]]))
    assert torch.count_nonzero(server.cache[:, :, [1, 2]]) == 0


# ---- CUDA: pinned staging on the sender, pinned receive buffers ---------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("socket_min_bytes", [None, 0])
def test_cuda_sends_stage_through_reused_pinned_buffers(socket_min_bytes: int | None) -> None:
    dims = {"layers": 4, "block_size": 16, "head_dim": 64}
    received: list[bool] = []
    decode = Server(
        num_blocks=64, dtype=torch.bfloat16, device="cuda",
        watch=lambda buffer: received.append(buffer.device.type == "cpu" and buffer.is_pinned()), **dims,
    )  # fmt: skip
    assert decode.server.pin_memory  # CUDA is there: receive buffers are pinned by default
    sender = GrpcKVSender(MODEL, SECRET, socket_min_bytes=socket_min_bytes)
    sources = [make_cache(32, torch.bfloat16, seed=20 + i, **dims).cuda() for i in range(2)]
    try:
        push_and_check_from_two_threads(sender, decode, sources)
        assert len(received) == 8 and all(received)
        free = sender._staging._free
        assert 1 <= len(free) <= 2 and all(buffer.is_pinned() for buffer in free)
    finally:
        sender.close()
        decode.server.stop()
