"""Ray actor for the decode (or co-located) worker: forwards calls and runs the KV receiver.

Created at wiring time with `ray.remote(DecodeActor)`; the class itself is plain
so it can be built in a unit test without Ray.
"""

from __future__ import annotations

from decode_worker.worker import DecodeWorker
from engine.core.sampling_params import SamplingParams
from engine.engine_loop import WorkerActor
from engine.llm_engine import EngineConfig
from transfer.contract import KVHandle


class DecodeActor(WorkerActor):
    def __init__(
        self,
        worker_id: str,
        engine_config: EngineConfig,
        transfer_backend: str,
        role: str = "decode",
        grpc_host: str = "127.0.0.1",
        grpc_ports: tuple[int, int] = (0, 0),  # (gRPC, data) ports of the KV server; 0 = a free one
        grpc_data_streams: int = 4,  # parallel data connections per large KV buffer, at most
    ) -> None:
        self.worker = DecodeWorker(worker_id, engine_config, role=role)
        self.transfer_backend = transfer_backend
        self._receiver = None
        self._grpc_server = None
        if role == "decode" and transfer_backend == "grpc":
            from transfer.grpc_server import GrpcKVServer

            if grpc_host == "auto":  # this node's address, reachable from other nodes
                import ray

                grpc_host = ray.util.get_node_ip_address()

            grpc_port, data_port = grpc_ports
            self._grpc_server = GrpcKVServer(
                f"{grpc_host}:{grpc_port}",
                self.worker.receive_kv,
                self.worker.layout,
                data_port=data_port,
                max_data_streams=grpc_data_streams,
                device=self.worker.engine.kv_cache.device,  # on CUDA, bytes go on to the GPU as they land
            )
            port = self._grpc_server.start()
            self.worker.grpc_address = f"{grpc_host}:{port}"

    def init_transfer(self, rank: int, world_size: int, init_method: str) -> None:
        from transfer.nccl_backend import NcclKVReceiver, init_transfer_group

        kv_cache = self.worker.engine.kv_cache
        init_transfer_group(rank, world_size, init_method, kv_cache.device)
        self.worker.nccl_rank = rank
        self._receiver = NcclKVReceiver(
            self.worker.receive_kv,
            self.worker.layout,
            kv_cache.device,
            on_chunk_received=self.worker.receive_kv_chunk,  # unpack layer chunks as they land
        )

    def recv_kv_nccl(self, notice) -> None:
        """Called by a prefill worker right before it sends; returns once the KV is in place."""
        self._receiver.recv(notice)

    def reserve(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> KVHandle | None:
        return self.worker.reserve(req_id, prompt_token_ids, params)

    def start(self, req_id: str, first_token_id: int) -> bool:
        return self.worker.start(req_id, first_token_id)

    def add_local(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.worker.add_local(req_id, prompt_token_ids, params)

    def kv_failed(self, req_id: str, reason: str) -> None:
        self.worker.kv_failed(req_id, reason)

    def shutdown(self) -> None:
        if self._grpc_server is not None:
            self._grpc_server.stop()
        super().shutdown()
