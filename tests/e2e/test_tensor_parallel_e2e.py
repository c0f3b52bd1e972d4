"""Tensor-parallel workers behind the router (Ray, CPU, gloo), on a two-node Ray cluster.

A worker's Ray actor is rank 0; its other ranks are child processes on the same node. A
co-located worker with TP=2, and disaggregated pools of different TP sizes (prefill TP=2
feeding decode TP=1, prefill TP=1 feeding decode TP=2; prefill on one node, decode on the
other) over both transfer backends: 64 concurrent streams give exactly the offline
single-process engine's tokens (the tiny preset's weights are the same, split over the
ranks), every block is free after they finish and after 20% are cancelled (one block pool
per worker: its ranks share rank 0's tables), and `down` leaves no rank process behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import pytest

from pdserve.bench.chaos import run_with_kill
from pdserve.deploy.config import parse_config
from pdserve.deploy.launcher import up
from pdserve.engine.config import ModelConfig
from pdserve.engine.model.sharding import kv_head_sources
from tests.e2e.conftest import ENGINE, tiny_config, two_node_cluster
from tests.e2e.test_chaos import (  # noqa: F401 (fixture)
    check_new_request,
    make_requests,
    offline,
    wait_live_workers_free,
)
from tests.e2e.test_chaos_stall import open_credentials, wait_broken_pairs, wait_every_worker_free
from tests.e2e.test_disaggregated import check_deployment, expected  # noqa: F401 (fixture)

ray = pytest.importorskip("ray")

RANK_MODULE = b"pdserve.engine.tensor_parallel"
TINY_KV_HEADS = ModelConfig.tiny().num_key_value_heads


def rank_processes() -> set[int]:
    """PIDs of running tensor-parallel child ranks (python -m pdserve.engine.tensor_parallel)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if RANK_MODULE in f.read():
                        pids.add(int(entry))
            except OSError:
                continue  # gone meanwhile
    return pids


@pytest.fixture(scope="module")
def two_nodes():
    with two_node_cluster("pdserve-test-tp") as cluster:
        yield cluster


def transfer_counts(dep, worker_id: str) -> tuple[dict[int, int], int]:
    """(bytes each rank of the worker moved rank to rank, bytes its rank 0 gathered or scattered)."""

    def read(actor):
        worker = actor.worker
        side = getattr(worker, "send_side", None) or worker.receive_side
        ranks = worker.engine.tp_ranks
        return dict(side.direct.rank_bytes), 0 if ranks is None else ranks.staged_kv_bytes

    return ray.get(dep.workers[worker_id].__ray_call__.remote(read), timeout=30)


def check_rank_to_rank(dep, prefill_tp: int, decode_tp: int) -> None:
    """Every byte went rank to rank: each source rank sent, each decode rank received its equal
    share (the heads split evenly), the totals agree, and no rank 0 staged a byte."""
    sent, prefill_staged = transfer_counts(dep, "prefill-0")
    received, decode_staged = transfer_counts(dep, "decode-0")
    assert prefill_staged == 0 and decode_staged == 0
    sources = kv_head_sources(TINY_KV_HEADS, prefill_tp)  # the lowest holder of each head
    assert sorted(r for r, n in sent.items() if n) == sources
    assert sorted(r for r, n in received.items() if n) == list(range(decode_tp))
    assert len({sent[r] for r in sources}) == 1 and len(set(received.values())) == 1
    assert sum(sent.values()) == sum(received.values()) > 0


def serve_and_check(cfg, expected, num_child_ranks: int, then=None) -> None:  # noqa: F811
    """Bring `cfg` up, check it like the disaggregated tests (then `then(dep)`), bring it down:
    no rank left."""
    before = rank_processes()
    dep = up(cfg)
    try:
        ours = rank_processes() - before
        assert len(ours) == num_child_ranks
        check_deployment(dep, expected)
        if then is not None:
            then(dep)
    finally:
        dep.down()
    deadline = time.monotonic() + 20
    while ours & rank_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ours & rank_processes(), "a tensor-parallel rank outlived its deployment"


def test_colocated_tp2(two_nodes, expected):  # noqa: F811
    cfg = parse_config(
        {
            "model": "tiny",
            "engine": dict(ENGINE, tensor_parallel_size=2),
            "colocated": {"count": 1},
            "router": {"port": 0},
        }
    )
    serve_and_check(cfg, expected, num_child_ranks=1)


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2)])
def test_disaggregated_between_tp_sizes_over_grpc(two_nodes, expected, prefill_tp, decode_tp):  # noqa: F811
    cfg = tiny_config(1, 1, "grpc", two_nodes=True, prefill_tp=prefill_tp, decode_tp=decode_tp)
    assert (cfg.prefill.tensor_parallel_size, cfg.decode.tensor_parallel_size) == (prefill_tp, decode_tp)
    serve_and_check(cfg, expected, num_child_ranks=prefill_tp + decode_tp - 2)


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2), (2, 2), (4, 2), (2, 4)])
def test_disaggregated_between_tp_sizes_rank_to_rank_over_nccl(two_nodes, expected, prefill_tp, decode_tp):  # noqa: F811
    cfg = tiny_config(1, 1, "nccl", two_nodes=True, prefill_tp=prefill_tp, decode_tp=decode_tp)
    assert (cfg.prefill.tensor_parallel_size, cfg.decode.tensor_parallel_size) == (prefill_tp, decode_tp)
    serve_and_check(
        cfg,
        expected,
        num_child_ranks=prefill_tp + decode_tp - 2,
        then=lambda dep: check_rank_to_rank(dep, prefill_tp, decode_tp),
    )


def rewrite_rank_ones_next_task(direct, rewrite) -> None:
    """Wrap `direct.ranks` (a `DirectSender`'s or `DirectReceiver`'s) so that the next task
    submitted to rank 1 goes as `rewrite(task)`; everything else is the worker's own."""
    ranks, armed = direct.ranks, [True]

    class RankOneRewritten:
        size, here = ranks.size, ranks.here

        def run_here(self, task):
            return ranks.run_here(task)

        def submit(self, rank, task):
            if armed[0] and rank == 1:
                armed[0] = False
                task = rewrite(task)
            return ranks.submit(rank, task)

    direct.ranks = RankOneRewritten()


def fail_next_child_send(actor) -> None:
    """What `__ray_call__` runs in a TP=2 prefill worker's actor: its rank 1's next rank-to-rank
    send names blocks past the end of its cache, so that child's task raises (IndexError) after
    the notice went out; everything else is the worker's own."""
    direct = actor.worker.send_side.direct
    past_end = direct.ranks.here.kv_cache.shape[2]

    def past_the_cache(task):
        return dataclasses.replace(task, block_ids=tuple(range(past_end, past_end + len(task.block_ids))))

    rewrite_rank_ones_next_task(direct, past_the_cache)


CHILD_FAILURE_TIMEOUT_S = 6.0  # transfer.timeout_s: how long the decode rank waits for the bytes never sent


def check_failed_or_retried(result, want: list[int], reason: str) -> None:
    """The failed transfer's stream, as today for a failed transfer: ABORTED naming `reason`
    (lower case), or, when the router learnt of the broken pair first, prefilled again and exact."""
    if result.error is None:
        assert result.tokens == want, "the retried stream differs from the offline engine"
        return
    assert result.error.startswith("ABORTED: request "), result.error
    assert reason in result.error.lower(), result.error
    assert result.tokens == want[: len(result.tokens)]


@pytest.mark.timeout(180)
def test_a_child_ranks_failed_send_over_nccl_fails_its_request_and_breaks_the_pair(two_nodes, offline):  # noqa: F811
    """1P (TP 2) -> 1D over nccl: prefill rank 1's send raises. That request ends ABORTED naming
    the child's error, at once; the prefill worker breaks the pair, and the decode worker's wait
    for rank 1's bytes ends by `transfer.timeout_s` and breaks it there too. The router then
    prefills on the decode worker: new requests are exact, and every block on both sides is free."""
    cfg = tiny_config(1, 1, "nccl", two_nodes=True, prefill_tp=2, decode_tp=1)
    cfg.transfer = dataclasses.replace(cfg.transfer, timeout_s=CHILD_FAILURE_TIMEOUT_S)
    dep = up(cfg)
    try:
        ray.get(dep.workers["prefill-0"].__ray_call__.remote(fail_next_child_send), timeout=30)
        prompts, sampling = make_requests(64, seed=5)
        started = time.monotonic()
        results, _ = asyncio.run(run_with_kill(dep.url, prompts[:1], sampling[:1], timeout_s=60))
        check_failed_or_retried(
            results[0], offline(prompts[:1], sampling[:1])[0], "rank 1 failed to send its heads: indexerror"
        )
        assert time.monotonic() - started < CHILD_FAILURE_TIMEOUT_S, "the failure waited for the timeout"
        status = wait_broken_pairs(dep)
        assert list(status["broken_transfer_pairs"]) == ["prefill-0 -> decode-0"], status
        check_new_request(dep, offline)
        wait_live_workers_free(dep, timeout=3 * CHILD_FAILURE_TIMEOUT_S)
        wait_every_worker_free(dep, timeout=3 * CHILD_FAILURE_TIMEOUT_S)  # prefill-0 is out of routing
        assert open_credentials(dep, "decode-0") == 0
    finally:
        dep.down()


def stall_next_child_receive(actor) -> None:
    """What `__ray_call__` runs in a TP=2 decode worker's actor: its rank 1's next rank-to-rank
    receive waits for its bytes from a rank that never sends them (the worker's own rank 0), so
    it runs out `transfer.timeout_s`, as a child whose peer stalled would."""
    own_first_rank = actor.worker.receive_side.rank

    def from_own_rank_0(task):
        return dataclasses.replace(
            task, routes=tuple(dataclasses.replace(r, peer=own_first_rank) for r in task.routes)
        )

    rewrite_rank_ones_next_task(actor.worker.receive_side.direct, from_own_rank_0)


@pytest.mark.timeout(180)
def test_a_child_ranks_stalled_receive_over_nccl_ends_by_the_timeout_and_breaks_the_pair(two_nodes, offline):  # noqa: F811
    """1P -> 1D (TP 2) over nccl: decode rank 1's receive never gets its bytes. Both sides' waits
    end by `transfer.timeout_s` (nothing hangs), the request ends ABORTED naming the timeout,
    the pair is broken from both ends, the reserved blocks are freed once the ranks stopped
    writing, and the decode worker serves new requests alone, exactly."""
    cfg = tiny_config(1, 1, "nccl", two_nodes=True, prefill_tp=1, decode_tp=2)
    cfg.transfer = dataclasses.replace(cfg.transfer, timeout_s=CHILD_FAILURE_TIMEOUT_S)
    dep = up(cfg)
    try:
        ray.get(dep.workers["decode-0"].__ray_call__.remote(stall_next_child_receive), timeout=30)
        prompts, sampling = make_requests(64, seed=6)
        started = time.monotonic()
        results, _ = asyncio.run(run_with_kill(dep.url, prompts[:1], sampling[:1], timeout_s=60))
        check_failed_or_retried(results[0], offline(prompts[:1], sampling[:1])[0], "timed out waiting")
        assert time.monotonic() - started < 3 * CHILD_FAILURE_TIMEOUT_S
        status = wait_broken_pairs(dep)
        assert list(status["broken_transfer_pairs"]) == ["prefill-0 -> decode-0"], status
        check_new_request(dep, offline)
        wait_every_worker_free(dep, timeout=3 * CHILD_FAILURE_TIMEOUT_S)
        assert open_credentials(dep, "decode-0") == 0
    finally:
        dep.down()
