"""Wiring a deployment, the same way in Ray (`pdserve up`) and in one process (tests).

1. `plan_workers(cfg)`: one `WorkerSpec` per worker of the config's pools.
2. `build_worker(spec)`: the plain worker object (in the worker's own process), with its
   side of the KV connector the config names (`transfer.connector.make_connector`).
3. `connect_workers(specs, controls, transfer)`: waits for the engines, forms the
   connector's process group when it has one (nccl) and gives every prefill worker a
   `DecodeLink` to each decode worker.
4. the router gets a `WorkerClient` per worker (`WorkerControl.router_client`).

A `WorkerControl` makes the set-up calls on one worker: `RayWorkerControl` (deploy/actors.py)
on a Ray actor, `LocalWorkerControl` here on an object in this process.
"""

from __future__ import annotations

import copy
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.config import EngineConfig
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve.router.worker_client import LocalWorkerClient, WorkerClient
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.connector import DecodeLink, Waitable, connector_class, make_connector

GROUP_JOIN_TIMEOUT_S = 120.0


@dataclass
class WorkerSpec:
    """One worker of a deployment: what it runs and where it is placed."""

    worker_id: str  # "prefill-0", "decode-1", "colocated-0"
    role: str  # the engine's role: "prefill" | "decode" | "both"
    engine: EngineConfig
    transfer: TransferConfig
    decode_index: int = 0  # its place in the decode pool (its KV server's ports)
    resources: dict[str, Any] = field(default_factory=dict)  # Ray resources


def plan_workers(cfg: Any) -> list[WorkerSpec]:
    """The workers of a DeployConfig's pools, prefill first; each runs its pool's TP size."""
    specs = []
    for name, pool, role in (
        ("prefill", cfg.prefill, "prefill"),
        ("decode", cfg.decode, "decode"),
        ("colocated", cfg.colocated, "both"),
    ):
        engine = pool.engine_for(cfg.engine)
        for i in range(pool.count):
            specs.append(WorkerSpec(f"{name}-{i}", role, engine, cfg.transfer, i, dict(pool.resources)))
    return specs


def build_worker(spec: WorkerSpec) -> PrefillWorker | DecodeWorker:
    """The worker a spec describes, with its side of the connector (none when co-located)."""
    engine = copy.deepcopy(spec.engine)
    if spec.role == "prefill":
        return PrefillWorker(spec.worker_id, engine, make_connector(spec.transfer))
    connector = make_connector(spec.transfer) if spec.role == "decode" else None
    return DecodeWorker(spec.worker_id, engine, spec.role, connector, spec.decode_index)


class WorkerControl(Protocol):
    """The set-up calls the wiring makes on one worker."""

    worker_id: str

    def wait_ready(self) -> None:
        """Return once the worker's engine is built (raise its error if it failed)."""
        ...

    def rendezvous_address(self) -> str:
        """host:port on the worker's node for a process group's store (rank 0 hosts it)."""
        ...

    def start_join_transfer_group(self, rank: int, world_size: int, init_method: str) -> Waitable:
        """Start joining the connector's process group; every member joins at once."""
        ...

    def set_decode_links(self, links: dict[str, DecodeLink]) -> None: ...

    def decode_link(self) -> DecodeLink:
        """How a prefill worker reaches this decode worker's control plane."""
        ...

    def router_client(self) -> WorkerClient: ...


def connect_workers(
    specs: list[WorkerSpec], controls: dict[str, WorkerControl], transfer: TransferConfig
) -> None:
    """Wait for every worker's engine, form the connector's process group (if it has one)
    and link prefill to decode workers."""
    for control in controls.values():  # Ray actors build in parallel; this waits for each
        control.wait_ready()
    prefill = [s.worker_id for s in specs if s.role == "prefill"]
    decode = [s.worker_id for s in specs if s.role == "decode"]
    if not prefill:
        return
    if connector_class(transfer.backend).uses_process_group:
        members = prefill + decode  # rank 0 = prefill-0's rank 0
        first_ranks, world_size = transfer_ranks(specs, members)
        init_method = "tcp://" + controls[members[0]].rendezvous_address()
        joins = [
            controls[worker_id].start_join_transfer_group(first_ranks[worker_id], world_size, init_method)
            for worker_id in members
        ]
        for join in joins:
            join.result(GROUP_JOIN_TIMEOUT_S)
    links = {worker_id: controls[worker_id].decode_link() for worker_id in decode}
    for worker_id in prefill:
        controls[worker_id].set_decode_links(links)


def transfer_ranks(specs: list[WorkerSpec], members: list[str]) -> tuple[dict[str, int], int]:
    """Each member's first rank in the transfer group and the group's size: every rank of every
    worker is a member (KV moves rank to rank), a worker's rank r at its first rank + r, the
    workers in `members`' order. With one rank each this is the members' index and count."""
    sizes = {s.worker_id: s.engine.tensor_parallel_size for s in specs}
    first_ranks, next_rank = {}, 0
    for worker_id in members:
        first_ranks[worker_id] = next_rank
        next_rank += sizes[worker_id]
    return first_ranks, next_rank


class LocalDecodeLink:
    """A decode worker in this process, as a prefill worker's send side reaches it."""

    def __init__(self, worker: DecodeWorker, executor: ThreadPoolExecutor) -> None:
        self.worker = worker
        self.executor = executor

    def notify_kv(self, notice: object) -> Future:
        return self.executor.submit(self.worker.receive_kv_notice, notice)

    def kv_failed(self, req_id: str, reason: str | None) -> None:
        self.worker.kv_failed(req_id, reason)


class LocalWorkerControl:
    """Set-up calls on a worker object in this process (tests, the in-process deployment)."""

    def __init__(self, worker: PrefillWorker | DecodeWorker) -> None:
        self.worker_id = worker.worker_id
        self.worker = worker
        self._executor = ThreadPoolExecutor(4, thread_name_prefix=f"link-{worker.worker_id}")

    def wait_ready(self) -> None:
        self.worker.ready()

    def rendezvous_address(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"127.0.0.1:{s.getsockname()[1]}"

    def start_join_transfer_group(self, rank: int, world_size: int, init_method: str) -> Waitable:
        raise NotImplementedError(
            "an in-process deployment holds one torch.distributed process group at most: "
            "use a connector without one (transfer.backend: grpc)"
        )

    def set_decode_links(self, links: dict[str, DecodeLink]) -> None:
        self.worker.set_decode_links(links)

    def decode_link(self) -> DecodeLink:
        return LocalDecodeLink(self.worker, self._executor)

    def router_client(self) -> WorkerClient:
        return LocalWorkerClient(self.worker)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
