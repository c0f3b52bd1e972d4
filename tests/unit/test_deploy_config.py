"""Deploy configs: every shipped YAML parses; bad keys and values fail naming the key."""

import glob
import os

import pytest

from deploy.config import ConfigError, load_config, parse_config

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
        ({"colocated": {"count": 1}, "modle": "tiny"}, "modle"),
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
    assert '"prefill_node"' in head and '"decode_node"' in " ".join(config["worker_start_ray_commands"])
    # the custom resources the multi-node deploy config places its pools on
    multinode = load_config(os.path.join(ROOT, "deploy", "multinode.yaml"))
    assert "prefill_node" in str(multinode.prefill.resources) and "decode_node" in str(
        multinode.decode.resources
    )
