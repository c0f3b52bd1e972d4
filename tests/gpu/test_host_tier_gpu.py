"""The host tier on a GPU: pinned slots, each direction's copies on a stream of its own,
with events: the offload's gather of a layer before the layer's blocks are reused (by the
engine stream or the same step's load), each layer's loads before that layer's attention;
under async scheduling and CUDA graphs, prompts served from it give the CPU reference's
greedy tokens."""

from __future__ import annotations

import gc
import random
import time

import pytest
import torch

from pdserve.engine import LLM, SamplingParams, host_kv
from pdserve.engine.core.host_tier import BlockCopies
from pdserve.engine.host_kv import HostKVPool
from tests.hf_models import make_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NUM_LAYERS, NUM_BLOCKS, BLOCK = 4, 64, (16, 2, 128)  # bf16 rows of 256 bytes: copied as words
SLEEP_CYCLES = 50_000_000  # tens of ms on any current GPU: a stream busy long past the host


def _cache() -> torch.Tensor:
    return torch.randn(NUM_LAYERS, 2, NUM_BLOCKS, *BLOCK, device="cuda").to(torch.bfloat16)


def _pool(cache: torch.Tensor, staging_blocks: int) -> HostKVPool:
    layer_block_bytes = cache[0, :, 0].numel() * cache.element_size()
    pool = HostKVPool(cache, 32, staging_bytes=staging_blocks * layer_block_bytes)
    assert pool._out.stream is not None and pool._in.stream is not None and pool.slots.is_pinned()
    return pool


def _engine_writes(pool: HostKVPool, cache: torch.Tensor, index: torch.Tensor, value: float) -> None:
    """What a forward does: each layer waits for its copies, then writes those blocks."""
    for layer in range(NUM_LAYERS):
        pool._wait_layer(layer)
        cache[layer].index_fill_(1, index, value)
    pool.wait_for_copies()


@pytest.mark.parametrize("staging_blocks", [3, 32], ids=["chunked", "one_chunk"])
def test_offload_reads_blocks_after_the_engine_stream_and_before_their_reuse(staging_blocks):
    """The offload starts after the engine stream's queued writes to the blocks (first half:
    the engine stream is held up), and the engine stream's later writes to a layer (the
    blocks' new owners) wait for that layer's gather (second half: the offload is held up)."""
    cache = _cache()
    pool = _pool(cache, staging_blocks)
    blocks = [9, 3, 40, 41, 42, 7, 60, 1, 2, 30]
    index = torch.tensor(blocks, device="cuda")  # on the device already: no host sync below
    for first_slot, engine_sleep, copy_sleep, value in ((0, 1, 0, 1.0), (16, 0, 2, 3.0)):
        offloads = [(block, first_slot + i) for i, block in enumerate(blocks)]
        torch.cuda.synchronize()
        torch.cuda._sleep(engine_sleep * SLEEP_CYCLES)
        cache.index_fill_(2, index, value)  # the blocks' last contents (engine stream)
        with torch.cuda.stream(pool._out.stream):
            torch.cuda._sleep(copy_sleep * SLEEP_CYCLES)
        pool.run(BlockCopies(offloads=offloads))
        _engine_writes(pool, cache, index, -value)  # new owners
        pool.synchronize()
        torch.cuda.synchronize()
        assert (pool.slots[:, first_slot : first_slot + len(blocks)] == value).all()


@pytest.mark.parametrize("staging_blocks", [3, 32], ids=["chunked", "one_chunk"])
def test_loads_land_before_each_layer_waits_for_them(staging_blocks):
    """Loads go in a layer at a time on their stream; a layer's event covers that layer's
    blocks, and waiting on every layer covers all: bit-exact round trip to new blocks."""
    cache = _cache()
    original = cache.clone()
    pool = _pool(cache, staging_blocks)
    offloads = [(block, slot) for slot, block in enumerate([5, 6, 7, 8, 20, 21, 33, 12])]
    pool.run(BlockCopies(offloads=offloads))
    pool.synchronize()
    targets = [50, 51, 52, 53, 54, 55, 56, 57]
    cache[:, :, targets] = 0
    torch.cuda.synchronize()
    target_index = torch.tensor(targets, device="cuda")
    with torch.cuda.stream(pool._in.stream):
        torch.cuda._sleep(SLEEP_CYCLES)  # the loads start well after the host moves on
    pool.run(BlockCopies(onloads=[(slot, t) for (_, slot), t in zip(offloads, targets, strict=True)]))
    assert sorted(pool._pending) == list(range(NUM_LAYERS))
    pool._wait_layer(0)  # what layer 0's attention pre-hook does
    layer0 = cache[0].index_select(1, target_index)  # the engine stream, after layer 0's event
    pool.wait_for_copies()
    loaded = cache.index_select(2, target_index)
    torch.cuda.synchronize()
    sources = [block for block, _ in offloads]
    assert torch.equal(layer0, original[0][:, sources])
    assert torch.equal(loaded, original[:, :, sources])
    assert pool.last_load_seconds() > 0
    assert not pool._pending and not pool._hooks


@pytest.mark.parametrize("staging_blocks", [3, 32], ids=["chunked", "one_chunk"])
def test_a_step_loads_into_the_blocks_it_evicts_after_saving_them(staging_blocks):
    """One step evicts blocks (saved to new slots) and loads other slots into those same
    blocks, the offload held up: each layer's scatter waits for that layer's gather."""
    cache = _cache()
    pool = _pool(cache, staging_blocks)
    blocks = [4, 5, 6, 30, 31]
    index = torch.tensor(blocks, device="cuda")
    cache.index_fill_(2, index, 5.0)
    pool.run(BlockCopies(offloads=[(b, i) for i, b in enumerate(blocks)]))  # slots 0-4 hold 5.0
    pool.synchronize()
    cache.index_fill_(2, index, 7.0)  # the blocks' contents now, to be saved in slots 10-14
    with torch.cuda.stream(pool._out.stream):
        torch.cuda._sleep(SLEEP_CYCLES)
    offloads = [(b, 10 + i) for i, b in enumerate(blocks)]
    onloads = [(i, b) for i, b in enumerate(blocks)]
    pool.run(BlockCopies(offloads=offloads, onloads=onloads))
    pool.wait_for_copies()
    loaded = cache.index_select(2, index)
    pool.synchronize()
    torch.cuda.synchronize()
    assert (pool.slots[:, 10:15] == 7.0).all()
    assert (loaded == 5.0).all()
    assert pool.last_offload_seconds() > 0 and pool.last_load_seconds() > 0


@pytest.mark.parametrize("staging_bytes", [None, 1], ids=["default_staging", "one_block_staging"])
def test_host_tier_on_gpu_equals_cpu_reference(tmp_path, staging_bytes, monkeypatch):
    """Async scheduling and CUDA graphs on; 145 tokens: 9 blocks load and one token is
    computed, a decode-shaped step that replays a graph (its loads waited for first)."""
    if staging_bytes is not None:
        monkeypatch.setattr(host_kv, "STAGING_BYTES", staging_bytes)
    torch.backends.cuda.matmul.allow_tf32 = False
    make_checkpoint("llama", str(tmp_path))
    rng = random.Random(0)
    prompts = [[rng.randrange(320) for _ in range(n)] for n in (150, 150, 145, 150)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = [o.token_ids for o in LLM(str(tmp_path), num_gpu_blocks=256).generate(prompts, params)]
    llm = LLM(str(tmp_path), device="cuda", num_gpu_blocks=24, num_host_blocks=64)
    pool = llm.engine.runner.host_kv
    for _ in range(2):  # the second round finds every prompt in the host tier
        for prompt, want in zip(prompts, expected, strict=True):
            assert llm.generate([prompt], params)[0].token_ids == want
    tier = llm.engine.kv_manager.host
    assert tier.num_hits >= 4 * 8
    assert pool.num_layer_waits > 0  # eager steps' layers waited for their own loads
    assert not pool._pending and not pool._hooks
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.kv_manager.num_blocks


def _rss_shmem_bytes() -> int:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["RssShmem"].split()[0]) * 1024


def test_slots_are_exactly_their_size_pinned_in_place_and_copied_asynchronously():
    """3000 slots of 64 KiB (187.5 MiB: torch's pinned allocator would have taken 256 MiB):
    the slots are pageable pages pinned in place, resident and registered at exactly their
    size (nothing from torch's pinned allocator); a copy into them while their stream is held
    up returns at once (a copy to pageable memory would block the host until it ran); after
    close() (and after the pool is collected) they are plain pageable memory."""
    cache = _cache()
    torch.cuda.synchronize()
    allocator_before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    shmem_before = _rss_shmem_bytes()
    pool = HostKVPool(cache, 3000)
    requested = pool.slots.numel() * pool.slots.element_size()
    assert requested == 3000 * NUM_LAYERS * 2 * 16 * 2 * 128 * 2 and requested & (requested - 1)
    grown = _rss_shmem_bytes() - shmem_before
    assert requested <= grown < requested + (2 << 20), grown  # resident now, and only that
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == allocator_before
    assert pool.slots.is_pinned() and pool.slots[NUM_LAYERS - 1, 2999].is_pinned()
    assert len(pool._memory.registered) == 1  # 4 layers of 47 MiB: one registration
    # once first, so first-use allocations (the block ids' pinned staging) are not timed
    pool.run(BlockCopies(offloads=[(block, 100 + block) for block in range(NUM_BLOCKS)]))
    pool.synchronize()
    with torch.cuda.stream(pool._out.stream):
        torch.cuda._sleep(10 * SLEEP_CYCLES)  # hundreds of ms
    start = time.perf_counter()
    pool.run(BlockCopies(offloads=[(block, 100 + block) for block in range(NUM_BLOCKS)]))
    queued_s = time.perf_counter() - start
    assert not pool._out.stream.query(), (
        f"the copies ran before the held-up stream got to them ({queued_s:.3f} s)"
    )
    pool.synchronize()
    torch.cuda.synchronize()
    assert queued_s < 0.05, f"queueing the copies blocked the host for {queued_s:.3f} s"
    assert torch.equal(pool.slots[:, 100 : 100 + NUM_BLOCKS].cpu(), cache.transpose(1, 2).cpu())
    pool.close()
    pool.close()  # idempotent
    assert not pool.slots.is_pinned()
    view = HostKVPool(cache, 8).slots[0]  # collected at once, its pool and registration with it
    gc.collect()
    assert not view.is_pinned() and int(view.count_nonzero()) == 0  # unregistered, still valid


def test_layers_over_the_piece_cap_register_in_pieces_of_whole_layers(monkeypatch):
    """With the cap at 1.5 layers, each layer is a registration of its own: every copy (one
    layer's run of slots) stays within one, and a round trip through them is bit-exact."""
    from pdserve.engine import host_memory

    cache = _cache()
    layer_bytes = 32 * cache[0, :, 0].numel() * cache.element_size()
    monkeypatch.setattr(host_memory, "REGISTER_PIECE_BYTES", layer_bytes * 3 // 2)
    pool = HostKVPool(cache, 32)
    assert len(pool._memory.registered) == NUM_LAYERS
    assert all(pool.slots[layer].is_pinned() for layer in range(NUM_LAYERS))
    original = cache.clone()
    pool.run(BlockCopies(offloads=[(block, block) for block in range(32)]))
    pool.synchronize()
    cache.zero_()
    pool.run(BlockCopies(onloads=[(slot, slot) for slot in range(32)]))
    pool.wait_for_copies()
    torch.cuda.synchronize()
    assert torch.equal(cache[:, :, :32], original[:, :, :32])
    pool.close()
