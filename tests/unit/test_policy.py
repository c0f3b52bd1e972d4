"""Routing policies over a real tracker and index."""

import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.engine.core.block_pool import BlockStored
from pdserve.engine.core.outputs import LoadReport
from pdserve.router.kv_sync import KVEventBatch
from pdserve.router.policy import (
    CacheAwarePolicy,
    LeastLoadedPolicy,
    PolicyConfig,
    RoundRobinPolicy,
    make_policy,
)
from pdserve.router.routing import RouteRequest
from pdserve.router.worker_state import WorkerStateTracker

BLOCK = 16


def add_worker(
    tracker: WorkerStateTracker,
    worker_id: str,
    role: str,
    free: int = 1000,
    total: int = 1000,
    running: int = 0,
    queued: int = 0,
    ts: float = 0.0,
) -> None:
    tracker.update_load(LoadReport(worker_id, "i0", role, free, total, BLOCK, running, 0, queued, ts))


def hold(tracker: WorkerStateTracker, worker_id: str, hashes: list[int], seq: int = 0) -> None:
    assert tracker.apply(KVEventBatch(worker_id, "i0", seq, [BlockStored(tuple(hashes), 0)]))


def request(req_id: str, hashes: list[int], extra_tokens: int = 8, max_tokens: int = 64) -> RouteRequest:
    return RouteRequest(req_id, len(hashes) * BLOCK + extra_tokens, hashes, max_tokens)


def cluster(num_prefill: int = 2, num_decode: int = 2) -> WorkerStateTracker:
    tracker = WorkerStateTracker(clock=lambda: 1.0)
    for i in range(num_prefill):
        add_worker(tracker, f"p{i}", "prefill")
    for i in range(num_decode):
        add_worker(tracker, f"d{i}", "decode")
    return tracker


PREFIX = list(range(1000, 1064))  # 64 blocks = 1024 tokens


def test_cache_aware_prefills_where_prefix_is_cached() -> None:
    tracker = cluster()
    hold(tracker, "p1", PREFIX)
    decision = CacheAwarePolicy().route(request("r", PREFIX), tracker)
    assert decision is not None and decision.prefill_worker_id == "p1"
    assert decision.num_prefix_hit_tokens == 64 * BLOCK


def test_cache_hit_cannot_outweigh_a_long_queue() -> None:
    tracker = cluster()
    hold(tracker, "p1", PREFIX)
    add_worker(tracker, "p1", "prefill", queued=5000, ts=0.5)
    decision = CacheAwarePolicy().route(request("r", PREFIX), tracker)
    assert decision is not None and decision.prefill_worker_id == "p0"


@pytest.mark.parametrize("policy_name", ["round_robin", "least_loaded", "cache_aware"])
def test_every_policy_respects_decode_headroom(policy_name: str) -> None:
    tracker = cluster()
    add_worker(tracker, "d0", "decode", free=5, total=1000, ts=0.5)  # too full for 10 blocks
    policy = make_policy(policy_name)
    for i in range(5):
        decision = policy.route(request(f"r{i}", PREFIX[:4] + [i]), tracker)
        assert decision is not None and decision.decode_worker_id == "d1"


@pytest.mark.parametrize("policy_name", ["round_robin", "least_loaded", "cache_aware"])
def test_none_when_no_decode_worker_has_room(policy_name: str) -> None:
    tracker = cluster()
    add_worker(tracker, "d0", "decode", free=3, ts=0.5)
    add_worker(tracker, "d1", "decode", free=3, ts=0.5)
    assert make_policy(policy_name).route(request("r", [1, 2, 3]), tracker) is None


def test_pending_reservations_spread_a_burst() -> None:
    tracker = cluster(num_prefill=2, num_decode=4)
    policy = LeastLoadedPolicy()
    chosen = []
    for i in range(8):
        req = request(f"r{i}", [i * 100 + j for j in range(8)])
        decision = policy.route(req, tracker)
        assert decision is not None
        tracker.on_routed(req, decision)
        chosen.append(decision.decode_worker_id)
    assert sorted(chosen) == ["d0", "d0", "d1", "d1", "d2", "d2", "d3", "d3"]


def test_committed_blocks_stop_admission_before_memory_runs_out() -> None:
    tracker = cluster(num_prefill=1, num_decode=1)
    add_worker(tracker, "d0", "decode", free=100, total=100, ts=0.5)
    policy = CacheAwarePolicy()
    admitted = 0
    for i in range(10):
        req = RouteRequest(f"r{i}", 160, [i * 100 + j for j in range(10)], max_tokens=160)  # 20 blocks
        decision = policy.route(req, tracker)
        if decision is None:
            break
        tracker.on_routed(req, decision, now=1.0)
        admitted += 1
    assert admitted == 5
    tracker.release("r0")
    assert policy.route(RouteRequest("x", 160, [7] * 10, 160), tracker) is not None


def test_conditional_disaggregation_prefills_on_decode_worker() -> None:
    tracker = cluster()
    hold(tracker, "d1", PREFIX)  # 40 tokens left to compute there; 1,064 on any prefill worker
    decision = CacheAwarePolicy().route(request("r", PREFIX + [5, 6], extra_tokens=8), tracker)
    assert decision is not None
    assert decision.prefill_worker_id is None and decision.decode_worker_id == "d1"
    assert decision.num_prefix_hit_tokens == 64 * BLOCK
    off = CacheAwarePolicy(PolicyConfig(local_prefill_threshold_tokens=0))
    decision = off.route(request("r", PREFIX + [5, 6], extra_tokens=8), tracker)
    assert decision is not None and decision.prefill_worker_id in ("p0", "p1")


def test_idle_prefill_worker_with_the_prefix_beats_local_prefill() -> None:
    tracker = cluster()
    hold(tracker, "d1", PREFIX)
    hold(tracker, "p0", PREFIX)  # same 40-token remainder, no decode-step wait
    decision = CacheAwarePolicy().route(request("r", PREFIX + [5, 6], extra_tokens=8), tracker)
    assert decision is not None and decision.prefill_worker_id == "p0"
    add_worker(tracker, "p0", "prefill", queued=2000, ts=0.5)  # now it is busy: go local
    decision = CacheAwarePolicy().route(request("r", PREFIX + [5, 6], extra_tokens=8), tracker)
    assert decision is not None and decision.prefill_worker_id is None


def test_no_sink_under_one_hot_prefix() -> None:
    """Every request shares one long prefix: load must still spread over workers."""
    tracker = cluster(num_prefill=4, num_decode=4)
    policy = CacheAwarePolicy(PolicyConfig(local_prefill_threshold_tokens=0))
    counts: dict[str, int] = {}
    seqs = {w: 0 for w in ("p0", "p1", "p2", "p3")}
    for i in range(200):
        hashes = PREFIX + [50_000 + i]
        req = request(f"r{i}", hashes, extra_tokens=0)
        decision = policy.route(req, tracker)
        assert decision is not None and decision.prefill_worker_id is not None
        tracker.on_routed(req, decision)
        tracker.on_kv_landed(req.req_id)  # the prefix is shared on its decode worker from now on
        worker = decision.prefill_worker_id
        counts[worker] = counts.get(worker, 0) + 1
        hold(tracker, worker, hashes, seq=seqs[worker])  # the worker caches what it prefilled
        seqs[worker] += 1
    assert len(counts) == 4
    assert max(counts.values()) <= 2 * min(counts.values())


def test_round_robin_rotates_and_colocated_returns_one_worker() -> None:
    tracker = cluster(num_prefill=2, num_decode=2)
    policy = RoundRobinPolicy()
    pairs = []
    for i in range(4):
        decision = policy.route(request(f"r{i}", [i]), tracker)
        assert decision is not None
        pairs.append((decision.prefill_worker_id, decision.decode_worker_id))
    assert pairs == [("p0", "d0"), ("p1", "d1"), ("p0", "d0"), ("p1", "d1")]

    colocated = WorkerStateTracker()
    for i in range(3):
        add_worker(colocated, f"b{i}", "both")
    hold(colocated, "b2", PREFIX)
    for name in ("round_robin", "least_loaded", "cache_aware"):
        decision = make_policy(name).route(request("r", PREFIX), colocated)
        assert decision is not None and decision.prefill_worker_id is None
    decision = make_policy("cache_aware").route(request("r", PREFIX), colocated)
    assert decision is not None and decision.decode_worker_id == "b2"


def test_make_policy_names_unknown_policy_and_parameter() -> None:
    with pytest.raises(ValueError, match="'fastest'"):
        make_policy("fastest")
    with pytest.raises(ValueError, match="'prefill_weight'"):
        make_policy("cache_aware", prefill_weight=2.0)
    with pytest.raises(ValueError, match="decode_load_weight"):
        make_policy("least_loaded", decode_load_weight=-1)
    policy = make_policy("cache_aware", local_prefill_threshold_tokens=0)
    assert policy.config.local_prefill_threshold_tokens == 0


def test_routing_modules_do_not_import_torch() -> None:
    code = (
        "import sys, pdserve.router.kv_index, pdserve.router.worker_state, pdserve.router.policy; "
        "import pdserve.router.admission; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    repo_root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=repo_root, check=False).returncode == 0


def test_host_tier_hits_count_at_their_cost() -> None:
    """A prefix in p1's host tier (continuing its GPU hits) is worth host_hit_weight of a GPU
    hit: it beats no hit, loses to the same prefix on the GPU, and counts whole in the
    decision's hit tokens (it is copied, not computed)."""
    from pdserve.engine.core.block_pool import BlockRemoved

    tracker = cluster(num_prefill=3)
    # p0: the first 16 blocks on the GPU, the next 48 only in its host tier
    hold(tracker, "p0", PREFIX[:16])
    assert tracker.apply(KVEventBatch("p0", "i0", 1, [BlockStored(tuple(PREFIX[16:]), PREFIX[15], "cpu")]))
    decision = CacheAwarePolicy().route(request("r", PREFIX), tracker)
    assert decision is not None and decision.prefill_worker_id == "p0"
    assert decision.num_prefix_hit_tokens == 64 * BLOCK
    hold(tracker, "p2", PREFIX)  # the whole prefix on p2's GPU wins over p0's copy
    decision = CacheAwarePolicy().route(request("r2", PREFIX), tracker)
    assert decision is not None and decision.prefill_worker_id == "p2"
    # the host tier dropping the blocks removes them from the router's host index only
    assert tracker.apply(KVEventBatch("p0", "i0", 2, [BlockRemoved(tuple(PREFIX[16:]), "cpu")]))
    assert tracker.host_hit_blocks("p0", PREFIX, 16) == 0
    assert tracker.index.run_length("p0", PREFIX) == 16


def test_a_resync_snapshot_restores_the_host_index() -> None:
    from pdserve.engine.core.outputs import KVSnapshot

    tracker = cluster()
    assert not tracker.apply(KVEventBatch("p1", "i1", 5, []))  # a gap: resync needed
    tracker.apply_snapshot(KVSnapshot("p1", "i1", 5, PREFIX[:8], host_block_hashes=PREFIX[8:20]))
    assert tracker.index.run_length("p1", PREFIX) == 8
    assert tracker.host_hit_blocks("p1", PREFIX, 8) == 12
