"""Disaggregated serving on GPUs through Ray and the router's gRPC API.

- one GPU: 1P1D with the `grpc` backend, both workers sharing the GPU;
- two GPUs: 1P1D with `nccl` (torch.distributed NCCL between the workers' GPUs);
- three GPUs: prefill TP=2 feeding decode TP=1 and TP=1 feeding TP=2, over `nccl` (each
  worker's actor holds one GPU per rank; eager steps with the reference attention, what
  TP supports on CUDA for now); four GPUs: TP=2 feeding TP=2. The KV goes rank to rank
  (NCCL between every rank's GPU; rank 0 gathers and scatters nothing).
Greedy tokens for concurrent requests equal the co-located engine's.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from pdserve.deploy.config import parse_config
from pdserve.engine import LLM, SamplingParams

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NUM_REQUESTS = 64
MAX_TOKENS = 16
ENGINE = {
    "device": "cuda",
    "dtype": "float32",
    "num_gpu_blocks": 2048,
    "max_num_seqs": 64,
    "max_num_batched_tokens": 2048,
}


def make_prompts() -> list[list[int]]:
    rng = random.Random(7)
    prefixes = [[256] + [rng.randrange(256) for _ in range(60)] for _ in range(8)]
    return [
        prefixes[i % 8] + [rng.randrange(256) for _ in range(rng.randrange(1, 50))]
        for i in range(NUM_REQUESTS)
    ]


async def stream_all(url: str, prompts):
    from pdserve.router.client import AsyncPdserveClient, GenerateChunk

    async with AsyncPdserveClient(url) as client:

        async def one(p):
            toks = []
            async for ev in client.generate(p, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True):
                if isinstance(ev, GenerateChunk):
                    toks.extend(ev.token_ids)
            return toks

        return await asyncio.gather(*(one(p) for p in prompts))


def run_1p1d(backend: str, gpus_per_worker: float, prefill_tp: int = 1, decode_tp: int = 1) -> None:
    from pdserve.deploy.launcher import up

    prompts = make_prompts()
    engine = dict(ENGINE)
    if max(prefill_tp, decode_tp) > 1:
        engine.update(attention_backend="reference", enforce_eager=True)
    options = {k: v for k, v in engine.items() if k not in ("device", "dtype")}
    colocated = LLM("tiny", device="cuda", **options)
    expected = [
        o.token_ids
        for o in colocated.generate(
            prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        )
    ]
    del colocated
    torch.cuda.empty_cache()

    def pool(tp: int) -> dict:
        gpus = gpus_per_worker * tp
        return {"count": 1, "tensor_parallel_size": tp, "resources": {"num_cpus": 0, "num_gpus": gpus}}

    cfg = parse_config(
        {
            "model": "tiny",
            "engine": engine,
            "prefill": pool(prefill_tp),
            "decode": pool(decode_tp),
            "transfer": {"backend": backend},
            "router": {"port": 0, "policy_params": {"local_prefill_threshold_tokens": 0}},
        }
    )
    ray.init(
        address="local", num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False
    )
    try:
        dep = up(cfg)
        try:
            got = asyncio.run(stream_all(dep.url, prompts))
            assert got == expected
            if backend == "nccl" and max(prefill_tp, decode_tp) > 1:
                from tests.e2e.test_tensor_parallel_e2e import check_rank_to_rank

                check_rank_to_rank(dep, prefill_tp, decode_tp)
        finally:
            dep.down()
    finally:
        ray.shutdown()


def test_1p1d_grpc_sharing_one_gpu():
    run_1p1d("grpc", 0.5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_1p1d_nccl_two_gpus():
    run_1p1d("nccl", 1)


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2), (2, 2)])
def test_1p1d_nccl_between_tp_sizes(prefill_tp, decode_tp):
    if torch.cuda.device_count() < prefill_tp + decode_tp:
        pytest.skip(f"needs {prefill_tp + decode_tp} GPUs")
    run_1p1d("nccl", 1, prefill_tp, decode_tp)
