"""Sampling parity on a GPU: the fast backend with CUDA-graph decode and async scheduling
returns the same raw logprobs (sampled and prompt) and the same penalized greedy tokens as
the float32 reference engine on the CPU."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from tests.hf_models import make_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.backends.cuda.matmul.allow_tf32 = False
    path = str(tmp_path_factory.mktemp("llama"))
    make_checkpoint("llama", path)
    return path


def test_logprobs_and_penalties_on_gpu_equal_cpu_reference(checkpoint):
    rng = random.Random(0)
    prompts = [[rng.randrange(320) for _ in range(n)] for n in (3, 20, 70, 130)]
    prompts.append([5, 6, 5, 6, 5, 6, 5, 6])
    params = [
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=5, prompt_logprobs=3),
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, repetition_penalty=1.3, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, frequency_penalty=0.7),
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, presence_penalty=1.2, min_p=0.1),
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
    ]
    cpu = LLM(checkpoint, num_gpu_blocks=256).generate(prompts, params)
    gpu = LLM(checkpoint, device="cuda", num_gpu_blocks=256).generate(prompts, params)
    for i, (want, got) in enumerate(zip(cpu, gpu, strict=True)):
        assert got.token_ids == want.token_ids, f"request {i}"
        pairs = list(zip(got.logprobs or [], want.logprobs or [], strict=True))
        pairs += list(zip(got.prompt_logprobs or [], want.prompt_logprobs or [], strict=True))
        for g, w in pairs:
            assert g.token_id == w.token_id and abs(g.logprob - w.logprob) < 1e-3
            assert [t for t, _ in g.top] == [t for t, _ in w.top]
