"""One request's life in the router: admission, the workers' calls, and its stream.

The path of a disaggregated request takes three control calls: `reserve` on the decode
worker (blocks, and a KVHandle naming them and the decode worker's peer descriptor),
`prefill` on the prefill worker with that handle (it answers with the first token, which
is streamed at once, and ships the KV with that token to the decode worker), then the
decode worker starts the request by itself when the KV has landed; its outputs reach
this stream through the worker monitor's polls (`deliver`). A request prefilled on the
decode worker takes one call, `add_local`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.core.block_pool import hash_prompt_blocks
from pdserve.engine.core.outputs import PrefillResult, RequestOutput, TokenLogprobs
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.engine.output_processor import OutputProcessor
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.admission import AdmissionController, AdmissionRejected
from pdserve.router.events import Chunk, Completion, RouterError
from pdserve.router.routing import RouteDecision, RouteRequest
from pdserve.router.worker_client import WorkerClient
from pdserve.router.worker_state import WorkerStateTracker

log = logging.getLogger(__name__)


@dataclass
class StreamDeps:
    """What every request stream shares with the router."""

    admission: AdmissionController[RouteRequest, RouteDecision]
    clients: dict[str, WorkerClient]
    tracker: WorkerStateTracker
    tokenizer: Tokenizer | None
    block_size: int
    max_model_len: int


@dataclass
class _Merged:
    """Queued outputs of one stream, merged into what goes out as one chunk."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None
    last: RequestOutput | None = None  # the output that ended the request
    stopped: bool = False  # a stop string ended it
    failure: RouterError | None = None  # raised after the chunk


def _take_queued(queue: asyncio.Queue, first: Any) -> list[Any]:
    """`first` and whatever is already queued behind it, in order; never waits."""
    items = [first]
    while True:
        try:
            items.append(queue.get_nowait())
        except asyncio.QueueEmpty:
            return items


class RequestStream:
    def __init__(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams, deps: StreamDeps
    ) -> None:
        self.req_id = req_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.deps = deps
        # Outputs (RequestOutput) from the decode worker's polls, or a RouterError.
        self.queue: asyncio.Queue[RequestOutput | RouterError] = asyncio.Queue()
        self.decode_worker_id: str | None = None
        self.prefill_worker_id: str | None = None
        self.kv_wait_ms = 0.0
        self.processor = OutputProcessor(deps.tokenizer)
        self.processor.add(req_id, prompt_token_ids, params)
        self.arrival = time.perf_counter()
        self.routed = self.arrival
        self.first_token_at: float | None = None
        self.prefill_ms = 0.0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finished = False

    # -- from the worker monitor -------------------------------------------------------
    def deliver(self, output: RequestOutput, kv_wait_ms: float) -> None:
        self.kv_wait_ms += kv_wait_ms
        self.queue.put_nowait(output)

    def fail(self, error: RouterError) -> None:
        self.queue.put_nowait(error)

    def involves(self, worker_id: str) -> bool:
        return worker_id in (self.decode_worker_id, self.prefill_worker_id)

    # -- the stream ----------------------------------------------------------------------
    async def events(self) -> AsyncIterator[Chunk | Completion]:
        """Chunks, then one Completion (or a RouterError). Leaving early aborts the request."""
        try:
            decision = await self._admit()
            decode = self.deps.clients[decision.decode_worker_id]
            if decision.prefill_worker_id is None:
                await decode.add_local(self.req_id, self.prompt_token_ids, self.params)
            else:
                async for event in self._prefill_remotely(decode, decision.prefill_worker_id):
                    yield event
                if self.finished:
                    return
            async for event in self._stream_outputs():
                yield event
        finally:
            self.deps.tracker.release(self.req_id)
            self.deps.admission.notify_capacity()
            if not self.finished:
                await self.abort_everywhere()

    async def _admit(self) -> RouteDecision:
        num_prompt_tokens = len(self.prompt_token_ids)
        route = RouteRequest(
            self.req_id,
            num_prompt_tokens,
            hash_prompt_blocks(self.prompt_token_ids, self.deps.block_size),
            # Reserve what the engine can generate: it stops at max_model_len.
            min(self.params.max_tokens, self.deps.max_model_len - num_prompt_tokens),
        )
        try:
            decision = await self.deps.admission.admit(route)
        except AdmissionRejected as exc:
            raise RouterError("RESOURCE_EXHAUSTED", str(exc)) from exc
        self.routed = time.perf_counter()
        self.decode_worker_id = decision.decode_worker_id
        self.prefill_worker_id = decision.prefill_worker_id
        return decision

    async def _prefill_remotely(
        self, decode: WorkerClient, prefill_worker_id: str
    ) -> AsyncIterator[Chunk | Completion]:
        """Reserve on the decode worker, prefill with its handle, stream the first token."""
        prompt = self.prompt_token_ids
        handle = await decode.reserve(self.req_id, prompt, self.params)
        if handle is None:
            raise RouterError("RESOURCE_EXHAUSTED", "the decode worker has no free KV blocks")
        cached_on_decode = len(prompt) - handle.num_tokens
        prefill = self.deps.clients[prefill_worker_id]
        result: PrefillResult = await prefill.prefill(self.req_id, prompt, self.params, handle)
        self.first_token_at = time.perf_counter()
        self.prefill_ms = (self.first_token_at - self.routed) * 1e3
        self.cached_tokens = max(cached_on_decode, result.num_cached_tokens)
        self.completion_tokens = 1
        delta = self.processor.process(self.req_id, [result.first_token_id], result.finished)
        first_logprobs = None if result.first_logprobs is None else [result.first_logprobs]
        yield Chunk(delta.token_ids, delta.text, first_logprobs, result.prompt_logprobs)
        if result.finished or delta.stopped:
            if delta.stopped and not result.finished:
                await decode.abort(self.req_id)  # the decode worker started it meanwhile
            self.finished = True
            yield self._completion("stop" if delta.stopped else result.finish_reason, 0.0)

    async def _stream_outputs(self) -> AsyncIterator[Chunk | Completion]:
        while True:
            # Everything queued for this stream goes out as one chunk (vLLM's
            # RequestOutputCollector does the same): a consumer that fell behind, e.g.
            # a slow gRPC write, catches up in one message instead of one per step.
            # Never waits for more: the first output still leaves as soon as it lands.
            items = _take_queued(self.queue, await self.queue.get())
            merged = self._merge(items)
            if merged.token_ids or merged.text:
                yield Chunk(merged.token_ids, merged.text, merged.logprobs, merged.prompt_logprobs)
            if merged.failure is not None:
                raise merged.failure
            last = merged.last
            if last is not None:
                if merged.stopped and not last.finished:
                    await self.deps.clients[self.decode_worker_id].abort(self.req_id)
                self.finished = True
                yield self._completion("stop" if merged.stopped else last.finish_reason, self.kv_wait_ms)
                return

    def _merge(self, items: list[RequestOutput | RouterError]) -> _Merged:
        """Queued outputs as one chunk, up to the output that ended the request or a failure."""
        merged = _Merged()
        text_parts: list[str] = []
        for item in items:
            if isinstance(item, RouterError):
                merged.failure = item
                break
            if item.error is not None:
                merged.failure = RouterError("ABORTED", f"request {self.req_id} failed: {item.error}")
                break
            if self.first_token_at is None and item.new_token_ids:
                self.first_token_at = time.perf_counter()
                self.prefill_ms = (self.first_token_at - self.routed) * 1e3
                self.cached_tokens = item.num_cached_tokens
            self.completion_tokens += len(item.new_token_ids)
            # One output at a time, as they came: stop strings and min_tokens are
            # judged at each step's boundary exactly as without merging.
            delta = self.processor.process(self.req_id, item.new_token_ids, item.finished)
            merged.token_ids += delta.token_ids
            if item.new_logprobs is not None and delta.token_ids:
                merged.logprobs = (merged.logprobs or []) + item.new_logprobs
            if item.prompt_logprobs is not None:
                merged.prompt_logprobs = item.prompt_logprobs
            text_parts.append(delta.text)
            if item.finished or delta.stopped:
                merged.last, merged.stopped = item, delta.stopped
                break
        merged.text = "".join(text_parts)
        return merged

    def _completion(self, reason: str | None, kv_ms: float) -> Completion:
        now = time.perf_counter()
        first_at = self.first_token_at or now
        return Completion(
            finish_reason=reason or "stop",
            prompt_tokens=len(self.prompt_token_ids),
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
            queue_ms=(self.routed - self.arrival) * 1e3,
            prefill_ms=self.prefill_ms,
            kv_transfer_ms=kv_ms,
            decode_ms=(now - first_at) * 1e3,
            ttft_ms=(first_at - self.arrival) * 1e3,
        )

    async def abort_everywhere(self) -> None:
        calls = [
            self.deps.clients[worker_id].abort(self.req_id)
            for worker_id in (self.prefill_worker_id, self.decode_worker_id)
            if worker_id is not None
        ]
        # Shielded: the caller is usually being cancelled, but the abort must happen.
        results = await asyncio.shield(asyncio.gather(*calls, return_exceptions=True))
        for r in results:
            if isinstance(r, Exception):
                log.warning("abort of %s failed: %s", self.req_id, r)
