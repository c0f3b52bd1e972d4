"""Ray actor for the prefill worker: forwards calls and wires the KV sender.

Created at wiring time with `ray.remote(PrefillActor)`; the class itself is
plain so it can be built in a unit test without Ray.
"""

from __future__ import annotations

from typing import Any

from engine.core.sampling_params import SamplingParams
from engine.engine_loop import WorkerActor
from engine.llm_engine import EngineConfig
from prefill_worker.worker import PrefillResult, PrefillWorker
from transfer.contract import KVHandle


class PrefillActor(WorkerActor):
    def __init__(self, worker_id: str, engine_config: EngineConfig, transfer_backend: str) -> None:
        self.worker = PrefillWorker(worker_id, engine_config)
        self.transfer_backend = transfer_backend
        self.rank: int | None = None
        self._peers: dict[str, Any] = {}

    def rendezvous_address(self) -> str:
        """host:port on this worker's node for the transfer group's store (rank 0 hosts it)."""
        import socket

        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return f"{host}:{s.getsockname()[1]}"

    def init_transfer(self, rank: int, world_size: int, init_method: str) -> None:
        """Join the torch.distributed group (nccl backend only); every worker calls it at once."""
        from transfer.nccl_backend import init_transfer_group

        self.rank = rank
        init_transfer_group(rank, world_size, init_method, self.worker.engine.kv_cache.device)

    def set_decode_peers(self, peers: dict[str, Any]) -> None:
        """Actor handles of the decode workers, by worker id, for KV notices and failures."""
        self._peers = dict(peers)
        model_name = self.worker.engine.model_config.name
        if self.transfer_backend == "nccl":
            from transfer.nccl_backend import NcclKVSender

            sender = NcclKVSender(self.rank, model_name)

            def send(handle: KVHandle, src_block_ids: list[int], kv_cache):
                peer = self._peers[handle.decode_worker_id]
                return sender.send(
                    handle,
                    src_block_ids,
                    kv_cache,
                    notify=lambda notice: peer.recv_kv_nccl.remote(notice).future(),
                )

        else:
            from transfer.grpc_backend import GrpcKVSender

            send = GrpcKVSender(model_name).send

        def failed(handle: KVHandle, exc: Exception) -> None:
            self._peers[handle.decode_worker_id].kv_failed.remote(
                handle.req_id, f"{type(exc).__name__}: {exc}"
            )

        self.worker.set_sender(send, failed)

    def prefill(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams, handle: KVHandle | None
    ) -> PrefillResult:
        return self.worker.prefill(req_id, prompt_token_ids, params, handle).result()
