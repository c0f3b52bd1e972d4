"""KV sources (`transfer.source`): a sender reads a request's KV as layer pieces.

A cache's blocks (`CacheBlocks`) pack any range into the sender's own buffer; pieces made on
demand (`LayerPieces`, what a tensor-parallel prefill worker gathers) are asked for a few
layers at a time, in order, and a sender holds at most two of them: the gRPC sender stages
each on the host and drops it before fetching the next (in band and over the socket data
plane), the nccl sender (gloo here, two processes) keeps one on the wire while it fetches the
next. Either way the decode side's blocks are bit-equal to the source's; a fetch that fails
fails the send with `KVTransferError` naming it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import threading
import weakref
from typing import Any

import pytest
import torch

from pdserve.transfer.contract import KVTransferError
from pdserve.transfer.grpc_backend import GrpcKVSender
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.packing import pack_blocks
from pdserve.transfer.source import CacheBlocks, LayerPieces, PieceFiller, chunk_plan, source_layout
from tests.unit.grpc_kv import FIRST_TOKEN, MODEL, SECRET, Server, bits, make_cache

pytestmark = pytest.mark.timeout(120)

NUM_LAYERS = 5


class RecordingFetch:
    """A fetch of `blocks`' packed layers from `cache`, each a fresh tensor (as a gather makes
    it), recording each call's layers and how many earlier pieces were still alive then."""

    def __init__(self, cache: torch.Tensor, blocks: list[int], fail_at: int | None = None) -> None:
        self.cache, self.blocks, self.fail_at = cache, blocks, fail_at
        self.calls: list[tuple[slice, int]] = []
        self._alive: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()

    def __call__(self, layers: slice) -> torch.Tensor:
        self.calls.append((layers, len(self._alive)))
        if layers.start == self.fail_at:
            raise RuntimeError(f"tensor-parallel rank 1 exited while gathering layer {layers.start}")
        piece = pack_blocks(self.cache, self.blocks, layers=layers).clone()
        self._alive.add(piece)
        return piece


def pieces_of(
    cache: torch.Tensor, blocks: list[int], fetch: RecordingFetch, max_layers: int = 1
) -> LayerPieces:
    shape = (cache.shape[0], 2, len(blocks), *cache.shape[3:])
    return LayerPieces(fetch, shape, cache.dtype, cache.device, max_layers)


def test_sources_describe_the_buffer_and_refuse_bad_pieces() -> None:
    cache = make_cache(8, layers=NUM_LAYERS)
    blocks = CacheBlocks(cache, [3, 1])
    assert blocks.shape == (NUM_LAYERS, 2, 2, 4, 2, 16) and blocks.max_chunk_layers == 0
    assert source_layout(blocks, MODEL, tp_size=2) == KVLayout.from_cache(cache, MODEL, tp_size=2)
    assert torch.equal(blocks.layers(slice(1, 3)), cache[1:3][:, :, [3, 1]])
    assert chunk_plan(blocks, 0) == [slice(0, NUM_LAYERS)]  # a cache: all at once if asked
    fetch = RecordingFetch(cache, [3, 1])
    pieces = pieces_of(cache, [3, 1], fetch, max_layers=2)
    assert chunk_plan(pieces, 0) == [slice(0, 2), slice(2, 4), slice(4, 5)]  # never over the limit
    assert chunk_plan(pieces, 1) == [slice(i, i + 1) for i in range(NUM_LAYERS)]
    with pytest.raises(ValueError, match="at most 2 of 5 layers"):
        pieces.layers(slice(0, 3))
    out = torch.empty(1, 2, 2, 4, 2, 16)
    assert pieces.layers(slice(4, 5), out=out) is out and torch.equal(out, cache[4:5][:, :, [3, 1]])
    wrong = LayerPieces(fetch, (NUM_LAYERS, 2, 3, 4, 2, 16), cache.dtype, "cpu", 1)  # 3 blocks: lies
    with pytest.raises(ValueError, match=r"fetched KV piece \(1, 2, 2, 4, 2, 16\).*expected \(1, 2, 3"):
        wrong.layers(slice(0, 1))
    with pytest.raises(ValueError, match="max_chunk_layers must be > 0"):
        LayerPieces(fetch, pieces.shape, cache.dtype, "cpu", 0)


def test_piece_filler_stages_in_order_and_reports_a_failed_fetch() -> None:
    cache = make_cache(8, layers=NUM_LAYERS)
    fetch = RecordingFetch(cache, [0, 6, 2])
    source = pieces_of(cache, [0, 6, 2], fetch)
    host = torch.empty(cache[:, :, :3].numel() * 4, dtype=torch.uint8)
    filler = PieceFiller(source, host, "r")
    filler.ready(-1)
    filler.stop()
    assert torch.equal(host.view(torch.float32).view(source.shape), cache[:, :, [0, 6, 2]])
    assert [layers for layers, _ in fetch.calls] == [slice(i, i + 1) for i in range(NUM_LAYERS)]
    assert max(alive for _, alive in fetch.calls) == 0  # each piece dropped before the next
    failing = PieceFiller(
        pieces_of(cache, [0, 6, 2], RecordingFetch(cache, [0, 6, 2], fail_at=3)), host, "r2"
    )
    failing.ready(3 * host.numel() // NUM_LAYERS)  # layers 0..2 are there
    with pytest.raises(KVTransferError, match="request r2: fetching its KV failed.*gathering layer 3"):
        failing.ready(-1)
    failing.stop()


@pytest.mark.parametrize("route", ["inband", "socket"])
def test_grpc_sends_layer_pieces_one_at_a_time(route: str) -> None:
    source_cache = make_cache(8, seed=7, layers=NUM_LAYERS)
    decode = Server(layers=NUM_LAYERS)
    sender = GrpcKVSender(MODEL, SECRET, socket_min_bytes=None if route == "inband" else 0)
    try:
        fetch = RecordingFetch(source_cache, [5, 0, 7])
        stats = sender.send(
            decode.handle("r", [9, 2, 14]), pieces_of(source_cache, [5, 0, 7], fetch), FIRST_TOKEN
        )
        assert stats.nbytes == source_cache[:, :, :3].numel() * 4
        assert [layers for layers, _ in fetch.calls] == [slice(i, i + 1) for i in range(NUM_LAYERS)]
        assert max(alive for _, alive in fetch.calls) == 0  # staged on the host, dropped, then the next
        assert decode.ready == ["r"]
        assert torch.equal(bits(decode.cache[:, :, [9, 2, 14]]), bits(source_cache[:, :, [5, 0, 7]]))
        failing = RecordingFetch(source_cache, [1], fail_at=2)
        with pytest.raises(KVTransferError, match="fetching its KV failed.*gathering layer 2"):
            sender.send(decode.handle("lost", [3]), pieces_of(source_cache, [1], failing), FIRST_TOKEN)
        assert decode.ready == ["r"] and torch.count_nonzero(decode.cache[:, :, 3]) == 0  # nothing landed
        sender.send(decode.handle("next", [3]), CacheBlocks(source_cache, [1]), FIRST_TOKEN)  # still fine
        assert decode.ready == ["r", "next"]
    finally:
        sender.close()
        decode.server.stop()


def gloo_decode_main(init: str, notices: Any, replies: Any, results: Any) -> None:
    from pdserve.transfer.credentials import KVGate
    from pdserve.transfer.nccl_backend import NcclKVReceiver
    from pdserve.transfer.nccl_group import destroy_transfer_group, init_transfer_group
    from pdserve.transfer.packing import unpack_into

    cache = torch.zeros_like(make_cache(16, layers=NUM_LAYERS))
    gate = KVGate(SECRET)  # the reservation first: the prefill side starts with its credential
    results.put(("credential", gate.issue("r", [9, 2, 14], cache[:, :, :3].numel() * 4)))
    init_transfer_group(0, 2, init, "cpu", timeout_s=20)
    chunks: list[slice] = []
    unpack = unpack_into(cache)

    class Sink:
        def on_kv_chunk(self, arrival: Any, layers: slice, chunk: torch.Tensor) -> None:
            chunks.append(layers)
            unpack.on_kv_chunk(arrival, layers, chunk)

    receiver = NcclKVReceiver(Sink(), KVLayout.from_cache(cache, MODEL), "cpu", gate, timeout_s=20)
    notice = notices.get(timeout=30)
    try:
        receiver.recv(notice)
        replies.put(None)
    except Exception as exc:
        replies.put(repr(exc))
    results.put(("decode", (chunks, cache.numpy().copy())))
    destroy_transfer_group()


def gloo_prefill_main(init: str, notices: Any, replies: Any, results: Any, credential: bytes) -> None:
    from concurrent.futures import Future

    from pdserve.transfer.contract import KVHandle
    from pdserve.transfer.nccl_backend import NcclKVSender
    from pdserve.transfer.nccl_group import destroy_transfer_group, init_transfer_group
    from pdserve.transfer.peers import NcclPeer

    init_transfer_group(1, 2, init, "cpu", timeout_s=20)
    cache = make_cache(8, seed=7, layers=NUM_LAYERS)

    def notify(notice: Any) -> Future:  # resolves when the receiver replies (after every chunk)
        future: Future = Future()
        notices.put(notice)

        def wait_reply() -> None:
            reply = replies.get(timeout=30)
            future.set_result(None) if reply is None else future.set_exception(RuntimeError(reply))

        threading.Thread(target=wait_reply, daemon=True).start()
        return future

    sender = NcclKVSender(1, MODEL, SECRET, notify, timeout_s=20, chunk_layers=1)
    layout = KVLayout.from_cache(cache, MODEL)
    handle = KVHandle("r", "decode-0", [9, 2, 14], 12, layout, NcclPeer(0), credential=credential)
    fetch = RecordingFetch(cache, [5, 0, 7])
    try:
        stats = sender.send(handle, pieces_of(cache, [5, 0, 7], fetch), FIRST_TOKEN)
        results.put(("prefill", (stats.extra["chunks"], fetch.calls)))
    except Exception as exc:
        results.put(("prefill", repr(exc)))
    destroy_transfer_group()


def test_gloo_sends_layer_pieces_with_at_most_two_held() -> None:
    """Five one-layer pieces: each fetched while the one before is on the wire, the one before
    that dropped once its send completed (the pieces still alive at each fetch show it)."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    from tests.unit.test_transfer_nccl import free_port

    ctx = mp.get_context("spawn")
    init = f"tcp://127.0.0.1:{free_port()}"
    notices, replies, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    decode = ctx.Process(target=gloo_decode_main, args=(init, notices, replies, results))
    decode.start()
    processes = [decode]
    reports: dict[str, Any] = {}
    try:
        name, credential = results.get(timeout=60)
        assert name == "credential"
        prefill = ctx.Process(target=gloo_prefill_main, args=(init, notices, replies, results, credential))
        prefill.start()
        processes.append(prefill)
        while len(reports) < 2:
            name, report = results.get(timeout=60)
            reports[name] = report
    except queue.Empty:
        pytest.fail(f"reported: {sorted(reports)} (see captured stderr)")
    finally:
        for process in processes:
            process.join(timeout=15)
            if process.is_alive():
                process.kill()
    assert not isinstance(reports["prefill"], str), reports["prefill"]
    num_chunks, calls = reports["prefill"]
    assert num_chunks == NUM_LAYERS
    assert [layers for layers, _ in calls] == [slice(i, i + 1) for i in range(NUM_LAYERS)]
    assert max(alive for _, alive in calls) <= 1  # the one on the wire: two held at most
    chunks, cache = reports["decode"]
    assert chunks == [slice(i, i + 1) for i in range(NUM_LAYERS)]
    expected = make_cache(8, seed=7, layers=NUM_LAYERS)[:, :, [5, 0, 7]]
    assert torch.equal(bits(torch.from_numpy(cache)[:, :, [9, 2, 14]]), bits(expected))
