"""Greedy tokens of LLM.generate equal transformers' generate, token for token.

Four architectures x three settings that stress the paged cache: prefix caching
with shared prefixes, a cache so small that requests are preempted, and a token
budget smaller than the longest prompt (chunked prefill).
"""

from __future__ import annotations

import random

import pytest

from pdserve.engine import LLM, SamplingParams
from tests.hf_models import ARCHS, hf_greedy, make_checkpoint

MAX_NEW = 32


def make_prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(1)
    shared = [rng.randrange(vocab) for _ in range(100)]
    lengths = [1, 7, 16, 33, 120, 200, 300, 64]
    prompts = []
    for i, n in enumerate(lengths):
        if i % 2 == 0 and n > 100:  # several prompts share a 100-token prefix
            prompts.append(shared + [rng.randrange(vocab) for _ in range(n - 100)])
        else:
            prompts.append([rng.randrange(vocab) for _ in range(n)])
    prompts.append(shared + [5, 6, 7])  # a prefix hit for a short tail
    return prompts


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    model = make_checkpoint(request.param, path)
    prompts = make_prompts(model.config.vocab_size)
    expected = [hf_greedy(model, p, MAX_NEW) for p in prompts]
    return path, prompts, expected


SETTINGS = {
    "prefix_caching": dict(enable_prefix_caching=True, num_gpu_blocks=512),
    "preemption": dict(enable_prefix_caching=True, num_gpu_blocks=26, max_num_batched_tokens=512),
    "chunked_prefill": dict(enable_prefix_caching=False, num_gpu_blocks=512, max_num_batched_tokens=96),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_greedy_matches_transformers(checkpoint, setting):
    path, prompts, expected = checkpoint
    llm = LLM(path, **SETTINGS[setting])
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for i, (out, exp) in enumerate(zip(outs, expected, strict=True)):
        assert out.token_ids == exp, f"prompt {i} (len {len(prompts[i])}) differs"
        assert out.finish_reason == "length"
    sched = llm.engine.scheduler
    assert not sched.requests and llm.engine.kv_manager.num_free_blocks == llm.engine.kv_manager.num_blocks
    if setting == "prefix_caching":
        # a second round hits the cache for every prompt longer than one block
        again = llm.generate(prompts, params)
        assert [o.token_ids for o in again] == expected
        assert sum(o.num_cached_tokens for o in again) > 0
    if setting == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
