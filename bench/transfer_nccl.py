"""KV transfer between two GPUs through the nccl backend, pack and unpack included.

`python -m pdserve.bench.transfer_nccl [--tokens 2048] [--json PATH]` spawns two processes (one
per GPU): rank 0 holds a prefill-side cache, rank 1 a decode-side cache, both in the
Llama-3-8B layout (32 layers, 8 KV heads, head_dim 128, bf16, block 16). Each round ships
one request's blocks with `NcclKVSender.send`, which returns once the receiver has
unpacked them. Two ways, in the same run: pipelined (layer chunks of `--chunk-layers`,
default: the sender's >= 32 MiB chunks; pack of chunk k+1 and unpack of chunk k overlap the
send of chunk k; the receiver's sink, `packing.unpack_into`, unpacks chunk by chunk) and serialized (one
chunk: gather, send, scatter). It reports both end-to-end rates next to a raw `dist.send`
of the same bytes, and checks the data arrived bit-exact.
With `--cpu` it runs on gloo (a smoke run of the same code).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pdserve.transfer.contract import KVHandle
from pdserve.transfer.credentials import KVGate
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.nccl_backend import NcclKVReceiver, NcclKVSender
from pdserve.transfer.nccl_group import init_transfer_group
from pdserve.transfer.packing import unpack_into
from pdserve.transfer.peers import NcclPeer
from pdserve.transfer.source import CacheBlocks

MODEL = "llama3-8b-shape"


def cache_shape(args) -> tuple[int, ...]:
    return (args.layers, 2, args.num_blocks, 16, 8, 128)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


PROFILED_ROUNDS = 3
SECRET = "bench-transfer-nccl"  # both ranks' deployment secret
SHOWN_HOST_CALL_NS = 20_000  # host CUDA/NCCL calls and ops at least this long are listed


def start_profiler():
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    profiler.start()
    return profiler


def profiled_events(profiler) -> list[tuple[int, int, str, str]]:
    """(start ns, end ns, kind, name) of a stopped profiler's events: every GPU op ("gpu"), every
    host annotation ("range"), and host calls of SHOWN_HOST_CALL_NS or more ("host"). Kineto
    stamps both processes with the same host clock, so the two ranks' lists line up."""
    events = []
    for event in profiler.profiler.kineto_results.events():
        on_host = event.device_type() == torch.autograd.DeviceType.CPU
        start, end = event.start_ns(), event.start_ns() + event.duration_ns()
        if event.is_user_annotation():
            if on_host:
                events.append((start, end, "range", event.name()))
        elif not on_host:
            events.append((start, end, "gpu", event.name()))
        elif end - start >= SHOWN_HOST_CALL_NS:
            events.append((start, end, "host", event.name()))
    return sorted(events)


def round_timelines(sender_events: list, receiver_events: list) -> dict[str, list[tuple]]:
    """For each profiled round on the sender ("serial round 1", ...): both ranks' events inside
    it as (us from the round's start, us long, rank, kind, name)."""
    rounds = {}
    for start, end, kind, name in sender_events:
        if kind != "range" or " round " not in name:
            continue
        rows = [
            (round((s - start) / 1e3, 1), round((e - s) / 1e3, 1), rank, k, n[:70])
            for rank, events in ((0, sender_events), (1, receiver_events))
            for s, e, k, n in events
            if s >= start and s < end and n != name
        ]
        rounds[name] = sorted(rows) + [(round((end - start) / 1e3, 1), 0.0, 0, "end", name)]
    return rounds


@dataclass
class RankSetup:
    """One rank's cache and the request's blocks: scattered on the sender, contiguous on the receiver."""

    device: str
    cache: torch.Tensor  # cache_shape(args)
    layout: KVLayout
    src_blocks: list[int]
    dst_blocks: list[int]
    nbytes: int  # the request's KV bytes


def set_up_rank(rank: int, args, init: str) -> RankSetup:
    device = "cpu" if args.cpu else f"cuda:{rank}"
    init_transfer_group(rank, 2, init, device, timeout_s=120)
    dtype = torch.float32 if args.cpu else torch.bfloat16
    n_blocks = args.tokens // 16
    gen = torch.Generator(device=device).manual_seed(rank)
    cache = torch.randn(cache_shape(args), dtype=torch.float32, device=device, generator=gen).to(dtype)
    src_blocks = list(range(3, 3 + 2 * n_blocks, 2))  # scattered, as in a real cache
    dst_blocks = list(range(n_blocks, 2 * n_blocks))
    nbytes = n_blocks * cache[:, :, 0].numel() * cache.element_size()
    return RankSetup(device, cache, KVLayout.from_cache(cache, MODEL), src_blocks, dst_blocks, nbytes)


def serve_notices(setup: RankSetup, args, notices, replies, results) -> None:
    """The decode rank: serve the sender's notices until it says stop, then report a checksum."""
    device, cache, nbytes = setup.device, setup.cache, setup.nbytes
    gate = KVGate(SECRET)
    receiver = NcclKVReceiver(
        unpack_into(cache), setup.layout, device, gate, timeout_s=120
    )  # unpacks chunk by chunk
    # One reservation (credential) per send the sender will make, as reserve() would issue them.
    sends = 2 * (args.warmup + args.rounds + PROFILED_ROUNDS)
    replies.put([gate.issue(f"r{i}", setup.dst_blocks, nbytes) for i in range(sends)])
    profiler = None
    while (notice := notices.get()) is not None:
        if notice in ("profile-start", "profile-stop"):  # the sender's profiled rounds
            if notice == "profile-start":
                profiler = start_profiler()
            else:
                profiler.stop()
                results.put(("profile 1", profiled_events(profiler)))
            replies.put("ok")
            continue
        if notice == "raw":
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            dist.recv(buf, src=0)
            _sync(device)
            replies.put("ok")
            continue
        receiver.recv(notice)
        replies.put("ok")
    results.put(("checksum", cache[:, :, setup.dst_blocks].float().sum().item()))


def timed_rounds(send: Callable[[], object], args, device: str) -> list[float]:
    """Seconds of each of `args.rounds` sends after `args.warmup` untimed ones."""
    times = []
    for i in range(args.warmup + args.rounds):
        _sync(device)
        t0 = time.perf_counter()
        send()
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
    return times


def send_rounds(setup: RankSetup, args, notices, replies, results) -> None:
    """The prefill rank: time pipelined and serial `NcclKVSender.send`s and raw `dist.send`s of
    the same bytes (then, with --profile, a few profiled rounds of each); report them."""
    device, cache, src_blocks = setup.device, setup.cache, setup.src_blocks

    def notify(notice):
        fut: Future = Future()
        notices.put(notice)
        threading.Thread(target=lambda: fut.set_result(replies.get()), daemon=True).start()
        return fut

    credentials = iter(enumerate(replies.get()))  # the decode rank's reservations, one per send

    def handle() -> KVHandle:
        i, credential = next(credentials)
        return KVHandle(
            f"r{i}",
            "decode-0",
            setup.dst_blocks,
            args.tokens,
            setup.layout,
            NcclPeer(1),
            credential=credential,
        )

    senders = {
        mode: NcclKVSender(0, MODEL, SECRET, notify=notify, timeout_s=120, chunk_layers=chunk_layers)
        for mode, chunk_layers in (("pipelined", args.chunk_layers), ("serial", 0))
    }
    chunks = 0.0

    def send(mode: str) -> None:  # returns when the blocks are unpacked there
        nonlocal chunks
        stats = senders[mode].send(handle(), CacheBlocks(cache, src_blocks), 0)
        if mode == "pipelined":
            chunks = stats.extra["chunks"]

    timed = {mode: timed_rounds(lambda mode=mode: send(mode), args, device) for mode in senders}
    buf = torch.empty(setup.nbytes, dtype=torch.uint8, device=device)

    def raw_send() -> None:
        notices.put("raw")
        dist.send(buf, dst=1)
        replies.get()

    raw_times = timed_rounds(raw_send, args, device)
    if args.profile:  # a few more rounds of each mode, both ranks under torch.profiler
        sends = [(mode, lambda mode=mode: send(mode)) for mode in senders]
        profile_rounds(sends + [("raw", raw_send)], device, notices, replies, results)
    notices.put(None)
    checksum = cache[:, :, src_blocks].float().sum().item()
    results.put(("send", setup.nbytes, timed, raw_times, checksum, chunks))


def profile_rounds(
    sends: list[tuple[str, Callable[[], None]]], device: str, notices, replies, results
) -> None:
    """PROFILED_ROUNDS rounds of each send, this rank and (by notice) the decode rank profiled."""
    notices.put("profile-start")
    replies.get()
    profiler = start_profiler()
    for mode, send in sends:
        for r in range(PROFILED_ROUNDS):
            _sync(device)
            with torch.profiler.record_function(f"{mode} round {r}"):
                send()
    profiler.stop()
    notices.put("profile-stop")
    replies.get()
    results.put(("profile 0", profiled_events(profiler)))


def worker(rank: int, args, init: str, notices, replies, results) -> None:
    setup = set_up_rank(rank, args, init)
    if rank == 1:  # decode side
        serve_notices(setup, args, notices, replies, results)
    else:
        send_rounds(setup, args, notices, replies, results)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--num-blocks", type=int, default=600)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cpu", action="store_true", help="gloo on CPU tensors (smoke run)")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--profile", metavar="PATH", help="profile a few more rounds on both ranks; timelines to PATH"
    )
    p.add_argument(
        "--chunk-layers",
        type=int,
        default=None,
        help="layers per pipelined chunk (default: the sender's, >= 32 MiB per chunk; 0 = one chunk)",
    )
    args = p.parse_args(argv)
    if not args.cpu and torch.cuda.device_count() < 2:
        raise SystemExit("needs two GPUs (or --cpu)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    ctx = mp.get_context("spawn")
    notices, replies, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args, init, notices, replies, results)) for r in (0, 1)]
    for proc in procs:
        proc.start()
    expected = 4 if args.profile else 2
    got = dict((item[0], item[1:]) for item in (results.get(timeout=600) for _ in range(expected)))
    for proc in procs:
        proc.join(60)
    nbytes, timed, raw_times, src_sum, chunks = got["send"]
    (dst_sum,) = got["checksum"]
    raw_med = statistics.median(raw_times)
    row = {
        "device": "cpu (gloo)" if args.cpu else torch.cuda.get_device_name(0),
        "tokens": args.tokens,
        "nbytes": nbytes,
        "chunk_layers": args.chunk_layers,
        "chunks": chunks,
        "raw_send_ms_median": raw_med * 1e3,
        "raw_send_GBps_median": nbytes / raw_med / 1e9,
        "bit_exact": src_sum == dst_sum,
    }
    for mode, times in timed.items():
        med = statistics.median(times)
        row[f"{mode}_ms_median"] = med * 1e3
        row[f"{mode}_GBps_median"] = nbytes / med / 1e9
        row[f"{mode}_GBps_best"] = nbytes / min(times) / 1e9
        row[f"{mode}_ratio_to_raw_send"] = raw_med / med
    print(f"KV transfer of a {args.tokens}-token prompt ({nbytes / 1e6:.0f} MB), pack + send + unpack:")
    for mode in timed:
        label = f"{mode} ({chunks:.0f} chunks)" if mode == "pipelined" else mode
        print(
            f"  {label:<24}{row[f'{mode}_ms_median']:8.2f} ms  {row[f'{mode}_GBps_median']:7.1f} GB/s "
            f"(best {row[f'{mode}_GBps_best']:.1f}; {row[f'{mode}_ratio_to_raw_send']:.2f} of raw)"
        )
    print(f"  {'raw send':<24}{row['raw_send_ms_median']:8.2f} ms  {row['raw_send_GBps_median']:7.1f} GB/s")
    print(f"  data bit-exact: {row['bit_exact']}")
    if args.profile:
        rounds = round_timelines(got["profile 0"][0], got["profile 1"][0])
        with open(args.profile, "w") as f:
            json.dump(rounds, f, indent=1)
        for name in (f"{mode} round {PROFILED_ROUNDS - 1}" for mode in (*timed, "raw")):
            print(f"  {name} (us from its start, us long, rank, kind, name):")
            for row_ in rounds[name]:
                print("    " + " ".join(str(x) for x in row_))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
