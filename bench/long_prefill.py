"""Long-prefill attention on one GPU: the paged Triton kernel against the fused path of
`sdpa_prefill` (cuDNN attention over the chunk's own keys and its gathered cached prefix, merged
by log-sum-exp), chunk by chunk as a chunked 32k/128k prefill runs them, with the matmul rate and
SDPA's backends on the same GPU in the same run.

    python -m pdserve.bench.long_prefill --json out.json

TFLOP/s counts useful causal FLOPs (bench.attention_kernels.prefill_flops); Llama-3-8B heads
(32 query heads, 8 KV heads, head_dim 128), block_size 16, bf16, scattered blocks. The
`MIN_QUERY_WITH_PREFIX` threshold of sdpa_prefill comes from the small-chunk rows.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pdserve.bench.attention_kernels import _time_ms, build_paged_batch, measure_matmul_tflops, prefill_flops

HEADS = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16)
CHUNKS = [  # (new tokens, cached prefix): a 128k prefill in 8,192-token chunks, and prefix hits
    (8192, 0), (8192, 8192), (8192, 24576), (8192, 57344), (8192, 122880),
    (32768, 0), (4096, 4096), (2048, 2048), (1024, 8192), (1024, 1024), (512, 3584),
]  # fmt: skip


def sdpa_backends(tokens: int, matmul_tflops: float) -> dict[str, float | str]:
    """Causal SDPA on [1, 32, tokens, 128] with 8 KV heads (enable_gqa) under each backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, tokens, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, 8, tokens, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    flops = prefill_flops([tokens], [tokens], 32, 128)
    rows: dict[str, float | str] = {}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        name = backend.name.lower()
        try:
            with sdpa_kernel(backend):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=True
                )  # noqa: E731
                ms = _time_ms(fn, iters=20)
            rows[name] = flops / (ms * 1e-3) / 1e12
        except RuntimeError as error:
            rows[name] = f"unavailable: {str(error).splitlines()[0][:120]}"
    return rows


def bench_chunk(query_len: int, prefix_len: int, matmul_tflops: float) -> dict:
    from pdserve.engine.attention import sdpa_prefill
    from pdserve.engine.attention.triton_backend import TritonAttention

    query, key, value, cache, meta = build_paged_batch(
        [query_len], [prefix_len], **HEADS, dtype=torch.bfloat16, device="cuda", seed=0
    )
    scale = HEADS["head_dim"] ** -0.5
    attn = TritonAttention()
    attn.forward(query, key, value, cache, meta, scale)  # the cache holds the chunk's K/V too
    paged_out = torch.empty_like(query)
    paged_ms = _time_ms(lambda: attn.prefill(query, cache, meta, scale, paged_out), iters=20)
    fused = sdpa_prefill.use_sdpa_prefill(query, key, value, cache, meta)
    # The first call at a new (query, key) shape includes cuDNN's plan build for it (cached per
    # shape after that): what a request with an unseen prefix length pays once.
    torch.cuda.synchronize()
    started = time.perf_counter()
    fused_out = sdpa_prefill.sdpa_prefill(query, key, value, cache, meta, scale)
    torch.cuda.synchronize()
    first_call_ms = (time.perf_counter() - started) * 1e3
    fused_ms = _time_ms(lambda: sdpa_prefill.sdpa_prefill(query, key, value, cache, meta, scale), iters=20)
    flops = prefill_flops(meta.query_lens_cpu, meta.seq_lens_cpu, HEADS["num_q_heads"], HEADS["head_dim"])
    diff = (fused_out.float() - paged_out.float()).norm() / paged_out.float().norm()
    return {
        "query_len": query_len,
        "prefix_len": prefix_len,
        "paged_us": paged_ms * 1e3,
        "paged_tflops": flops / (paged_ms * 1e-3) / 1e12,
        "fused_us": fused_ms * 1e3,
        "fused_first_call_ms": first_call_ms,
        "fused_tflops": flops / (fused_ms * 1e-3) / 1e12,
        "fused_vs_paged": paged_ms / fused_ms,
        "fused_vs_matmul": flops / (fused_ms * 1e-3) / 1e12 / matmul_tflops,
        "engine_takes_fused": fused,
        "relative_difference": diff.item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    from pdserve.engine.attention import lse_attention

    matmul_tflops = measure_matmul_tflops()
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "matmul_tflops": matmul_tflops,
    }
    print(f"{result['device']}: bf16 matmul {matmul_tflops:.0f} TFLOP/s")
    result["sdpa_causal_8192_tflops"] = sdpa_backends(8192, matmul_tflops)
    print("SDPA causal 8,192 tokens, TFLOP/s by backend:", result["sdpa_causal_8192_tflops"])
    result["chunks"] = []
    for query_len, prefix_len in CHUNKS:
        row = bench_chunk(query_len, prefix_len, matmul_tflops)
        result["chunks"].append(row)
        print(
            f"q={query_len:6d} prefix={prefix_len:6d}: paged {row['paged_tflops']:5.0f} TFLOP/s, fused "
            f"{row['fused_tflops']:5.0f} ({row['fused_vs_matmul']:.2f} x matmul, "
            f"{row['fused_vs_paged']:.2f} x paged)"
            f" engine takes fused: {row['engine_takes_fused']}, rel diff {row['relative_difference']:.1e}, "
            f"first call {row['fused_first_call_ms']:.1f} ms"
        )
    result["cudnn_modes"] = {str(key): mode for key, mode in lse_attention._CUDNN_MODE.items()}
    print("cuDNN op checks:", result["cudnn_modes"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
