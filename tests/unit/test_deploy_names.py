"""Named deployments (records, namespaces), the cluster checks `pdserve up` makes before it
places an actor, and the network helpers: all without Ray."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pdserve.deploy import cluster, netaddr, records
from pdserve.deploy.config import ConfigError, parse_config
from pdserve.deploy.launcher import reachable_url
from pdserve.deploy.records import DeploymentRecord, StartedHead


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_HOME", str(tmp_path))
    return tmp_path


def test_two_named_deployments_keep_their_own_records_and_namespaces(home):
    a = DeploymentRecord("alice", records.namespace_for("alice"), "10.0.0.1:6379", router_url="10.0.0.1:1")
    b = DeploymentRecord(
        "bob", records.namespace_for("bob"), "10.0.0.2:6379", started_heads=[StartedHead(7, 7, "/t")]
    )
    records.save(a)
    records.save(b)
    assert records.names() == ["alice", "bob"]
    assert records.load("alice") == a and records.load("bob") == b
    assert a.namespace == "pdserve-alice" != b.namespace
    records.remove("alice")
    assert records.names() == ["bob"] and records.load("bob") == b
    assert records.resolve_name(None) == "bob"  # the only one
    with pytest.raises(ValueError, match=r"no deployment named 'alice' on this host \(known: bob\)"):
        records.load("alice")


def test_resolve_name_asks_for_one_of_several(home):
    for name in ("x", "y"):
        records.save(DeploymentRecord(name, records.namespace_for(name), "a:1"))
    with pytest.raises(ValueError, match=r"several deployments on this host: pass --name \(one of: x, y\)"):
        records.resolve_name(None)
    records.remove("x")
    records.remove("y")
    with pytest.raises(ValueError, match="no pdserve deployment recorded"):
        records.resolve_name(None)


def test_names_default_to_the_config_file_and_must_be_safe():
    assert records.default_name("deploy/local.yaml") == "local"
    assert records.default_name("/x/my config.yml") == "my-config"
    for bad in ("", "../x", "a/b", "-x", "x" * 64):
        with pytest.raises(ValueError, match="--name"):
            records.check_name(bad)


def test_mixed_colocated_and_disaggregated_pools_are_refused():
    with pytest.raises(ConfigError, match=r"^colocated\.count: a deployment runs either co-located"):
        parse_config({"prefill": {"count": 1}, "decode": {"count": 1}, "colocated": {"count": 1}})


def test_transfer_defaults_and_new_keys():
    cfg = parse_config({"prefill": {"count": 1}, "decode": {"count": 1}})
    assert cfg.transfer.host == "auto" and cfg.transfer.rendezvous_port == 0
    assert cfg.ray.namespace is None
    with pytest.raises(ConfigError, match=r"^transfer\.rendezvous_port: must be an integer in \[0, 65535\]"):
        parse_config({"colocated": {"count": 1}, "transfer": {"rendezvous_port": 70000}})
    with pytest.raises(ConfigError, match=r"^ray\.resource_wait_s: must be >= 0"):
        parse_config({"colocated": {"count": 1}, "ray": {"resource_wait_s": -1}})


def _cfg(**pools):
    return parse_config({"model": "tiny", **pools})


def test_missing_resources_names_the_config_key():
    cfg = _cfg(
        prefill={"count": 2, "resources": {"num_cpus": 1, "resources": {"prefill_node": 1}}},
        decode={"count": 1, "resources": {"num_gpus": 1}},
    )
    demands = cluster.worker_demands(cfg)
    head = {"CPU": 4.0, "prefill_node": 1.0, "GPU": 1.0}
    assert cluster.missing_resources(demands, [head]) == (
        "prefill.resources.resources.prefill_node: the workers need 2 prefill_node in all, "
        "the Ray cluster offers 1"
    )
    assert cluster.missing_resources(demands, [head, {"CPU": 1.0, "prefill_node": 1.0}]) is None
    assert cluster.missing_resources(demands, [{"CPU": 8.0, "prefill_node": 2.0}]) == (
        "decode.resources.num_gpus: no node of the Ray cluster offers 1 GPU (the most any node has: 0)"
    )


def test_cuda_without_gpus_fails_naming_engine_device():
    cfg = _cfg(colocated={"count": 1, "resources": {"num_gpus": 1}}, engine={"device": "cuda"})
    with pytest.raises(
        cluster.ClusterError, match=r"^engine\.device: 'cuda', but no node of the Ray cluster"
    ):
        cluster.check_device(cfg, [{"Resources": {"CPU": 2.0}}])
    cpu_pool = _cfg(colocated={"count": 1}, engine={"device": "cuda"})
    with pytest.raises(cluster.ClusterError, match=r"^colocated\.resources\.num_gpus: engine\.device is"):
        cluster.check_device(cpu_pool, [{"Resources": {"GPU": 1.0}}])
    cluster.check_device(cfg, [{"Resources": {"GPU": 1.0}}])


def test_addresses():
    assert (
        netaddr.is_loopback("127.0.0.1") and netaddr.is_loopback("localhost") and netaddr.is_loopback("::1")
    )
    assert not netaddr.is_loopback("10.231.0.1") and not netaddr.is_loopback("auto")
    assert netaddr.interface_for("127.0.0.1") == "lo"
    assert netaddr.interface_for("203.0.113.77") is None
    assert reachable_url("0.0.0.0:50051", "10.0.0.5") == "10.0.0.5:50051"
    assert reachable_url("127.0.0.1:50051", "10.0.0.5") == "127.0.0.1:50051"


def test_pin_socket_interface_keeps_a_users_choice(monkeypatch):
    before = os.environ.get("GLOO_SOCKET_IFNAME")
    # setenv first, so that monkeypatch restores the variable's absence afterwards: a bare
    # delenv of an unset variable records nothing, and the "lo" set below used to outlive the
    # test and pin later deployments' gloo to loopback (test_two_hosts' NCCL test then failed)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "restored-after-the-test")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth9")
    assert netaddr.pin_socket_interface("127.0.0.1") == "lo"
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo" and os.environ["NCCL_SOCKET_IFNAME"] == "eth9"
    monkeypatch.undo()
    assert os.environ.get("GLOO_SOCKET_IFNAME") == before  # nothing outlives the test


def test_stop_head_touches_only_the_head_it_started():
    # a live process that is not a `ray start` of that temp dir: left alone
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert not cluster.stop_head(StartedHead(proc.pid, proc.pid, "/tmp/pdserve-ray/nobody"))
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    assert not cluster.stop_head(StartedHead(proc.pid, proc.pid, "/tmp/pdserve-ray/nobody"))  # gone


def test_unreachable_address_and_bad_address_are_one_line():
    with pytest.raises(cluster.ClusterError, match=r"^no Ray cluster answers at 127\.0\.0\.1:1 "):
        cluster.probe("127.0.0.1:1")
    with pytest.raises(cluster.ClusterError, match=r"^--address: expected HOST:PORT"):
        cluster.probe("nohost")


def test_token_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert cluster.auth_token() is None
    (tmp_path / "file").write_text("from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "file"))
    assert cluster.auth_token() == "from-file"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert cluster.auth_token() == "from-env"


def test_the_code_shipped_to_workers_imports_on_its_own(tmp_path):
    """`up` on a joined cluster ships pdserve as Ray's `py_modules`: the folder it hands Ray is
    the whole package, importable with nothing of this checkout on the path."""
    env = cluster.code_runtime_env()
    (package,) = env["py_modules"]
    assert os.path.basename(package) == "pdserve"
    assert not any(name == "results" for _, dirs, _ in os.walk(package) for name in dirs)
    probe = (
        "import pdserve.deploy.actors, pdserve.engine.config, pdserve.transfer.grpc_connector, pdserve.v1; "
        "print(pdserve.__file__); print(pdserve.engine.config.__file__)"
    )
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={**clean, "PYTHONPATH": os.path.dirname(package)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(line.startswith(package) for line in out.stdout.split()), out.stdout
