"""Where an engine step's time goes: host phases, GPU kernels, and the gap between them.

    python -m pdserve.bench.profile_steps                 # Llama-3-8B shape, bf16, on CUDA
    python -m pdserve.bench.profile_steps --small         # tiny shapes on CPU (checks the script)
    python -m pdserve.bench.profile_steps --cases prefill --prefill-tokens 32768 \
        --max-num-batched-tokens 32768 --max-position 131072   # one long prefill (issue 19)

For the engine rows of `bench.gpu` (decode b=1 ctx 512, decode b=128 ctx 1,024, prefill of
2,048 tokens, and an offline `LLM.generate` call) it prints, per step (per call for offline):
  wall      engine.step() wall time
  gpu       sum of kernel and memcpy time under torch.profiler (CUDA only)
  host      wall time inside each engine phase: step > schedule, execute (> forward or graph,
            then sample), wait (for the step's tokens), update; gc = the garbage collector
and the top kernels by GPU time, also summed by kind (`kernel_kind`: GEMM, attention, other).
On CUDA it then reads the trace's timeline (bench.timeline): how long the GPU sat idle, what
the host was doing meanwhile, which host call ended each idle stretch, and the largest ones.
`--cases` picks among decode_b1, decode_batch, prefill and offline.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pdserve.bench import timeline
from pdserve.bench.gpu import LLAMA3_8B, TINY, build_llm, random_prompt
from pdserve.bench.gpu_limits import ModelCost
from pdserve.bench.gpu_shapes import SMALL, Shapes
from pdserve.engine import SamplingParams, cuda_graphs, model_runner
from pdserve.engine.sampled_tokens import SampledTokens

WINDOW = "profiled window"  # the record_function range around the measured steps


class PhaseTimer:
    """Wraps methods of objects (or classes), summing their wall time by label and marking
    each call as a profiler range (bench.timeline reads those); Python's garbage collector
    pauses inside `timing_gc()` are timed and marked as `gc`. Leaving the `with` block puts
    everything back."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._originals: list[tuple[object, str, object]] = []
        self._gc_range = None
        self._gc_start = 0.0

    def wrap(
        self,
        obj: object,
        name: str,
        label: str,
        describe: Callable[..., str] | None = None,
        inspect: Callable[[Any], None] | None = None,
    ) -> None:
        """`describe(*args)` adds to the range's name (not to the label's time);
        `inspect(result)` sees each call's result."""
        inner = getattr(obj, name)
        self._originals.append((obj, name, vars(obj).get(name)))

        def timed(*args, **kwargs):
            start = time.perf_counter()
            range_name = f"{label} {describe(*args)}" if describe else label
            try:
                with torch.profiler.record_function(range_name):
                    result = inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
            if inspect is not None:
                inspect(result)
            return result

        setattr(obj, name, functools.wraps(inner)(timed))

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
            self._gc_range = torch.profiler.record_function("gc")
            self._gc_range.__enter__()
        elif self._gc_range is not None:
            self._gc_range.__exit__(None, None, None)
            self._gc_range = None
            self.seconds["gc"] += time.perf_counter() - self._gc_start

    @contextlib.contextmanager
    def timing_gc(self) -> Iterator[None]:
        gc.callbacks.append(self._on_gc)
        try:
            yield
        finally:
            gc.callbacks.remove(self._on_gc)

    def __enter__(self) -> PhaseTimer:
        return self

    def __exit__(self, *exc) -> None:
        for obj, name, original in reversed(self._originals):
            if original is None:  # was looked up through the class: drop the instance's wrapper
                delattr(obj, name)
            else:
                setattr(obj, name, original)
        self._originals.clear()


def _fill_batch(llm, batch: int, context: int, max_tokens: int) -> None:
    engine = llm.engine
    rng = random.Random(batch)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
    for _ in range(batch):
        engine.add_request(
            engine.new_request_id(), random_prompt(rng, context, engine.model_config.vocab_size), params
        )
    while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
        engine.step()


KERNEL_KINDS = (  # (kind, name fragments), first match wins: cuDNN attention names say "sm90" too
    ("attention", ("sdpa", "fmha", "flash", "attention", "_attn", "_prefill_kernel", "_decode")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm")),
)


def kernel_kind(name: str) -> str:
    """GEMM, attention or other (element-wise, norms, copies: memory-bound) for a kernel name."""
    lowered = name.lower()
    for kind, fragments in KERNEL_KINDS:
        if any(fragment in lowered for fragment in fragments):
            return kind
    return "other"


def profile_case(llm, label: str, run_steps, num_steps: int, top: int) -> dict:
    """Time `run_steps(n)` (n engine steps) under the phase timer and torch.profiler."""
    engine = llm.engine
    runner = engine.runner
    device = runner.device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with PhaseTimer() as timer:
        steps_by_kind: dict[str, int] = defaultdict(int)

        def count_step(out) -> None:
            if out.is_empty:
                steps_by_kind["empty"] += 1
            else:
                decodes = sum(entry.num_new_tokens == 1 for entry in out.scheduled)
                steps_by_kind["decode only" if decodes == len(out.scheduled) else "with prefill"] += 1

        timer.wrap(engine.scheduler, "schedule", "schedule", inspect=count_step)
        timer.wrap(runner, "execute", "execute", describe=lambda out, _: f"{out.total_num_tokens} tok")
        for obj, name, phase in (
            (model_runner, "host_to_device", "h2d"),
            (cuda_graphs, "copy_into", "h2d"),
            (runner.model, "compute_logits", "logits"),
            (model_runner, "sample_tokens", "sample_tokens"),
            (SampledTokens, "launch", "copy_out"),
            (engine, "step", "step"),
            (engine.scheduler, "update", "update"),
            (runner.model, "forward", "forward"),
            (runner, "_sample", "sample"),
            (SampledTokens, "wait", "wait"),
        ):
            timer.wrap(obj, name, phase)
        if runner.decode_graphs is not None:
            timer.wrap(runner.decode_graphs, "run", "graph")
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            with torch.profiler.record_function(WINDOW), timer.timing_gc():
                run_steps(num_steps)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            wall = time.perf_counter() - start
    trace = timeline.trace_from_kineto(prof, WINDOW)
    kernels: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for op in trace.device_ops:
        kernels[op.name] += (op.end_ns - op.start_ns) / 1e6  # ms
        counts[op.name] += 1
    per_step = lambda x: x / num_steps  # noqa: E731
    host_ms = {name: per_step(seconds * 1e3) for name, seconds in timer.seconds.items()}
    result = {
        "steps": num_steps,
        "wall_ms": per_step(wall * 1e3),
        # host phases per step; nested: step > schedule, execute > (forward | graph, sample), wait, update
        "host_ms": host_ms,
        "schedule_ms": host_ms.get("schedule", 0.0),
        "execute_ms": host_ms.get("execute", 0.0),
        "scheduled_steps": dict(steps_by_kind),
        "gpu_ms": per_step(sum(kernels.values())),
        "gpu_ms_by_kind": _sum_by_kind(kernels, num_steps),
        "top_kernels": [
            {"name": name[:90], "ms_per_step": per_step(ms), "calls_per_step": counts[name] / num_steps}
            for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
        ],
    }
    if device.type == "cuda":  # on CPU nothing runs on a device: the whole window would be a gap
        result["timeline"] = timeline.summarize(trace, timeline.idle_gaps(trace, min_gap_us=2.0), top=top)
    print_case(label, result)
    return result


def _sum_by_kind(kernels: dict[str, float], num_steps: int) -> dict[str, float]:
    by_kind: dict[str, float] = defaultdict(float)
    for name, ms in kernels.items():
        by_kind[kernel_kind(name)] += ms / num_steps
    return dict(by_kind)


def print_case(label: str, result: dict) -> None:
    host = " ".join(f"{name} {ms:.3f}" for name, ms in result["host_ms"].items())
    print(f"{label}: wall {result['wall_ms']:.3f} ms/step | gpu {result['gpu_ms']:.3f} | host {host}")
    print(f"    schedules: {result['scheduled_steps']}")
    print("    gpu ms by kind: " + ", ".join(f"{k} {v:.3f}" for k, v in result["gpu_ms_by_kind"].items()))
    for k in result["top_kernels"]:
        print(f"    {k['ms_per_step']:8.3f} ms  x{k['calls_per_step']:5.1f}  {k['name']}")
    if "timeline" not in result:
        return
    t = result["timeline"]
    top = lambda d, n: ", ".join(f"{k} {v:.2f}" for k, v in list(d.items())[:n])  # noqa: E731
    print(
        f"    GPU idle {t['gpu_idle_ms']:.2f} of {t['window_ms']:.2f} ms ({t['num_gaps']} gaps >= 2 us, "
        f"{t['host_late_ms']:.2f} ms ended by a late host call); host meanwhile (ms): "
        + top(t["idle_by_host_annotation_ms"], 8)
    )
    print("    idle ended by (ms): " + top(t["idle_by_gap_end_ms"], 5))
    slow = ", ".join(f"{k} x{v['count']} {v['ms']:.2f}" for k, v in list(t["slow_host_calls"].items())[:10])
    print(f"    host ops and CUDA calls >= 100 us (ms): {slow}")
    for g in t["largest_gaps"][:5]:
        print(
            f"      {g['ms']:.3f} ms at {g['at_ms']:.1f} ms: host {g['host']} -> {g['ended_by']} {g['after']}"
        )


CASES = ("decode_b1", "decode_batch", "prefill", "offline")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="tiny model on CPU, float32, reference")
    parser.add_argument("--cases", default=",".join(CASES), help="comma list of " + ", ".join(CASES))
    parser.add_argument("--steps", type=int, default=20, help="profiled decode steps per case")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per case")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--offline-requests", type=int, default=512, help="requests of the offline case")
    parser.add_argument("--prefill-tokens", type=int, help="prompt of the prefill case (the shapes' 2,048)")
    parser.add_argument("--max-position", type=int, help="the model's max_position_embeddings (long prompts)")
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"--cases: unknown {sorted(unknown)}; choose from {', '.join(CASES)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    small = args.small or not torch.cuda.is_available()
    shapes: Shapes = SMALL if small else Shapes()
    device = torch.device("cpu" if small else "cuda")
    dtype = torch.float32 if small else torch.bfloat16
    cfg = dict(TINY if small else LLAMA3_8B)
    if args.max_position:
        cfg["max_position_embeddings"] = args.max_position
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
        start = time.perf_counter()
        gc.collect()
        results["gc_heap"] = {  # what a full collection walks once the engine is up
            "frozen_objects": gc.get_freeze_count(),
            "tracked_objects": len(gc.get_objects()),
            "full_collection_ms": (time.perf_counter() - start) * 1e3,
        }
        print(f"garbage collector after start-up: {results['gc_heap']}")
        cases = args.cases.split(",")
        for label in ("decode_b1", "decode_batch"):
            if label in cases:
                results[label] = profile_decode(llm, label, shapes, args)
        if "prefill" in cases:
            results["prefill"] = profile_prefill(llm, args.prefill_tokens or shapes.prefill_tokens, args.top)
        if "offline" in cases:
            results.update(profile_offline(llm, shapes, args))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)
    return results


def profile_decode(llm, label: str, shapes: Shapes, args: argparse.Namespace) -> dict:
    """`args.steps` decode steps of a full batch (b=1 at the shapes' decode context, or their batch)."""
    engine, steps = llm.engine, args.steps
    batch, context = (
        (1, shapes.decode_context)
        if label == "decode_b1"
        else (shapes.batch_decode_size, shapes.batch_decode_context)
    )

    def decode_steps(n: int) -> None:
        for _ in range(n):
            engine.step()

    _fill_batch(llm, batch, context, max_tokens=3 * steps + 16)
    decode_steps(8)  # warm-up: graph capture done at build, kernels compiled here
    result = profile_case(llm, f"{label} b={batch} ctx={context}", decode_steps, steps, args.top)
    for req_id in list(engine.scheduler.requests):
        engine.abort_request(req_id)
    return result


def profile_prefill(llm, num_tokens: int, top: int, reps: int = 5) -> dict:
    """`reps` prefills of fresh random `num_tokens` prompts (made before the profiled window:
    a 32k prompt's random ids take ~10 ms of Python) after two warm-ups."""
    engine = llm.engine
    rng = random.Random(num_tokens)
    prompts = [random_prompt(rng, num_tokens, engine.model_config.vocab_size) for _ in range(2 + reps)]

    def prefill(n: int) -> None:
        for _ in range(n):
            engine.add_request(
                engine.new_request_id(), prompts.pop(), SamplingParams(max_tokens=1, ignore_eos=True)
            )
            while engine.has_unfinished():
                engine.step()

    prefill(2)
    return profile_case(llm, f"prefill {num_tokens}", prefill, reps, top)


def profile_offline(llm, shapes: Shapes, args: argparse.Namespace) -> dict:
    """One `LLM.generate` call over `args.offline_requests` prompts, greedy, ignore_eos."""
    engine, results = llm.engine, {}
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    # made before the profiled window: building 512 random prompts is the bench's work
    offline_prompts = [random_prompt(rng, shapes.prompt_len, vocab) for _ in range(args.offline_requests)]

    def offline(n: int) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=shapes.output_len, ignore_eos=True)
        steps_before = engine.num_steps
        llm.generate(offline_prompts, params)
        results["offline_engine_steps"] = engine.num_steps - steps_before

    label = f"offline {args.offline_requests} x {shapes.prompt_len}/{shapes.output_len} (one call)"
    results["offline"] = profile_case(llm, label, offline, 1, args.top)
    print(f"    {results['offline_engine_steps']} engine steps")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
