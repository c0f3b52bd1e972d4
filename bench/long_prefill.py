"""Long-prefill attention on one GPU: the paged Triton kernel against the fused path of
`sdpa_prefill` (cuDNN attention over the chunk's own keys and its gathered cached prefix, merged
by log-sum-exp), chunk by chunk as a chunked 32k/128k prefill runs them, with the matmul rate and
SDPA's backends on the same GPU in the same run.

    python -m pdserve.bench.long_prefill --json out.json
    python -m pdserve.bench.long_prefill --power-only --json out.json   # the power-cap check instead

The power-cap check times one layer's causal attention over 32,768 tokens (the engine's own
`causal_sdpa` call: SDPA, cuDNN's kernel on an H100) alone, after the GPU sat idle, and right
after a layer's MLP GEMMs, with the SM clock
and board power sampled by nvidia-smi while the two alternate: inside a long prefill the GEMMs
hold the GPU at its power limit, its clock falls, and the attention runs slower than alone.

TFLOP/s counts useful causal FLOPs (bench.attention_kernels.prefill_flops); Llama-3-8B heads
(32 query heads, 8 KV heads, head_dim 128), block_size 16, bf16, scattered blocks. The
`MIN_QUERY_WITH_PREFIX` threshold of sdpa_prefill comes from the small-chunk rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
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


def _event_ms(before, fn, reps: int = 5) -> float:
    """Median CUDA-event time of `fn` over `reps` runs, each right after `before()`."""
    times = []
    for _ in range(reps):
        before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def power_cap_check(tokens: int = 32768, loop_s: float = 4.0) -> dict:
    """Causal attention of one Llama-3-8B layer over `tokens` (the engine's `causal_sdpa` on
    views of a fused qkv tensor) alone, after 0.3 s idle, and right after three gate_up GEMMs
    [tokens, 4096] x [4096, 28672]; then the two alternate for `loop_s` while nvidia-smi samples
    the SM clock and board power. CUDA only."""
    from pdserve.engine.attention.sdpa_prefill import causal_sdpa

    heads, kv_heads, dim = HEADS["num_q_heads"], HEADS["num_kv_heads"], HEADS["head_dim"]
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)  # [n, H*D] views
    q, k, v = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(28672, 4096, device="cuda", dtype=torch.bfloat16)
    attention = lambda: causal_sdpa(q, k, v, dim**-0.5)  # noqa: E731

    def gemms() -> None:
        for _ in range(3):
            torch.nn.functional.linear(x, w)

    def idle() -> None:
        torch.cuda.synchronize()
        time.sleep(0.3)

    attention_flops = prefill_flops([tokens], [tokens], heads, dim)
    gemm_flops = 3 * 2 * tokens * 4096 * 28672
    attention()
    gemms()
    timings = {
        "attention_alone_ms": _event_ms(lambda: None, attention),
        "attention_after_idle_ms": _event_ms(idle, attention),
        "attention_after_gemms_ms": _event_ms(gemms, attention),
        "gemms_alone_ms": _event_ms(lambda: None, gemms),
        "gemms_after_idle_ms": _event_ms(idle, gemms),
    }
    result: dict = {"tokens": tokens, **timings}
    for name, ms in timings.items():
        flops = gemm_flops if name.startswith("gemms") else attention_flops
        result[name.replace("_ms", "_tflops")] = flops / (ms * 1e-3) / 1e12
    result["loop_attention_ms"], result["smi_samples"] = _alternate_with_samples(attention, gemms, loop_s)
    return result


def _alternate_with_samples(attention, gemms, loop_s: float) -> tuple[dict, list[str]]:
    """Run GEMMs then attention in turn for `loop_s`: the attention's event times, and
    nvidia-smi's samples meanwhile (SM clock MHz, power W, power limit W)."""
    smi = shutil.which("nvidia-smi")
    query = ["--query-gpu=clocks.sm,power.draw,power.limit", "--format=csv,noheader", "-lms", "100"]
    sampler = subprocess.Popen([smi, *query], stdout=subprocess.PIPE, text=True) if smi else None
    loop_ms, started, samples = [], time.perf_counter(), []
    try:
        while time.perf_counter() - started < loop_s:
            loop_ms.append(_event_ms(gemms, attention, reps=1))
    finally:
        if sampler is not None:
            sampler.terminate()
            samples = sampler.communicate()[0].strip().splitlines()
    return {"first": loop_ms[0], "median": statistics.median(loop_ms), "runs": len(loop_ms)}, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--power-only", action="store_true", help="the power-cap check instead of the chunks")
    args = parser.parse_args()
    from pdserve.engine.attention import lse_attention

    matmul_tflops = measure_matmul_tflops()
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "matmul_tflops": matmul_tflops,
    }
    print(f"{result['device']}: bf16 matmul {matmul_tflops:.0f} TFLOP/s")
    if args.power_only:  # on its own: it leaves the GPU hot for whatever would run next
        result["power_cap_check"] = check = power_cap_check()
        print("power-cap check:", {k: round(v, 1) for k, v in check.items() if isinstance(v, float)})
        print("  SM clock, power while GEMMs and attention alternate:", check["smi_samples"][-4:])
        return _write(result, args.json)
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
    _write(result, args.json)


def _write(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
