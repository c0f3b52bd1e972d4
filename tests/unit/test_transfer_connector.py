"""The connector layer: the backend registry, `TransferConfig.validate`, peer descriptors, and
the first sampled token reaching the decode side's `KVArrival` over gRPC (in band and over the
socket data plane) and over gloo (two processes, through `DecodeLink.notify_kv`)."""

from __future__ import annotations

import ast
import os
import pathlib
import pickle
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from pdserve.transfer.config import BACKENDS, TransferConfig
from pdserve.transfer.connector import KVConnector, KVReceiveSide, KVSendSide, make_connector
from pdserve.transfer.contract import KVArrival, KVHandle, KVTransferError
from pdserve.transfer.grpc_connector import GrpcConnector
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.nccl_connector import NcclConnector
from pdserve.transfer.packing import unpack_into
from pdserve.transfer.peers import GrpcPeer, NcclPeer
from pdserve.transfer.source import CacheBlocks
from tests.unit.grpc_kv import SECRET, bits, make_cache
from tests.unit.test_transfer_nccl import free_port

MODEL = "tiny"
REPO = pathlib.Path(__file__).resolve().parents[2]


class RecordingSink:
    """Scatters into `cache` [L, 2, num_blocks, block_size, Hkv, D]; records (arrival, layers, shape)."""

    def __init__(self, cache: torch.Tensor) -> None:
        self.scatter = unpack_into(cache)
        self.calls: list[tuple[KVArrival, slice, tuple[int, ...]]] = []

    def on_kv_chunk(self, arrival: KVArrival, layers: slice, chunk: torch.Tensor) -> None:
        self.calls.append((arrival, layers, tuple(chunk.shape)))
        self.scatter.on_kv_chunk(arrival, layers, chunk)


def test_registry_makes_each_backend_and_names_the_allowed_ones() -> None:
    assert BACKENDS == ("grpc", "nccl")
    grpc_connector = make_connector(TransferConfig(secret=SECRET, backend="grpc", data_streams=2))
    assert isinstance(grpc_connector, GrpcConnector) and isinstance(grpc_connector, KVConnector)
    assert grpc_connector.name == "grpc" and not grpc_connector.uses_process_group
    assert grpc_connector.config.data_streams == 2
    nccl_connector = make_connector(TransferConfig(secret=SECRET, backend="nccl"))
    assert isinstance(nccl_connector, NcclConnector)
    assert nccl_connector.name == "nccl" and nccl_connector.uses_process_group
    with pytest.raises(ValueError, match=r"backend.*'nixl'.*allowed: grpc, nccl"):
        make_connector(TransferConfig(secret=SECRET, backend="nixl"))


def test_transfer_config_validate_names_the_field() -> None:
    TransferConfig().validate()
    TransferConfig(backend="nccl", port_base=65535, data_streams=1).validate()
    with pytest.raises(ValueError, match=r"TransferConfig\.backend: .*'tcp'.*allowed: grpc, nccl"):
        TransferConfig(backend="tcp").validate()
    for streams in (0, -3, True):
        with pytest.raises(ValueError, match=r"TransferConfig\.data_streams"):
            TransferConfig(data_streams=streams).validate()
    for port_base in (-1, 65536, True):
        with pytest.raises(ValueError, match=r"TransferConfig\.port_base"):
            TransferConfig(port_base=port_base).validate()
    assert TransferConfig(port_base=20000).kv_server_ports(3) == (20006, 20007)
    assert TransferConfig().kv_server_ports(3) == (0, 0)


def test_handle_needs_a_peer_and_pickles_with_either_descriptor() -> None:
    layout = KVLayout(MODEL, "float32", 2, 2, 16, 4)
    with pytest.raises(ValueError, match="KVHandle for r: give the decode worker's peer descriptor"):
        KVHandle("r", "decode-0", [1], 4, layout, None)
    for peer in (GrpcPeer("10.0.0.7:5000"), NcclPeer(3)):
        handle = KVHandle("r", "decode-0", [1], 4, layout, peer)
        assert pickle.loads(pickle.dumps(handle)) == handle and handle.peer == peer


def test_torch_free_modules_import_no_torch_and_transfer_imports_no_ray() -> None:
    code = (
        "import pickle, sys\n"
        "import pdserve.transfer, pdserve.transfer.config\n"
        "import pdserve.transfer.connector, pdserve.transfer.contract\n"
        "from pdserve.transfer import make_connector, TransferConfig\n"
        "from pdserve.transfer.peers import GrpcPeer\n"
        "from pdserve.transfer.peers import NcclPeer\n"
        "from pdserve.transfer.contract import KVHandle\n"
        "from pdserve.transfer.layout import KVLayout\n"
        "for backend in ('grpc', 'nccl'):\n"
        "    make_connector(TransferConfig(backend=backend))\n"
        "layout = KVLayout('tiny', 'float32', 2, 2, 16, 4)\n"
        "for peer in (GrpcPeer('h:1'), NcclPeer(1)):\n"
        "    pickle.loads(pickle.dumps(KVHandle('r', 'd', [0], 4, layout, peer)))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "proto")])}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=60)
    for path in (REPO / "transfer").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(name.split(".")[0] == "ray" for name in names), f"{path.name} imports ray"


def test_each_send_side_refuses_another_backends_descriptor() -> None:
    cache = make_cache(4)
    layout = KVLayout.from_cache(cache, MODEL)
    grpc_side = make_connector(TransferConfig(secret=SECRET, backend="grpc")).send_side(MODEL, {})
    nccl_side = make_connector(TransferConfig(secret=SECRET, backend="nccl")).send_side(MODEL, {})
    try:
        with pytest.raises(ValueError, match="grpc backend needs a GrpcPeer.*NcclPeer"):
            grpc_side.send(KVHandle("r", "decode-0", [0], 4, layout, NcclPeer(1)), CacheBlocks(cache, [1]), 5)
        with pytest.raises(ValueError, match="nccl backend needs an NcclPeer.*GrpcPeer"):
            nccl_side.send(
                KVHandle("r", "decode-0", [0], 4, layout, GrpcPeer("h:1")), CacheBlocks(cache, [1]), 5
            )
        with pytest.raises(RuntimeError, match="before join_group"):  # the right peer, but no group yet
            nccl_side.send(KVHandle("r", "decode-0", [0], 4, layout, NcclPeer(1)), CacheBlocks(cache, [1]), 5)
    finally:
        grpc_side.close()
        nccl_side.close()
    receive_side = make_connector(TransferConfig(secret=SECRET, backend="nccl")).receive_side(
        RecordingSink(cache), layout, "cpu", 0
    )
    with pytest.raises(RuntimeError, match="join_group"):
        receive_side.peer()
    for backend in BACKENDS:  # no side without the deployment's secret, and the error never shows one
        with pytest.raises(ValueError, match="transfer.secret is empty"):
            make_connector(TransferConfig(backend=backend)).receive_side(
                RecordingSink(cache), layout, "cpu", 0
            )
        with pytest.raises(ValueError, match="transfer.secret is empty"):
            make_connector(TransferConfig(backend=backend)).send_side(MODEL, {})
    assert SECRET not in repr(TransferConfig(secret=SECRET))


@pytest.mark.parametrize("route", ["inband", "socket"])
def test_grpc_first_token_arrives_with_the_kv(route: str) -> None:
    source = make_cache(8, seed=3)  # [2, 2, 8, 4, 2, 16]
    cache = torch.zeros_like(make_cache(16))
    sink = RecordingSink(cache)
    connector = make_connector(
        TransferConfig(secret=SECRET, backend="grpc", host="127.0.0.1", data_streams=3)
    )
    receive: KVReceiveSide = connector.receive_side(sink, KVLayout.from_cache(cache, MODEL), "cpu", 0)
    send: KVSendSide = connector.send_side(MODEL, {})
    send.sender.socket_min_bytes = None if route == "inband" else 0
    try:
        peer = receive.peer()
        assert isinstance(peer, GrpcPeer) and peer.address.startswith("127.0.0.1:")
        assert receive.server._servicer.max_data_streams == 3  # from config.data_streams
        with pytest.raises(TypeError, match="no notices"):
            receive.receive_notice(object())
        layout = KVLayout.from_cache(cache, MODEL)

        def handle(req_id: str, block_ids: list[int]) -> KVHandle:  # as the decode worker's reserve
            credential = receive.expect(req_id, block_ids)
            return KVHandle(
                req_id, "decode-0", block_ids, 4 * len(block_ids), layout, peer, credential=credential
            )

        before = time.perf_counter()
        send.send(handle("a", [9, 2, 14]), CacheBlocks(source, [5, 0, 7]), 128_000)
        send.send(handle("b", [3]), CacheBlocks(source, [1]), 0)
        with pytest.raises(ValueError, match="first_token_id"):  # not a uint32: refused before sending
            send.send(handle("c", [4]), CacheBlocks(source, [1]), -1)
        with pytest.raises(ValueError, match="no transfer credential"):
            send.send(KVHandle("d", "decode-0", [4], 4, layout, peer), CacheBlocks(source, [1]), 1)
        after = time.perf_counter()
    finally:
        send.close()
        receive.close()
    (first, layers_a, shape_a), (second, layers_b, _) = sink.calls
    assert first.req_id == "a" and first.first_token_id == 128_000 and first.block_ids == (9, 2, 14)
    assert second.req_id == "b" and second.first_token_id == 0 and second.block_ids == (3,)
    assert before <= first.started_at <= second.started_at <= after
    # one chunk of every layer, once the whole buffer is in place
    assert layers_a == layers_b == slice(0, 2) and shape_a == (2, 2, 3, 4, 2, 16)
    assert torch.equal(bits(cache[:, :, [9, 2, 14]]), bits(source[:, :, [5, 0, 7]]))


class QueueLink:
    """A `DecodeLink` over multiprocessing queues, standing in for the Ray actor handle."""

    def __init__(self, notices: Any, replies: Any) -> None:
        self.notices, self.replies = notices, replies
        self.failed: list[tuple[str, str | None]] = []

    def notify_kv(self, notice: object) -> Future:
        future: Future = Future()
        self.notices.put(notice)

        def wait_reply() -> None:
            error = self.replies.get()
            future.set_result(None) if error is None else future.set_exception(RuntimeError(error))

        threading.Thread(target=wait_reply, daemon=True).start()
        return future

    def kv_failed(self, req_id: str, reason: str | None) -> None:
        self.failed.append((req_id, reason))


def gloo_decode_main(init: str, notices: Any, replies: Any, peers: Any, results: Any) -> None:
    cache = torch.zeros_like(make_cache(16))  # [2, 2, 16, 4, 2, 16]
    sink = RecordingSink(cache)
    side = make_connector(TransferConfig(secret=SECRET, backend="nccl")).receive_side(
        sink, KVLayout.from_cache(cache, MODEL), "cpu", 0
    )
    side.join_group(0, 2, init, "cpu")  # returns once the prefill side has joined too
    # what reserve() would put in each handle: the peer, and each request's credential
    peers.put((side.peer(), {r: side.expect(r, [2 * len(r), 11]) for r in ("a", "lost", "b")}))
    results.put(("peer", side.peer()))
    while (notice := notices.get(timeout=30)) is not None:
        try:
            side.receive_notice(notice)
            replies.put(None)
        except Exception as exc:
            replies.put(repr(exc))
    calls = [(a.req_id, a.first_token_id, a.block_ids, a.started_at, layers) for a, layers, _ in sink.calls]
    results.put(("decode", (calls, cache.numpy().copy())))  # numpy: pickled, not shared memory
    side.close()


def gloo_prefill_main(init: str, notices: Any, replies: Any, peers: Any, results: Any) -> None:
    os.environ["PDSERVE_KV_CHUNK_LAYERS"] = "1"  # 2 layer chunks per request: pipelined delivery
    links: dict[str, QueueLink] = {}
    side = make_connector(TransferConfig(secret=SECRET, backend="nccl")).send_side(MODEL, links)
    links["decode-0"] = QueueLink(notices, replies)  # filled in after the side was made
    side.join_group(1, 2, init, "cpu")
    peer, credentials = peers.get(timeout=30)
    source = make_cache(8, seed=4)
    layout = KVLayout.from_cache(source, MODEL)
    outcomes = []
    for req_id, worker, token in (("a", "decode-0", 31_999), ("lost", "decode-9", 1), ("b", "decode-0", 7)):
        handle = KVHandle(
            req_id, worker, [2 * len(req_id), 11], 8, layout, peer, credential=credentials[req_id]
        )
        try:
            side.send(handle, CacheBlocks(source, [3, 6]), token)
            outcomes.append((req_id, "ok"))
        except KVTransferError as exc:
            outcomes.append((req_id, str(exc)))
    notices.put(None)
    results.put(("prefill", outcomes))
    side.close()


def test_gloo_first_token_arrives_with_each_layer_chunk() -> None:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.get_context("spawn")
    init = f"tcp://127.0.0.1:{free_port()}"
    notices, replies, peers, results = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    args = (init, notices, replies, peers, results)
    processes = [ctx.Process(target=main, args=args) for main in (gloo_decode_main, gloo_prefill_main)]
    for process in processes:
        process.start()
    reports: dict[str, Any] = {}
    try:
        while len(reports) < 3:
            name, report = results.get(timeout=60)
            reports[name] = report
    except queue.Empty:
        pytest.fail(f"reported: {sorted(reports)} (see captured stderr)")
    finally:
        for process in processes:
            process.join(timeout=15)
            if process.is_alive():
                process.kill()
    assert reports["peer"] == NcclPeer(0)
    outcomes = dict(reports["prefill"])
    assert outcomes["a"] == outcomes["b"] == "ok"
    assert "no link to decode worker 'decode-9'" in outcomes["lost"]  # nothing sent: still in step
    calls, cache = reports["decode"][0], torch.from_numpy(reports["decode"][1])
    assert [(req, token, ids, layers) for req, token, ids, _, layers in calls] == [
        ("a", 31_999, (2, 11), slice(0, 1)),
        ("a", 31_999, (2, 11), slice(1, 2)),
        ("b", 7, (2, 11), slice(0, 1)),
        ("b", 7, (2, 11), slice(1, 2)),
    ]
    assert calls[0][3] == calls[1][3] < calls[2][3]  # one started_at per request
    source = make_cache(8, seed=4)
    assert torch.equal(bits(cache[:, :, [2, 11]]), bits(source[:, :, [3, 6]]))
