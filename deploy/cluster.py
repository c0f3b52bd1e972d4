"""The Ray cluster a deployment runs on: joining it (token authentication included), the
Ray head `pdserve up --detach` starts and `pdserve down` stops, and the checks that the
cluster can run a config before any actor is placed.

Every failure a user can cause here is a `ClusterError` (a ValueError, so the CLI prints
it as one line): no cluster at the address, a missing or wrong token, a resource no node
offers, a model directory missing on a node.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

from pdserve.deploy.records import StartedHead

HEAD_START_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 5.0
TOKEN_VARS = "RAY_AUTH_TOKEN (the token) or RAY_AUTH_TOKEN_PATH (a file holding it)"


class ClusterError(ValueError):
    """The cluster cannot run the deployment; the message names what to change."""


# -- token authentication ------------------------------------------------------------------
def auth_token() -> str | None:
    """The Ray auth token at hand: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names,
    else Ray's default file ~/.ray/auth_token (Ray's own order)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    default = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    try:
        with open(os.environ.get("RAY_AUTH_TOKEN_PATH") or default) as f:
            return f.read().strip() or None
    except OSError:
        return None


def token_given() -> bool:
    return auth_token() is not None


def check_token(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Ask the Ray head's GCS one cheap question with the token at hand (if any): an
    UNAUTHENTICATED answer is a one-line error now, instead of Ray's 20 s of retries."""
    import grpc

    token = auth_token()
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            "/ray.rpc.NodeInfoGcsService/GetClusterId",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            call(b"", timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                return  # anything else: let ray.init have its say
            if token is None:
                raise ClusterError(
                    f"the Ray cluster at {address} requires token authentication: set {TOKEN_VARS}"
                ) from None
            raise ClusterError(
                f"the Ray cluster at {address} rejected the token: set {TOKEN_VARS} to the cluster's token"
            ) from None


def enable_token_auth() -> None:
    """Ray's client sends its token only with RAY_AUTH_MODE=token, even when the token is
    there (without it, a join fails after 20 s of InvalidAuthToken): set it when a token
    is given and the user did not choose a mode."""
    if token_given() and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        if "ray" in sys.modules:  # Ray read its config at import: have it read the mode again
            from ray._raylet import Config

            Config.initialize("")


# -- joining --------------------------------------------------------------------------------
def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast, in one line, when nothing listens at the Ray address."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address: expected HOST:PORT of a Ray head (its GCS port), got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterError(f"no Ray cluster answers at {address} ({exc.strerror or exc})") from None


def connect(address: str, namespace: str, runtime_env: dict[str, Any] | None = None) -> None:
    """`ray.init` on `address` in `namespace`; a connection or token failure is one line."""
    import ray

    if address != "auto":  # "auto": the cluster this host's Ray belongs to (on a `ray up` head)
        probe(address)
        check_token(address)
    enable_token_auth()
    try:
        with _stderr_to_log():  # Ray's client logs every failed attempt (20 s of them)
            ray.init(
                address=address,
                namespace=namespace,
                log_to_driver=os.environ.get("PDSERVE_WORKER_LOGS", "0") == "1",
                runtime_env=runtime_env,
            )
    except (ConnectionError, ray.exceptions.AuthenticationError, RuntimeError) as exc:
        lines = str(exc).strip().splitlines()
        why = lines[0] if lines else type(exc).__name__
        if token_given():
            hint = f"if it requires token authentication, check that {TOKEN_VARS} holds its token"
        else:
            hint = f"if it requires token authentication, set {TOKEN_VARS}"
        raise ClusterError(f"could not join the Ray cluster at {address}: {why} ({hint})") from None


@contextlib.contextmanager
def _stderr_to_log() -> Iterator[None]:
    """Send this process's stderr (fd 2, where Ray's C++ client logs) to a file meanwhile;
    PDSERVE_DEBUG=1 keeps it."""
    if os.environ.get("PDSERVE_DEBUG") == "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


# -- the code the workers run ---------------------------------------------------------------
SUBPACKAGES = ("engine", "transfer", "prefill_worker", "decode_worker", "router", "deploy", "bench")
_NOT_SHIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", "results", "*.egg-info")


def code_runtime_env() -> dict[str, Any]:
    """Ray's `runtime_env` that carries this `pdserve` to every node (`py_modules`: Ray zips it
    into the cluster's store, and each node's workers import it from there), so no node needs
    the driver's paths. From a source checkout the package is assembled first as installed
    (proto/pdserve with the top-level folders as its subpackages)."""
    import pdserve

    roots = list(pdserve.__path__)
    if all(os.path.isdir(os.path.join(roots[0], name)) for name in SUBPACKAGES):
        return {"py_modules": [roots[0]]}  # an installed package: ship it as it is
    stage = tempfile.mkdtemp(prefix="pdserve-code-")
    atexit.register(shutil.rmtree, stage, ignore_errors=True)
    package = os.path.join(stage, "pdserve")
    shutil.copytree(roots[0], package, ignore=_NOT_SHIPPED)
    for name in SUBPACKAGES:
        source = next((os.path.join(r, name) for r in roots if os.path.isdir(os.path.join(r, name))), None)
        if source is None:
            raise ClusterError(f"pdserve.{name} not found next to {roots[0]}: reinstall pdserve")
        shutil.copytree(source, os.path.join(package, name), ignore=_NOT_SHIPPED)
    return {"py_modules": [package]}


# -- the head `pdserve up --detach` starts ------------------------------------------------------
def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_head(name: str, num_cpus: int | None, host: str = "127.0.0.1") -> tuple[str, StartedHead]:
    """Start a Ray head for deployment `name` that outlives this process: `ray start --head
    --block` leading its own process group, on a free GCS port, in its own temp dir (two
    deployments' heads on one host share nothing). Returns (GCS address, the head)."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    temp_dir = os.path.join("/tmp", "pdserve-ray", name)
    os.makedirs(temp_dir, exist_ok=True)
    port = _free_port(host)
    cmd = [
        ray_bin,
        "start",
        "--head",
        "--block",
        f"--node-ip-address={host}",
        f"--port={port}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        "--include-dashboard=false",
        *([f"--num-cpus={num_cpus}"] if num_cpus is not None else []),
    ]
    log_path = os.path.join(temp_dir, "ray-start.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"{host}:{port}"
    head = StartedHead(pid=proc.pid, pgid=proc.pid, temp_dir=temp_dir)
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"`ray start --head` exited {proc.returncode}: {_last_line(log_path)}")
        with contextlib.suppress(OSError), open(log_path) as f:
            if "Ray runtime started" in f.read():
                return address, head
        time.sleep(0.2)
    stop_head(head)
    raise ClusterError(
        f"`ray start --head` did not come up in {HEAD_START_TIMEOUT_S:.0f} s: {_last_line(log_path)}"
    )


def _last_line(path: str) -> str:
    with contextlib.suppress(OSError), open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
        return lines[-1] if lines else "(no output)"
    return "(no output)"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's group took the id: not ours
        return False


def _is_our_head(head: StartedHead) -> bool:
    """The recorded PID still is that `ray start` (a PID can be reused after a reboot)."""
    try:
        with open(f"/proc/{head.pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "start" in cmdline and f"--temp-dir={head.temp_dir}" in cmdline


def _read_proc(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def head_processes(head: StartedHead) -> list[int]:
    """The head's processes: its process group (`ray start`, GCS, raylet, agents) and the
    worker processes its raylet started, which Ray puts in process groups of their own
    (found by the RAY_RAYLET_PID their raylet gave them)."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    group = [pid for pid in pids if _pgid(pid) == head.pgid]
    raylets = {pid for pid in group if b"raylet" in _read_proc(pid, "cmdline").split(b"\0")[0]}
    marks = {f"RAY_RAYLET_PID={pid}".encode() for pid in raylets}
    workers = [
        pid for pid in pids if pid not in group and marks & set(_read_proc(pid, "environ").split(b"\0"))
    ]
    return group + workers


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def stop_head(head: StartedHead, grace_s: float = 1.0, kill_wait_s: float = 10.0) -> bool:
    """Stop the Ray head `start_head` started and every process it started: SIGTERM, then
    SIGKILL to what is left after `grace_s`, then wait up to `kill_wait_s` for them to be gone
    (a killed worker holds its GPU memory until it has exited: a `pdserve up` right after must
    find it free). Ray's own drain on SIGTERM would wait 30 s for nothing: its GCS and raylet
    outlast a 6 s grace every time, so a longer grace only delayed `pdserve down` (8.2 s with
    5 s of it, 4.3 s with 1 s). Only those processes: never `ray stop`, which ends every Ray of
    the user on the host. Removes its temp dir. Returns whether it was running."""
    if not head_running(head):
        return False
    pids = head_processes(head)
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(head.pid, os.WNOHANG)
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    return True


def _alive(pid: int) -> bool:
    state = _read_proc(pid, "stat").rsplit(b")", 1)[-1].split()[:1]
    return bool(state) and state[0] != b"Z"  # a zombie is gone, only not yet reaped


# -- can the cluster run this config? --------------------------------------------------------
def worker_demands(cfg: Any) -> list[tuple[str, dict[str, float]]]:
    """(pool name, Ray resources of one worker) for every worker of the config."""
    out = []
    for pool_name in ("prefill", "decode", "colocated"):
        pool = getattr(cfg, pool_name)
        res = pool.resources
        demand = {"CPU": float(res.get("num_cpus", 0) or 0), "GPU": float(res.get("num_gpus", 0) or 0)}
        if res.get("memory"):
            demand["memory"] = float(res["memory"])
        demand.update({k: float(v) for k, v in (res.get("resources") or {}).items()})
        out += [(pool_name, {k: v for k, v in demand.items() if v > 0})] * pool.count
    return out


_CONFIG_KEY = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}


def _key(pool: str, resource: str) -> str:
    if resource in _CONFIG_KEY:
        return f"{pool}.resources.{_CONFIG_KEY[resource]}"
    return f"{pool}.resources.resources.{resource}"


def missing_resources(
    demands: Iterable[tuple[str, dict[str, float]]], nodes: list[dict[str, float]]
) -> str | None:
    """Why the nodes (each one's total resources) cannot hold the workers, or None. Each
    worker must fit on one node, and each resource's sum must fit the cluster's total."""
    demands = list(demands)
    totals: dict[str, float] = {}
    for node in nodes:
        for k, v in node.items():
            totals[k] = totals.get(k, 0.0) + v
    needed: dict[tuple[str, str], float] = {}
    for pool, demand in demands:
        if not any(all(node.get(k, 0.0) >= v for k, v in demand.items()) for node in nodes):
            short = [k for k, v in demand.items() if max((n.get(k, 0.0) for n in nodes), default=0.0) < v]
            resource = short[0] if short else sorted(demand)[0]
            if not short:
                return f"{pool}.resources: no single node offers all of {demand}"
            most = max((n.get(resource, 0.0) for n in nodes), default=0.0)
            return (
                f"{_key(pool, resource)}: no node of the Ray cluster offers {demand[resource]:g} "
                f"{resource} (the most any node has: {most:g})"
            )
        for k, v in demand.items():
            needed[(pool, k)] = needed.get((pool, k), 0.0) + v
    per_resource: dict[str, float] = {}
    for (_, k), v in needed.items():
        per_resource[k] = per_resource.get(k, 0.0) + v
    for (pool, k), _ in needed.items():
        if per_resource[k] > totals.get(k, 0.0) + 1e-9:
            return (
                f"{_key(pool, k)}: the workers need {per_resource[k]:g} {k} in all, "
                f"the Ray cluster offers {totals.get(k, 0.0):g}"
            )
    return None


def alive_node_resources() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def wait_for_resources(cfg: Any, timeout_s: float) -> list[dict[str, Any]]:
    """Wait (up to `timeout_s`: nodes may still be joining) until the cluster's nodes can
    hold every worker; raise a ClusterError naming the missing resource. Returns the nodes."""
    demands = worker_demands(cfg)
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = alive_node_resources()
        why = missing_resources(demands, [n["Resources"] for n in nodes])
        if why is None:
            return nodes
        if time.monotonic() >= deadline:
            waited = f" (waited {timeout_s:g} s for nodes to join)" if timeout_s else ""
            raise ClusterError(why + waited)
        time.sleep(1.0)


def check_device(cfg: Any, nodes: list[dict[str, Any]]) -> None:
    """`engine.device: cuda` needs GPUs the workers ask for, on a cluster that has them."""
    if not str(cfg.engine.device).startswith("cuda"):
        return
    if not any(n["Resources"].get("GPU", 0) > 0 for n in nodes):
        raise ClusterError(
            f"engine.device: {cfg.engine.device!r}, but no node of the Ray cluster has a GPU "
            "(use device: cpu, or join a cluster with GPUs)"
        )
    for pool_name in ("prefill", "decode", "colocated"):
        pool = getattr(cfg, pool_name)
        if pool.count and not pool.resources.get("num_gpus"):
            raise ClusterError(
                f"{pool_name}.resources.num_gpus: engine.device is {cfg.engine.device!r}, so each "
                f"{pool_name} worker needs a GPU share (num_gpus > 0)"
            )


def check_model_on_nodes(cfg: Any, nodes: list[dict[str, Any]]) -> None:
    """A model directory must exist on every node that may host a worker (each node reads its
    own copy); fail naming the node and the path."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if cfg.model == "tiny":
        return
    demands = [d for _, d in worker_demands(cfg)]
    hosts = [
        n for n in nodes if any(all(n["Resources"].get(k, 0.0) >= v for k, v in d.items()) for d in demands)
    ]
    check = ray.remote(num_cpus=0)(os.path.isdir)
    found = ray.get(
        [
            check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                cfg.model
            )
            for n in hosts
        ]
    )
    for node, ok in zip(hosts, found, strict=True):
        if not ok:
            raise ClusterError(
                f"model: {cfg.model} does not exist on node {node['NodeManagerAddress']} "
                "(copy the model directory to the same path on every node that runs workers)"
            )


def head_running(head: StartedHead) -> bool:
    return _is_our_head(head) and _group_alive(head.pgid)
