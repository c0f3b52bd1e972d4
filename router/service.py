"""The router, independent of gRPC and of Ray: `RouterCore`.

`RouterCore.generate()` takes a validated request and yields events: `Chunk`s of new
tokens and text, then one `Completion` (or raises `RouterError`). Two parts do the work:
a `WorkerMonitor` (router/worker_monitor.py) polls every worker and keeps the
`WorkerStateTracker` current, and a `RequestStream` (router/request_stream.py) per
request routes it through the policy and admission queue, drives the chosen workers and
turns their outputs into its stream.

Workers are reached through `WorkerClient`s (router/worker_client.py): typed calls on a
Ray actor or on an in-process object.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pdserve.engine.core.outputs import RequestOutput
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.admission import AdmissionController
from pdserve.router.events import Chunk, Completion, ModelSummary, RouterError
from pdserve.router.parallel_sampling import generate_samples, is_sample_of
from pdserve.router.policy import Policy, make_policy
from pdserve.router.request_stream import RequestStream, StreamDeps
from pdserve.router.reservations import fits_in_cache
from pdserve.router.routing import RouteDecision, RouteRequest
from pdserve.router.worker_client import WorkerClient
from pdserve.router.worker_monitor import WorkerMonitor
from pdserve.router.worker_state import WorkerStateTracker

__all__ = ["Chunk", "Completion", "ModelSummary", "RouterCore", "RouterError"]

log = logging.getLogger(__name__)


class RouterCore:
    def __init__(
        self,
        model: ModelSummary,
        tokenizer: Tokenizer | None,
        policy: Policy,
        clients: dict[str, WorkerClient],
        worker_roles: dict[str, str],
        use_kv_events: bool = True,
        max_queue_len: int = 256,
        max_wait_s: float = 30.0,
        poll_timeout_s: float = 0.2,
        max_bypasses: int = 16,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.policy = policy
        self.clients = clients
        self.worker_roles = worker_roles  # worker id -> "prefill" | "decode" | "both"
        self.tracker = WorkerStateTracker(use_kv_events=use_kv_events)
        self.admission: AdmissionController[RouteRequest, RouteDecision] = AdmissionController(
            self._try_route,
            max_queue_len,
            max_wait_s,
            on_abandoned=lambda r, d: self.tracker.release(r.req_id),
            max_bypasses=max_bypasses,
            size_of=lambda r: r.num_prompt_tokens + r.max_tokens,
        )
        self.monitor = WorkerMonitor(
            clients,
            self.tracker,
            on_outputs=self._deliver,
            on_worker_failed=self._fail_worker,
            on_state_change=self.admission.notify_capacity,
            poll_timeout_s=poll_timeout_s,
        )
        self._deps = StreamDeps(
            self.admission, clients, self.tracker, tokenizer, model.block_size, model.max_model_len
        )
        self._streams: dict[str, RequestStream] = {}

    @classmethod
    def from_config(
        cls, model: ModelSummary, tokenizer: Tokenizer | None, clients: dict[str, WorkerClient],
        worker_roles: dict[str, str], router_config: Any,
    ) -> RouterCore:  # fmt: skip
        """The router a deploy config's `router` section describes."""
        return cls(
            model,
            tokenizer,
            make_policy(router_config.policy, **router_config.policy_params),
            clients,
            worker_roles,
            use_kv_events=router_config.kv_events,
            max_queue_len=router_config.max_queue_len,
            max_wait_s=router_config.max_wait_s,
            max_bypasses=router_config.max_bypasses,
        )

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        await self.monitor.start()

    async def wait_ready(self, timeout: float = 120.0) -> None:
        await asyncio.wait_for(self.monitor.ready.wait(), timeout)

    @property
    def ready(self) -> bool:
        return self.monitor.ready.is_set()

    async def stop(self) -> None:
        await self.monitor.stop()

    # -- what the monitor reports ---------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput], kv_wait_ms: dict[str, float]) -> None:
        for out in outputs:
            stream = self._streams.get(out.req_id)
            if stream is not None:
                stream.deliver(out, kv_wait_ms.get(out.req_id, 0.0))

    def _fail_worker(self, worker_id: str, message: str) -> None:
        for stream in list(self._streams.values()):
            if stream.involves(worker_id):
                stream.fail(RouterError("UNAVAILABLE", message))

    def _try_route(self, request: RouteRequest) -> RouteDecision | None:
        decision = self.policy.route(request, self.tracker)
        if decision is not None:
            self.tracker.on_routed(request, decision)
        return decision

    # -- requests ----------------------------------------------------------------------
    def new_request_id(self) -> str:
        return uuid.uuid4().hex

    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise RouterError("INVALID_ARGUMENT", "input.text: this model has no tokenizer; send token_ids")
        return self.tokenizer.encode(text)

    async def generate(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[Chunk | Completion]:
        """Stream one request (its n samples when params.n > 1). Cancelling the consumer
        aborts it on every worker."""
        if params.n > 1:
            async for event in generate_samples(self._generate_one, req_id, prompt_token_ids, params):
                yield event
            return
        async for event in self._generate_one(req_id, prompt_token_ids, params):
            yield event

    async def _generate_one(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[Chunk | Completion]:
        if req_id in self._streams:
            raise RouterError("ALREADY_EXISTS", f"request_id {req_id!r} is already running")
        if not self.ready:
            raise RouterError("UNAVAILABLE", "workers are not ready yet")
        self.check_fits(len(prompt_token_ids), params.max_tokens)
        stream = RequestStream(req_id, prompt_token_ids, params, self._deps)
        self._streams[req_id] = stream
        try:
            async for event in stream.events():
                yield event
        finally:
            self._streams.pop(req_id, None)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Refuse at once (INVALID_ARGUMENT, naming the numbers) a request that can never
        run: beyond the model's context, as vLLM words it, or beyond the KV cache of
        every decode-capable worker. Anything else that finds no room waits for it."""
        total = num_prompt_tokens + max_tokens
        if total > self.model.max_model_len:
            raise RouterError(
                "INVALID_ARGUMENT",
                f"sampling.max_tokens: this model's maximum context length is {self.model.max_model_len} "
                f"tokens. However, you requested {total} tokens ({num_prompt_tokens} in the prompt, "
                f"{max_tokens} in the completion). Please reduce the prompt or max_tokens.",
            )
        decode_reports = [r for r in self.tracker.loads.values() if r.role != "prefill"]
        if decode_reports and not any(fits_in_cache(r, total) for r in decode_reports):
            largest = max(decode_reports, key=lambda r: r.num_total_blocks * r.block_size)
            raise RouterError(
                "INVALID_ARGUMENT",
                f"sampling.max_tokens: the request needs KV cache for {total} tokens ({num_prompt_tokens} "
                f"in the prompt, {max_tokens} in the completion), but the largest decode worker's cache "
                f"holds {largest.num_total_blocks * largest.block_size} tokens ({largest.num_total_blocks} "
                f"blocks of {largest.block_size}). Please reduce the prompt or max_tokens.",
            )

    async def abort(self, req_id: str) -> bool:
        """Abort a request (all its samples); False when none runs under that id."""
        streams = [s for child_id, s in self._streams.items() if is_sample_of(child_id, req_id)]
        for stream in streams:
            await stream.abort_everywhere()
            stream.deliver(RequestOutput(stream.req_id, finished=True, finish_reason="abort"), 0.0)
        return bool(streams)

    def status(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "num_streams": len(self._streams),
            "num_waiting_admission": self.admission.num_waiting,
            "workers": {
                w: {"role": self.worker_roles[w], **(vars(r) if (r := self.tracker.loads.get(w)) else {})}
                for w in self.worker_roles
            },
        }
