"""Ray actor hosting the router's gRPC server (an async actor: the server runs on its loop).

Plain class, wrapped with `ray.remote` at wiring time by `deploy.launcher`.
"""

from __future__ import annotations

from typing import Any

from engine.gc_heap import freeze_startup_heap
from router.policy import make_policy
from router.server import RouterServer
from router.service import ModelSummary, RayWorkerClient, RouterCore


class RouterActor:
    def __init__(
        self,
        model: ModelSummary,
        model_path: str,
        prefill_handles: dict[str, Any],
        decode_handles: dict[str, Any],
        worker_roles: dict[str, str],
        router_config: Any,
    ) -> None:
        from engine.tokenizer import load_tokenizer

        self.config = router_config
        tokenizer = load_tokenizer(model_path, model.eos_token_id, None)
        self.core = RouterCore(
            model,
            tokenizer,
            make_policy(router_config.policy, **router_config.policy_params),
            {w: RayWorkerClient(h) for w, h in prefill_handles.items()},
            {w: RayWorkerClient(h) for w, h in decode_handles.items()},
            worker_roles,
            use_kv_events=router_config.kv_events,
            max_queue_len=router_config.max_queue_len,
            max_wait_s=router_config.max_wait_s,
        )
        self.server = RouterServer(
            self.core, router_config.host, router_config.port, router_config.default_max_tokens
        )

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
