"""One-command GPU benchmark: pdserve against the GPU's measured limits and against
Hugging Face transformers, on a Llama-3-8B-shaped model (random bf16 weights).

    PYTHONPATH=$PWD python -m pdserve.bench.gpu --json out.json --markdown out.md
    python -m pdserve.bench.gpu --small               # tiny shapes on CPU, seconds (the unit test)
    python -m pdserve.bench.gpu --only 1,3 --skip-transformers

Rows (pdserve | floor | transformers):
  1 decode, batch 1, 512-token context: tokens/s | HBM floor: (weights + KV read) per
    step / copy rate | generate, batch 1, 512 in / 128 out, t(129) - t(1)
  2 decode, batch 128, 1,024-token context: tokens/s | same floor | generate at batch 32
  3 prefill of one 2,048-token prompt: ms | 2 x params x tokens + attention FLOPs over
    the bf16 matmul rate | one forward, logits of the last token
  4 offline throughput, 1,000 requests of 512 in / 128 out: output tokens/s | matmul FLOPs at
    the matmul rate + decode K/V reads at the copy rate (ModelCost.offline_floor_s) |
    generate_batch (continuous batching) with 64 requests
  5 pack + unpack of a 2,048-token prompt's KV (128 blocks): GB/s read + written | copy rate
The copy rate (2 GiB device-to-device copy, bytes read + written) and matmul rate
(8192^3 bf16) are measured at the start of the same run. "vs" columns are speed
ratios: above 1 means pdserve is faster (vs floor: the fraction of the bound reached).
pdserve runs first; its model is freed before transformers builds its own.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from pdserve.bench import gpu_baselines as hf
from pdserve.bench.gpu_baselines import synchronize, timed_seconds
from pdserve.bench.gpu_limits import ModelCost, measure_limits
from pdserve.bench.gpu_report import Report, parse_only
from pdserve.bench.gpu_shapes import SMALL, Shapes
from pdserve.bench.transfer import best_seconds

# The same Llama-3-8B shape the GPU deploy configs serve (one config.json in the repo).
_LLAMA3_8B_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "models", "llama3-8b-shape"
)
with open(os.path.join(_LLAMA3_8B_DIR, "config.json")) as _f:
    # Random weights: lengths are fixed by max_tokens, never by eos.
    LLAMA3_8B = {**json.load(_f), "bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}
TINY = dict(
    LLAMA3_8B,
    rope_scaling=dict(LLAMA3_8B["rope_scaling"], original_max_position_embeddings=256),
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
    max_position_embeddings=1024,
)


PACK_BACK_TO_BACK = 8  # pack (unpack) calls per timing in row 5


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(vocab_size) for _ in range(length)]


# -- pdserve rows ---------------------------------------------------------------------
def pdserve_decode(llm, batch: int, context: int, shapes: Shapes, cost: ModelCost, limits: dict) -> dict:
    """Tokens/s of `engine.step()` once every request of the batch is decoding."""
    from pdserve.engine import SamplingParams

    engine, device = llm.engine, llm.engine.runner.device
    vocab, rng = engine.model_config.vocab_size, random.Random(batch * 7919 + context)
    prefill_steps_bound = -(-batch * context // engine.config.max_num_batched_tokens) + batch
    params = SamplingParams(
        temperature=0.0,
        ignore_eos=True,
        max_tokens=prefill_steps_bound + shapes.warmup_steps + shapes.decode_steps,
    )
    num_outputs: dict[str, int] = {}
    for _ in range(batch):
        req_id = engine.new_request_id()
        engine.add_request(req_id, random_prompt(rng, context, vocab), params)
        num_outputs[req_id] = 0

    def step() -> int:
        outputs = engine.step()
        for out in outputs:
            num_outputs[out.req_id] = out.num_output_tokens
        return len(outputs)

    for _ in range(4 * prefill_steps_bound):  # until every prompt is prefilled
        if min(num_outputs.values()) > 0:
            break
        step()
    else:
        raise RuntimeError(f"the batch of {batch} was not prefilled in {4 * prefill_steps_bound} steps")
    for _ in range(shapes.warmup_steps):  # CUDA-graph capture, kernel compiles
        step()
    # A decode step reads the K and V of every token so far, the one fed in included.
    start_context = sum(context + n for n in num_outputs.values())
    smallest_batch = batch
    synchronize(device)
    start = time.perf_counter()
    for _ in range(shapes.decode_steps):
        smallest_batch = min(smallest_batch, step())
    synchronize(device)
    elapsed = time.perf_counter() - start
    for req_id in num_outputs:
        engine.abort_request(req_id)
    mean_context_tokens = start_context + batch * (shapes.decode_steps - 1) / 2
    floor_step_s = cost.decode_step_bytes(int(mean_context_tokens)) / (limits["copy_gbps"] * 1e9)
    return {
        "value": batch * shapes.decode_steps / elapsed,
        "floor": batch / floor_step_s,
        "step_ms": elapsed / shapes.decode_steps * 1e3,
        "floor_step_ms": floor_step_s * 1e3,
        "mean_context_per_request": mean_context_tokens / batch,
        "smallest_batch_in_timed_steps": smallest_batch,
        "method": f"{shapes.decode_steps} engine.step() after prefill + {shapes.warmup_steps} warm-up steps",
    }


def pdserve_prefill(
    llm, shapes: Shapes, cost: ModelCost, limits: dict, num_tokens: int | None = None, reps: int | None = None
) -> dict:
    """Wall time of the step(s) that prefill one prompt (`num_tokens`, default the shapes'
    prefill_tokens) and sample its first token."""
    from pdserve.engine import SamplingParams

    engine, device = llm.engine, llm.engine.runner.device
    vocab, rng = engine.model_config.vocab_size, random.Random(3)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    # A fresh random prompt each time, so the prefix cache never serves it; made before the
    # clock starts (2,048 rng.randrange calls are about a millisecond of Python).
    num_tokens = num_tokens or shapes.prefill_tokens
    reps = reps or shapes.prefill_reps
    prompts = [random_prompt(rng, num_tokens, vocab) for _ in range(2 + reps)]

    def prefill_once() -> None:
        engine.add_request(engine.new_request_id(), prompts.pop(), params)
        while engine.has_unfinished():
            engine.step()

    for _ in range(2):
        prefill_once()
    times = [timed_seconds(prefill_once, device) for _ in range(reps)]
    flops = cost.prefill_flops(num_tokens)
    return {
        "value": statistics.median(times) * 1e3,
        "floor": flops / (limits["matmul_tflops"] * 1e12) * 1e3,
        "best_ms": min(times) * 1e3,
        "flops": flops,
        "method": f"engine.step() until done, max_tokens=1: median of {reps} after 2 warm-ups",
    }


def pdserve_throughput(llm, num_requests: int, shapes: Shapes, cost: ModelCost, limits: dict) -> dict:
    """`LLM.generate` over every request at once, greedy, ignore_eos: output tokens/s."""
    from pdserve.engine import SamplingParams

    device, vocab = llm.engine.runner.device, llm.engine.model_config.vocab_size
    rng = random.Random(4)
    llm.generate([random_prompt(rng, 16, vocab) for _ in range(4)], SamplingParams(max_tokens=4))  # warm-up
    prompts = [random_prompt(rng, shapes.prompt_len, vocab) for _ in range(num_requests)]
    params = SamplingParams(temperature=0.0, max_tokens=shapes.output_len, ignore_eos=True)
    results: list = []
    elapsed = timed_seconds(lambda: results.extend(llm.generate(prompts, params)), device)
    output_tokens = sum(len(r.token_ids) for r in results)
    assert output_tokens == num_requests * shapes.output_len, "some request stopped early"
    floor_s = num_requests * cost.offline_floor_s(shapes.prompt_len, shapes.output_len, limits)
    extra = {}
    if "layer_gemm_tflops" in limits:  # the same floor at the rate cuBLAS reaches on the layer's shapes
        at_layer_rate = dict(limits, matmul_tflops=limits["layer_gemm_tflops"])
        layer_floor_s = num_requests * cost.offline_floor_s(
            shapes.prompt_len, shapes.output_len, at_layer_rate
        )
        extra = {
            "floor_at_layer_gemm_rate": output_tokens / layer_floor_s,
            "vs_floor_at_layer_gemm_rate": layer_floor_s / elapsed,
        }
        print(
            f"  offline floor at the layer GEMMs' rate: {extra['floor_at_layer_gemm_rate']:.0f} out tok/s; "
            f"pdserve reaches {extra['vs_floor_at_layer_gemm_rate']:.3f} of it"
        )
    return {
        **extra,
        "value": output_tokens / elapsed,
        "floor": output_tokens / floor_s,
        "floor_s": floor_s,
        "wall_s": elapsed,
        "num_requests": num_requests,
        "requests_per_s": num_requests / elapsed,
        "total_tokens_per_s": (output_tokens + num_requests * shapes.prompt_len) / elapsed,
        "method": "LLM.generate wall time, greedy, ignore_eos, random token ids",
    }


def pdserve_pack_unpack(llm, shapes: Shapes, limits: dict) -> dict:
    """transfer.packing on the engine's own cache: gather a prompt's scattered blocks
    into a buffer, scatter it back at other scattered blocks (best of N, as bench.transfer)."""
    from pdserve.transfer.layout import KVLayout
    from pdserve.transfer.packing import buffer_nbytes, pack_blocks, unpack_blocks

    cache = llm.engine.kv_cache  # [L, 2, num_blocks, block_size, Hkv, D]
    n = shapes.pack_blocks
    if 2 * n > cache.shape[2]:
        raise ValueError(f"the KV cache has {cache.shape[2]} blocks; pack/unpack needs {2 * n}")
    ids = torch.randperm(cache.shape[2], generator=torch.Generator().manual_seed(5))[: 2 * n].tolist()
    src_ids, dst_ids = ids[:n], ids[n:]
    layout = KVLayout.from_cache(cache, "bench")
    buffer = torch.empty(layout.buffer_shape(n), dtype=cache.dtype, device=cache.device)
    # Back-to-back calls (as a worker's sends queue up): the device's rate, not one call's launch
    # and host checks (~30 us against ~90 us of copying); the single-call rate is kept too.
    reps = PACK_BACK_TO_BACK

    def repeated(fn: Callable[[], object]) -> Callable[[], None]:
        return lambda: [fn() for _ in range(reps)]

    def pack() -> object:
        return pack_blocks(cache, src_ids, out=buffer)

    def unpack() -> object:
        return unpack_blocks(cache, buffer, dst_ids)

    pack_s = best_seconds(repeated(pack), shapes.pack_iters, cache.device) / reps
    unpack_s = best_seconds(repeated(unpack), shapes.pack_iters, cache.device) / reps
    single_s = best_seconds(pack, shapes.pack_iters, cache.device) + best_seconds(
        unpack, shapes.pack_iters, cache.device
    )
    assert torch.equal(cache[:, :, dst_ids], cache[:, :, src_ids]), "pack/unpack lost data"
    nbytes = buffer_nbytes(layout, n)
    return {
        "value": 4 * nbytes / (pack_s + unpack_s) / 1e9,  # each of pack and unpack reads and writes nbytes
        "single_call_gbps": 4 * nbytes / single_s / 1e9,
        "floor": limits["copy_gbps"],
        "request_mb": nbytes / 1e6,
        "pack_gbps": 2 * nbytes / pack_s / 1e9,
        "unpack_gbps": 2 * nbytes / unpack_s / 1e9,
        "pack_ms": pack_s * 1e3,
        "unpack_ms": unpack_s * 1e3,
        "method": f"pack_blocks + unpack_blocks of {n} scattered blocks, {reps} back-to-back calls per "
        f"timing, best of {shapes.pack_iters} each",
    }


def row_titles(shapes: Shapes) -> dict[str, str]:
    return {
        "decode_b1": f"decode b=1 ctx={shapes.decode_context}",
        "decode_batch": f"decode b={shapes.batch_decode_size} ctx={shapes.batch_decode_context} "
        f"(transformers b={shapes.transformers_batch})",
        "prefill": f"prefill {shapes.prefill_tokens} tokens",
        "throughput": f"offline {shapes.num_requests} x {shapes.prompt_len}/{shapes.output_len} "
        f"(transformers {shapes.transformers_requests} req)",
        "pack_unpack": f"KV pack+unpack {shapes.pack_blocks} blocks",
    }


def build_llm(model_dir: str, args: argparse.Namespace, device: torch.device, cost: ModelCost):
    from pdserve.engine import LLM

    num_blocks = args.num_gpu_blocks
    if num_blocks is None and device.type == "cuda":
        num_blocks = int(args.kv_cache_gb * 1e9) // (cost.kv_bytes_per_token * args.block_size)
    kwargs = dict(
        device=str(device),
        dtype=args.dtype,
        block_size=args.block_size,
        num_gpu_blocks=num_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        attention_backend=args.attention_backend,
        load_format="dummy",
    )
    if args.enforce_eager:
        if "enforce_eager" in inspect.signature(LLM).parameters:
            kwargs["enforce_eager"] = True
        else:
            print("  --enforce-eager ignored: this engine has no such switch")
    return LLM(model_dir, **kwargs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="tiny model and counts, CPU, float32, reference")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--only", metavar="ROWS", help="comma list of row numbers (1-5) or names")
    parser.add_argument("--json", metavar="PATH", help="write results (rewritten after every row)")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    parser.add_argument("--num-requests", type=int, help="row 4 requests for pdserve (default 1000)")
    parser.add_argument("--transformers-requests", type=int, help="row 4 requests for transformers (64)")
    parser.add_argument("--decode-steps", type=int, help="timed decode steps (default 128)")
    parser.add_argument("--num-gpu-blocks", type=int, help="KV cache blocks (overrides --kv-cache-gb)")
    parser.add_argument("--kv-cache-gb", type=float, default=45.0, help="KV cache size on CUDA (45 GB)")
    # Offline sizes (row 4): 512 sequences of 512 + 128 tokens fit the 45 GB KV cache without
    # preemption (20,480 of its 21,457 blocks); vLLM's offline LLM defaults on 80 GB GPUs are larger
    # still (1,024 sequences, 16,384 tokens per step). Rows 1-3 do not depend on these.
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (if the engine has it)")
    parser.add_argument("--device", help="default: cuda if available (cpu with --small)")
    parser.add_argument("--dtype", help="default: bfloat16 (float32 with --small)")
    parser.add_argument("--attention-backend", help="default: auto (reference with --small)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    args.dtype = args.dtype or ("float32" if args.small else "bfloat16")
    args.attention_backend = args.attention_backend or ("reference" if args.small else "auto")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up at once, even piped
    began = time.perf_counter()
    overrides = {n: getattr(args, n) for n in ("num_requests", "transformers_requests", "decode_steps")}
    shapes = replace(SMALL if args.small else Shapes(), **{n: v for n, v in overrides.items() if v})
    chosen = parse_only(args.only)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model_cfg = TINY if args.small else LLAMA3_8B
    cost = ModelCost(model_cfg, dtype)
    titles = row_titles(shapes)
    report = Report({"rows": {}, "errors": {}, "shapes": vars(shapes), "args": vars(args)}, args.json)
    result = report.result
    result.update(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        model=model_cfg,
    )
    print(f"bench.gpu on {result['device']} (torch {torch.__version__}), rows: {', '.join(chosen)}")
    result["limits"] = measure_limits(device, dtype, model_cfg, args.max_num_batched_tokens)
    print(
        f"  copy {result['limits']['copy_gbps']:.0f} GB/s (read + written), "
        f"matmul {result['limits']['matmul_tflops']:.1f} TFLOP/s ({args.dtype})"
        + (
            f", layer GEMMs {result['limits']['layer_gemm_tflops']:.1f}"
            if "layer_gemm_tflops" in result["limits"]
            else ""
        )
    )
    limits = result["limits"]
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as model_dir:
        with open(os.path.join(model_dir, "config.json"), "w") as file:
            json.dump(model_cfg, file)
        run_pdserve(model_dir, args, device, shapes, cost, chosen, report)
        gc.collect()  # the engine is gone: free its 16 GB of weights and the KV cache for transformers
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not args.skip_transformers and set(chosen) - {"pack_unpack"}:
            hf.run_transformers(model_dir, device, dtype, shapes, chosen, report, small=args.small)
    result["elapsed_s"] = time.perf_counter() - began
    report.write()
    print(report.table(titles))
    if args.markdown:
        offline = result["rows"].get("throughput", {}).get("pdserve", {})
        with open(args.markdown, "w") as file:
            file.write(
                f"{result['device']}, torch {torch.__version__}, transformers "
                f"{result.get('transformers', '-')}, copy {limits['copy_gbps']:.0f} GB/s, "
                f"matmul {limits['matmul_tflops']:.1f} TFLOP/s"
                + (
                    f" (the layer's GEMMs: {limits['layer_gemm_tflops']:.1f})"
                    if "layer_gemm_tflops" in limits
                    else ""
                )
                + "\n\n"
                + report.table(titles, markdown=True)
            )
            if "floor_at_layer_gemm_rate" in offline:
                file.write(
                    f"\nOffline floor at the layer GEMMs' rate: "
                    f"{offline['floor_at_layer_gemm_rate']:.0f} out tok/s; "
                    f"pdserve reaches {offline['vs_floor_at_layer_gemm_rate']:.3f} of it.\n"
                )
    return result


def run_pdserve(
    model_dir: str,
    args: argparse.Namespace,
    device: torch.device,
    shapes: Shapes,
    cost: ModelCost,
    chosen: list[str],
    report: Report,
) -> None:
    """Every chosen pdserve row on one `LLM`, built once; it is dropped on return."""
    started = time.perf_counter()
    llm = build_llm(model_dir, args, device, cost)
    limits = report.result["limits"]
    report.result["pdserve_build_s"] = time.perf_counter() - started
    report.result["num_gpu_blocks"] = llm.engine.runner.num_blocks
    report.result["cuda_graphs"] = getattr(llm.engine.runner, "decode_graphs", None) is not None
    print(
        f"pdserve: built in {report.result['pdserve_build_s']:.1f}s, {llm.engine.runner.num_blocks} "
        f"KV blocks, CUDA graphs {report.result['cuda_graphs']}"
    )
    rows: dict[str, Callable[[], dict]] = {
        "decode_b1": lambda: pdserve_decode(llm, 1, shapes.decode_context, shapes, cost, limits),
        "decode_batch": lambda: pdserve_decode(
            llm, shapes.batch_decode_size, shapes.batch_decode_context, shapes, cost, limits
        ),
        "prefill": lambda: pdserve_prefill(llm, shapes, cost, limits),
        "throughput": lambda: pdserve_throughput(llm, shapes.num_requests, shapes, cost, limits),
        # Last: it overwrites blocks of the cache.
        "pack_unpack": lambda: pdserve_pack_unpack(llm, shapes, limits),
    }
    for key, measure in rows.items():
        if key in chosen:
            report.record(key, "pdserve", measure)
            # A row that failed half-way must not leave requests behind for the next one.
            for req_id in list(llm.engine.scheduler.requests):
                llm.engine.abort_request(req_id)


if __name__ == "__main__":
    main(sys.argv[1:])
