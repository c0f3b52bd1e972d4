"""Decode step as one batch vs two overlapped micro-batches, in the same run.

A large decode step's GEMMs are bound by the tensor cores and its attention by HBM;
`LlamaForCausalLM.forward_two_batches` runs one half's attention on a second stream
while the other half's GEMMs run. This measures one CUDA-graph replay of the whole
model (Llama-3-8B shape, random bf16 weights, a random paged KV cache) both ways, for
each (batch, context), and prints the ratio (above 1: two micro-batches are faster),
with the two outputs' relative difference (the halves' GEMMs may round differently).

    PYTHONPATH=$PWD python -m bench.two_batch --json out.json
    python -m bench.two_batch --cases 512x576,256x1024 --kv-cache-gb 40
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from engine.attention import get_backend
from engine.attention.metadata import AttentionMetadata
from engine.config import ModelConfig
from engine.cuda_graphs import DecodeGraphs
from engine.model.loader import load_model

_MODEL_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "models", "llama3-8b-shape"
)
BLOCK_SIZE = 16


def parse_cases(text: str) -> list[tuple[int, int]]:
    """'512x576,256x1024' -> [(512, 576), (256, 1024)]: (batch, context tokens)."""
    cases = []
    for item in text.split(","):
        batch, context = item.lower().split("x")
        cases.append((int(batch), int(context)))
    return cases


def random_decode_inputs(
    batch: int, context: int, num_blocks: int, vocab: int, generator: torch.Generator
) -> dict[str, list]:
    """One decode row per sequence at position context - 1; every sequence owns distinct blocks
    (a random permutation), so the new tokens' slots never collide."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    if batch * blocks_per_seq > num_blocks:
        need = batch * blocks_per_seq
        raise ValueError(f"{batch} x {context} tokens need {need} blocks, the cache has {num_blocks}")
    perm = torch.randperm(num_blocks, generator=generator)[: batch * blocks_per_seq].view(batch, -1)
    tables = perm.tolist()
    last = context - 1
    return dict(
        input_ids=torch.randint(vocab, (batch,), generator=generator).tolist(),
        positions=[last] * batch,
        slot_mapping=[t[last // BLOCK_SIZE] * BLOCK_SIZE + last % BLOCK_SIZE for t in tables],
        seq_lens=[context] * batch,
        block_tables=tables,
    )


def time_replays(graphs: DecodeGraphs, inputs: dict, iters: int) -> tuple[float, torch.Tensor]:
    """Median ms of `iters` replays (inputs copied once; a replay rewrites the same slots)."""
    bucket = next(x for x in graphs.buckets if x >= len(inputs["input_ids"]))
    graph, _ = graphs.graphs[bucket]
    with torch.inference_mode():
        hidden = graphs.run(**inputs).clone()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], hidden


def time_eager(
    model, kv_cache, inputs: dict, two: bool, prio: bool, iters: int
) -> tuple[float, torch.Tensor]:  # noqa: E501
    """Median ms of `iters` eager forwards (one batch, or two micro-batches: `two`) on a stream of
    the highest priority when `prio` (the attention stream has the lowest)."""
    low, high = torch.cuda.Stream.priority_range()
    dev = kv_cache.device
    b = len(inputs["input_ids"])
    ids = torch.tensor(inputs["input_ids"], device=dev)
    pos = torch.tensor(inputs["positions"], device=dev)
    tables = torch.tensor(inputs["block_tables"], dtype=torch.int32, device=dev)

    def meta(s, e):
        return AttentionMetadata(
            torch.tensor(inputs["slot_mapping"][s:e], device=dev),
            torch.arange(e - s + 1, dtype=torch.int32, device=dev),
            torch.tensor(inputs["seq_lens"][s:e], dtype=torch.int32, device=dev),
            tables[s:e],
            [1] * (e - s),
            inputs["seq_lens"][s:e],
            1,
            max(inputs["seq_lens"]),
        )

    main_stream = torch.cuda.Stream(priority=high if prio else 0)
    side = torch.cuda.Stream(priority=low)
    split = b // 2
    metas = (meta(0, split), meta(split, b))
    whole = meta(0, b)

    def step():
        if two:
            return model.forward_two_batches(ids, pos, kv_cache, metas, split, side)
        return model(ids, pos, kv_cache, whole)

    times = []
    with torch.inference_mode(), torch.cuda.stream(main_stream):
        for _ in range(3):
            out = step()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], out.clone()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default="512x576,384x576,256x576,256x1024,128x1024,128x2048")
    parser.add_argument("--kv-cache-gb", type=float, default=40.0)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument(
        "--variants", default="one,two,two-prio,eager,eager-two,eager-two-prio,two-prio-carve32"
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.two_batch needs a CUDA GPU (two streams and CUDA graphs)")
    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    config = ModelConfig.from_pretrained(_MODEL_DIR)
    model = load_model(config, get_backend("triton", "cuda"), "cuda", dtype, "dummy")
    block_bytes = config.num_hidden_layers * 2 * BLOCK_SIZE * config.num_key_value_heads * config.head_dim * 2
    num_blocks = int(args.kv_cache_gb * 1e9) // block_bytes
    shape = (config.num_hidden_layers, 2, num_blocks, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    kv_cache = torch.randn(shape, dtype=dtype, device=device)  # [L, 2, blocks, block, Hkv, D]
    cases = parse_cases(args.cases)
    max_batch = max(b for b, _ in cases)
    max_len = max(c for _, c in cases)
    low, high = torch.cuda.Stream.priority_range()  # (least, greatest): e.g. (0, -5)
    modes: dict[str, DecodeGraphs | tuple] = {}
    for variant in args.variants.split(","):
        carve = int(variant.split("carve")[1]) if "carve" in variant else None
        if variant.startswith("eager"):
            modes[variant] = ("eager", variant == "eager-two", "prio" in variant)
            continue
        graphs = DecodeGraphs(
            model, kv_cache, max_batch, max_len, BLOCK_SIZE, two_batch_min=2 if "two" in variant else None
        )
        if "prio" in variant:
            graphs.attention_stream = torch.cuda.Stream(priority=low)
        torch._C._set_sm_carveout_experimental(carve)
        graphs.capture(priority=high if "prio" in variant else 0)
        torch._C._set_sm_carveout_experimental(None)
        modes[variant] = graphs
    generator = torch.Generator().manual_seed(1)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}
    print(f"bench.two_batch on {result['device']}: ms per decode step (32 layers, one graph replay)")
    for batch, context in cases:
        inputs = random_decode_inputs(batch, context, num_blocks, config.vocab_size, generator)
        ms, hidden = {}, {}
        for name, graphs in modes.items():
            if isinstance(graphs, tuple):
                ms[name], hidden[name] = time_eager(model, kv_cache, inputs, graphs[1], graphs[2], args.iters)
            else:
                ms[name], hidden[name] = time_replays(graphs, inputs, args.iters)
        ref = hidden["one"].float()
        rel_diff = {k: ((v.float() - ref).norm() / ref.norm()).item() for k, v in hidden.items()}
        row = dict(batch=batch, context=context, ms=ms, rel_diff=rel_diff)
        result["cases"].append(row)
        print(f"{batch:>6} {context:>8} " + " ".join(f"{k}={v:.2f}" for k, v in ms.items()))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    return result


if __name__ == "__main__":
    main()
