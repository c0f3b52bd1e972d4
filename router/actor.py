"""Ray actor hosting the router's gRPC server (an async actor: the server runs on its loop).

Plain class, wrapped with `ray.remote` at wiring time by `deploy.launcher`.
"""

from __future__ import annotations

from typing import Any

from pdserve.engine.gc_heap import freeze_startup_heap
from pdserve.router.server import RouterServer
from pdserve.router.service import ModelSummary, RouterCore
from pdserve.router.worker_client import WorkerClient


class RouterActor:
    def __init__(
        self,
        model: ModelSummary,
        model_path: str,
        clients: dict[str, WorkerClient],
        worker_roles: dict[str, str],
        router_config: Any,
    ) -> None:
        from pdserve.engine.tokenizer import load_tokenizer

        self.config = router_config
        tokenizer = load_tokenizer(model_path, model.eos_token_id, None)
        self.core = RouterCore.from_config(model, tokenizer, clients, worker_roles, router_config)
        self.server = RouterServer.from_config(self.core, router_config)

    async def start(self) -> str:
        """Bind, wait until every worker has reported, then report SERVING. Returns host:port."""
        url = await self.server.start()
        # Before SERVING, so this one collection holds up no request: a full collection
        # otherwise stops the event loop, and every stream and call waiting to be accepted.
        freeze_startup_heap()
        await self.server.wait_workers_ready()
        return url

    async def status(self) -> dict[str, Any]:
        return self.core.status()

    async def stop(self) -> None:
        await self.server.stop()
