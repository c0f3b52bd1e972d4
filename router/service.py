"""The router's request lifecycle, independent of gRPC and of Ray.

`RouterCore.generate()` takes a validated request and yields events: `Chunk`s
of new tokens and text, then one `Completion` (or raises `RouterError`). It
routes through a policy and an admission queue, drives the chosen workers
(reserve on decode -> prefill -> start decode), and turns the decode worker's
per-step batches into per-request streams. One poll loop per worker drains its
outputs, KV events and load: one message per worker per poll, never one per token.
Outputs that pile up for a stream while its consumer is busy leave as one `Chunk`.

Workers are reached through `WorkerClient`s with async methods; `RayWorkerClient`
wraps a Ray actor handle and `LocalWorkerClient` an in-process object.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from engine.core.block_pool import hash_prompt_blocks
from engine.core.outputs import RequestOutput
from engine.core.sampling_params import SamplingParams
from engine.output_processor import OutputProcessor
from engine.tokenizer import Tokenizer
from router.admission import AdmissionController, AdmissionRejected
from router.policy import Policy, RouteDecision, RouteRequest
from router.worker_state import KVEventBatch, KVSnapshot, LoadReport, WorkerStateTracker

log = logging.getLogger(__name__)


class RouterError(Exception):
    """A request failed; `code` is a gRPC status code name (e.g. "INVALID_ARGUMENT")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Chunk:
    token_ids: list[int]
    text: str


@dataclass
class Completion:
    finish_reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queue_ms: float
    prefill_ms: float
    kv_transfer_ms: float
    decode_ms: float
    ttft_ms: float


@dataclass
class ModelSummary:
    name: str
    vocab_size: int
    max_model_len: int
    block_size: int
    eos_token_id: int | None


@dataclass
class _Stream:
    req_id: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    decode_worker_id: str | None = None
    prefill_worker_id: str | None = None
    kv_wait_ms: float = 0.0


def _take_queued(queue: asyncio.Queue, first: Any) -> list[Any]:
    """`first` and whatever is already queued behind it, in order; never waits."""
    items = [first]
    while True:
        try:
            items.append(queue.get_nowait())
        except asyncio.QueueEmpty:
            return items


class RayWorkerClient:
    """Async calls on a Ray actor handle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self.handle, method).remote(*args)


class LocalWorkerClient:
    """Async calls on an in-process worker object (its methods block: run them in threads)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    async def call(self, method: str, *args: Any) -> Any:
        result = await asyncio.to_thread(getattr(self.obj, method), *args)
        if hasattr(result, "result") and callable(result.result):  # a Future from the worker
            result = await asyncio.wrap_future(result)
        return result


class RouterCore:
    def __init__(
        self,
        model: ModelSummary,
        tokenizer: Tokenizer | None,
        policy: Policy,
        prefill_workers: dict[str, Any],
        decode_workers: dict[str, Any],
        worker_roles: dict[str, str],
        use_kv_events: bool = True,
        max_queue_len: int = 256,
        max_wait_s: float = 30.0,
        poll_timeout_s: float = 0.2,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.policy = policy
        self.prefill_workers = prefill_workers
        self.decode_workers = decode_workers  # includes co-located ("both") workers
        self.worker_roles = worker_roles
        self.tracker = WorkerStateTracker(use_kv_events=use_kv_events)
        self.admission: AdmissionController[RouteRequest, RouteDecision] = AdmissionController(
            self._try_route,
            max_queue_len,
            max_wait_s,
            on_abandoned=lambda r, d: self.tracker.release(r.req_id),
        )
        self.poll_timeout_s = poll_timeout_s
        self._streams: dict[str, _Stream] = {}
        self._tasks: list[asyncio.Task] = []
        self._ready = asyncio.Event()
        self._resyncing: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        for worker_id in {**self.prefill_workers, **self.decode_workers}:
            self._tasks.append(asyncio.create_task(self._poll_loop(worker_id)))

    async def wait_ready(self, timeout: float = 120.0) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _client(self, worker_id: str) -> Any:
        return self.decode_workers.get(worker_id) or self.prefill_workers[worker_id]

    # -- worker state -----------------------------------------------------------------
    async def _poll_loop(self, worker_id: str) -> None:
        client = self._client(worker_id)
        role = self.worker_roles[worker_id]
        while True:
            try:
                batch = await client.call("poll", self.poll_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a dead worker: fail its requests
                log.error("worker %s stopped answering: %s", worker_id, exc)
                self._fail_worker(worker_id, f"worker {worker_id} failed: {exc}")
                await asyncio.sleep(1.0)
                continue
            self._apply_state(worker_id, role, batch)
            for out in batch.outputs:
                stream = self._streams.get(out.req_id)
                if stream is not None:
                    stream.kv_wait_ms += batch.kv_wait_ms.get(out.req_id, 0.0)
                    stream.queue.put_nowait(out)

    def _apply_state(self, worker_id: str, role: str, batch) -> None:
        load = batch.load
        if load:
            self.tracker.update_load(
                LoadReport(
                    worker_id=worker_id,
                    instance_id=batch.instance_id,
                    role=role,
                    num_free_blocks=load["num_free_blocks"],
                    num_total_blocks=load["num_total_blocks"],
                    block_size=load["block_size"],
                    num_running=load["num_running"],
                    num_waiting=load["num_waiting"],
                    num_queued_prefill_tokens=load["num_queued_prefill_tokens"],
                    timestamp=batch.timestamp,
                )
            )
        if batch.kv_events:
            applied = self.tracker.apply(
                KVEventBatch(worker_id, batch.instance_id, batch.event_seq, batch.kv_events)
            )
            if not applied and worker_id not in self._resyncing:
                self._resyncing.add(worker_id)
                self._tasks.append(asyncio.create_task(self._resync(worker_id)))
        if not self._ready.is_set() and all(w in self.tracker.loads for w in self.worker_roles):
            self._ready.set()
        self.admission.notify_capacity()

    async def _resync(self, worker_id: str) -> None:
        """Events were missed (a gap, or a restarted worker): replace its index entries."""
        try:
            instance_id, seq, hashes = await self._client(worker_id).call("kv_snapshot")
            self.tracker.apply_snapshot(KVSnapshot(worker_id, instance_id, seq, hashes))
        except Exception as exc:  # noqa: BLE001 - the next gap retries
            log.warning("KV snapshot of %s failed: %s", worker_id, exc)
        finally:
            self._resyncing.discard(worker_id)

    def _fail_worker(self, worker_id: str, message: str) -> None:
        for stream in list(self._streams.values()):
            if worker_id in (stream.decode_worker_id, stream.prefill_worker_id):
                stream.queue.put_nowait(RouterError("UNAVAILABLE", message))

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
        """Stream one request. Cancelling the consumer aborts it on every worker."""
        if req_id in self._streams:
            raise RouterError("ALREADY_EXISTS", f"request_id {req_id!r} is already running")
        if not self._ready.is_set():
            raise RouterError("UNAVAILABLE", "workers are not ready yet")
        arrival = time.perf_counter()
        stream = _Stream(req_id)
        self._streams[req_id] = stream
        processor = OutputProcessor(self.tokenizer)
        processor.add(req_id, prompt_token_ids, params)
        finished = False
        route = RouteRequest(
            req_id,
            len(prompt_token_ids),
            hash_prompt_blocks(prompt_token_ids, self.model.block_size),
            params.max_tokens,
        )
        try:
            try:
                decision = await self.admission.admit(route)
            except AdmissionRejected as exc:
                raise RouterError("RESOURCE_EXHAUSTED", str(exc)) from exc
            routed = time.perf_counter()
            stream.decode_worker_id = decision.decode_worker_id
            stream.prefill_worker_id = decision.prefill_worker_id
            decode = self.decode_workers[decision.decode_worker_id]
            prefill_ms = 0.0
            first_token_at = None
            completion_tokens = 0
            cached_tokens = 0
            if decision.prefill_worker_id is None:
                await decode.call("add_local", req_id, prompt_token_ids, params)
            else:
                handle = await decode.call("reserve", req_id, prompt_token_ids, params)
                if handle is None:
                    raise RouterError("RESOURCE_EXHAUSTED", "the decode worker has no free KV blocks")
                cached_on_decode = len(prompt_token_ids) - handle.num_tokens
                prefill = self.prefill_workers[decision.prefill_worker_id]
                result = await prefill.call("prefill", req_id, prompt_token_ids, params, handle)
                first_token_at = time.perf_counter()
                prefill_ms = (first_token_at - routed) * 1e3
                cached_tokens = max(cached_on_decode, result.num_cached_tokens)
                completion_tokens = 1
                delta = processor.process(req_id, [result.first_token_id], result.finished)
                yield Chunk(delta.token_ids, delta.text)
                if result.finished or delta.stopped:
                    await decode.call("abort", req_id)
                    finished = True
                    yield self._completion(
                        "stop" if delta.stopped else result.finish_reason,
                        len(prompt_token_ids),
                        1,
                        cached_tokens,
                        arrival,
                        routed,
                        prefill_ms,
                        0.0,
                        first_token_at,
                    )
                    return
                await decode.call("start", req_id, result.first_token_id)
            while True:
                # Everything queued for this stream goes out as one chunk (vLLM's
                # RequestOutputCollector does the same): a consumer that fell behind, e.g.
                # a slow gRPC write, catches up in one message instead of one per step.
                # Never waits for more: the first output still leaves as soon as it lands.
                items = _take_queued(stream.queue, await stream.queue.get())
                token_ids: list[int] = []
                text_parts: list[str] = []
                failure: RouterError | None = None
                last: RequestOutput | None = None  # the output that ended the request
                stopped = False
                for item in items:
                    if isinstance(item, RouterError):
                        failure = item
                        break
                    if item.error is not None:
                        failure = RouterError("ABORTED", f"request {req_id} failed: {item.error}")
                        break
                    if first_token_at is None and item.new_token_ids:
                        first_token_at = time.perf_counter()
                        prefill_ms = (first_token_at - routed) * 1e3
                        cached_tokens = item.num_cached_tokens
                    completion_tokens += len(item.new_token_ids)
                    # One output at a time, as they came: stop strings and min_tokens are
                    # judged at each step's boundary exactly as without merging.
                    delta = processor.process(req_id, item.new_token_ids, item.finished)
                    token_ids += delta.token_ids
                    text_parts.append(delta.text)
                    if item.finished or delta.stopped:
                        last, stopped = item, delta.stopped
                        break
                text = "".join(text_parts)
                if token_ids or text:
                    yield Chunk(token_ids, text)
                if failure is not None:
                    raise failure
                if last is not None:
                    if stopped and not last.finished:
                        await decode.call("abort", req_id)
                    finished = True
                    reason = "stop" if stopped else last.finish_reason
                    yield self._completion(
                        reason,
                        len(prompt_token_ids),
                        completion_tokens,
                        cached_tokens,
                        arrival,
                        routed,
                        prefill_ms,
                        stream.kv_wait_ms,
                        first_token_at or time.perf_counter(),
                    )
                    return
        finally:
            self._streams.pop(req_id, None)
            self.tracker.release(req_id)
            self.admission.notify_capacity()
            if not finished:
                await self._abort_everywhere(stream)

    def _completion(
        self,
        reason,
        prompt_tokens,
        completion_tokens,
        cached_tokens,
        arrival,
        routed,
        prefill_ms,
        kv_ms,
        first_at,
    ) -> Completion:
        now = time.perf_counter()
        return Completion(
            finish_reason=reason or "stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            queue_ms=(routed - arrival) * 1e3,
            prefill_ms=prefill_ms,
            kv_transfer_ms=kv_ms,
            decode_ms=(now - first_at) * 1e3,
            ttft_ms=(first_at - arrival) * 1e3,
        )

    async def _abort_everywhere(self, stream: _Stream) -> None:
        calls = []
        for worker_id in (stream.prefill_worker_id, stream.decode_worker_id):
            if worker_id is not None:
                calls.append(self._client(worker_id).call("abort", stream.req_id))
        # Shielded: the caller is usually being cancelled, but the abort must happen.
        results = await asyncio.shield(asyncio.gather(*calls, return_exceptions=True))
        for r in results:
            if isinstance(r, Exception):
                log.warning("abort of %s failed: %s", stream.req_id, r)

    async def abort(self, req_id: str) -> bool:
        stream = self._streams.get(req_id)
        if stream is None:
            return False
        await self._abort_everywhere(stream)
        stream.queue.put_nowait(RequestOutput(req_id, finished=True, finish_reason="abort"))
        return True

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
