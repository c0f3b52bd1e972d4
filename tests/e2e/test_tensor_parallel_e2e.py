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

import os
import time

import pytest

from pdserve.deploy.config import parse_config
from pdserve.deploy.launcher import up
from tests.e2e.conftest import ENGINE, tiny_config, two_node_cluster
from tests.e2e.test_disaggregated import check_deployment, expected  # noqa: F401 (fixture)

ray = pytest.importorskip("ray")

RANK_MODULE = b"pdserve.engine.tensor_parallel"


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


def serve_and_check(cfg, expected, num_child_ranks: int) -> None:  # noqa: F811
    """Bring `cfg` up, check it like the disaggregated tests, bring it down: no rank left."""
    before = rank_processes()
    dep = up(cfg)
    try:
        ours = rank_processes() - before
        assert len(ours) == num_child_ranks
        check_deployment(dep, expected)
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


@pytest.mark.parametrize("backend", ["grpc", "nccl"])
@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2)])
def test_disaggregated_between_tp_sizes(two_nodes, expected, prefill_tp, decode_tp, backend):  # noqa: F811
    cfg = tiny_config(1, 1, backend, two_nodes=True, prefill_tp=prefill_tp, decode_tp=decode_tp)
    assert (cfg.prefill.tensor_parallel_size, cfg.decode.tensor_parallel_size) == (prefill_tp, decode_tp)
    serve_and_check(cfg, expected, num_child_ranks=prefill_tp + decode_tp - 2)
