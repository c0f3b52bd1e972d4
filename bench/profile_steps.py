"""Where an engine step's time goes: host phases, GPU kernels, and the gap between them.

    python -m bench.profile_steps                 # Llama-3-8B shape, bf16, on CUDA
    python -m bench.profile_steps --small         # tiny shapes on CPU (checks the script)

For the engine rows of `bench.gpu` (decode b=1 ctx 512, decode b=128 ctx 1,024, prefill of
2,048 tokens, and an offline `LLM.generate` call) it prints, per step (per call for offline):
  wall      engine.step() wall time
  schedule  Scheduler.schedule()             (host)
  execute   ModelRunner.execute()            (host prep + launches + wait for the tokens)
  update    Scheduler.update() + outputs     (host; the rest of step())
  gpu       sum of kernel and memcpy time under torch.profiler (CUDA only)
and the top kernels by GPU time. wall - gpu is time the GPU sat idle waiting for the host.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

import torch

from bench.gpu import LLAMA3_8B, SMALL, TINY, ModelCost, Shapes, build_llm, random_prompt


class PhaseTimer:
    """Wraps bound methods of one object, summing their wall time by label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, obj: object, name: str, label: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start

        setattr(obj, name, timed)


def _fill_batch(llm, batch: int, context: int, max_tokens: int) -> None:
    import random

    from engine import SamplingParams

    engine = llm.engine
    rng = random.Random(batch)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
    for _ in range(batch):
        engine.add_request(
            engine.new_request_id(), random_prompt(rng, context, engine.model_config.vocab_size), params
        )
    while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
        engine.step()


def profile_case(llm, label: str, run_steps, num_steps: int, top: int) -> dict:
    """Time `run_steps(n)` (n engine steps) under the phase timer and torch.profiler."""
    engine = llm.engine
    device = engine.runner.device
    timer = PhaseTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.runner, "execute", "execute")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        run_steps(num_steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    for name in ("schedule", "execute"):
        vars(engine.scheduler).pop(name, None)
        vars(engine.runner).pop(name, None)
    kernels: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] += event.device_time_total / 1e3  # ms
            counts[event.name] += 1
    per_step = lambda x: x / num_steps  # noqa: E731
    result = {
        "steps": num_steps,
        "wall_ms": per_step(wall * 1e3),
        "schedule_ms": per_step(timer.seconds["schedule"] * 1e3),
        "execute_ms": per_step(timer.seconds["execute"] * 1e3),
        "gpu_ms": per_step(sum(kernels.values())),
        "top_kernels": [
            {"name": name[:90], "ms_per_step": per_step(ms), "calls_per_step": counts[name] / num_steps}
            for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
        ],
    }
    result["update_ms"] = result["wall_ms"] - result["schedule_ms"] - result["execute_ms"]
    print(
        f"{label}: wall {result['wall_ms']:.3f} ms/step | schedule {result['schedule_ms']:.3f} "
        f"execute {result['execute_ms']:.3f} rest {result['update_ms']:.3f} | gpu {result['gpu_ms']:.3f}"
    )
    for k in result["top_kernels"]:
        print(f"    {k['ms_per_step']:8.3f} ms  x{k['calls_per_step']:5.1f}  {k['name']}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="tiny model on CPU, float32, reference")
    parser.add_argument("--steps", type=int, default=20, help="profiled decode steps per case")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per case")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--offline-requests", type=int, default=512, help="requests of the offline case")
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    small = args.small or not torch.cuda.is_available()
    shapes: Shapes = SMALL if small else Shapes()
    device = torch.device("cpu" if small else "cuda")
    dtype = torch.float32 if small else torch.bfloat16
    cfg = TINY if small else LLAMA3_8B
    cost = ModelCost(cfg, dtype)
    build_args = argparse.Namespace(
        num_gpu_blocks=None if device.type == "cuda" else 512,
        kv_cache_gb=45.0,
        dtype=str(dtype).removeprefix("torch."),
        block_size=16,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        attention_backend="reference" if small else "auto",
        enforce_eager=args.enforce_eager,
    )
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    with tempfile.TemporaryDirectory(prefix="profile-") as model_dir:
        with open(os.path.join(model_dir, "config.json"), "w") as file:
            json.dump(cfg, file)
        llm = build_llm(model_dir, build_args, device, cost)
        engine = llm.engine
        steps = args.steps

        def decode_steps(n: int) -> None:
            for _ in range(n):
                engine.step()

        for label, batch, context in (
            ("decode_b1", 1, shapes.decode_context),
            ("decode_batch", shapes.batch_decode_size, shapes.batch_decode_context),
        ):
            _fill_batch(llm, batch, context, max_tokens=3 * steps + 16)
            decode_steps(8)  # warm-up: graph capture done at build, kernels compiled here
            results[label] = profile_case(
                llm, f"{label} b={batch} ctx={context}", decode_steps, steps, args.top
            )
            for req_id in list(engine.scheduler.requests):
                engine.abort_request(req_id)

        def prefill(n: int) -> None:
            import random

            from engine import SamplingParams

            rng = random.Random(n)
            for _ in range(n):
                prompt = random_prompt(rng, shapes.prefill_tokens, engine.model_config.vocab_size)
                engine.add_request(
                    engine.new_request_id(), prompt, SamplingParams(max_tokens=1, ignore_eos=True)
                )
                while engine.has_unfinished():
                    engine.step()

        prefill(2)
        results["prefill"] = profile_case(llm, f"prefill {shapes.prefill_tokens}", prefill, 5, args.top)

        def offline(n: int) -> None:
            import random

            from engine import SamplingParams

            rng = random.Random(n)
            vocab = engine.model_config.vocab_size
            prompts = [random_prompt(rng, shapes.prompt_len, vocab) for _ in range(args.offline_requests)]
            params = SamplingParams(temperature=0.0, max_tokens=shapes.output_len, ignore_eos=True)
            steps_before = engine.num_steps
            llm.generate(prompts, params)
            results["offline_engine_steps"] = engine.num_steps - steps_before

        label = f"offline {args.offline_requests} x {shapes.prompt_len}/{shapes.output_len} (one call)"
        results["offline"] = profile_case(llm, label, offline, 1, args.top)
        print(f"    {results['offline_engine_steps']} engine steps")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
