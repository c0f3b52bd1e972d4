"""Block pool and KV cache manager: ref counts, prefix hashing, LRU revival, events."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.core import BlockPool, BlockRemoved, BlockStored, KVCacheManager, Request, SamplingParams
from pdserve.engine.core.block_pool import hash_block_tokens, hash_prompt_blocks


def test_hash_chains_parent_and_is_stable():
    a = hash_prompt_blocks(list(range(48)), 16)
    assert len(a) == 3
    assert a[1] == hash_block_tokens(a[0], list(range(16, 32)))
    # same block tokens under a different parent hash differently
    assert hash_block_tokens(0, list(range(16, 32))) != a[1]
    assert hash_prompt_blocks(list(range(47)), 16) == a[:2]  # partial block not hashed


@pytest.mark.parametrize("record_events", [True, False])
def test_free_cached_block_is_revived_then_evicted_lru(record_events: bool):
    pool = BlockPool(4, record_events=record_events)
    blocks = pool.allocate(2)
    pool.cache_blocks(blocks, [11, 22], parent_hash=0)
    pool.free(list(reversed(blocks)))
    assert pool.num_free_blocks == 4
    assert pool.lookup([11, 22, 33]) == blocks
    pool.touch(blocks[:1])
    assert pool.num_free_blocks == 3
    # the two never-used blocks go first, then the freed tail block (22), not the revived one
    new = pool.allocate(3)
    assert blocks[1] in new and blocks[0] not in new
    assert pool.lookup([11, 22]) == [blocks[0]]
    events = pool.take_events()
    # with no router to drain them (the offline LLM), nothing piles up; caching is the same
    assert events == ([BlockStored((11, 22), 0), BlockRemoved((22,))] if record_events else [])


def _req(rid, tokens):
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def test_manager_prefix_hit_leaves_last_token_to_compute():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    r1 = _req("a", list(range(8)))
    assert kv.allocate_slots(r1, 8) is not None
    kv.free(r1)
    r2 = _req("b", list(range(8)))
    hits, n = kv.get_computed_blocks(r2)
    assert n == 4 and len(hits) == 1  # 8 tokens = 2 full blocks, but the last token must run
    r3 = _req("c", list(range(9)))
    hits, n = kv.get_computed_blocks(r3)
    assert n == 8


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["alloc", "free"]), st.integers(0, 5), st.integers(1, 40)),
        min_size=1,
        max_size=40,
    )
)
def test_manager_invariants(ops):
    """No block is both free and in use; ref counts equal table membership; all free at the end."""
    kv = KVCacheManager(num_blocks=24, block_size=4)
    reqs: dict[str, Request] = {}
    shared = list(range(12))
    for op, idx, n in ops:
        rid = f"r{idx}"
        if op == "alloc" and rid not in reqs:
            req = _req(rid, shared[: n % 12] + [100 + idx] * n)
            hits, num_hit = kv.get_computed_blocks(req)
            if kv.allocate_slots(req, req.num_tokens - num_hit, hits) is not None:
                req.num_computed_tokens = req.num_tokens
                reqs[rid] = req
        elif op == "free" and rid in reqs:
            kv.free(reqs.pop(rid))
        pool = kv.pool
        in_use = {}
        for table in kv.block_ids.values():
            for b in table:
                in_use[b] = in_use.get(b, 0) + 1
        for b in range(pool.num_blocks):
            assert pool.ref_counts[b] == in_use.get(b, 0)
            assert (b in pool._free) == (pool.ref_counts[b] == 0)
        assert pool.num_free_blocks + len(in_use) == pool.num_blocks
    for req in list(reqs.values()):
        kv.free(req)
    assert kv.num_free_blocks == kv.num_blocks
    assert all(c == 0 for c in kv.pool.ref_counts)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["alloc", "free"]), st.integers(0, 5), st.integers(1, 40)),
        min_size=1,
        max_size=40,
    )
)
def test_manager_with_host_tier_invariants(ops):
    """With a host tier: a GPU block is offloaded only when evicted with its hash, every
    onload targets a new block of the request that hit, and no slot holds two hashes."""
    kv = KVCacheManager(num_blocks=16, block_size=4, num_host_blocks=6)
    reqs: dict[str, Request] = {}
    shared = list(range(12))
    for op, idx, n in ops:
        rid = f"r{idx}"
        if op == "alloc" and rid not in reqs:
            req = _req(rid, shared[: n % 12] + [100 + idx] * n)
            hits, num_hit = kv.get_computed_blocks(req)
            table = kv.allocate_slots(req, req.num_tokens - num_hit, hits)
            copies = kv.take_block_copies()
            if table is not None:
                req.num_computed_tokens = req.num_tokens
                reqs[rid] = req
                loaded = table[len(hits.block_ids) : len(hits)]
                assert [b for _, b in copies.onloads] == loaded
            else:
                assert not copies.onloads
            assert len({slot for _, slot in copies.offloads}) == len(copies.offloads)
        elif op == "free" and rid in reqs:
            kv.free(reqs.pop(rid))
        tier = kv.host
        assert len(set(tier.cached.values())) == len(tier.cached) <= tier.num_slots
        assert not tier._pinned
    for req in list(reqs.values()):
        kv.free(req)
    assert kv.num_free_blocks == kv.num_blocks
