"""`pdserve up`: start or join Ray, place the workers, wire KV transfer, start the router.

    dep = up("deploy/local.yaml")      # -> Deployment with .url ("127.0.0.1:50051")
    dep.down()

Workers are named Ray actors in the config's namespace (`pdserve-prefill-0`,
`pdserve-decode-0`, `pdserve-colocated-0`, `pdserve-router`), so `pdserve status`
and `pdserve down` can find them from another process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from pdserve.deploy.config import DeployConfig, load_config
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
    from pdserve.transfer.connector import make_connector

    if make_connector(cfg.transfer).uses_process_group:
        return 0
    return cfg.ray.max_worker_restarts


def _start_workers(cfg: DeployConfig, specs: list[Any], detached: bool) -> dict[str, Any]:
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
            opts = _actor_options(spec.resources, f"pdserve-{spec.worker_id}", cfg.ray.namespace, detached)
            decode_names = None
            if spec.role == "prefill":
                decode_names = {s.worker_id: f"pdserve-{s.worker_id}" for s in specs if s.role == "decode"}
            workers[spec.worker_id] = actor_cls.options(**opts, **restarts).remote(
                spec, decode_names, cfg.ray.namespace
            )
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
) -> Deployment:
    """Bring a deployment up and return once the router reports SERVING."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pdserve.deploy.actors import RayWorkerControl
    from pdserve.deploy.wiring import connect_workers, plan_workers
    from pdserve.router.actor import RouterActor
    from pdserve.router.service import ModelSummary

    cfg = load_config(config, overrides) if isinstance(config, str) else config
    # One KV secret per deployment, generated here unless the config pins one; it reaches every
    # worker in its WorkerSpec (over Ray) and is never logged.
    cfg = dataclasses.replace(cfg, transfer=cfg.transfer.with_secret())
    model_cfg = ModelConfig.resolve(cfg.model)  # fail fast on a bad model path
    started_ray = False
    if not ray.is_initialized():
        join = address or cfg.ray.address
        local_ip = {} if join else {"_node_ip_address": "127.0.0.1"}  # a local cluster stays on loopback
        ray.init(
            **local_ip,
            address=join or "local",
            namespace=cfg.ray.namespace,
            num_cpus=cfg.ray.num_cpus if not join else None,
            include_dashboard=False,
            log_to_driver=os.environ.get("PDSERVE_WORKER_LOGS", "0") == "1",
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(_python_path())}},
        )
        started_ray = True
    ns = cfg.ray.namespace
    workers: dict[str, Any] = {}
    try:
        specs = plan_workers(cfg)
        workers = _start_workers(cfg, specs, detached)
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
        url = ray.get(router.start.remote())
        http_url = ray.get(router.http_url.remote())
    except BaseException:
        _kill_all(workers)
        if started_ray:
            ray.shutdown()
        raise
    return Deployment(url, cfg, router, workers, started_ray, http_url)


def _python_path() -> list[str]:
    """What the workers need on their path: the folder holding the `pdserve` package (site-packages
    when installed, the checkout's proto/ when not) and, from a source checkout, the checkout
    itself (tests pickle their own helpers); never the package's folder, whose subpackages are
    not top-level names."""
    import pdserve

    paths = [os.path.dirname(os.path.dirname(os.path.abspath(pdserve.__file__)))]
    paths += [p for p in pdserve.__path__ if os.path.isfile(os.path.join(p, "pyproject.toml"))]
    return [*paths, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
