"""KV packing and host-path transfer throughput.

    python -m pdserve.bench.transfer                 # Llama-3-8B-shaped cache, 2,048-token request (GPU)
    python -m pdserve.bench.transfer --small         # CPU-sized run, < 30 s
    python -m pdserve.bench.transfer --json out.json
    python -m pdserve.bench.transfer --chunk-layers 4   # also pack/unpack in 4-layer chunks
    python -m pdserve.bench.transfer --grpc-in-band     # gRPC bytes on the stream, not the socket data plane

Measures, on the current device, for one request's blocks (scattered block ids):
  pack         pack_blocks into a pooled buffer [L, 2, n, bs, Hkv, D] (Triton kernel on CUDA)
  unpack       unpack_blocks into another cache (Triton kernel on CUDA)
  pack_torch   one index_select on dim 2 (the fallback, and the path before the kernel)
  unpack_torch one index_copy_ on dim 2
  pack_chunked / unpack_chunked  the same, one `layers=` chunk at a time (--chunk-layers)
  copy         a plain contiguous device-to-device copy of the same bytes (the ceiling)
reported as GB/s of bytes read + written, and as a ratio to `copy`; then the gRPC host
path end to end (pack -> host -> stream over 127.0.0.1 -> reassemble -> unpack), as
payload GB/s. Times are the best of N runs, with the device synchronized (a shared
CPU box is noisy; the best run is the most repeatable figure).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from pdserve.transfer.contract import KVHandle
from pdserve.transfer.credentials import KVGate
from pdserve.transfer.grpc_backend import GrpcKVSender
from pdserve.transfer.grpc_data import MAX_DATA_STREAMS, num_data_streams
from pdserve.transfer.grpc_server import GrpcKVServer
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.packing import buffer_nbytes, layer_chunks, pack_blocks, unpack_blocks, unpack_into
from pdserve.transfer.peers import GrpcPeer
from pdserve.transfer.source import CacheBlocks


@dataclass
class BenchConfig:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    num_cache_blocks: int
    request_blocks: int
    iters: int
    grpc_iters: int


BENCH_SECRET = "bench-transfer"  # the deployment secret of the bench's sender and server
FULL = BenchConfig(
    32, 8, 128, 16, "bfloat16", num_cache_blocks=512, request_blocks=128, iters=20, grpc_iters=5
)
SMALL = BenchConfig(
    8, 8, 128, 16, "bfloat16", num_cache_blocks=128, request_blocks=64, iters=10, grpc_iters=3
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], iters: int, device: torch.device, warmup: int = 2) -> float:
    """Fastest of `iters` timed runs: the least disturbed by other work on a shared machine."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


@dataclass
class BenchCaches:
    """A source and a destination cache of the bench's shape, and one request's scattered block ids."""

    src: torch.Tensor  # [num_layers, 2, num_cache_blocks, block_size, Hkv, D]
    dst: torch.Tensor
    layout: KVLayout
    src_ids: list[int]
    dst_ids: list[int]

    def check_moved(self, what: str) -> None:
        assert torch.equal(self.dst[:, :, self.dst_ids], self.src[:, :, self.src_ids]), f"{what} lost data"


def make_caches(config: BenchConfig, device: torch.device, seed: int) -> BenchCaches:
    dtype = getattr(torch, config.dtype)
    # [num_layers, 2, num_cache_blocks, block_size, Hkv, D]
    shape = (
        config.num_layers,
        2,
        config.num_cache_blocks,
        config.block_size,
        config.num_kv_heads,
        config.head_dim,
    )
    generator = torch.Generator().manual_seed(seed)
    src_cache = torch.randn(shape, generator=generator).to(dtype).to(device)
    n = config.request_blocks
    # Scattered ids, as a real block table after some churn.
    src_ids = torch.randperm(config.num_cache_blocks, generator=generator)[:n].tolist()
    dst_ids = torch.randperm(config.num_cache_blocks, generator=generator)[:n].tolist()
    layout = KVLayout.from_cache(src_cache, "bench")
    return BenchCaches(src_cache, torch.zeros_like(src_cache), layout, src_ids, dst_ids)


def time_device_paths(
    config: BenchConfig, device: torch.device, caches: BenchCaches, chunk_layers: int
) -> tuple[dict[str, float], float]:
    """Best seconds of each pack/unpack path (see the module's docstring), and of the plain copy."""
    src_cache, dst_cache, src_ids, dst_ids = caches.src, caches.dst, caches.src_ids, caches.dst_ids
    n = len(src_ids)
    buffer = torch.empty(caches.layout.buffer_shape(n), dtype=src_cache.dtype, device=device)  # pooled
    pack_s = best_seconds(lambda: pack_blocks(src_cache, src_ids, out=buffer), config.iters, device)
    unpack_s = best_seconds(lambda: unpack_blocks(dst_cache, buffer, dst_ids), config.iters, device)
    flat_src = src_cache.reshape(-1)[: buffer_nbytes(caches.layout, n) // src_cache.dtype.itemsize]
    flat_dst = torch.empty_like(flat_src)
    copy_s = best_seconds(lambda: flat_dst.copy_(flat_src), config.iters, device)
    caches.check_moved("pack/unpack")
    src_index = torch.tensor(src_ids, device=device)
    dst_index = torch.tensor(dst_ids, device=device)
    seconds = {
        "pack": pack_s,
        "unpack": unpack_s,
        "pack_torch": best_seconds(
            lambda: torch.index_select(src_cache, 2, src_index, out=buffer), config.iters, device
        ),
        "unpack_torch": best_seconds(
            lambda: dst_cache.index_copy_(2, dst_index, buffer), config.iters, device
        ),
    }
    chunks = layer_chunks(config.num_layers, chunk_layers)
    if len(chunks) > 1:

        def pack_chunked() -> None:
            for layers in chunks:
                pack_blocks(src_cache, src_ids, out=buffer[layers], layers=layers)

        def unpack_chunked() -> None:
            for layers in chunks:
                unpack_blocks(dst_cache, buffer[layers], dst_ids, layers=layers)

        seconds["pack_chunked"] = best_seconds(pack_chunked, config.iters, device)
        seconds["unpack_chunked"] = best_seconds(unpack_chunked, config.iters, device)
    caches.check_moved("pack/unpack")
    return seconds, copy_s


def bench_grpc_paths(
    config: BenchConfig, device: torch.device, caches: BenchCaches, in_band: bool, data_streams: int
) -> dict[str, float]:
    """The gRPC host path; over the socket data plane also over one data connection, the
    striping's baseline (keys `*_one_stream`, and the speedup)."""
    args = (config, caches.src, caches.src_ids, caches.dst_ids, caches.layout, device)
    result = bench_grpc(*args, in_band, data_streams)
    if not in_band:
        one = bench_grpc(*args, max_data_streams=1)
        result.update({f"{key}_one_stream": value for key, value in one.items()})
        result["grpc_streams_speedup"] = one["grpc_ms"] / result["grpc_ms"]
    return result


def run(
    config: BenchConfig,
    device: torch.device,
    seed: int = 0,
    chunk_layers: int = 0,
    grpc_in_band: bool = False,
    data_streams: int = MAX_DATA_STREAMS,
) -> dict[str, object]:
    caches = make_caches(config, device, seed)
    nbytes = buffer_nbytes(caches.layout, config.request_blocks)
    seconds, copy_s = time_device_paths(config, device, caches, chunk_layers)
    grpc_result = bench_grpc_paths(config, device, caches, grpc_in_band, data_streams)

    def gbps(seconds: float, moved: int) -> float:
        return moved / seconds / 1e9

    copy_gbps = gbps(copy_s, 2 * nbytes)
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "config": asdict(config),
        "request_nbytes": nbytes,
        "chunk_layers": chunk_layers,
        "paths": list(seconds),
        **{f"{name}_ms": s * 1e3 for name, s in seconds.items()},
        **{f"{name}_gbps": gbps(s, 2 * nbytes) for name, s in seconds.items()},
        **{f"{name}_vs_copy": gbps(s, 2 * nbytes) / copy_gbps for name, s in seconds.items()},
        # pack + unpack back to back, as GB/s of bytes read + written by both, vs copy
        "pack_unpack_vs_copy": 2 * copy_s / (seconds["pack"] + seconds["unpack"]),
        "copy_ms": copy_s * 1e3,
        "copy_gbps": copy_gbps,
        **grpc_result,
    }


def bench_grpc(
    config: BenchConfig,
    src_cache: torch.Tensor,
    src_ids: list[int],
    dst_ids: list[int],
    layout: KVLayout,
    device: torch.device,
    in_band: bool = False,
    max_data_streams: int = MAX_DATA_STREAMS,
) -> dict[str, float]:
    recv_cache = torch.zeros_like(src_cache)
    gate = KVGate(BENCH_SECRET)
    server = GrpcKVServer(  # as a decode worker runs it: bytes go on to its device as they land
        "127.0.0.1:0", unpack_into(recv_cache), layout, gate=gate, max_data_streams=max_data_streams,
        device=device,
    )  # fmt: skip
    server.start()
    sender = GrpcKVSender("bench", BENCH_SECRET, **({"socket_min_bytes": None} if in_band else {}))

    def handle() -> KVHandle:  # a fresh reservation per send, as the decode worker's reserve makes it
        credential = gate.issue("bench", dst_ids, buffer_nbytes(layout, len(dst_ids)))
        return KVHandle("bench", "decode-0", dst_ids, len(dst_ids) * config.block_size, layout,
                        GrpcPeer(server.address), credential=credential)  # fmt: skip

    try:
        stats = []
        seconds = best_seconds(
            lambda: stats.append(sender.send(handle(), CacheBlocks(src_cache, src_ids), 0)),
            config.grpc_iters,
            device,
            1,
        )
        assert torch.equal(recv_cache[:, :, dst_ids], src_cache[:, :, src_ids]), "gRPC path lost data"
    finally:
        sender.close()
        server.stop()
    measured = stats[1:]  # drop the warm-up send
    return {
        "grpc_data_streams": num_data_streams(stats[0].nbytes, max_data_streams) if not in_band else 0,
        "grpc_ms": seconds * 1e3,
        "grpc_gbps": stats[0].nbytes / seconds / 1e9,
        "grpc_pack_to_host_ms": min(s.pack_ms for s in measured),
        "grpc_stream_and_unpack_ms": min(s.send_ms for s in measured),
    }


def print_report(result: dict[str, object]) -> None:
    config = result["config"]
    print(f"device: {result['device']}   torch {result['torch']}")
    print(
        f"cache: {config['num_layers']} layers x {config['num_kv_heads']} KV heads "
        f"x head_dim {config['head_dim']}, {config['dtype']}, block {config['block_size']}; "
        f"request: {config['request_blocks']} blocks "
        f"= {result['request_nbytes'] / 1e6:.1f} MB"
    )
    print(f"{'path':<16}{'ms':>10}{'GB/s (r+w)':>14}{'vs copy':>10}")
    for name in ("copy", *result["paths"]):
        ratio = 1.0 if name == "copy" else result[f"{name}_vs_copy"]
        print(f"{name:<16}{result[f'{name}_ms']:>10.2f}{result[f'{name}_gbps']:>14.2f}{ratio:>10.2f}")
    print(f"pack + unpack vs copy: {result['pack_unpack_vs_copy']:.2f} (target >= 0.70)")
    print(
        f"gRPC host path (pack -> host -> loopback stream -> unpack): {result['grpc_ms']:.1f} ms, "
        f"{result['grpc_gbps']:.2f} GB/s payload (pack + to host where it does not overlap the stream "
        f"{result['grpc_pack_to_host_ms']:.1f} ms, "
        f"stream+unpack {result['grpc_stream_and_unpack_ms']:.1f} ms)"
        + (f", {result['grpc_data_streams']} data streams" if result["grpc_data_streams"] else ", in band")
    )
    if "grpc_ms_one_stream" in result:
        print(
            f"  the same over one data stream: {result['grpc_ms_one_stream']:.1f} ms "
            f"(stream+unpack {result['grpc_stream_and_unpack_ms_one_stream']:.1f} ms); "
            f"{result['grpc_data_streams']} streams are {result['grpc_streams_speedup']:.2f}x as fast"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help="CPU-sized run (8 layers, 64-block request = 33.5 MB, bigger than a 32 MiB L3)",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--chunk-layers", type=int, default=0, help="also time pack/unpack in chunks of this many layers"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 avoids OpenMP stalls on a busy box)"
    )
    parser.add_argument(
        "--data-streams",
        type=int,
        default=MAX_DATA_STREAMS,
        help=f"the gRPC server's most data connections per buffer (default {MAX_DATA_STREAMS})",
    )
    parser.add_argument(
        "--grpc-in-band",
        action="store_true",
        help="keep the gRPC path's bytes on the stream (no data socket)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = run(
        SMALL if args.small else FULL,
        device,
        chunk_layers=args.chunk_layers,
        grpc_in_band=args.grpc_in_band,
        data_streams=args.data_streams,
    )
    print_report(result)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
