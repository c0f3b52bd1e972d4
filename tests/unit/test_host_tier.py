"""The prefix cache's host-memory tier: evicted blocks kept in host slots and copied back.

Core (no tensors): LRU slots, pins, events. Engine (float32, CPU): greedy tokens of prompts
served from the host tier equal transformers', across chunked prefill and partial GPU
hits; a 1,000-request run with evictions leaks no GPU block, slot or pin."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine import LLM, SamplingParams, host_kv
from pdserve.engine.core.block_pool import BlockRemoved, BlockStored
from pdserve.engine.core.host_tier import BlockCopies, HostTier
from pdserve.engine.host_kv import HostKVPool
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


def test_blocks_evicted_one_after_another_take_consecutive_slots():
    """A run goes on into the next slot when it is free or holds a block in the older half
    by last use; a recently used block there is kept and the run restarts at the LRU slot."""
    tier = HostTier(8)
    for h in range(10, 14):
        tier.offload(block_id=h, block_hash=h, parent_hash=None)
    for h in range(20, 24):
        tier.offload(block_id=h, block_hash=h, parent_hash=None)
    assert [slot for _, slot in tier.take_copies().offloads] == list(range(8))
    assert tier.lookup([20]) == [4]
    tier.take_copies()
    for h in (30, 31, 32):  # full: LRU block 10's slot, then its old neighbours 11 and 12
        tier.offload(block_id=h, block_hash=h, parent_hash=None)
    assert tier.take_copies().offloads == [(30, 0), (31, 1), (32, 2)]
    assert tier.lookup([13]) == [3]  # slot 3's block is now the most recently used
    tier.take_copies()
    tier.offload(block_id=33, block_hash=33, parent_hash=None)
    assert tier.take_copies().offloads == [(33, 5)]  # the LRU block 21's slot; 13 kept
    assert tier.cached[13] == 3 and 21 not in tier.cached
    assert len(set(tier.cached.values())) == len(tier.cached) == 8


@pytest.mark.parametrize("head_dim", [8, 3], ids=["as_words", "as_floats"])
@pytest.mark.parametrize("staging_blocks", [None, 1, 3], ids=["one_chunk", "one_block", "three_blocks"])
def test_host_pool_copies_round_trip_in_runs_of_slots(staging_blocks, head_dim):
    """Blocks offloaded to scattered slots come back bit-exact into other GPU blocks, through
    a staging buffer of any size (chunked copies); nothing else in the cache changes. With a
    buffer that holds the step, each run of consecutive slots is one copy per layer.
    (head_dim 8: rows of 32 bytes move as 8-byte words; 3: as the floats themselves.)"""
    num_layers, num_blocks, block_shape = 3, 20, (4, 2, head_dim)
    cache = torch.randn(num_layers, 2, num_blocks, *block_shape)
    layer_block_bytes = 2 * 4 * 2 * head_dim * cache.element_size()
    staging = None if staging_blocks is None else staging_blocks * layer_block_bytes
    pool = HostKVPool(cache, 12, staging_bytes=staging)
    original = cache.clone()
    offloads = [(5, 3), (2, 4), (9, 5), (11, 0), (1, 7), (0, 8), (3, 9)]  # slot runs 0, 3-5, 7-9
    pool.run(BlockCopies(offloads=offloads))
    for block, slot in offloads:
        assert torch.equal(pool.slots[:, slot], original[:, :, block])
    if staging is None:
        assert pool.num_offload_copies == 3 * num_layers
    cache[:, :, 10:] = 0
    onloads = [(9, 10), (3, 15), (8, 12), (0, 19), (4, 16), (7, 13), (5, 17)]
    pool.run(BlockCopies(onloads=onloads))
    gpu_block_of_slot = {slot: block for block, slot in offloads}
    for slot, block in onloads:
        assert torch.equal(cache[:, :, block], original[:, :, gpu_block_of_slot[slot]])
    assert torch.equal(cache[:, :, :10], original[:, :, :10])
    assert not cache[:, :, [11, 14, 18]].any()  # untouched
    if staging is None:
        assert pool.num_load_copies == 3 * num_layers
    pool.wait_for_copies()  # what the runner does after the forward (no attention layers here)
    assert not pool._pending and not pool._hooks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    return path, make_checkpoint("llama", path)


@pytest.mark.parametrize(
    "budget, staging_bytes",
    [(2048, None), (24, None), (24, 1)],
    ids=["whole_prompts", "chunked", "chunked_one_block_staging"],
)
def test_prompts_served_from_the_host_tier_equal_transformers(checkpoint, budget, staging_bytes, monkeypatch):
    """`staging_bytes` 1: the staging buffer holds one layer of one block, so every copy
    is chunked to a single block."""
    if staging_bytes is not None:
        monkeypatch.setattr(host_kv, "STAGING_BYTES", staging_bytes)
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
    pool = llm.engine.runner.host_kv
    before, waits_before = tier.num_hits, pool.num_layer_waits
    # the long prompts again (and one extended): GPU evicted them, the host tier holds them
    again = long_prompts + [long_prompts[0] + [5, 6, 7, 8, 9]]
    for prompt in again:
        out = llm.generate([prompt], params)[0]
        want = expected.get(tuple(prompt)) or hf_greedy(model, prompt, 6)
        assert out.token_ids == want
        assert out.num_cached_tokens >= 64  # its full blocks came back instead of recomputed
    assert tier.num_hits - before >= 6 + 4  # both prompts' full blocks (the third hits the GPU)
    # two steps loaded blocks (others may only have saved some): in each step with copies,
    # every layer's attention waited for its own layer's
    waits, num_layers = pool.num_layer_waits - waits_before, model.config.num_hidden_layers
    assert waits >= 2 * num_layers and waits % num_layers == 0
    assert not pool._pending and not pool._hooks
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
    reference = LLM("tiny", num_gpu_blocks=1024, max_num_batched_tokens=256)  # no evictions
    for start in range(0, 1000, 50):
        outs = llm.generate(prompts[start : start + 50], params[start : start + 50])
        assert all(
            len(o.token_ids) == p.max_tokens for o, p in zip(outs, params[start : start + 50], strict=True)
        )
        # steps that load from the host tier beside other requests' prefills and decodes
        want = reference.generate(prompts[start : start + 50], params[start : start + 50])
        assert [o.token_ids for o in outs] == [o.token_ids for o in want]
    kv = llm.engine.kv_manager
    tier = kv.host
    assert kv.num_free_blocks == kv.num_blocks  # every GPU block back
    assert tier.num_hits > 0 and tier.num_used_slots <= tier.num_slots
    assert len(set(tier.cached.values())) == len(tier.cached)  # one hash per slot
    assert not tier._pinned and not tier.copies
    pool = llm.engine.runner.host_kv
    assert pool.num_layer_waits > 0 and not pool._pending and not pool._hooks
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


def test_bench_host_tier_small_reports_one_copy_per_layer(tmp_path):
    """`python -m pdserve.bench.host_tier --small` on CPU: the prompt evicted tail first comes
    back from the host tier as one run of slots, so one host-to-device copy per layer."""
    import json

    from pdserve.bench import host_tier as bench

    path = tmp_path / "host_tier.json"
    result = bench.main(["--small", "--reps", "1", "--json", str(path)])
    assert json.loads(path.read_text()).keys() == result.keys()  # CPU: the copy rates are NaN
    assert result["blocks_loaded"] == 256 // 16 - 1  # the last block is computed
    assert result["load_copies"] == bench.TINY["num_hidden_layers"]
    assert result["ttft_host_tier_ms"] > 0 and result["ttft_recompute_ms"] > 0
    # queueing the copies is host work only (on CPU they also run in there: still small)
    assert 0 < result["copies_queue_ms"] < result["ttft_host_tier_ms"]
    assert result["suffix_stream_spans"] == {}  # no --trace


def test_bench_host_tier_suffix_requests_load_all_of_the_prompt_every_rep():
    """Each rep's prompt stays in the tier through the rep: the suffix request over it loads
    every block of it, in every rep (with room for only 2.5 prompts, reps 2 and 3 found part
    of it evicted and recomputed it, and the overlap figure measured that recompute)."""
    from pdserve.bench import host_tier as bench

    # the 32k GPU run's proportions: four prefill chunks a prompt, a suffix of 1/16 of it
    argv = ["--small", "--reps", "3", "--prompt-tokens", "2000", "--chunk-tokens", "512"]
    result = bench.main([*argv, "--suffix-tokens", "128", "--max-position", "4096"])
    assert result["suffix_blocks_loaded"] == 2000 // 16  # 105 with the old 2.5-prompt tier
    assert result["blocks_loaded"] == 2000 // 16 - 1
