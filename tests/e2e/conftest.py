"""Shared e2e helpers: a two-node Ray cluster on loopback and deploy configs for the tiny model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from pdserve.deploy.config import DeployConfig, parse_config

ENGINE = {"num_gpu_blocks": 1024, "max_num_seqs": 64, "max_num_batched_tokens": 1024}


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/e2e" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def tiny_config(
    num_prefill: int,
    num_decode: int,
    backend: str = "grpc",
    two_nodes: bool = False,
    prefill_tp: int = 1,
    decode_tp: int = 1,
) -> DeployConfig:
    """Tiny-model 'xPyD' config; with `two_nodes`, prefill on `prefill_node`, decode on `decode_node`;
    each pool's tensor_parallel_size. Every request takes the KV path (short prompts would
    otherwise prefill on the decode worker)."""

    def pool(node: str) -> dict:
        return {"num_cpus": 0, **({"resources": {node: 1}} if two_nodes else {})}

    return parse_config(
        {
            "model": "tiny",
            "engine": ENGINE,
            "prefill": {
                "count": num_prefill,
                "resources": pool("prefill_node"),
                "tensor_parallel_size": prefill_tp,
            },
            "decode": {
                "count": num_decode,
                "resources": pool("decode_node"),
                "tensor_parallel_size": decode_tp,
            },
            "transfer": {"backend": backend},
            "router": {
                "port": 0,
                "policy": "cache_aware",
                "policy_params": {"local_prefill_threshold_tokens": 0},
            },
        }
    )


@contextlib.contextmanager
def one_node_cluster(namespace: str) -> Iterator[None]:
    """A local one-node Ray cluster on loopback (2 CPUs), shut down afterwards."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        namespace=namespace,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def two_node_cluster(namespace: str) -> Iterator[object]:
    """Two Ray nodes on this machine, both on loopback: one offers `prefill_node`, one `decode_node`."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # a cluster left by another test module
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"prefill_node": 4},
            "include_dashboard": False,
            "node_ip_address": "127.0.0.1",
        },
    )
    cluster.add_node(num_cpus=1, resources={"decode_node": 4}, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, namespace=namespace, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
