"""The Hugging Face transformers side of `python -m pdserve.bench.gpu`: the same measurements on
the same model shape, on the same device, in the same run.

Every function takes a built model and returns a plain dict of numbers plus a
`method` string saying exactly what was timed, so the JSON explains itself.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pdserve.bench.gpu_report import Report
    from pdserve.bench.gpu_shapes import Shapes


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of fn with the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def build_transformers_model(model_dir: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`LlamaForCausalLM(config)` from the same config.json pdserve loads, random weights.

    Built directly on the device with the target default dtype: initialising 8B
    parameters on the CPU and moving them would take minutes.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(model_dir)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old_dtype)
    return model.eval()


def random_ids(batch: int, length: int, vocab_size: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator).to(device)


@torch.inference_mode()
def bench_decode(
    model: torch.nn.Module, batch: int, context: int, new_tokens: int, vocab_size: int, seed: int = 0
) -> dict:
    """Decode tokens/s of `generate` (greedy, default dynamic cache).

    Method: t(N + 1 new tokens) - t(1 new token) is the time of N decode forwards,
    because both calls do the same prefill; the best of two 1-token calls is used.
    """
    device = next(model.parameters()).device
    input_ids = random_ids(batch, context, vocab_size, seed, device)
    attention_mask = torch.ones_like(input_ids)

    def generate(num_new: int) -> float:
        def call() -> None:
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=num_new,
                min_new_tokens=num_new,  # random weights may emit eos: never stop early
                do_sample=False,
                pad_token_id=0,
            )
            assert out.shape[1] == context + num_new, "generate stopped early"

        return timed_seconds(call, device)

    generate(2)  # warm-up: kernels, allocator
    prefill_s = min(generate(1) for _ in range(2))
    full_s = generate(new_tokens + 1)
    decode_s = max(full_s - prefill_s, 1e-9)
    return {
        "tokens_per_s": batch * new_tokens / decode_s,
        "batch": batch,
        "context": context,
        "new_tokens": new_tokens,
        "decode_s": decode_s,
        "prefill_plus_one_token_s": prefill_s,
        "method": f"generate: t({new_tokens + 1} new) - t(1 new), greedy, batch {batch}",
    }


@torch.inference_mode()
def bench_prefill(model: torch.nn.Module, num_tokens: int, vocab_size: int, reps: int, seed: int = 0) -> dict:
    """One forward over a `num_tokens` prompt (KV cache written, logits for the last
    token only, as generate's prefill and as pdserve's step): median of `reps`."""
    device = next(model.parameters()).device
    input_ids = random_ids(1, num_tokens, vocab_size, seed, device)
    kwargs: dict = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    call = lambda: model(input_ids=input_ids, use_cache=True, **kwargs)
    for _ in range(2):
        timed_seconds(call, device)
    times = [timed_seconds(call, device) for _ in range(reps)]
    return {
        "ms": statistics.median(times) * 1e3,
        "best_ms": min(times) * 1e3,
        "num_tokens": num_tokens,
        "method": f"model(ids[1, {num_tokens}], use_cache=True, {kwargs}): median of {reps} after 2 warm-ups",
    }


@torch.no_grad()  # not inference_mode: generate_batch updates its static tensors from a worker thread
def bench_generate_batch(
    model: torch.nn.Module,
    num_requests: int,
    prompt_len: int,
    output_len: int,
    vocab_size: int,
    small: bool,
    seed: int = 0,
) -> dict:
    """Offline throughput of transformers' continuous batching (`generate_batch`).

    Output tokens/s over the serving window: first request admitted to last one
    finished (the requests' own `lifespan` stamps), so the manager's set-up and
    CUDA-graph warm-up are not charged to it; the whole call's wall time is kept too.
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    prompts = random_ids(num_requests, prompt_len, vocab_size, seed, torch.device("cpu")).tolist()
    generation_config = GenerationConfig(max_new_tokens=output_len, do_sample=False, pad_token_id=0)
    kwargs: dict = {}
    accepted = inspect.signature(model.generate_batch).parameters  # it changes between 5.x releases
    if small:
        # The CPU unit test: no CUDA-graph warm-up, and a small cache rather than one
        # sized from free host memory (zeroing that takes longer than the whole test).
        if "warmup" in accepted:
            kwargs["warmup"] = False
        if "continuous_batching_config" in accepted:
            from transformers import ContinuousBatchingConfig

            kwargs["continuous_batching_config"] = ContinuousBatchingConfig(num_blocks=32)
    results: dict = {}

    def call() -> None:
        results.update(model.generate_batch(inputs=prompts, generation_config=generation_config, **kwargs))

    wall_s = timed_seconds(call, device)
    outputs = list(results.values())
    errors = [o.error for o in outputs if getattr(o, "error", None)]
    if len(outputs) != num_requests or errors:
        raise RuntimeError(
            f"generate_batch returned {len(outputs)}/{num_requests} results, errors: {errors[:3]}"
        )
    output_tokens = sum(len(o.generated_tokens) for o in outputs)
    spans = [getattr(o, "lifespan", (-1, -1)) for o in outputs]
    window_s = None
    if all(start > 0 and end >= start for start, end in spans):
        window_s = max(end for _, end in spans) - min(start for start, _ in spans)
    seconds = window_s if window_s else wall_s
    return {
        "output_tokens_per_s": output_tokens / seconds,
        "output_tokens_per_s_wall": output_tokens / wall_s,
        "num_requests": num_requests,
        "prompt_len": prompt_len,
        "output_len": output_len,
        "output_tokens": output_tokens,
        "window_s": window_s,
        "wall_s": wall_s,
        "method": (
            "generate_batch, greedy: output tokens / "
            + ("(last finish - first admission)" if window_s else "wall time of the call")
        ),
    }


def run_transformers(
    model_dir: str,
    device: torch.device,
    dtype: torch.dtype,
    shapes: Shapes,
    chosen: list[str],
    report: Report,
    small: bool,
) -> None:
    """Every chosen row except pack/unpack (transformers has no counterpart), on one
    model built after pdserve's has been freed."""
    import transformers

    report.result["transformers"] = transformers.__version__
    started = time.perf_counter()
    model = build_transformers_model(model_dir, device, dtype)
    vocab = model.config.vocab_size
    print(
        f"transformers {transformers.__version__}: built in {time.perf_counter() - started:.1f}s "
        f"(attention {model.config._attn_implementation})"
    )
    rows: dict[str, Callable[[], dict]] = {
        "decode_b1": lambda: bench_decode(model, 1, shapes.decode_context, shapes.decode_steps, vocab),
        "decode_batch": lambda: bench_decode(
            model, shapes.transformers_batch, shapes.batch_decode_context, shapes.decode_steps, vocab
        ),
        "prefill": lambda: bench_prefill(model, shapes.prefill_tokens, vocab, shapes.prefill_reps),
        "throughput": lambda: bench_generate_batch(
            model,
            shapes.transformers_requests,
            shapes.prompt_len,
            shapes.output_len,
            vocab,
            small=small,
        ),
    }
    for key, measure in rows.items():
        if key in chosen:
            report.record(key, "transformers", measure)
