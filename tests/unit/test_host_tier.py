"""The prefix cache's host-memory tier: evicted blocks kept in host slots and copied back.

Core (no tensors): LRU slots, pins, events. Engine (float32, CPU): greedy tokens of prompts
served from the host tier equal transformers', across chunked prefill and partial GPU
hits; a 1,000-request run with evictions leaks no GPU block, slot or pin."""

from __future__ import annotations

import random

import pytest

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.core.block_pool import BlockRemoved, BlockStored
from pdserve.engine.core.host_tier import HostTier
from tests.hf_models import hf_greedy, make_checkpoint


def test_host_tier_keeps_lru_slots_and_never_overwrites_a_pinned_one():
    tier = HostTier(2)
    tier.offload(block_id=7, block_hash=100, parent_hash=None)
    tier.offload(block_id=8, block_hash=101, parent_hash=100)
    tier.offload(block_id=8, block_hash=101, parent_hash=100)  # kept already: no second copy
    assert tier.take_copies().offloads == [(7, 0), (8, 1)]
    assert tier.lookup([100, 101, 102]) == [0, 1]  # pinned until the step's copies are taken
    tier.offload(block_id=9, block_hash=102, parent_hash=101)  # every slot pinned: dropped
    assert 102 not in tier.cached
    tier.onload([0, 1], [3, 4])
    copies = tier.take_copies()
    assert copies.onloads == [(0, 3), (1, 4)] and not copies.offloads
    assert tier.lookup([101]) == [1]  # 101 is now the most recent; 100 the least
    tier.take_copies()
    tier.offload(block_id=9, block_hash=102, parent_hash=101)
    assert tier.take_copies().offloads == [(9, 0)]  # 100's slot, the least recently used
    assert list(tier.cached) == [101, 102]
    assert tier.take_events() == [
        BlockStored((100,), None, "cpu"),
        BlockStored((101,), 100, "cpu"),
        BlockRemoved((100,), "cpu"),
        BlockStored((102,), 101, "cpu"),
    ]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    return path, make_checkpoint("llama", path)


@pytest.mark.parametrize("budget", [2048, 24], ids=["whole_prompts", "chunked"])
def test_prompts_served_from_the_host_tier_equal_transformers(checkpoint, budget):
    path, model = checkpoint
    rng = random.Random(0)
    vocab = model.config.vocab_size
    long_prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (100, 75)]
    fillers = [[rng.randrange(vocab) for _ in range(90)] for _ in range(4)]
    # 16 GPU blocks of 16 tokens: each filler evicts what came before it
    llm = LLM(path, num_gpu_blocks=16, num_host_blocks=64, max_num_batched_tokens=budget)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = {tuple(p): hf_greedy(model, p, 6) for p in long_prompts + fillers}
    for prompt in long_prompts + fillers:
        out = llm.generate([prompt], params)[0]
        assert out.token_ids == expected[tuple(prompt)]
    tier = llm.engine.kv_manager.host
    before = tier.num_hits
    # the long prompts again (and one extended): GPU evicted them, the host tier holds them
    again = long_prompts + [long_prompts[0] + [5, 6, 7, 8, 9]]
    for prompt in again:
        out = llm.generate([prompt], params)[0]
        want = expected.get(tuple(prompt)) or hf_greedy(model, prompt, 6)
        assert out.token_ids == want
        assert out.num_cached_tokens >= 64  # its full blocks came back instead of recomputed
    assert tier.num_hits - before >= 6 + 4  # both prompts' full blocks (the third hits the GPU)
    engine = llm.engine
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


def test_thousand_requests_with_evictions_leak_nothing():
    llm = LLM("tiny", num_gpu_blocks=48, num_host_blocks=40, max_num_batched_tokens=256)
    rng = random.Random(1)
    prefixes = [[rng.randrange(256) for _ in range(rng.choice((32, 48, 80)))] for _ in range(12)]
    prompts, params = [], []
    for _ in range(1000):
        prompts.append(rng.choice(prefixes) + [rng.randrange(256) for _ in range(rng.randrange(1, 20))])
        params.append(SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 6), ignore_eos=True))
    for start in range(0, 1000, 50):
        outs = llm.generate(prompts[start : start + 50], params[start : start + 50])
        assert all(
            len(o.token_ids) == p.max_tokens for o, p in zip(outs, params[start : start + 50], strict=True)
        )
    kv = llm.engine.kv_manager
    tier = kv.host
    assert kv.num_free_blocks == kv.num_blocks  # every GPU block back
    assert tier.num_hits > 0 and tier.num_used_slots <= tier.num_slots
    assert len(set(tier.cached.values())) == len(tier.cached)  # one hash per slot
    assert not tier._pinned and not tier.copies
    assert not llm.engine.scheduler.requests


def test_disaggregated_serving_with_host_tiers_equals_offline():
    """1P1D over gRPC, both workers with small GPU caches and a host tier: a prompt evicted
    from both GPUs comes back from the host tiers (the prefill worker copies instead of
    computing; the decode worker's reservation asks for fewer blocks) and still equals the
    offline engine's tokens."""
    from pdserve.engine.config import EngineConfig
    from pdserve.router.client import GenerateChunk, GenerateComplete, PdserveClient
    from tests.inprocess import InProcessDeployment

    rng = random.Random(2)
    prompts = [[rng.randrange(256) for _ in range(120)] for _ in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    expected = [o.token_ids for o in LLM("tiny", num_gpu_blocks=256).generate(prompts, params)]
    engine = EngineConfig(model="tiny", num_gpu_blocks=20, num_host_blocks=64)
    dep = InProcessDeployment(num_prefill=1, num_decode=1, engine=engine)
    try:
        with PdserveClient(dep.url) as client:

            def run(i: int) -> tuple[list[int], GenerateComplete]:
                events = list(client.generate(prompts[i], temperature=0.0, max_tokens=5, ignore_eos=True))
                tokens = [t for e in events if isinstance(e, GenerateChunk) for t in e.token_ids]
                return tokens, events[-1]

            for i in range(5):  # each prompt evicts the one before it from both GPUs
                assert run(i)[0] == expected[i]
            tokens, complete = run(0)
            assert tokens == expected[0] and complete.usage.cached_tokens >= 96
        for worker in [*dep.prefill.values(), *dep.decode.values()]:
            assert worker.engine.kv_manager.host.num_hits >= 6, worker
        assert dep.all_blocks_free()
    finally:
        dep.close()
