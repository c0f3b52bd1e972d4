"""One-row linear layers (batch-1 decode): cuBLAS `F.linear` against the engine's Triton GEMV.

    python -m pdserve.bench.gemv [--json PATH]

For each Llama-3-8B weight shape (bf16, random values) both run 32 times inside one CUDA
graph (so launch overhead is out of the picture, as in a captured decode step), over
different weight copies where they fit so that L2 holds none of them; best of 5 replays.
GB/s counts the weight bytes read; the HBM copy rate of the same run is the yardstick.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.nn import functional as F

from pdserve.bench.attention_kernels import measure_copy_gbps
from pdserve.engine.model.gemv import gemv_triton

# (name, N, K) of Llama-3-8B's linear layers: y[1, N] = x[1, K] @ W[N, K]^T
SHAPES = (
    ("qkv_proj", 6144, 4096),
    ("o_proj", 4096, 4096),
    ("gate_up_proj", 28672, 4096),
    ("down_proj", 4096, 14336),
    ("lm_head", 128256, 4096),
)
REPS = 32


def graph_us(fn, weights: list[torch.Tensor]) -> float:
    """Microseconds per call of fn(weight), REPS calls captured in one CUDA graph."""
    fn(weights[0])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(REPS):
            fn(weights[i % len(weights)])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(6):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / REPS)
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.gemv needs a CUDA GPU")
    copy_gbps = measure_copy_gbps()
    result = {"device": torch.cuda.get_device_name(), "copy_gbps": copy_gbps, "rows": []}
    print(f"{result['device']}: copy {copy_gbps:.0f} GB/s (read + written)")
    header = ("layer", "N", "K", "cuBLAS us", "GEMV us", "GEMV GB/s", "speedup")
    print("{:14s} {:>7s} {:>6s} {:>10s} {:>8s} {:>10s} {:>8s}".format(*header))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, n, k in SHAPES:
        copies = 4 if n * k * 2 < 400e6 else 1  # 4 x 100 MB spills L2; lm_head (1 GB) alone does
        weights = [
            torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
            for _ in range(copies)
        ]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        cublas = graph_us(lambda w, x=x: F.linear(x, w), weights)
        gemv = graph_us(lambda w, x=x: gemv_triton(x, w), weights)
        ref, got = F.linear(x, weights[0]).float(), gemv_triton(x, weights[0]).float()
        row = {
            "layer": name,
            "n": n,
            "k": k,
            "cublas_us": cublas,
            "gemv_us": gemv,
            "gemv_gbps": n * k * 2 / gemv / 1e3,
            "cublas_gbps": n * k * 2 / cublas / 1e3,
            "max_rel_diff": ((got - ref).abs().max() / ref.abs().max()).item(),
        }
        result["rows"].append(row)
        print(
            f"{name:14s} {n:7d} {k:6d} {cublas:10.1f} {gemv:8.1f} {row['gemv_gbps']:10.0f} "
            f"{cublas / gemv:7.2f}x"
        )
        del weights
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
