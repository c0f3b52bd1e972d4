"""The gRPC data plane's striping: a large buffer over several data connections, sent and
received piece by piece (with CUDA: copied to and from the GPU as the pieces go)."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest
import torch

import pdserve.transfer.grpc_data as grpc_data
from pdserve.internal import kv_transfer_pb2, kv_transfer_pb2_grpc
from pdserve.transfer.grpc_backend import (
    DATA_PLANE_KEY,
    DATA_PLANE_SOCKET,
    DATA_PORT_KEY,
    DATA_TOKEN_KEY,
    GrpcKVSender,
    layout_to_proto,
)
from pdserve.transfer.grpc_data import (
    interleaved,
    num_data_streams,
    recv_payload,
    stripe_bounds,
    stripe_pieces,
)
from pdserve.transfer.packing import buffer_nbytes, pack_blocks
from pdserve.transfer.source import CacheBlocks
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
    options = {"max_data_streams": max_streams, "data_stream_min_bytes": 1}
    return Server(num_blocks=64, head_dim=64, server_options=options)


def test_a_striped_transfer_arrives_bit_exact_over_one_connection_per_stripe() -> None:
    decode = striped_server(max_streams=3)
    sender = GrpcKVSender(MODEL, SECRET, socket_min_bytes=0)
    source = make_cache(64, seed=9, head_dim=64)
    src_ids, dst_ids = list(range(0, 60, 2)), list(range(30, 60))  # 30 blocks: 240 KiB, 3 stripes
    accepted: list[int] = []
    listener = decode.server._data_listener
    original_wait = listener.wait
    listener.wait = lambda ticket, timeout_s: accepted.append(1) or original_wait(ticket, timeout_s)
    try:
        stats = sender.send(decode.handle("striped", dst_ids), CacheBlocks(source, src_ids), FIRST_TOKEN)
        assert stats.nbytes == buffer_nbytes(decode.layout, 30) == 245_760
        assert len(accepted) == 3 and decode.ready == ["striped"] and decode.pending_tokens() == 0
        assert torch.equal(bits(decode.cache[:, :, dst_ids]), bits(source[:, :, src_ids]))
        # 8 KiB: one connection
        small = sender.send(decode.handle("one-stripe", [0]), CacheBlocks(source, [1]), FIRST_TOKEN)
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
                metadata=(*server_auth(decode, case, block_ids), (DATA_PLANE_KEY, DATA_PLANE_SOCKET)),
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
    devices: list[str] = []
    options = {"max_data_streams": 3, "data_stream_min_bytes": 1, "device": "cuda"}
    decode = Server(
        num_blocks=64, dtype=torch.bfloat16, device="cuda", server_options=options,
        watch=lambda buffer: devices.append(buffer.device.type), **dims,
    )  # fmt: skip
    sender = GrpcKVSender(MODEL, SECRET, socket_min_bytes=0)
    sources = [make_cache(32, torch.bfloat16, seed=40 + i, **dims).cuda() for i in range(2)]
    try:
        assert buffer_nbytes(decode.layout, 32) == 1 << 20  # 3 stripes of 5, 5 and 6 pieces
        push_and_check_from_two_threads(sender, decode, sources)
        assert devices == ["cuda"] * 8
    finally:
        sender.close()
        decode.server.stop()
