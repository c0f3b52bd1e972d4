"""The grpc backend: a real server on 127.0.0.1, real streams, bit-exact blocks.

Every test that takes the `sender` fixture runs twice: with the bytes in band on the gRPC
stream, and over the socket data plane (`socket_min_bytes=0` sends even tiny buffers there),
whose connections all come in on the server's one data port.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import grpc
import pytest
import torch

from pdserve.internal import kv_transfer_pb2, kv_transfer_pb2_grpc
from pdserve.transfer.contract import KVArrival, KVHandle, KVSender, KVTransferError
from pdserve.transfer.credentials import KVGate
from pdserve.transfer.grpc_backend import PUSH_KV, GrpcKVSender, encode_header, layout_to_proto
from pdserve.transfer.grpc_server import GrpcKVServer
from pdserve.transfer.layout import KVLayout, KVLayoutMismatch
from pdserve.transfer.packing import buffer_nbytes, pack_blocks
from pdserve.transfer.peers import GrpcPeer
from pdserve.transfer.source import CacheBlocks
from tests.unit.grpc_kv import FIRST_TOKEN, MODEL, SECRET, Server, auth_metadata, bits, make_cache
from tests.unit.threads import run_in_threads


@pytest.fixture(params=["inband", "socket"])
def sender(request: pytest.FixtureRequest) -> Iterator[GrpcKVSender]:
    # In band: small chunks so even these tiny buffers span many messages.
    socket_min_bytes = None if request.param == "inband" else 0
    grpc_sender = GrpcKVSender(
        MODEL, SECRET, chunk_bytes=1000, timeout_s=10, socket_min_bytes=socket_min_bytes
    )
    yield grpc_sender
    grpc_sender.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_push_blocks_bit_exact(sender: GrpcKVSender, dtype: torch.dtype) -> None:
    assert isinstance(sender, KVSender)
    receiver = Server(dtype=dtype)
    try:
        source = make_cache(16, dtype, seed=7)
        requests = {
            "a": ([3, 1, 4], [30, 0, 5]),
            "b": ([15, 9], [2, 23]),
            "c": (list(range(8)), list(range(8, 16))),
        }
        for req_id, (src_ids, dst_ids) in requests.items():
            stats = sender.send(receiver.handle(req_id, dst_ids), CacheBlocks(source, src_ids), FIRST_TOKEN)
            assert stats.nbytes == len(src_ids) * 2 * 2 * 4 * 2 * 16 * dtype.itemsize
            assert stats.pack_ms >= 0 and stats.send_ms > 0
        assert receiver.ready == ["a", "b", "c"]  # send returns only after the callback ran
        expected = torch.zeros_like(receiver.cache)
        for src_ids, dst_ids in requests.values():
            expected[:, :, dst_ids] = source[:, :, src_ids]
        assert torch.equal(bits(receiver.cache), bits(expected))
    finally:
        receiver.server.stop()


def test_concurrent_senders_to_one_server(sender: GrpcKVSender) -> None:
    receiver = Server(dtype=torch.bfloat16)
    try:
        sources = [make_cache(8, torch.bfloat16, seed=seed) for seed in range(4)]

        def push(i: int) -> None:
            handle = receiver.handle(f"r{i}", [i * 8 + j for j in range(8)])
            sender.send(handle, CacheBlocks(sources[i], list(range(8))), FIRST_TOKEN)

        assert not run_in_threads(push, 4, timeout_s=20)
        assert sorted(receiver.ready) == ["r0", "r1", "r2", "r3"]
        for i, source in enumerate(sources):
            assert torch.equal(bits(receiver.cache[:, :, i * 8 : i * 8 + 8]), bits(source))
        listener = receiver.server._data_listener  # one for all four, every token claimed
        assert listener is not None and listener.port == receiver.server.data_port
        assert listener.pending_tokens() == 0
    finally:
        receiver.server.stop()


def test_layout_mismatch_is_refused_with_a_clear_message(sender: GrpcKVSender) -> None:
    receiver = Server(dtype=torch.float32, head_dim=8)
    try:
        source = make_cache(4, torch.bfloat16, head_dim=16)
        # A handle that lies about the decode layout gets past the sender's own check; the server refuses.
        lying_layout = KVLayout.from_cache(source, MODEL)
        handle = dataclasses.replace(
            receiver.handle("bad", [0, 1]), layout=lying_layout, layout_fingerprint=""
        )
        start = time.monotonic()
        with pytest.raises(KVLayoutMismatch) as info:
            sender.send(handle, CacheBlocks(source, [0, 1]), FIRST_TOKEN)
        assert time.monotonic() - start < 5
        message = str(info.value)
        assert "dtype: prefill 'bfloat16' != decode 'float32'" in message
        assert "head_dim: prefill 16 != decode 8" in message
        assert receiver.ready == [] and torch.count_nonzero(receiver.cache) == 0
        # The honest handle is checked on the sender side before any byte moves.
        with pytest.raises(KVLayoutMismatch, match="head_dim: prefill 16 != decode 8"):
            sender.send(receiver.handle("bad2", [0, 1]), CacheBlocks(source, [0, 1]), FIRST_TOKEN)
    finally:
        receiver.server.stop()


def test_callback_failure_and_unreachable_server_raise_transfer_errors(sender: GrpcKVSender) -> None:
    layout = KVLayout.from_cache(make_cache(4, torch.float32), MODEL)

    class Refuse:
        def on_kv_chunk(self, arrival: KVArrival, layers: slice, chunk: torch.Tensor) -> None:
            raise KeyError(f"unknown request {arrival.req_id}")

    gate = KVGate(SECRET)
    server = GrpcKVServer("127.0.0.1:0", Refuse(), layout, gate=gate)
    server.start()
    credential = gate.issue("gone", [0], buffer_nbytes(layout, 1))
    handle = KVHandle("gone", "decode-0", [0], 4, layout, GrpcPeer(server.address), credential=credential)
    try:
        with pytest.raises(KVTransferError, match="INTERNAL.*unknown request gone"):
            sender.send(handle, CacheBlocks(make_cache(4, torch.float32), [1]), FIRST_TOKEN)
    finally:
        server.stop()
    start = time.monotonic()
    with pytest.raises(KVTransferError, match="UNAVAILABLE"):
        sender.send(
            handle, CacheBlocks(make_cache(4, torch.float32), [1]), FIRST_TOKEN
        )  # nobody listens any more
    assert time.monotonic() - start < 5


def test_a_server_restarted_on_the_same_address_is_reached_at_once(sender: GrpcKVSender) -> None:
    """A decode worker restarted by Ray may get the port its dead predecessor (or another
    dead worker) had: the push to it must not fail fast in the old connection's reconnect
    backoff (seen in the soak: 59 requests ABORTED over 2 s with "Connection refused")."""
    source = make_cache(4, torch.float32, seed=3)
    first = Server()
    address = first.server.address
    sender.send(first.handle("a", [0]), CacheBlocks(source, [1]), FIRST_TOKEN)
    stale = first.handle("b", [1])
    first.server.stop()
    with pytest.raises(KVTransferError, match="UNAVAILABLE"):
        sender.send(stale, CacheBlocks(source, [1]), FIRST_TOKEN)  # nobody listens: fails, and quickly
    second = Server(address=address)
    try:
        start = time.monotonic()
        sender.send(second.handle("c", [2]), CacheBlocks(source, [1]), FIRST_TOKEN)
        assert time.monotonic() - start < 1.0
        assert second.ready == ["c"] and torch.equal(bits(second.cache[:, :, 2]), bits(source[:, :, 1]))
    finally:
        second.server.stop()


def test_server_rejects_malformed_streams() -> None:
    layout = KVLayout.from_cache(make_cache(4, torch.float32), MODEL)
    received: list[str] = []
    sink = SimpleNamespace(on_kv_chunk=lambda arrival, *_: received.append(arrival.req_id))
    gate = KVGate(SECRET)
    server = GrpcKVServer("127.0.0.1:0", sink, layout, gate=gate)
    server.start()
    nbytes = buffer_nbytes(layout, 1)

    def auth() -> tuple[tuple[str, str], ...]:  # a fresh reservation of block 0 per call
        return auth_metadata("short", gate.issue("short", [0], nbytes))

    channel = grpc.insecure_channel(server.address)
    stub = kv_transfer_pb2_grpc.KVTransferStub(channel)
    good_header = kv_transfer_pb2.KVHeader(
        req_id="short", layout=layout_to_proto(layout), block_ids=[0], dtype="float32",
        shape=list(layout.buffer_shape(1)), total_bytes=2 * 2 * 4 * 2 * 16 * 4,
    )  # fmt: skip
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.PushKV(iter([kv_transfer_pb2.KVChunk(data=b"xx")]), timeout=5, metadata=auth())
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:  # stream stops short of total_bytes
            stub.PushKV(
                iter([kv_transfer_pb2.KVChunk(header=good_header), kv_transfer_pb2.KVChunk(data=b"x")]),
                timeout=5,
                metadata=auth(),
            )
        assert info.value.code() == grpc.StatusCode.DATA_LOSS
        wrong_shape = kv_transfer_pb2.KVHeader()
        wrong_shape.CopyFrom(good_header)
        wrong_shape.shape[2] = 2
        with pytest.raises(grpc.RpcError) as info:
            stub.PushKV(iter([kv_transfer_pb2.KVChunk(header=wrong_shape)]), timeout=5, metadata=auth())
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert received == []
        payload = (
            pack_blocks(make_cache(4, torch.float32), [2]).reshape(-1).view(torch.uint8).numpy().tobytes()
        )
        chunks = [kv_transfer_pb2.KVChunk(header=good_header), kv_transfer_pb2.KVChunk(data=payload)]
        with pytest.raises(grpc.RpcError) as info:  # no deadline: it could hold a thread forever
            stub.PushKV(iter(chunks), metadata=auth())
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "deadline" in info.value.details()
        reply = stub.PushKV(iter(chunks), timeout=5, metadata=auth())
        assert reply.received_bytes == len(payload) and received == ["short"]
    finally:
        channel.close()
        server.stop()


def test_stalled_senders_hold_nobody_up_and_end_by_their_deadline() -> None:
    receiver = Server(server_options={"timeout_s": 2.0})
    stall = threading.Event()
    channel = grpc.insecure_channel(receiver.server.address)
    push = channel.stream_unary(PUSH_KV, response_deserializer=kv_transfer_pb2.PushKVReply.FromString)
    nbytes = buffer_nbytes(receiver.layout, 1)

    def stalled(handle: KVHandle) -> Iterator[bytes]:
        yield encode_header(handle, receiver.layout, nbytes, FIRST_TOKEN)  # admitted, header read ...
        stall.wait(30)  # ... and then nothing: a sender that stopped

    sender = GrpcKVSender(MODEL, SECRET, timeout_s=2.0)
    try:
        calls = []
        for i in range(8):  # more stalled calls than the server once had threads
            handle = receiver.handle(f"stalled-{i}", [i])
            metadata = auth_metadata(handle.req_id, handle.credential)
            calls.append(push.future(stalled(handle), timeout=2.0, metadata=metadata))
        time.sleep(0.3)  # every stalled call is in, holding a server thread
        source = make_cache(4, seed=3)
        start = time.monotonic()
        sender.send(receiver.handle("real", [20, 21]), CacheBlocks(source, [0, 1]), FIRST_TOKEN)
        assert time.monotonic() - start < 1.5  # nobody waited for the stalled ones (2 s deadlines)
        assert torch.equal(bits(receiver.cache[:, :, [20, 21]]), bits(source[:, :, [0, 1]]))
        codes = {call.exception(timeout=10).code() for call in calls}
        assert codes == {grpc.StatusCode.DEADLINE_EXCEEDED}  # the deadline ended each
        assert receiver.ready == ["real"]
        # A call asking for more time than the transfer timeout (+ slack) is refused up front.
        handle = receiver.handle("greedy", [30])
        with pytest.raises(grpc.RpcError) as info:
            push(iter([b""]), timeout=60, metadata=auth_metadata(handle.req_id, handle.credential))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "deadline" in info.value.details()
    finally:
        stall.set()
        sender.close()
        channel.close()
        receiver.server.stop()
