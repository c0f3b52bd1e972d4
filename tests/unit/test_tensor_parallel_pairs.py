"""Rank-to-rank KV pairing (engine/kv_heads.py `head_pairs`, transfer/nccl_direct.py `routes_for`):
which sending rank gives which receiving rank which heads, for every pair of TP sizes that
split or replicate the heads. Every receiving rank gets exactly its heads, each once, from the
lowest sending rank holding it; no sending rank ships a head it is not the source of; moving a
whole buffer by these pairs, rank slice to rank slice, reproduces each receiving rank's slice.
The wiring's global ranks: a worker's rank r at its first rank + r (TP 1: as before)."""

from __future__ import annotations

import pytest
import torch

from pdserve.deploy.wiring import WorkerSpec, transfer_ranks
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_heads import HeadPair, head_pairs, rank_heads
from pdserve.engine.model.sharding import kv_head_range, kv_head_sources
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.nccl_direct import routes_for
from pdserve.transfer.nccl_ranks import HeadRoute

SIZES = [1, 2, 4, 8]


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4, 8])
@pytest.mark.parametrize("src_size", SIZES)
@pytest.mark.parametrize("dst_size", SIZES)
def test_every_receiving_rank_gets_its_heads_once_from_their_source(num_kv_heads, src_size, dst_size):
    pairs = head_pairs(num_kv_heads, src_size, dst_size)
    sources = set(kv_head_sources(num_kv_heads, src_size))
    for dst in range(dst_size):
        start, count = kv_head_range(num_kv_heads, dst, dst_size)
        got = sorted(h for p in pairs if p.dst == dst for h in range(p.head_start, p.head_start + p.count))
        assert got == list(range(start, start + count))  # exactly its heads, each once
    for pair in pairs:
        assert pair.src in sources and pair.count > 0
        src_start, src_count = kv_head_range(num_kv_heads, pair.src, src_size)
        assert src_start <= pair.head_start and pair.head_start + pair.count <= src_start + src_count
        # the source is the lowest rank holding the head
        holders = [r for r in range(src_size) if kv_head_range(num_kv_heads, r, src_size)[0] == src_start]
        assert pair.src == min(holders)
    assert len({(p.src, p.dst) for p in pairs}) == len(pairs)  # one route per pair of ranks
    total = sum(p.count for p in pairs)
    assert total == sum(kv_head_range(num_kv_heads, d, dst_size)[1] for d in range(dst_size))


def test_the_pairs_of_the_tiny_models_sizes_by_hand():
    # tiny: 2 KV heads
    assert head_pairs(2, 1, 1) == [HeadPair(0, 0, 0, 2)]
    assert head_pairs(2, 2, 1) == [HeadPair(0, 0, 0, 1), HeadPair(1, 0, 1, 1)]
    assert head_pairs(2, 1, 2) == [HeadPair(0, 0, 0, 1), HeadPair(0, 1, 1, 1)]
    assert head_pairs(2, 2, 2) == [HeadPair(0, 0, 0, 1), HeadPair(1, 1, 1, 1)]
    # replicated on the sender (4 ranks, 2 heads: ranks 0,1 hold head 0, ranks 2,3 head 1):
    # only ranks 0 and 2 send; each of 4 replicated receivers gets its one head
    assert head_pairs(2, 4, 4) == [
        HeadPair(0, 0, 0, 1),
        HeadPair(0, 1, 0, 1),
        HeadPair(2, 2, 1, 1),
        HeadPair(2, 3, 1, 1),
    ]
    assert head_pairs(8, 2, 4) == [
        HeadPair(0, 0, 0, 2),
        HeadPair(0, 1, 2, 2),
        HeadPair(1, 2, 4, 2),
        HeadPair(1, 3, 6, 2),
    ]


def test_routes_use_local_head_offsets_and_global_peer_ranks():
    pairs = head_pairs(8, 2, 4)  # sender ranks hold 4 heads each, receivers 2
    # sending worker's rank 1 (heads 4..7) to a decode worker whose first global rank is 10
    assert routes_for(pairs, 1, 2, 8, True, 10) == (HeadRoute(12, 0, 2), HeadRoute(13, 2, 2))
    # receiving rank 3 (heads 6..7) from a prefill worker at global ranks 4, 5
    assert routes_for(pairs, 3, 4, 8, False, 4) == (HeadRoute(5, 0, 2),)
    assert routes_for(head_pairs(2, 4, 1), 1, 4, 2, True, 0) == ()  # a replica sends nothing


@pytest.mark.parametrize(
    ("num_kv_heads", "src_size", "dst_size"), [(2, 2, 1), (2, 1, 2), (2, 2, 2), (2, 4, 2), (4, 2, 8)]
)
def test_moving_slices_by_the_routes_rebuilds_every_receiving_rank(num_kv_heads, src_size, dst_size):
    whole = torch.randn(3, 2, 2, 4, num_kv_heads, 5)
    src_caches = [rank_heads(whole, r, src_size).clone() for r in range(src_size)]
    dst_caches = [torch.zeros_like(rank_heads(whole, r, dst_size)) for r in range(dst_size)]
    pairs = head_pairs(num_kv_heads, src_size, dst_size)
    sent = {}
    for src in range(src_size):  # global ranks: senders 0.., receivers 100..
        for route in routes_for(pairs, src, src_size, num_kv_heads, True, 100):
            sent[(src, route.peer - 100)] = src_caches[src].narrow(4, route.head_offset, route.count)
    for dst in range(dst_size):
        for route in routes_for(pairs, dst, dst_size, num_kv_heads, False, 0):
            buffer = sent.pop((route.peer, dst))
            dst_caches[dst].narrow(4, route.head_offset, route.count).copy_(buffer)
        assert torch.equal(dst_caches[dst], rank_heads(whole, dst, dst_size))
    assert not sent  # every send has its receive


def test_the_wiring_gives_every_rank_of_every_worker_a_global_rank():
    def spec(worker_id: str, tp: int) -> WorkerSpec:
        engine = EngineConfig(model="tiny", tensor_parallel_size=tp)
        return WorkerSpec(worker_id, worker_id.split("-")[0], engine, TransferConfig(backend="nccl"))

    specs = [spec("prefill-0", 2), spec("prefill-1", 1), spec("decode-0", 4), spec("decode-1", 1)]
    members = [s.worker_id for s in specs]
    assert transfer_ranks(specs, members) == (
        {"prefill-0": 0, "prefill-1": 2, "decode-0": 3, "decode-1": 7},
        8,
    )
    ones = [spec(w, 1) for w in members]  # TP 1 everywhere: the members' index and count, as before
    assert transfer_ranks(ones, members) == ({w: i for i, w in enumerate(members)}, 4)
