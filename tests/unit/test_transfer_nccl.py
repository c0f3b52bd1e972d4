"""The nccl backend on CPU (gloo): real processes, a real process group, bit-exact blocks.

Each test spawns one receiver process and one or two sender processes. The sender's
`notify` travels over a multiprocessing queue to the receiver's loop (standing in for
the Ray call the wiring layer makes); the reply comes back on a per-sender queue and
completes the sender's `concurrent.futures.Future`.
"""

from __future__ import annotations

import os
import queue
import socket
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from pdserve.transfer.contract import KVHandle
from pdserve.transfer.credentials import KVGate
from pdserve.transfer.layout import KVLayout, KVLayoutMismatch
from pdserve.transfer.nccl_backend import NcclKVReceiver, NcclKVSender, NcclTransferNotice
from pdserve.transfer.nccl_group import destroy_transfer_group, init_transfer_group
from pdserve.transfer.packing import buffer_nbytes, to_bytes, unpack_into
from pdserve.transfer.peers import GrpcPeer, NcclPeer
from pdserve.transfer.source import CacheBlocks

MODEL = "tiny"
FIRST_TOKEN = 4242  # the first sampled token every send carries
SEND_TIMEOUT_S = 3.0  # sender's wait for the receiver's confirmation
NUM_RECEIVER_BLOCKS = 24
SECRET = "nccl-tests-deployment-secret"


def make_cache(num_blocks: int, dtype: torch.dtype | str, seed: int) -> torch.Tensor:
    # [num_layers=2, 2, num_blocks, block_size=4, Hkv=2, D=16]
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, num_blocks, 4, 2, 16, generator=generator).to(dtype)


def device_for(rank: int, use_cuda: bool) -> str:
    return f"cuda:{rank}" if use_cuda else "cpu"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def receiver_main(
    rank: int,
    world: int,
    init: str,
    notices: Any,
    replies: list[Any],
    results: Any,
    slow_released: Any,
    use_cuda: bool,
    plans: dict[int, list[tuple]],
) -> None:
    device = device_for(rank, use_cuda)
    init_transfer_group(rank, world, init, device, timeout_s=20)
    caches = {
        dtype: torch.zeros_like(make_cache(NUM_RECEIVER_BLOCKS, dtype, 0)).to(device)
        for dtype in ("float32", "bfloat16")
    }
    gates = {name: KVGate(SECRET) for name in caches}
    receivers = {
        name: NcclKVReceiver(
            unpack_into(cache), KVLayout.from_cache(cache, MODEL), device, gates[name], timeout_s=10
        )
        for name, cache in caches.items()
    }
    for sender_rank, plan in plans.items():  # each request's reservation, as reserve() makes it
        credentials = {}
        for req_id, _, _, dst_ids, handle_dtype in plan:
            name = handle_dtype if handle_dtype in receivers else "float32"
            nbytes = buffer_nbytes(receivers[name].expected_layout, len(dst_ids))
            credentials[req_id] = gates[name].issue(req_id, dst_ids, nbytes)
        replies[sender_rank].put(("credentials", credentials))
    senders_left = world - 1
    while senders_left:
        notice: NcclTransferNotice | None = notices.get(timeout=30)
        if notice is None:
            senders_left -= 1
            continue
        if notice.req_id.startswith("slow"):  # stall until the sender has given up on this request
            assert slow_released.wait(timeout=30)
        # Unknown dtypes go to the float32 receiver, which must refuse them (after draining).
        receiver = receivers.get(notice.dtype, receivers["float32"])
        try:
            receiver.recv(notice)
            reply = (notice.req_id, None, "")
        except Exception as exc:
            reply = (notice.req_id, type(exc).__name__, str(exc))
        replies[notice.src_rank].put(reply)
    results.put(("receiver", {name: bytes(to_bytes(cache.cpu())) for name, cache in caches.items()}))
    destroy_transfer_group()


def sender_main(
    rank: int,
    world: int,
    init: str,
    plan: list[tuple],
    notices: Any,
    reply_queue: Any,
    results: Any,
    slow_released: Any,
    use_cuda: bool,
) -> None:
    device = device_for(rank, use_cuda)
    init_transfer_group(rank, world, init, device, timeout_s=20)
    pending: dict[str, Future] = {}
    pending_lock = threading.Lock()
    _, credentials = reply_queue.get(timeout=30)  # the receiver's reservations of our plan

    def listen() -> None:  # completes futures as the receiver's replies arrive
        while True:
            req_id, error_type, message = reply_queue.get()
            with pending_lock:
                future = pending.pop(req_id)
            if error_type is None:
                future.set_result(None)
            elif error_type == "KVLayoutMismatch":
                future.set_exception(KVLayoutMismatch(message))
            else:
                future.set_exception(RuntimeError(f"{error_type}: {message}"))

    threading.Thread(target=listen, daemon=True).start()

    def notify(notice: NcclTransferNotice) -> Future:
        future: Future = Future()
        with pending_lock:
            pending[notice.req_id] = future
        notices.put(notice)
        return future

    sender = NcclKVSender(rank, MODEL, SECRET, notify, timeout_s=SEND_TIMEOUT_S)
    outcomes = []
    for req_id, dtype_name, src_ids, dst_ids, handle_dtype in plan:
        cache = make_cache(16, getattr(torch, dtype_name), seed=rank).to(device)
        layout = KVLayout.from_cache(cache, MODEL)
        if handle_dtype != dtype_name:  # a handle that lies about the decode layout
            layout = KVLayout.from_cache(cache.to(getattr(torch, handle_dtype)), MODEL)
            cache = cache.to(getattr(torch, handle_dtype))
        credential = credentials[req_id]
        handle = KVHandle(
            req_id, "decode-0", dst_ids, len(dst_ids) * 4, layout, NcclPeer(0), credential=credential
        )
        try:
            stats = sender.send(handle, CacheBlocks(cache, src_ids), FIRST_TOKEN)
            outcomes.append((req_id, "ok", stats.nbytes))
        except Exception as exc:
            outcomes.append((req_id, type(exc).__name__, str(exc)))
        if req_id.startswith("slow"):
            slow_released.set()
    deadline = time.monotonic() + 10
    while pending and time.monotonic() < deadline:  # let a late receiver finish before tearing down
        time.sleep(0.05)
    notices.put(None)
    for dst, why in sender.broken_peers().items():  # what the prefill worker reports to the router
        outcomes.append((f"broken-peer-{dst}", "reported", why))
    results.put((f"sender{rank}", outcomes))
    destroy_transfer_group()


def run_world(plans: dict[int, list[tuple]], use_cuda: bool = False) -> dict[str, Any]:
    """Rank 0 receives; ranks 1.. send `plans[rank]`. Returns what each process reported."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # inherited by the spawned children
    ctx = mp.get_context("spawn")
    world = len(plans) + 1
    init = f"tcp://127.0.0.1:{free_port()}"
    notices, results, slow_released = ctx.Queue(), ctx.Queue(), ctx.Event()
    replies = [ctx.Queue() for _ in range(world)]
    receiver_args = (0, world, init, notices, replies, results, slow_released, use_cuda, plans)
    processes = [ctx.Process(target=receiver_main, args=receiver_args)]
    for rank, plan in plans.items():
        args = (rank, world, init, plan, notices, replies[rank], results, slow_released, use_cuda)
        processes.append(ctx.Process(target=sender_main, args=args))
    for process in processes:
        process.start()
    reports: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    try:
        while len(reports) < len(processes):
            try:
                name, report = results.get(timeout=0.2)
                reports[name] = report
                continue
            except queue.Empty:
                pass
            crashed = [p.name for p in processes if p.exitcode not in (None, 0)]
            if crashed or time.monotonic() > deadline:
                pytest.fail(f"crashed: {crashed}; reported: {sorted(reports)} (see captured stderr)")
    finally:
        for process in processes:
            process.join(timeout=15)
            if process.is_alive():
                process.kill()
    return reports


def expected_receiver_cache(
    dtype_name: str, plans: dict[int, list[tuple]], delivered: set[str]
) -> torch.Tensor:
    dtype = getattr(torch, dtype_name)
    expected = torch.zeros_like(make_cache(NUM_RECEIVER_BLOCKS, dtype, 0))
    for rank, plan in plans.items():
        source = make_cache(16, dtype, seed=rank)
        for req_id, plan_dtype, src_ids, dst_ids, _ in plan:
            if plan_dtype == dtype_name and req_id in delivered:
                expected[:, :, dst_ids] = source[:, :, src_ids]
    return expected


def assert_cache_equals(report_bytes: bytes, expected: torch.Tensor) -> None:
    assert report_bytes == bytes(to_bytes(expected.contiguous()))  # bit for bit


def test_two_processes_float32_and_bfloat16_bit_exact_with_refusal_and_timeout() -> None:
    plans = {
        1: [
            ("f32-a", "float32", [3, 1, 4], [10, 0, 5], "float32"),
            ("bf16-a", "bfloat16", [15, 9], [2, 23], "bfloat16"),
            # the handle claims float16; the receiver expects float32, drains the bytes and refuses
            ("f16-mismatch", "float32", [0], [7], "float16"),
            ("f32-b", "float32", [2, 6, 5, 8], [1, 3, 11, 12], "float32"),  # still in step
            ("bf16-b", "bfloat16", [0, 1, 2, 3, 4], [17, 18, 19, 20, 21], "bfloat16"),
            ("slow-f32", "float32", [7], [22], "float32"),  # confirmation arrives after the timeout
            ("after-slow", "float32", [9], [23], "float32"),  # refused: the pair may be out of step
        ]
    }
    reports = run_world(plans)
    outcomes = {req_id: (status, detail) for req_id, status, detail in reports["sender1"]}
    for req_id in ("f32-a", "bf16-a", "f32-b", "bf16-b"):
        assert outcomes[req_id][0] == "ok", outcomes[req_id]
    assert outcomes["bf16-a"][1] == 2 * 2 * 2 * 4 * 2 * 16 * 2  # nbytes of 2 bf16 blocks
    assert outcomes["f16-mismatch"][0] == "KVLayoutMismatch"
    assert "dtype: prefill 'float16' != decode 'float32'" in outcomes["f16-mismatch"][1]
    assert outcomes["slow-f32"][0] == "KVTransferError" and "no confirmation" in outcomes["slow-f32"][1]
    assert outcomes["after-slow"][0] == "KVTransferError" and "unusable" in outcomes["after-slow"][1]
    broken = outcomes["broken-peer-0"][1]
    assert broken.startswith("request slow-f32 got no confirmation within"), broken
    # The slow request did land (late); the refused ones never touched the cache.
    delivered = {"f32-a", "bf16-a", "f32-b", "bf16-b", "slow-f32"}
    for dtype_name in ("float32", "bfloat16"):
        expected = expected_receiver_cache(dtype_name, plans, delivered)
        assert_cache_equals(reports["receiver"][dtype_name], expected)


TWO_SENDER_PLANS = {
    1: [
        ("s1-f32-a", "float32", [0, 1, 2], [0, 1, 2], "float32"),
        ("s1-bf16-a", "bfloat16", [5, 6], [3, 4], "bfloat16"),
        ("s1-f32-b", "float32", [15, 14, 13, 12], [5, 6, 7, 8], "float32"),
    ],
    2: [
        ("s2-f32-a", "float32", [0, 1, 2], [12, 13, 14], "float32"),
        ("s2-bf16-a", "bfloat16", [7, 8, 9], [20, 21, 22], "bfloat16"),
        ("s2-bf16-b", "bfloat16", [1], [9], "bfloat16"),
    ],
}


def check_sender_world(plans: dict[int, list[tuple]], use_cuda: bool) -> None:
    reports = run_world(plans, use_cuda)
    for rank in plans:
        assert all(status == "ok" for _, status, _ in reports[f"sender{rank}"]), reports[f"sender{rank}"]
    delivered = {req_id for plan in plans.values() for req_id, *_ in plan}
    for dtype_name in ("float32", "bfloat16"):
        expected = expected_receiver_cache(dtype_name, plans, delivered)
        assert_cache_equals(reports["receiver"][dtype_name], expected)


def test_two_senders_one_receiver_bit_exact() -> None:
    check_sender_world(TWO_SENDER_PLANS, use_cuda=False)


@pytest.mark.gpu
@pytest.mark.parametrize("num_senders", [1, 2])
def test_senders_to_one_receiver_bit_exact_over_nccl(num_senders: int) -> None:
    if torch.cuda.device_count() < num_senders + 1:
        pytest.skip(f"needs {num_senders + 1} CUDA GPUs (one per rank)")
    plans = {rank: TWO_SENDER_PLANS[rank] for rank in range(1, num_senders + 1)}
    check_sender_world(plans, use_cuda=True)


def test_sender_refuses_bad_arguments_before_touching_the_group() -> None:
    cache = make_cache(4, torch.float32, 0)
    layout = KVLayout.from_cache(cache, MODEL)
    sender = NcclKVSender(0, MODEL, SECRET, notify=lambda notice: Future())
    with pytest.raises(ValueError, match="no transfer credential"):
        sender.send(KVHandle("r", "d", [0], 4, layout, NcclPeer(1)), CacheBlocks(cache, [1]), FIRST_TOKEN)
    with pytest.raises(ValueError, match="own rank"):
        sender.send(
            KVHandle("r", "d", [0], 4, layout, NcclPeer(0), credential=b"c"),
            CacheBlocks(cache, [1]),
            FIRST_TOKEN,
        )
    with pytest.raises(ValueError, match="nccl backend needs an NcclPeer"):
        sender.send(
            KVHandle("r", "d", [0], 4, layout, GrpcPeer("127.0.0.1:1")), CacheBlocks(cache, [1]), FIRST_TOKEN
        )
    other = KVLayout(MODEL, "float32", 2, 2, 16, block_size=8)
    with pytest.raises(KVLayoutMismatch, match="block_size: prefill 4 != decode 8"):
        sender.send(
            KVHandle("r", "d", [0], 4, other, NcclPeer(1), credential=b"c"),
            CacheBlocks(cache, [1]),
            FIRST_TOKEN,
        )
