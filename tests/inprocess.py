"""An in-process deployment for tests: real workers, real gRPC (router and KV), no Ray.

The router's asyncio loop runs on a background thread; tests talk to it through
the real client on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import copy
import threading

from decode_worker.worker import DecodeWorker
from engine.llm_engine import EngineConfig
from engine.tokenizer import load_tokenizer
from prefill_worker.worker import PrefillWorker
from router.policy import make_policy
from router.server import RouterServer
from router.service import LocalWorkerClient, ModelSummary, RouterCore
from transfer.grpc_backend import GrpcKVSender
from transfer.grpc_server import GrpcKVServer


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
    ) -> None:
        engine = engine or EngineConfig(model="tiny", num_gpu_blocks=512)
        prefill_engine = prefill_engine or engine
        self.prefill = {
            f"prefill-{i}": PrefillWorker(f"prefill-{i}", copy.deepcopy(prefill_engine))
            for i in range(num_prefill)
        }
        self.decode = {
            f"decode-{i}": DecodeWorker(
                f"decode-{i}", copy.deepcopy(engine), role="decode" if num_prefill else "both"
            )
            for i in range(num_decode)
        }
        self.kv_servers = []
        for worker in self.decode.values():
            if num_prefill:
                server = GrpcKVServer("127.0.0.1:0", worker.receive_kv, worker.layout)
                worker.grpc_address = f"127.0.0.1:{server.start()}"
                self.kv_servers.append(server)
        for worker in self.prefill.values():
            sender = GrpcKVSender(worker.engine.model_config.name)
            worker.set_sender(
                sender.send,
                lambda h, exc: self.decode[h.decode_worker_id].kv_failed(
                    h.req_id, f"{type(exc).__name__}: {exc}"
                ),
            )
        mc = next(iter(self.decode.values())).engine.model_config
        roles = {
            **{w: "prefill" for w in self.prefill},
            **{w: ("decode" if num_prefill else "both") for w in self.decode},
        }
        params = {"local_prefill_threshold_tokens": 0, **(policy_params or {})}
        self.core = RouterCore(
            ModelSummary(
                mc.name,
                mc.vocab_size,
                engine.max_model_len or mc.max_position_embeddings,
                engine.block_size,
                mc.eos_token_id,
            ),
            load_tokenizer(engine.model, mc.eos_token_id, mc.bos_token_id),
            make_policy(policy, **params),
            {w: LocalWorkerClient(p) for w, p in self.prefill.items()},
            {w: LocalWorkerClient(d) for w, d in self.decode.items()},
            roles,
            max_queue_len=max_queue_len,
            max_wait_s=max_wait_s,
        )
        self.server = RouterServer(self.core, "127.0.0.1", 0)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.url = self.run(self.server.start())
        self.run(self.server.wait_workers_ready(60))

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def workers(self):
        return [*self.prefill.values(), *self.decode.values()]

    def all_blocks_free(self) -> bool:
        for w in self.workers():
            load = w.load()
            if load["num_free_blocks"] != load["num_total_blocks"]:
                return False
        return True

    def close(self) -> None:
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        for s in self.kv_servers:
            s.stop()
        for w in self.workers():
            w.shutdown()
