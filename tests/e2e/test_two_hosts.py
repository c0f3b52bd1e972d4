"""Two hosts, as a user deploying on two machines has them: two network namespaces joined by
a veth pair (10.231.0.1 and 10.231.0.2), a Ray head in the first and a Ray worker node in
the second, Ray token authentication on.

`pdserve up --detach --address 10.231.0.1:6380` runs in the head's namespace with the prefill
pool on node 1 and the decode pool on node 2 (Ray custom resources); 32 concurrent streams
with shared prefixes, sent from the head's namespace, equal the offline engine's tokens; the
veth's byte counters show the KV crossing; over `grpc` (a model whose KV takes the data port)
and `nccl` (gloo on CPU); `pdserve bench serve` runs against it; `pdserve down` stops it.
A config that keeps a loopback `transfer.host`, a user without the token, and a model
directory missing on node 2 each get one line.

Each Ray node runs as the first process of its own PID namespace (`unshare --pid --fork
--kill-child`): killing it ends every process of that node and nothing else (`ray stop`
matches process names machine-wide). Skips where network namespaces cannot be made.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
HEAD_IP, WORKER_IP = "10.231.0.1", "10.231.0.2"
RAY_ADDRESS = f"{HEAD_IP}:6380"
KV_PORT_BASE = 25000  # decode-0: gRPC 25000, data 25001
NUM_REQUESTS = 32
MAX_TOKENS = 8

pytestmark = pytest.mark.timeout(300)


def _netns_permitted() -> str | None:
    """Why this host cannot run the test, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if not (shutil.which("ip") and shutil.which("unshare")):
        return "needs iproute2's ip and util-linux's unshare"
    probe = f"pd2h-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns not permitted: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class TwoHosts:
    head_ns: str
    worker_ns: str
    head_veth: str
    env: dict[str, str]  # token, PYTHONPATH, PDSERVE_HOME for every command in the namespaces
    tmp: str
    head_only: str  # a folder node 2 does not see (a tmpfs over it in its mount namespace)

    def run(self, ns: str, *argv: str, env: dict[str, str] | None = None, timeout: float = 180):
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            cwd=ROOT,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def pdserve(self, *args: str, env: dict[str, str] | None = None, timeout: float = 180):
        return self.run(self.head_ns, sys.executable, "-m", "pdserve", *args, env=env, timeout=timeout)

    def veth_tx_bytes(self) -> int:
        out = subprocess.run(
            ["ip", "-n", self.head_ns, "-s", "-j", "link", "show", "dev", self.head_veth],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout)[0]["stats64"]["tx"]["bytes"]

    def tcp_connections(self, port: int) -> list[str]:
        """Every TCP socket (any state, both namespaces) with `port` at the worker's address."""
        lines = []
        for ns in (self.head_ns, self.worker_ns):
            out = self.run(ns, "ss", "-Htan").stdout
            lines += [line for line in out.splitlines() if f"{WORKER_IP}:{port}" in line]
        return lines


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _start_node(ns: str, args: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen:
    """`ray start --block` as PID 1 of a new PID namespace inside network namespace `ns`."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
            + [RAY, "start", "--block", "--disable-usage-stats", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait_started(proc: subprocess.Popen, log_path: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path) as f:
            text = f.read()
        if "Ray runtime started" in text:
            return
        if proc.poll() is not None:
            raise AssertionError(f"ray start exited {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"ray start did not come up in {timeout} s:\n{text[-3000:]}")


@contextlib.contextmanager
def two_hosts() -> Iterator[TwoHosts]:
    tag = f"{os.getpid() % 100000}{random.randrange(100):02d}"
    head_ns, worker_ns = f"pd2h-a-{tag}", f"pd2h-b-{tag}"
    head_veth, worker_veth = f"p2a{tag}", f"p2b{tag}"
    tmp = tempfile.mkdtemp(prefix="pd2h-", dir="/tmp")  # short: Ray's socket paths live under it
    # tests/conftest.py pins test clusters to loopback with this; real nodes must not have it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env |= {
        "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "proto"), ROOT]),
        "PDSERVE_HOME": os.path.join(tmp, "home"),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    nodes: list[subprocess.Popen] = []
    try:
        _sh("ip", "netns", "add", head_ns)
        _sh("ip", "netns", "add", worker_ns)
        _sh("ip", "link", "add", head_veth, "type", "veth", "peer", "name", worker_veth)
        for ns, veth, ip in ((head_ns, head_veth, HEAD_IP), (worker_ns, worker_veth, WORKER_IP)):
            _sh("ip", "link", "set", veth, "netns", ns)
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", veth)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", ns, "link", "set", veth, "up")
        head_log, worker_log = os.path.join(tmp, "head.log"), os.path.join(tmp, "worker.log")
        head_args = [
            "--head",
            f"--node-ip-address={HEAD_IP}",
            "--port=6380",
            "--num-cpus=1",
            '--resources={"prefill_node": 4}',
            f"--temp-dir={tmp}/ra",
            "--include-dashboard=false",
        ]
        # the nodes run without this checkout on their path: workers get pdserve as `up` ships it
        node_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        nodes.append(_start_node(head_ns, head_args, node_env, head_log))
        _wait_started(nodes[0], head_log)
        worker_args = [
            f"--address={RAY_ADDRESS}",
            f"--node-ip-address={WORKER_IP}",
            "--num-cpus=1",
            '--resources={"decode_node": 4}',
            f"--temp-dir={tmp}/rb",
        ]
        for attempt in range(2):  # on a loaded CI box the join can time out waiting for the GCS
            nodes.append(_start_node(worker_ns, worker_args, node_env, worker_log))
            try:
                _wait_started(nodes[-1], worker_log)
                break
            except AssertionError:
                if attempt:
                    raise
                failed = nodes.pop()
                failed.kill()  # unshare --kill-child: its namespace goes with it
                failed.wait()
        head_only = os.path.join(tmp, "head-only")
        os.makedirs(head_only)
        with open(f"/proc/{nodes[-1].pid}/task/{nodes[-1].pid}/children") as f:
            worker_init = f.read().split()[0]  # unshare's child: PID 1 of node 2's namespaces
        _sh("nsenter", "-t", worker_init, "-m", "mount", "-t", "tmpfs", "tmpfs", head_only)
        yield TwoHosts(head_ns, worker_ns, head_veth, env, tmp, head_only)
    finally:
        for node in nodes:  # unshare --kill-child: its PID namespace, every Ray process of the node, dies
            node.send_signal(signal.SIGKILL)
        for node in nodes:
            node.wait(timeout=30)
        for ns in (head_ns, worker_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes the veth pair along
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def hosts() -> Iterator[TwoHosts]:
    why = _netns_permitted()
    if why:
        pytest.skip(why)
    with two_hosts() as h:
        yield h


# -- models, prompts and configs ---------------------------------------------------------------
# KV of 16 KiB a token (2 layers x K,V x 8 heads x 128 x fp32): a 272-token prefix is 4.4 MB,
# over the gRPC backend's 4 MiB in-band limit, so it travels over the data port.
WIDE_KV_MODEL = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 258,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 256,
    "eos_token_id": 257,
}
WIDE_KV_BYTES_PER_TOKEN = 2 * 2 * 8 * 128 * 4
TINY_KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4
ENGINE = {"device": "cpu", "dtype": "float32", "num_gpu_blocks": 1024, "max_num_seqs": 64}


def make_prompts(prefix_len: int, num_prefixes: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(256) for _ in range(prefix_len)] for _ in range(num_prefixes)]
    return [
        prefixes[i % num_prefixes] + [rng.randrange(256) for _ in range(rng.randrange(1, 24))]
        for i in range(NUM_REQUESTS)
    ]


def offline_tokens(model: str, prompts: list[list[int]], **engine) -> list[list[int]]:
    from pdserve.engine import LLM, SamplingParams

    llm = LLM(model, num_gpu_blocks=1024, **engine)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return [o.token_ids for o in outs]


def write_config(
    path: str,
    model: str,
    backend: str,
    engine: dict | None = None,
    decode_node: str = "decode_node",
    wait_s: float = 10,
    **transfer,
) -> str:
    import yaml

    config = {
        "model": model,
        "engine": {**ENGINE, **(engine or {})},
        "prefill": {"count": 1, "resources": {"num_cpus": 0, "resources": {"prefill_node": 1}}},
        "decode": {"count": 1, "resources": {"num_cpus": 0, "resources": {decode_node: 1}}},
        "transfer": {"backend": backend, **transfer},
        "router": {"host": "0.0.0.0", "port": 50051, "policy_params": {"local_prefill_threshold_tokens": 0}},
        "ray": {"resource_wait_s": wait_s},
    }
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def up(hosts: TwoHosts, config: str, name: str) -> str:
    out = hosts.pdserve("up", config, "--address", RAY_ADDRESS, "--detach", "--name", name)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    match = re.search(r"serving \S+ at (\S+) ", out.stdout)
    assert match and match.group(1) == f"{HEAD_IP}:50051", out.stdout  # reachable, not 0.0.0.0
    return match.group(1)


def stream(hosts: TwoHosts, url: str, prompts: list[list[int]]) -> list[dict]:
    job = json.dumps({"url": url, "prompts": prompts, "max_tokens": MAX_TOKENS})
    out = subprocess.run(
        ["ip", "netns", "exec", hosts.head_ns, sys.executable, "-m", "tests.e2e.netns_client"],
        input=job,
        cwd=ROOT,
        env=hosts.env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def down(hosts: TwoHosts, name: str) -> None:
    out = hosts.pdserve("down", "--name", name)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert f"stopped 3 pdserve actor(s) of deployment '{name}'" in out.stdout, out.stdout


def check_streams(results: list[dict], want: list[list[int]]) -> None:
    for i, (got, expected) in enumerate(zip(results, want, strict=True)):
        assert got["tokens"] == expected, f"request {i} differs"
        assert got["finish_reason"] == "length"


# -- the tests ----------------------------------------------------------------------------------
def test_grpc_across_hosts_takes_the_data_port_and_serves_bench(hosts):
    model = os.path.join(hosts.tmp, "wide-kv")
    os.makedirs(model)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(WIDE_KV_MODEL, f)
    prompts = make_prompts(prefix_len=272, num_prefixes=4)
    want = offline_tokens(model, prompts, load_format="dummy")
    config = write_config(
        os.path.join(hosts.tmp, "grpc.yaml"), model, "grpc", {"load_format": "dummy"}, port_base=KV_PORT_BASE
    )
    url = up(hosts, config, "two-hosts-grpc")
    try:
        tx_before = hosts.veth_tx_bytes()
        check_streams(stream(hosts, url, prompts), want)
        # every prefix's KV crossed from node 1 to node 2 at least once, over the data port
        assert hosts.veth_tx_bytes() - tx_before >= 4 * 272 * WIDE_KV_BYTES_PER_TOKEN
        assert hosts.tcp_connections(KV_PORT_BASE + 1), "no connection to the decode node's data port"
        bench = hosts.pdserve(
            "bench", "serve", "--url", url, "--dataset", "random", "--num-prompts", "8",
            "--random-input-len", "64", "--random-output-len", "8", "--disable-tqdm",
        )  # fmt: skip
        assert bench.returncode == 0, bench.stdout + bench.stderr[-3000:]
        assert re.search(r"Successful requests:\s+8\b", bench.stdout), bench.stdout
    finally:
        down(hosts, "two-hosts-grpc")


def test_nccl_across_hosts_on_gloo(hosts):
    prompts = make_prompts(prefix_len=48, num_prefixes=6)
    want = offline_tokens("tiny", prompts)
    config = write_config(os.path.join(hosts.tmp, "nccl.yaml"), "tiny", "nccl", rendezvous_port=29511)
    url = up(hosts, config, "two-hosts-nccl")
    try:
        tx_before = hosts.veth_tx_bytes()
        check_streams(stream(hosts, url, prompts), want)
        assert hosts.veth_tx_bytes() - tx_before >= 6 * 48 * TINY_KV_BYTES_PER_TOKEN
    finally:
        down(hosts, "two-hosts-nccl")


def test_loopback_host_missing_token_and_missing_model_are_one_line_refusals(hosts):
    config = write_config(os.path.join(hosts.tmp, "loopback.yaml"), "tiny", "grpc", host="127.0.0.1")
    out = hosts.pdserve("up", config, "--address", RAY_ADDRESS, "--detach", "--name", "loopback")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "pdserve: error: transfer.host: 127.0.0.1 is a loopback address, but the workers run on 2 nodes "
        f"({HEAD_IP}, {WORKER_IP}): use `auto` (each decode worker's node address)"
    )
    assert "Traceback" not in out.stderr
    no_token = {k: v for k, v in hosts.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    no_token["HOME"] = hosts.tmp  # no ~/.ray/auth_token either
    t0 = time.monotonic()
    out = hosts.pdserve("up", config, "--address", RAY_ADDRESS, "--name", "no-token", env=no_token)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == (
        f"pdserve: error: the Ray cluster at {RAY_ADDRESS} requires token authentication: "
        "set RAY_AUTH_TOKEN (the token) or RAY_AUTH_TOKEN_PATH (a file holding it)"
    )
    assert time.monotonic() - t0 < 15
    wrong_token = {**no_token, "RAY_AUTH_TOKEN": "0" * 64}
    out = hosts.pdserve("status", "--name", "x", "--address", RAY_ADDRESS, env=wrong_token)
    assert out.returncode == 2 and out.stderr.strip() == (
        f"pdserve: error: the Ray cluster at {RAY_ADDRESS} rejected the token: "
        "set RAY_AUTH_TOKEN (the token) or RAY_AUTH_TOKEN_PATH (a file holding it) to the cluster's token"
    ), out.stderr
    model = os.path.join(hosts.head_only, "wide-kv")  # on node 1 only
    os.makedirs(model)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(WIDE_KV_MODEL, f)
    config = write_config(os.path.join(hosts.tmp, "head-only.yaml"), model, "grpc", {"load_format": "dummy"})
    out = hosts.pdserve("up", config, "--address", RAY_ADDRESS, "--name", "head-only")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"pdserve: error: model: {model} does not exist on node {WORKER_IP} "
        "(copy the model directory to the same path on every node that runs workers)"
    )
    config = write_config(
        os.path.join(hosts.tmp, "no-gpu-node.yaml"), "tiny", "grpc", decode_node="gpu_node", wait_s=2
    )
    out = hosts.pdserve("up", config, "--address", RAY_ADDRESS, "--name", "no-gpu-node")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "pdserve: error: decode.resources.resources.gpu_node: no node of the Ray cluster offers 1 gpu_node "
        "(the most any node has: 0) (waited 2 s for nodes to join)"
    ), out.stderr
    out = hosts.pdserve("status", "--name", "loopback")
    assert out.returncode == 2
    assert out.stderr.strip().startswith("pdserve: error: no deployment named 'loopback'")
