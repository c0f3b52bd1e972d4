"""The host tier on a GPU (pinned slots, copies queued on the engine's stream under async
scheduling and CUDA graphs): prompts served from it give the CPU reference's greedy tokens."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from tests.hf_models import make_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_host_tier_on_gpu_equals_cpu_reference(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    make_checkpoint("llama", str(tmp_path))
    rng = random.Random(0)
    prompts = [[rng.randrange(320) for _ in range(150)] for _ in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = [o.token_ids for o in LLM(str(tmp_path), num_gpu_blocks=256).generate(prompts, params)]
    llm = LLM(str(tmp_path), device="cuda", num_gpu_blocks=24, num_host_blocks=64)
    for _ in range(2):  # the second round finds every prompt in the host tier
        for prompt, want in zip(prompts, expected, strict=True):
            assert llm.generate([prompt], params)[0].token_ids == want
    tier = llm.engine.kv_manager.host
    assert tier.num_hits >= 4 * 8
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.kv_manager.num_blocks
