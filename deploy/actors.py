"""Ray adapters: the one worker actor, and how others reach it.

`WorkerActor` hosts a plain worker (`deploy.wiring.build_worker`) and forwards each call
of the worker API to it; it is wrapped with `ray.remote` at wiring time
(`deploy.launcher`), so the class builds in a unit test without Ray. `RayWorkerControl`
makes the wiring's set-up calls on such an actor, and `RayDecodeLink` is how a prefill
worker's send side reaches a decode actor (it travels to the prefill actor pickled).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from typing import Any

from pdserve.deploy.netaddr import pin_socket_interface
from pdserve.deploy.wiring import WorkerSpec, build_worker
from pdserve.engine.core.outputs import KVSnapshot, PrefillResult, StepBatch
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.router.worker_client import RayWorkerClient, WorkerClient
from pdserve.transfer.connector import DecodeLink, Waitable
from pdserve.transfer.contract import KVHandle

log = logging.getLogger(__name__)


class WorkerActor:
    def __init__(
        self, spec: WorkerSpec, decode_actor_names: dict[str, str] | None = None, namespace: str | None = None
    ) -> None:
        """`decode_actor_names`: a prefill worker's decode workers (worker id -> named actor
        in `namespace`), linked at build time too (not only by the wiring) so that the
        instance Ray restarts after a crash, built from these same arguments, can ship KV
        again at once. Names, not handles: plain arguments stay inline in the actor's
        creation task, so a restart does not depend on objects its creator owned."""
        import ray

        node_ip = ray.util.get_node_ip_address()
        pin_socket_interface(node_ip)  # gloo/NCCL on this node's Ray address, not the hostname's
        if spec.transfer.host == "auto":  # this node's address, reachable from other nodes
            spec = dataclasses.replace(spec, transfer=dataclasses.replace(spec.transfer, host=node_ip))
        self.rendezvous_port = spec.transfer.rendezvous_port
        self.worker = build_worker(spec)
        _log_if_restarted(spec.worker_id, self.worker.loop.instance_id)
        if decode_actor_names:
            self.worker.set_decode_links(
                {w: RayDecodeLink(ray.get_actor(name, namespace)) for w, name in decode_actor_names.items()}
            )

    # -- set-up -------------------------------------------------------------------------
    def ready(self) -> str:
        return self.worker.ready()

    def node_id(self) -> str:
        """The Ray node this worker runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def rendezvous_address(self) -> str:
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:  # a pinned port (transfer.rendezvous_port) for a firewall
            s.bind((host, self.rendezvous_port))
            return f"{host}:{s.getsockname()[1]}"

    def join_transfer_group(self, rank: int, world_size: int, init_method: str) -> None:
        self.worker.join_transfer_group(rank, world_size, init_method)

    def set_decode_links(self, links: dict[str, DecodeLink]) -> None:
        self.worker.set_decode_links(links)

    # -- the worker API -------------------------------------------------------------------
    def poll(self, timeout_s: float = 0.5) -> StepBatch:
        return self.worker.poll(timeout_s)

    def abort(self, req_id: str) -> bool:
        return self.worker.abort(req_id)

    def kv_snapshot(self) -> KVSnapshot:
        return self.worker.kv_snapshot()

    def prefill(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams, handle: KVHandle | None
    ) -> PrefillResult:
        return self.worker.prefill(req_id, prompt_token_ids, params, handle).result()

    def reserve(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> KVHandle | None:
        return self.worker.reserve(req_id, prompt_token_ids, params)

    def add_local(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.worker.add_local(req_id, prompt_token_ids, params)

    # -- from prefill workers (DecodeLink) --------------------------------------------------
    def receive_kv_notice(self, notice: object) -> None:
        self.worker.receive_kv_notice(notice)

    def kv_failed(self, req_id: str, reason: str | None) -> None:
        self.worker.kv_failed(req_id, reason)

    def shutdown(self) -> None:
        self.worker.shutdown()


def _log_if_restarted(worker_id: str, instance_id: str) -> None:
    import ray

    if ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed:
        log.warning("worker %s restarted by Ray after a crash (instance %s)", worker_id, instance_id)


class RayDecodeLink:
    """A decode worker's actor, as a prefill worker's send side reaches it."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def notify_kv(self, notice: object) -> Waitable:
        return self.handle.receive_kv_notice.remote(notice).future()

    def kv_failed(self, req_id: str, reason: str | None) -> None:
        self.handle.kv_failed.remote(req_id, reason)


class RayWorkerControl:
    """The wiring's set-up calls on a `WorkerActor`."""

    def __init__(self, worker_id: str, handle: Any) -> None:
        self.worker_id = worker_id
        self.handle = handle

    def wait_ready(self) -> None:
        import ray

        ray.get(self.handle.ready.remote())

    def rendezvous_address(self) -> str:
        import ray

        return ray.get(self.handle.rendezvous_address.remote())

    def start_join_transfer_group(self, rank: int, world_size: int, init_method: str) -> Waitable:
        return self.handle.join_transfer_group.remote(rank, world_size, init_method).future()

    def set_decode_links(self, links: dict[str, DecodeLink]) -> None:
        import ray

        ray.get(self.handle.set_decode_links.remote(links))

    def decode_link(self) -> DecodeLink:
        return RayDecodeLink(self.handle)

    def router_client(self) -> WorkerClient:
        return RayWorkerClient(self.worker_id, self.handle)
