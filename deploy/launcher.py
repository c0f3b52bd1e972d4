"""`pdserve up`: start or join Ray, place the workers, wire KV transfer, start the router.

    dep = up("deploy/local.yaml")      # -> Deployment with .url ("127.0.0.1:50051")
    dep.down()

Workers are named Ray actors (`pdserve-prefill-0`, `pdserve-decode-0`,
`pdserve-colocated-0`, `pdserve-router`) in the deployment's own namespace,
`pdserve-<name>`; a named deployment is recorded (deploy/records.py) so `pdserve status`
and `pdserve down` find its cluster and namespace from another process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from pdserve.deploy import cluster, netaddr, records
from pdserve.deploy.config import DeployConfig, load_config
from pdserve.deploy.records import StartedHead
from pdserve.engine.config import ModelConfig

log = logging.getLogger(__name__)

ROUTER_NAME = "pdserve-router"
ACTOR_MAX_CONCURRENCY = 512  # blocking calls (prefill, poll, KV receive) each hold a thread


@dataclass
class Deployment:
    url: str
    config: DeployConfig
    router: Any
    workers: dict[str, Any] = field(default_factory=dict)  # worker id -> actor handle
    started_ray: bool = False
    http_url: str | None = None  # the OpenAI-compatible base URL, None when router.http_port is null
    name: str = ""
    namespace: str = ""
    recorded: bool = False  # this process wrote ~/.pdserve/deployments/<name>.json

    def status(self, events_since: int = 0) -> dict[str, Any]:
        """The router's status; its lifecycle events after `events_since` under "events"."""
        import ray

        return ray.get(self.router.status.remote(events_since))

    def down(self) -> None:
        import ray

        try:
            ray.get(self.router.stop.remote(), timeout=10)
        except Exception as exc:  # noqa: BLE001 - going down anyway
            log.warning("router stop: %s", exc)
        _kill_all({"router": self.router, **self.workers})  # no_restart: down means down
        if self.recorded:
            records.remove(self.name)
        if self.started_ray:
            ray.shutdown()


def _actor_options(resources: dict[str, Any], name: str, namespace: str, detached: bool) -> dict[str, Any]:
    opts: dict[str, Any] = {"name": name, "namespace": namespace, "max_concurrency": ACTOR_MAX_CONCURRENCY}
    opts.update({k: v for k, v in resources.items()})
    if detached:
        opts["lifetime"] = "detached"
    return opts


def worker_max_restarts(cfg: DeployConfig) -> int:
    """How often Ray restarts a crashed worker. Never with nccl: a restarted process cannot
    join the torch.distributed group the others formed, so the dead worker stays out of
    routing and its requests move to the survivors (a decode worker with no prefill worker
    left prefills locally)."""
    from pdserve.transfer.connector import connector_class

    if connector_class(cfg.transfer.backend).uses_process_group:
        return 0
    return cfg.ray.max_worker_restarts


def _start_workers(cfg: DeployConfig, specs: list[Any], ns: str, detached: bool) -> dict[str, Any]:
    """One actor per spec. Decode and co-located workers first: the prefill workers are
    given the decode workers' actor names when they are built, so that a prefill worker Ray restarts after a
    crash is wired again. Calls are never retried by Ray (max_task_retries 0): the router
    decides what to run again, and where."""
    import ray

    from pdserve.deploy.actors import WorkerActor

    actor_cls = ray.remote(WorkerActor)
    restarts = {"max_restarts": worker_max_restarts(cfg), "max_task_retries": 0}
    workers: dict[str, Any] = {}
    try:
        for spec in sorted(specs, key=lambda s: s.role == "prefill"):
            opts = _actor_options(spec.resources, f"pdserve-{spec.worker_id}", ns, detached)
            decode_names = None
            if spec.role == "prefill":
                decode_names = {s.worker_id: f"pdserve-{s.worker_id}" for s in specs if s.role == "decode"}
            workers[spec.worker_id] = actor_cls.options(**opts, **restarts).remote(spec, decode_names, ns)
    except BaseException:
        _kill_all(workers)
        raise
    return {spec.worker_id: workers[spec.worker_id] for spec in specs}  # the specs' order


def _kill_all(handles: dict[str, Any]) -> None:
    import ray

    for handle in handles.values():
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # noqa: BLE001
            pass


def up(
    config: str | DeployConfig,
    address: str | None = None,
    overrides: dict[str, Any] | None = None,
    detached: bool = False,
    name: str | None = None,
    started_head: StartedHead | None = None,
) -> Deployment:
    """Bring a deployment up and return once the router reports SERVING.

    `name` (default: the config file's name) picks the Ray namespace, `pdserve-<name>`;
    given, the deployment is also recorded for `pdserve status/down --name`. `started_head`:
    the Ray head at `address` that the caller started for this deployment (`down` stops it).
    """
    import ray

    cfg = load_config(config, overrides) if isinstance(config, str) else config
    # One KV secret per deployment, generated here unless the config pins one; it reaches every
    # worker in its WorkerSpec (over Ray) and is never logged.
    cfg = dataclasses.replace(cfg, transfer=cfg.transfer.with_secret())
    model_cfg = ModelConfig.resolve(cfg.model)  # fail fast on a bad model path
    default = records.default_name(config) if isinstance(config, str) else "pdserve"
    label = records.check_name(name or default)
    ns = cfg.ray.namespace or records.namespace_for(label)
    started_ray = False
    if not ray.is_initialized():
        join = address or cfg.ray.address
        if join:
            cluster.connect(join, ns, cluster.code_runtime_env())  # other hosts: ship the code
        else:  # a local cluster of this process, on loopback
            ray.init(
                _node_ip_address="127.0.0.1",
                address="local",
                namespace=ns,
                num_cpus=cfg.ray.num_cpus,
                include_dashboard=False,
                log_to_driver=os.environ.get("PDSERVE_WORKER_LOGS", "0") == "1",
                runtime_env=_local_runtime_env(),
            )
        started_ray = True
    try:
        if name is not None:
            _refuse_if_running(label, ns)
        # a cluster started for this deployment has all the nodes it will have
        joined = bool(address or cfg.ray.address) and started_head is None
        wait_s = cfg.ray.resource_wait_s if joined else 0.0
        dep = _place(cfg, model_cfg, ns, detached, wait_s)
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    dep.started_ray, dep.name = started_ray, label
    if name is not None:
        records.save(
            records.DeploymentRecord(
                name=label,
                namespace=ns,
                address=ray.get_runtime_context().gcs_address,
                router_url=dep.url,
                config_path=os.path.abspath(config) if isinstance(config, str) else "",
                detached=detached,
                owner_pid=0 if detached else os.getpid(),
                started_heads=[started_head] if started_head else [],
            )
        )
        dep.recorded = True
    return dep


def _refuse_if_running(name: str, namespace: str) -> None:
    import ray

    try:
        ray.get_actor(ROUTER_NAME, namespace=namespace)
    except ValueError:
        return
    raise cluster.ClusterError(
        f"deployment {name!r} is already up on this cluster (namespace {namespace}): "
        f"`pdserve down --name {name}` first, or pick another --name"
    )


def _place(
    cfg: DeployConfig, model_cfg: ModelConfig, ns: str, detached: bool, resource_wait_s: float
) -> Deployment:
    """Check the cluster can run `cfg`, place its workers and router in namespace `ns`."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pdserve.deploy.actors import RayWorkerControl
    from pdserve.deploy.wiring import connect_workers, plan_workers
    from pdserve.router.actor import RouterActor
    from pdserve.router.service import ModelSummary

    try:
        nodes = cluster.wait_for_resources(cfg, resource_wait_s)
    except cluster.ClusterError:  # `device: cuda` on a cluster without GPUs: say so first
        cluster.check_device(cfg, cluster.alive_node_resources())
        raise
    cluster.check_device(cfg, nodes)
    cluster.check_model_on_nodes(cfg, nodes)
    workers: dict[str, Any] = {}
    try:
        specs = plan_workers(cfg)
        workers = _start_workers(cfg, specs, ns, detached)
        _check_transfer_host(cfg, workers, nodes)
        controls = {w: RayWorkerControl(w, h) for w, h in workers.items()}
        connect_workers(specs, controls, cfg.transfer)  # waits for every engine (or its error)
        summary = ModelSummary.of(
            model_cfg, cfg.engine.max_model_len or model_cfg.max_position_embeddings, cfg.engine.block_size
        )
        router_opts = _actor_options({"num_cpus": 0}, ROUTER_NAME, ns, detached)
        router_opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False
        )
        router_opts.pop("max_concurrency")  # async actor: concurrency is its event loop
        roles = {spec.worker_id: spec.role for spec in specs}
        clients = {w: control.router_client() for w, control in controls.items()}
        router = (
            ray.remote(RouterActor)
            .options(**router_opts)
            .remote(summary, cfg.model, clients, roles, cfg.router, cfg.transfer.backend)
        )
        url = reachable_url(ray.get(router.start.remote()), ray.util.get_node_ip_address())
        http_url = ray.get(router.http_url.remote())
    except BaseException:
        _kill_all(workers)
        raise
    return Deployment(url, cfg, router, workers, http_url=http_url, namespace=ns)


def _check_transfer_host(cfg: DeployConfig, workers: dict[str, Any], nodes: list[dict[str, Any]]) -> None:
    """A loopback KV-server address cannot serve workers on several nodes: refuse it before
    any request fails on it."""
    import ray

    if cfg.transfer.backend != "grpc" or not cfg.prefill.count or not netaddr.is_loopback(cfg.transfer.host):
        return
    node_ids = ray.get([handle.node_id.remote() for handle in workers.values()])
    if len(set(node_ids)) > 1:
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in nodes}
        where = ", ".join(sorted({ips.get(i, i) for i in node_ids}))
        raise cluster.ClusterError(
            f"transfer.host: {cfg.transfer.host} is a loopback address, but the workers run on "
            f"{len(set(node_ids))} nodes ({where}): use `auto` (each decode worker's node address)"
        )


def reachable_url(url: str, node_ip: str) -> str:
    """The router's address as a client elsewhere dials it: its node's IP for a wildcard bind."""
    host, _, port = url.rpartition(":")
    return f"{node_ip}:{port}" if netaddr.is_wildcard(host) else url


def _python_path() -> list[str]:
    """What the workers need on their path: the folder holding the `pdserve` package (site-packages
    when installed, the checkout's proto/ when not) and, from a source checkout, the checkout
    itself (tests pickle their own helpers); never the package's folder, whose subpackages are
    not top-level names."""
    import pdserve

    paths = [os.path.dirname(os.path.dirname(os.path.abspath(pdserve.__file__)))]
    paths += [p for p in pdserve.__path__ if os.path.isfile(os.path.join(p, "pyproject.toml"))]
    return [*paths, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]


def _local_runtime_env() -> dict[str, Any]:
    """A cluster of this process runs on this host: its workers take the driver's path."""
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(_python_path())}}
