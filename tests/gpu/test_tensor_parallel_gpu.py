"""engine.tensor_parallel_size 2 over NCCL on two GPUs: float32 greedy tokens equal
transformers' (eager steps, reference attention; the Triton kernels and CUDA graphs per rank:
test_tensor_parallel_triton_gpu.py). Skipped with fewer than two GPUs."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from tests.hf_models import hf_greedy, make_checkpoint

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.mark.parametrize(("arch", "overrides"), [("qwen2", {}), ("llama", {"num_key_value_heads": 1})])
def test_tp2_nccl_greedy_matches_transformers(arch, overrides, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    hf = make_checkpoint(arch, str(tmp_path), **overrides)
    rng = random.Random(5)
    prompts = [[rng.randrange(hf.config.vocab_size) for _ in range(n)] for n in (1, 17, 90)]
    expected = [hf_greedy(hf, p, 16) for p in prompts]  # on the CPU: the float32 oracle
    llm = LLM(
        str(tmp_path),
        device="cuda",
        tensor_parallel_size=2,
        attention_backend="reference",
        enforce_eager=True,
        num_gpu_blocks=64,
    )
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    finally:
        llm.shutdown()
    assert [o.token_ids for o in outs] == expected
