"""Deploy configs: every shipped YAML parses; bad keys and values fail naming the key."""

import dataclasses
import glob
import os

import pytest

from pdserve.deploy.config import ConfigError, load_config, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(
    f for f in glob.glob(os.path.join(ROOT, "deploy", "*.yaml")) if not f.endswith("ray-cluster.yaml")
)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_parse(path):
    cfg = load_config(path)
    assert cfg.prefill.count + cfg.decode.count + cfg.colocated.count > 0
    if cfg.model != "tiny":
        assert os.path.isabs(cfg.model) and os.path.isfile(os.path.join(cfg.model, "config.json"))


@pytest.mark.parametrize(
    "data, key",
    [
        ({"decode": {"count": 1}, "prefill": {"count": 1}, "engine": {"blok_size": 16}}, "engine.blok_size"),
        ({"decode": {"count": "two"}, "prefill": {"count": 1}}, "decode.count"),
        ({"decode": {"count": 1}}, "prefill.count"),
        ({"colocated": {"count": 1}, "transfer": {"backend": "rdma"}}, "transfer.backend"),
        ({"colocated": {"count": 1}, "router": {"policy": "random"}}, "router.policy"),
        (
            {"colocated": {"count": 1}, "router": {"policy_params": {"weight": 1}}},
            "router.policy_params.weight",
        ),
        ({"colocated": {"count": 1}, "engine": {"block_size": 12}}, "block_size"),
        ({"colocated": {"count": 1, "resources": {"gpus": 1}}}, "colocated.resources.gpus"),
        (
            {"prefill": {"count": 1, "max_num_batched_tokens": 0}, "decode": {"count": 1}},
            "prefill.max_num_batched_tokens",
        ),
        ({"prefill": {"count": 1}, "decode": {"count": 1, "max_num_seqs": "many"}}, "decode.max_num_seqs"),
        ({"colocated": {"count": 1}, "modle": "tiny"}, "modle"),
        (
            {"decode": {"count": 2}, "prefill": {"count": 1}, "transfer": {"port_base": 80}},
            "transfer.port_base",
        ),
        (
            {"decode": {"count": 2}, "prefill": {"count": 1}, "transfer": {"port_base": 65534}},
            "transfer.port_base",
        ),
        ({"colocated": {"count": 1}, "transfer": {"data_streams": 0}}, "transfer.data_streams"),
        ({"colocated": {"count": 1}, "transfer": {"data_streams": "4"}}, "transfer.data_streams"),
        ({"colocated": {"count": 1}, "transfer": {"timeout_s": 0}}, "transfer.timeout_s"),
        ({"colocated": {"count": 1}, "transfer": {"timeout_s": "30"}}, "transfer.timeout_s"),
        ({"colocated": {"count": 1}, "transfer": {"secret": 12345}}, "transfer.secret"),
        ({"colocated": {"count": 1}, "router": {"max_migrations": -1}}, "router.max_migrations"),
        ({"colocated": {"count": 1}, "router": {"worker_timeout_s": 0}}, "router.worker_timeout_s"),
        ({"colocated": {"count": 1}, "ray": {"max_worker_restarts": -2}}, "ray.max_worker_restarts"),
    ],
)
def test_bad_configs_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config({"model": "tiny", **data})


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_ray_cluster_yaml_passes_ray_up_validation():
    """`ray up deploy/ray-cluster.yaml` first runs this bootstrap: Ray's schema check (it once
    refused a top-level `min_workers`) and the local provider's fill-in of node types. The head
    must run the autoscaler, which is what starts the worker hosts."""
    import yaml
    from ray.autoscaler._private.commands import _bootstrap_config

    with open(os.path.join(ROOT, "deploy", "ray-cluster.yaml")) as f:
        raw = yaml.safe_load(f)
    config = _bootstrap_config(raw, no_config_cache=True)  # raises on a schema violation
    workers = raw["provider"]["worker_ips"]
    assert config["max_workers"] == len(workers)
    head = " ".join(config["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    workers_cmd = " ".join(config["worker_start_ray_commands"])
    assert '"prefill_node"' in head and '"decode_node"' in workers_cmd
    # it runs as written: Ray from the environment setup builds, a failed setup stops the launch,
    # each node starts on its own address, and every node reads the token
    assert not any("|| true" in cmd for cmd in config["setup_commands"])
    for cmd in (head, workers_cmd):
        assert "~/pdserve/.venv/bin/ray start" in cmd and " ray " not in f" {cmd} ".replace(
            ".venv/bin/ray", ""
        )
        assert "--node-ip-address=" in cmd and "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=" in cmd
    # the custom resources the multi-node deploy config places its pools on
    multinode = load_config(os.path.join(ROOT, "deploy", "multinode.yaml"))
    assert "prefill_node" in str(multinode.prefill.resources) and "decode_node" in str(
        multinode.decode.resources
    )


def test_decode_kv_server_takes_the_configured_ports():
    """`transfer.port_base`: decode-i's KV server listens on gRPC port base + 2i and data port
    base + 2i + 1 (here the plain actor class, as the launcher builds it inside Ray)."""
    import socket

    from pdserve.deploy.actors import WorkerActor
    from pdserve.deploy.wiring import WorkerSpec
    from pdserve.engine.config import EngineConfig
    from pdserve.transfer.config import TransferConfig

    for _ in range(50):  # a free pair of neighbouring ports (decode-1: base + 2, base + 3)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1] - 2
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base + 2))
                b.bind(("127.0.0.1", base + 3))
            break
        except OSError:
            continue
    grpc_port, data_port = base + 2, base + 3
    transfer = TransferConfig(port_base=base, data_streams=2).with_secret()
    actor = WorkerActor(
        WorkerSpec("decode-1", "decode", EngineConfig(model="tiny", num_gpu_blocks=64), transfer, 1)
    )
    server = actor.worker.receive_side.server
    try:
        assert actor.worker.kv_peer().address == f"127.0.0.1:{grpc_port}"
        assert server.data_port == data_port
        assert server._servicer.max_data_streams == 2  # transfer.data_streams
    finally:
        actor.shutdown()
    cfg = parse_config({"model": "tiny", "prefill": {"count": 1}, "decode": {"count": 3},
                        "transfer": {"port_base": 20000, "data_streams": 8}})  # fmt: skip
    assert cfg.transfer.data_streams == 8
    assert [cfg.transfer.kv_server_ports(i) for i in range(3)] == [
        (20000, 20001),
        (20002, 20003),
        (20004, 20005),
    ]
    assert parse_config({"model": "tiny", "colocated": {"count": 1}}).transfer.kv_server_ports(0) == (0, 0)


def test_router_http_port():
    """router.http_port: null (the default) serves no HTTP, 0 a free port; local.yaml serves 8000."""
    assert parse_config({"colocated": {"count": 1}}).router.http_port is None
    assert parse_config({"colocated": {"count": 1}, "router": {"http_port": 0}}).router.http_port == 0
    assert load_config(os.path.join(ROOT, "deploy", "local.yaml")).router.http_port == 8000
    for bad in (70000, -1, "8000"):
        with pytest.raises(ConfigError, match="router.http_port"):
            parse_config({"colocated": {"count": 1}, "router": {"http_port": bad}})
    with pytest.raises(ConfigError, match="router.http_port: 9000 is router.port"):
        parse_config({"colocated": {"count": 1}, "router": {"port": 9000, "http_port": 9000}})


def test_workers_restart_except_in_a_process_group():
    from pdserve.deploy.launcher import worker_max_restarts

    cfg = parse_config({"model": "tiny", "prefill": {"count": 1}, "decode": {"count": 1}})
    assert (cfg.router.max_migrations, cfg.router.worker_timeout_s, worker_max_restarts(cfg)) == (3, 5.0, 3)
    cfg = parse_config(
        {"model": "tiny", "prefill": {"count": 1}, "decode": {"count": 1}, "transfer": {"backend": "nccl"}}
    )
    assert worker_max_restarts(cfg) == 0  # a new process cannot join the torch.distributed group


def test_pools_take_their_own_scheduling_budgets():
    """A prefill pool with a long step budget and few sequences beside decode workers on the
    engine's defaults: each worker's engine (the plan's, and the engine a worker builds from it)
    runs its own pool's budgets."""
    from pdserve.deploy.wiring import build_worker, plan_workers

    cfg = parse_config(
        {
            "engine": {"max_num_batched_tokens": 256, "max_num_seqs": 64, "num_gpu_blocks": 64},
            "prefill": {"count": 1, "max_num_batched_tokens": 1024, "max_num_seqs": 4},
            "decode": {"count": 2},
        }
    )
    specs = {spec.worker_id: spec for spec in plan_workers(cfg)}
    budgets = {w: (s.engine.max_num_batched_tokens, s.engine.max_num_seqs) for w, s in specs.items()}
    assert budgets == {"prefill-0": (1024, 4), "decode-0": (256, 64), "decode-1": (256, 64)}
    prefill = specs["prefill-0"]
    # a real engine and connector (its send side reaches nothing until decode links are set)
    worker = build_worker(dataclasses.replace(prefill, transfer=prefill.transfer.with_secret()))
    try:
        config = worker.engine.scheduler.config
        assert (config.max_num_batched_tokens, config.max_num_seqs) == (1024, 4)
    finally:
        worker.shutdown()
