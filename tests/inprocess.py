"""An in-process deployment for tests: real workers, real gRPC (router and KV), no Ray.

The router's asyncio loop runs on a background thread; tests talk to it through
the real client on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.deploy.config import RouterConfig
from pdserve.deploy.wiring import LocalWorkerControl, WorkerSpec, build_worker, connect_workers
from pdserve.engine.config import EngineConfig
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.router.chat_template import ChatTemplate
from pdserve.router.http_server import HttpServer
from pdserve.router.server import RouterServer
from pdserve.router.service import ModelSummary, RouterCore
from pdserve.transfer.config import TransferConfig


def health_of(url: str, service: str) -> int:
    """The router's gRPC health status for `service` ("" for the whole server)."""
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


class InProcessDeployment:
    def __init__(
        self,
        num_prefill: int = 1,
        num_decode: int = 1,
        engine: EngineConfig | None = None,
        prefill_engine: EngineConfig | None = None,
        policy: str = "round_robin",
        policy_params: dict | None = None,
        max_queue_len: int = 256,
        max_wait_s: float = 30.0,
        http: bool = True,
        router_overrides: dict | None = None,
        transfer_options: dict | None = None,
    ) -> None:
        """`router_overrides`: more RouterConfig keys (admission and request bounds);
        `transfer_options`: more TransferConfig keys (e.g. timeout_s)."""
        engine = engine or EngineConfig(model="tiny", num_gpu_blocks=512)
        transfer = TransferConfig(backend="grpc", host="127.0.0.1", **(transfer_options or {})).with_secret()
        decode_role = "decode" if num_prefill else "both"
        specs = [
            WorkerSpec(f"prefill-{i}", "prefill", prefill_engine or engine, transfer)
            for i in range(num_prefill)
        ]
        specs += [WorkerSpec(f"decode-{i}", decode_role, engine, transfer, i) for i in range(num_decode)]
        self.transfer = transfer  # its secret: what a test plays the deployment's own sender with
        built = {spec.worker_id: build_worker(spec) for spec in specs}
        self.prefill = {w: built[w] for w in built if w.startswith("prefill")}
        self.decode = {w: built[w] for w in built if w.startswith("decode")}
        self.controls = {w: LocalWorkerControl(worker) for w, worker in built.items()}
        connect_workers(specs, self.controls, transfer)  # the wiring `pdserve up` uses
        mc = next(iter(self.decode.values())).engine.model_config
        router_config = RouterConfig(
            host="127.0.0.1",
            port=0,
            policy=policy,
            policy_params={"local_prefill_threshold_tokens": 0, **(policy_params or {})},
            max_queue_len=max_queue_len,
            max_wait_s=max_wait_s,
            **(router_overrides or {}),
        )
        summary = ModelSummary.of(mc, engine.max_model_len or mc.max_position_embeddings, engine.block_size)
        self.core = RouterCore.from_config(
            summary,
            load_tokenizer(engine.model, mc.eos_token_id, mc.bos_token_id),
            {w: control.router_client() for w, control in self.controls.items()},
            {spec.worker_id: spec.role for spec in specs},
            router_config,
            ChatTemplate.from_model(engine.model),
            transfer.backend,
        )
        self.server = RouterServer.from_config(self.core, router_config)
        self.http = HttpServer(self.core, "127.0.0.1", 0) if http else None
        self.loop = asyncio.new_event_loop()
        # In-process worker calls run in threads (LocalWorkerClient); a hung worker holds
        # one per call, so give them room beyond asyncio's default of cores + 4.
        self.loop.set_default_executor(ThreadPoolExecutor(64, thread_name_prefix="worker-call"))
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.url = self.run(self.server.start())
        self.http_url = self.run(self.http.start()) if self.http is not None else None
        self.run(self.server.wait_workers_ready(60))

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def workers(self):
        return [*self.prefill.values(), *self.decode.values()]

    def all_blocks_free(self) -> bool:
        for w in self.workers():
            load = w.load()
            if load.num_free_blocks != load.num_total_blocks:
                return False
        return True

    def close(self) -> None:
        if self.http is not None:
            self.run(self.http.stop())
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        for w in self.workers():
            w.shutdown()
        for control in self.controls.values():
            control.close()
