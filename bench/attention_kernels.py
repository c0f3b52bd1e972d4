"""Microbenchmark of the Triton attention kernels against the GPU's own measured limits.

Decode: achieved GB/s = HBM bytes the kernel must read (every context token's K and V,
plus q) / time, with a ratio to a large device-to-device copy measured in the same run.
Prefill: TFLOP/s of useful causal-attention FLOPs, with a ratio to a large bf16 matmul
measured in the same run and to torch SDPA (FlashAttention class) on contiguous tensors.

    PYTHONPATH=$PWD python -m pdserve.bench.attention_kernels --json out.json

`build_paged_batch` is also the input builder of tests/gpu/test_triton_attention.py.
"""

from __future__ import annotations

import argparse
import json

import torch

from pdserve.engine.attention.metadata import AttentionMetadata


def build_paged_batch(
    query_lens: list[int],
    prefix_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int | None = None,
    spare_blocks: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random q/k/v for the new tokens and a random paged cache holding the cached prefixes.

    Returns query [T, Hq, D], key/value [T, Hkv, D], kv_cache_layer
    [2, num_blocks, block_size, Hkv, D] and metadata. Physical block ids are a random
    permutation, so a sequence's blocks are scattered; block-table rows are padded with 0.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else torch.seed() % (2**31))
    seq_lens = [p + q for p, q in zip(prefix_lens, query_lens, strict=True)]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    width = max(blocks_per_seq + [1]) + 1  # one padding column past the longest sequence
    perm = torch.randperm(num_blocks, generator=generator)
    block_tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    slots: list[torch.Tensor] = []
    used = 0
    for i, (n_blocks, prefix, q_len) in enumerate(zip(blocks_per_seq, prefix_lens, query_lens, strict=True)):
        ids = perm[used : used + n_blocks]
        used += n_blocks
        block_tables[i, :n_blocks] = ids.to(torch.int32)
        positions = torch.arange(prefix, prefix + q_len)
        slots.append(ids[positions // block_size] * block_size + positions % block_size)
    total = sum(query_lens)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)

    cache = randn(2, num_blocks, block_size, num_kv_heads, head_dim)
    query = randn(total, num_q_heads, head_dim)
    key = randn(total, num_kv_heads, head_dim)
    value = randn(total, num_kv_heads, head_dim)
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=seq_lens,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
    return query, key, value, cache, meta


def prefill_flops(query_lens: list[int], seq_lens: list[int], num_q_heads: int, head_dim: int) -> float:
    """Useful FLOPs of causal attention (QK^T and PV, 2 FLOPs per multiply-add)."""
    total = 0.0
    for q_len, ctx_len in zip(query_lens, seq_lens, strict=True):
        prefix = ctx_len - q_len
        visible_keys = q_len * prefix + q_len * (q_len + 1) / 2  # sum over queries of keys seen
        total += 4.0 * visible_keys * head_dim * num_q_heads
    return total


def _time_ms(fn, iters: int = 50) -> float:
    """Median GPU time of fn with L2 flushed before each call (triton.testing.do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=iters, return_mode="median"))


def measure_copy_gbps() -> float:
    """Device-to-device copy of 2 GiB: bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint16, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), iters=100)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def measure_matmul_tflops() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = _time_ms(lambda: a @ b, iters=100)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def measure_layer_gemm_tflops(hidden: int, intermediate: int, qkv_out: int, rows: int) -> float:
    """bf16 TFLOP/s of one decoder layer's four GEMMs (qkv, o, gate_up, down) at `rows` tokens:
    the rate cuBLAS reaches on the model's own shapes, which can sit below the 8192^3 rate (a
    K = 4,096 GEMM spends more of its time in tile prologues and epilogues)."""
    shapes = [(hidden, qkv_out), (hidden, hidden), (hidden, 2 * intermediate), (intermediate, hidden)]
    x = torch.randn(rows, max(hidden, intermediate), dtype=torch.bfloat16, device="cuda")
    weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for k, n in shapes]

    def layer() -> None:
        for weight in weights:
            torch.nn.functional.linear(x[:, : weight.shape[1]], weight)

    ms = _time_ms(layer, iters=50)
    return sum(2 * rows * k * n for k, n in shapes) / (ms * 1e-3) / 1e12


def bench_decode(
    batch: int,
    context: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    copy_gbps: float,
    **kernel_args,
) -> dict:
    from pdserve.engine.attention.triton_backend import TritonAttention

    query, key, value, cache, meta = build_paged_batch(
        [1] * batch,
        [context - 1] * batch,
        num_q_heads,
        num_kv_heads,
        head_dim,
        block_size,
        torch.bfloat16,
        "cuda",
        seed=0,
    )
    out = torch.empty_like(query)
    attn = TritonAttention()
    decode = lambda: attn.decode(
        query, cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, head_dim**-0.5, out, **kernel_args
    )
    kernel_ms = _time_ms(decode)
    forward_ms = _time_ms(lambda: attn.forward(query, key, value, cache, meta, head_dim**-0.5))
    kv_bytes = batch * context * num_kv_heads * head_dim * 2 * cache.element_size()
    io_bytes = 2 * query.numel() * query.element_size()  # q read + output written
    gbps = (kv_bytes + io_bytes) / (kernel_ms * 1e-3) / 1e9
    return {
        "batch": batch,
        "context": context,
        "q_heads": num_q_heads,
        "kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "block_size": block_size,
        "kernel_args": kernel_args,
        "kernel_us": kernel_ms * 1e3,
        "forward_with_store_us": forward_ms * 1e3,
        "hbm_mbytes": (kv_bytes + io_bytes) / 1e6,
        "gbps": gbps,
        "ratio_to_copy": gbps / copy_gbps,
    }


def bench_decode_layers_graph(
    batch: int,
    context: int,
    num_layers: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    copy_gbps: float,
    max_seq_len_bound: int | None = None,
    **kernel_args,
) -> dict:
    """Decode attention of `num_layers` layers (one cache each) captured in one CUDA graph, as
    the engine runs it: no CPU launch cost, and the caches together exceed L2. The engine
    captures with the model's max length as `max_seq_len` (`max_seq_len_bound`), which sets the
    grid; without it the grid fits the context exactly."""
    from pdserve.engine.attention.triton_backend import TritonAttention

    query, _, _, cache, meta = build_paged_batch(
        [1] * batch,
        [context - 1] * batch,
        num_q_heads,
        num_kv_heads,
        head_dim,
        block_size,
        torch.bfloat16,
        "cuda",
        seed=0,
    )
    layers = cache.unsqueeze(0).repeat(num_layers, 1, 1, 1, 1, 1)  # [L, 2, blocks, bs, Hkv, D]
    out = torch.empty_like(query)

    def run_all() -> None:
        for layer in layers:
            TritonAttention.decode(
                query,
                layer,
                meta.block_tables,
                meta.seq_lens,
                max_seq_len_bound or meta.max_seq_len,
                head_dim**-0.5,
                out,
                **kernel_args,
            )

    run_all()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all()
    ms = _time_ms(graph.replay)
    kv_bytes = num_layers * batch * context * num_kv_heads * head_dim * 2 * cache.element_size()
    gbps = kv_bytes / (ms * 1e-3) / 1e9
    return {
        "batch": batch,
        "context": context,
        "layers": num_layers,
        "max_seq_len_bound": max_seq_len_bound,
        "kernel_args": kernel_args,
        "per_layer_us": ms * 1e3 / num_layers,
        "gbps": gbps,
        "ratio_to_copy": gbps / copy_gbps,
    }


def bench_prefill(
    query_len: int,
    prefix_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    matmul_tflops: float,
    **kernel_args,
) -> dict:
    from pdserve.engine.attention.triton_backend import TritonAttention

    query, key, value, cache, meta = build_paged_batch(
        [query_len],
        [prefix_len],
        num_q_heads,
        num_kv_heads,
        head_dim,
        block_size,
        torch.bfloat16,
        "cuda",
        seed=0,
    )
    out = torch.empty_like(query)
    attn = TritonAttention()
    attn.forward(query, key, value, cache, meta, head_dim**-0.5)  # fill the cache once
    kernel_ms = _time_ms(lambda: attn.prefill(query, cache, meta, head_dim**-0.5, out, **kernel_args))
    flops = prefill_flops(meta.query_lens_cpu, meta.seq_lens_cpu, num_q_heads, head_dim)
    tflops = flops / (kernel_ms * 1e-3) / 1e12
    row = {
        "query_len": query_len,
        "prefix_len": prefix_len,
        "q_heads": num_q_heads,
        "kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "block_size": block_size,
        "kernel_args": kernel_args,
        "kernel_us": kernel_ms * 1e3,
        "tflops": tflops,
        "ratio_to_matmul": tflops / matmul_tflops,
    }
    if prefix_len == 0:
        # Peer: SDPA on contiguous [1, H, T, D] tensors, GQA expanded outside the timing
        # (SDPA's flash path wants equal head counts). Same causal FLOPs.
        group = num_q_heads // num_kv_heads
        q = query.transpose(0, 1).unsqueeze(0).contiguous()
        k = key.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
        v = value.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
        sdpa = torch.nn.functional.scaled_dot_product_attention
        sdpa_ms = _time_ms(lambda: sdpa(q, k, v, is_causal=True))
        row.update(
            sdpa_us=sdpa_ms * 1e3,
            sdpa_tflops=flops / (sdpa_ms * 1e-3) / 1e12,
            speed_vs_sdpa=sdpa_ms / kernel_ms,
        )
    return row


def bench_mixed(
    matmul_tflops: float,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    prefill_len: int = 2048,
    decode_rows: int = 64,
    decode_context: int = 1024,
) -> dict:
    """One call holding a 2,048-token prefill and 64 decode rows (chunked-prefill style batch)."""
    from pdserve.engine.attention.triton_backend import TritonAttention

    query_lens = [prefill_len] + [1] * decode_rows
    prefix_lens = [0] + [decode_context - 1] * decode_rows
    query, key, value, cache, meta = build_paged_batch(
        query_lens,
        prefix_lens,
        num_q_heads,
        num_kv_heads,
        head_dim,
        block_size,
        torch.bfloat16,
        "cuda",
        seed=0,
    )
    attn = TritonAttention()
    ms = _time_ms(lambda: attn.forward(query, key, value, cache, meta, head_dim**-0.5))
    flops = prefill_flops(query_lens, meta.seq_lens_cpu, num_q_heads, head_dim)
    return {
        "prefill_len": prefill_len,
        "decode_rows": decode_rows,
        "decode_context": decode_context,
        "forward_us": ms * 1e3,
        "tflops": flops / (ms * 1e-3) / 1e12,
    }


def sweep_small_batch(copy_gbps: float, heads: dict) -> list[dict]:
    rows = []
    configs = [{}] + [
        dict(partition_size=size, block_n=block_n, num_warps=warps, num_stages=stages)
        for size in (64, 128, 256)
        for block_n in (32, 64)
        for warps in (2, 4)
        for stages in (2, 3)
        if block_n <= size
    ]
    for batch, context in [(1, 512), (4, 512), (1, 4096)]:
        for config in configs:
            row = bench_decode_layers_graph(
                batch, context, 32, copy_gbps=copy_gbps, max_seq_len_bound=8192, **heads, **config
            )
            rows.append(row)
            print(f"b={batch} ctx={context} {config or 'default'}: {row['per_layer_us']:6.2f} us/layer")
    # Large batches (one partition by default) against fixed splits and other pipeline depths.
    large_configs = [{}, dict(num_stages=2), dict(num_stages=4), dict(num_warps=8)] + [
        dict(partition_size=size) for size in (512, 1024, 4096)
    ]
    for batch, context in [(128, 1024), (32, 2048)]:
        for config in large_configs:
            row = bench_decode_layers_graph(
                batch, context, 32, copy_gbps=copy_gbps, max_seq_len_bound=8192, **heads, **config
            )
            rows.append(row)
            print(
                f"b={batch} ctx={context} {config or 'default'}: {row['per_layer_us']:6.2f} us/layer "
                f"{row['ratio_to_copy']:.2f} x copy"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--sweep", action="store_true", help="also try other tile configs")
    parser.add_argument(
        "--sweep-small-batch",
        action="store_true",
        help="only the decode kernel at batch 1 and 4 (ctx 512 and 4,096) and 32 and 128, in a 32-layer "
        "CUDA graph captured with an 8,192-token bound as the engine does, over partition sizes, warps "
        "and stages",
    )
    args = parser.parse_args()
    heads = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16)  # Llama-3-8B
    copy_gbps = measure_copy_gbps()
    matmul_tflops = measure_matmul_tflops()
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_gbps": copy_gbps,
        "matmul_bf16_tflops": matmul_tflops,
        "decode": [],
        "prefill": [],
    }
    import triton

    result["triton"] = triton.__version__
    print(f"{result['device']}: copy {copy_gbps:.0f} GB/s, bf16 matmul {matmul_tflops:.0f} TFLOP/s")
    if args.sweep_small_batch:
        result["decode_small_batch_sweep"] = sweep_small_batch(copy_gbps, heads)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return
    decode_cases = [(1, 512), (1, 4096), (1, 32768), (32, 1024), (128, 1024), (128, 4096)]
    decode_configs: list[dict] = [{}]
    if args.sweep:
        decode_configs += [dict(num_stages=2)]
    for batch, context in decode_cases:
        for config in decode_configs:
            row = bench_decode(batch, context, copy_gbps=copy_gbps, **heads, **config)
            result["decode"].append(row)
            print(
                f"decode b={batch:4d} ctx={context:6d} {config}: {row['kernel_us']:8.1f} us "
                f"(forward {row['forward_with_store_us']:8.1f} us) {row['gbps']:7.0f} GB/s "
                f"= {row['ratio_to_copy']:.2f} x copy"
            )
    result["decode_cuda_graph_32_layers"] = []
    graph_cases = [(1, 512, {}), (1, 4096, {}), (8, 2048, {}), (128, 1024, {})]
    if args.sweep:
        graph_cases += [
            (batch, context, dict(partition_size=size))
            for batch, context in [(1, 512), (1, 4096)]
            for size in (64, 128, 256, 512)
        ]
        graph_cases += [(8, 2048, dict(partition_size=size)) for size in (128, 256, 512)]
    for batch, context, config in graph_cases:
        row = bench_decode_layers_graph(batch, context, 32, copy_gbps=copy_gbps, **heads, **config)
        result["decode_cuda_graph_32_layers"].append(row)
        print(
            f"decode graph of 32 layers b={batch:4d} ctx={context:6d} {config}: {row['per_layer_us']:8.1f} "
            f"us/layer {row['gbps']:7.0f} GB/s = {row['ratio_to_copy']:.2f} x copy"
        )
    prefill_cases = [(2048, 0), (8192, 0), (2048, 2048), (512, 3584)]
    prefill_configs: list[dict] = [{}]
    if args.sweep:
        prefill_configs += [
            dict(block_m=64, block_n=32, num_warps=4, num_stages=3),
            dict(block_m=64, block_n=64, num_warps=4, num_stages=4),
            dict(block_m=128, block_n=64, num_warps=4, num_stages=3),
            dict(block_m=128, block_n=64, num_warps=8, num_stages=3),
        ]
    for query_len, prefix_len in prefill_cases:
        for config in prefill_configs:
            row = bench_prefill(query_len, prefix_len, matmul_tflops=matmul_tflops, **heads, **config)
            result["prefill"].append(row)
            sdpa = (
                f", SDPA {row['sdpa_tflops']:.0f} TFLOP/s -> {row['speed_vs_sdpa']:.2f} x SDPA"
                if "sdpa_us" in row
                else ""
            )
            print(
                f"prefill q={query_len:5d} prefix={prefix_len:5d} {config}: {row['kernel_us']:8.1f} us "
                f"{row['tflops']:6.1f} TFLOP/s = {row['ratio_to_matmul']:.2f} x matmul{sdpa}"
            )
    mixed = bench_mixed(matmul_tflops, **heads)
    result["mixed"] = mixed
    print(
        f"mixed: prefill {mixed['prefill_len']} + {mixed['decode_rows']} decode rows at "
        f"{mixed['decode_context']} context: forward {mixed['forward_us']:.1f} us"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
