"""bench.gpu's long-context rows: prefill at ~32k and ~128k tokens, decode at 32k (batch 1
and 8) and at ~128k (batch 1), against the same floors and transformers in the same run, on
the Llama-3-8B shape with Llama 3.1's rope scaling at 131,072 positions (random bf16 weights).

    python -m pdserve.bench.gpu_long --json out.json --markdown out.md
    python -m pdserve.bench.gpu_long --small              # tiny shapes on CPU (the unit test)
    python -m pdserve.bench.gpu_long --only 6,7 --skip-transformers

Rows (pdserve | floor | transformers):
  6 prefill of one 32,768-token prompt: ms | FLOPs (attention included) at the matmul rate |
    one forward, logits of the last token
  7 decode b=1 at 32k context: tokens/s | HBM floor (weights + KV read per step) | generate
  8 decode b=8 at 32k context: tokens/s | same | generate at batch 8
  9 prefill of one 130,048-token prompt: ms | as row 6 | as row 6
 10 decode b=1 at 130,048 context: tokens/s | as row 7 | generate
pdserve prefills in chunks of its token budget, by default 32,768 tokens: a prefill worker's
budget, which decodes nothing, so a long step costs no one's inter-token latency (vLLM's own
default for offline use on an H100 is 16,384). Row 6 is one step, row 9 four chunks, the last three over
a cached prefix (chunked prefill over the paged cache); `--max-num-batched-tokens 8192` gives a co-located
worker's chunking (on one H100 at stop 19: 1,252 against 1,206 ms at 32k in bench.profile_steps,
10.55 against 10.29 s at 128k; bench/results/gpu-h100-stop19).
transformers runs each prompt in one forward (SDPA).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from pdserve.bench import gpu_baselines as hf
from pdserve.bench.gpu import LLAMA3_8B, TINY, build_llm, pdserve_decode, pdserve_prefill
from pdserve.bench.gpu_limits import ModelCost, measure_limits
from pdserve.bench.gpu_report import Report, parse_only

LONG_ROWS = {  # key: (number, metric, higher is better)
    "prefill_32k": (6, "ms", False),
    "decode_b1_32k": (7, "tokens/s", True),
    "decode_b8_32k": (8, "tokens/s", True),
    "prefill_128k": (9, "ms", False),
    "decode_b1_128k": (10, "tokens/s", True),
}


@dataclass
class LongShapes:
    context: int = 32768
    xl_context: int = 130048  # ~128k: a prompt plus the decoded tokens stay under 131,072
    batch: int = 8
    decode_steps: int = 64
    warmup_steps: int = 4
    prefill_reps: int = 3
    xl_prefill_reps: int = 2
    max_position: int = 131072


SMALL_LONG = LongShapes(256, 768, 2, 8, 2, 2, 1, 1024)


def row_titles(shapes: LongShapes) -> dict[str, str]:
    return {
        "prefill_32k": f"prefill {shapes.context} tokens",
        "decode_b1_32k": f"decode b=1 ctx={shapes.context}",
        "decode_b8_32k": f"decode b={shapes.batch} ctx={shapes.context}",
        "prefill_128k": f"prefill {shapes.xl_context} tokens",
        "decode_b1_128k": f"decode b=1 ctx={shapes.xl_context}",
    }


def pdserve_rows(llm, shapes: LongShapes, cost: ModelCost, limits: dict) -> dict:
    return {
        "prefill_32k": lambda: pdserve_prefill(
            llm, shapes, cost, limits, shapes.context, shapes.prefill_reps
        ),
        "decode_b1_32k": lambda: pdserve_decode(llm, 1, shapes.context, shapes, cost, limits),
        "decode_b8_32k": lambda: pdserve_decode(llm, shapes.batch, shapes.context, shapes, cost, limits),
        "prefill_128k": lambda: pdserve_prefill(
            llm, shapes, cost, limits, shapes.xl_context, shapes.xl_prefill_reps
        ),
        "decode_b1_128k": lambda: pdserve_decode(llm, 1, shapes.xl_context, shapes, cost, limits),
    }


def transformers_rows(model, shapes: LongShapes) -> dict:
    vocab, steps = model.config.vocab_size, shapes.decode_steps
    return {
        "prefill_32k": lambda: hf.bench_prefill(model, shapes.context, vocab, shapes.prefill_reps),
        "decode_b1_32k": lambda: hf.bench_decode(model, 1, shapes.context, steps, vocab),
        "decode_b8_32k": lambda: hf.bench_decode(model, shapes.batch, shapes.context, steps, vocab),
        "prefill_128k": lambda: hf.bench_prefill(model, shapes.xl_context, vocab, shapes.xl_prefill_reps),
        "decode_b1_128k": lambda: hf.bench_decode(model, 1, shapes.xl_context, steps, vocab),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="tiny model and sizes, CPU, float32, reference")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--only", metavar="ROWS", help="comma list of row numbers (6-10) or names")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    parser.add_argument("--kv-cache-gb", type=float, default=45.0, help="KV cache size on CUDA (45 GB)")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=32768, help="pdserve's prefill chunk (tokens per step)"
    )
    args = parser.parse_args(argv)
    # the knobs bench.gpu's build_llm reads
    args.device = "cpu" if args.small or not torch.cuda.is_available() else "cuda"
    args.dtype = "float32" if args.small else "bfloat16"
    args.attention_backend = "reference" if args.small else "auto"
    args.num_gpu_blocks, args.block_size, args.max_num_seqs, args.enforce_eager = None, 16, 64, False
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    began = time.perf_counter()
    shapes = SMALL_LONG if args.small else LongShapes()
    chosen = parse_only(args.only, LONG_ROWS)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model_cfg = dict(TINY if args.small else LLAMA3_8B, max_position_embeddings=shapes.max_position)
    cost = ModelCost(model_cfg, dtype)
    report = Report(
        {"rows": {}, "errors": {}, "shapes": vars(shapes), "args": vars(args)}, args.json, LONG_ROWS
    )
    result = report.result
    result["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result["limits"] = limits = measure_limits(device, dtype)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-long-") as model_dir:
        with open(os.path.join(model_dir, "config.json"), "w") as file:
            json.dump(model_cfg, file)
        llm = build_llm(model_dir, args, device, cost)
        print(f"pdserve: {llm.engine.runner.num_blocks} KV blocks, max_model_len {llm.engine.max_model_len}")
        for key, measure in pdserve_rows(llm, shapes, cost, limits).items():
            if key in chosen:
                report.record(key, "pdserve", measure)
                for req_id in list(llm.engine.scheduler.requests):
                    llm.engine.abort_request(req_id)
        del llm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not args.skip_transformers:
            model = hf.build_transformers_model(model_dir, device, dtype)
            for key, measure in transformers_rows(model, shapes).items():
                if key in chosen:
                    report.record(key, "transformers", measure)
    result["elapsed_s"] = time.perf_counter() - began
    report.write()
    table = report.table(row_titles(shapes))
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as file:
            file.write(
                f"{result['device']}, copy {limits['copy_gbps']:.0f} GB/s, "
                f"matmul {limits['matmul_tflops']:.1f} TFLOP/s\n\n"
                + report.table(row_titles(shapes), markdown=True)
            )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
