"""A co-located worker with engine.tensor_parallel_size 2 behind the router (Ray, CPU, gloo).

The worker's Ray actor is rank 0; rank 1 is its child process. 64 concurrent streams give
exactly the offline single-process engine's tokens (the tiny preset's weights are the same,
split over the ranks), every block is free after they finish and after 20% are cancelled,
and `down` leaves no rank process behind.
"""

from __future__ import annotations

import os
import time

import pytest

from pdserve.deploy.config import parse_config
from pdserve.deploy.launcher import up
from tests.e2e.conftest import ENGINE, one_node_cluster
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
def one_node():
    with one_node_cluster("pdserve-test-tp"):
        yield


def test_colocated_tp2(one_node, expected):  # noqa: F811
    before = rank_processes()
    cfg = parse_config(
        {
            "model": "tiny",
            "engine": dict(ENGINE, tensor_parallel_size=2),
            "colocated": {"count": 1},
            "router": {"port": 0},
        }
    )
    dep = up(cfg)
    try:
        ours = rank_processes() - before
        assert len(ours) == 1  # rank 1 of the one worker
        check_deployment(dep, expected)
    finally:
        dep.down()
    deadline = time.monotonic() + 20
    while ours & rank_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ours & rank_processes(), "a tensor-parallel rank outlived its deployment"
