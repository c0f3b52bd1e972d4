"""One request's life in the router: admission, the workers' calls, and its stream.

The path of a disaggregated request takes three control calls: `reserve` on the decode
worker (blocks, and a KVHandle naming them and the decode worker's peer descriptor),
`prefill` on the prefill worker with that handle (it answers with the first token, which
is streamed at once, and ships the KV with that token to the decode worker), then the
decode worker starts the request by itself when the KV has landed; its outputs reach
this stream through the worker monitor's polls (`deliver`). A request prefilled on the
decode worker takes one call, `add_local`.

Failures (see the worker monitor, router/worker_monitor.py): when the request's decode
worker is lost, or its prefill worker is lost before the KV landed, the stream starts a
new attempt: the prompt plus every token already streamed is routed and prefilled again
(`SamplingParams.resumed_after` keeps the rest of the stream as it would have been, seeded
draws included), and streaming goes on with no token missing or repeated. Each attempt
runs on the workers under its own id (`<req_id>` then `<req_id>#2`, ...), so nothing an
earlier attempt still sends can reach the stream. Past `max_migrations` new attempts the
stream ends with UNAVAILABLE naming the cause.

A decode worker that drops an attempt (its KV transfer failed or outlived
`transfer.timeout_s`) ends it at once with ABORTED naming the cause, even while the prefill
call still waits on a worker that may never answer; the leftovers are then aborted in the
background, never awaited (a stalled worker answers nothing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pdserve.engine.core.block_pool import hash_prompt_blocks
from pdserve.engine.core.outputs import PrefillResult, RequestOutput, TokenLogprobs
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.engine.output_processor import OutputProcessor
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.admission import AdmissionController, AdmissionRejected
from pdserve.router.events import Chunk, Completion, LifecycleLog, RouterError, RouterStats
from pdserve.router.routing import RouteDecision, RouteRequest
from pdserve.router.worker_client import WorkerClient, WorkerLost
from pdserve.router.worker_state import WorkerStateTracker

if TYPE_CHECKING:
    from pdserve.transfer.contract import KVHandle

log = logging.getLogger(__name__)


class PairBroken(WorkerLost):
    """An attempt's KV can no longer cross from its prefill worker to its decode worker (their
    transfer broke): it is retried as if its prefill worker were lost."""

    def __init__(self, prefill_worker_id: str, decode_worker_id: str, reason: str) -> None:
        super().__init__(prefill_worker_id, reason)
        self.args = (f"KV transfer {prefill_worker_id} -> {decode_worker_id} broken: {reason}",)


@dataclass
class StreamDeps:
    """What every request stream shares with the router."""

    admission: AdmissionController[RouteRequest, RouteDecision]
    clients: dict[str, WorkerClient]
    tracker: WorkerStateTracker
    tokenizer: Tokenizer | None
    block_size: int
    max_model_len: int
    report_lost: Callable[[str, str], None]  # (worker_id, reason): a call found it gone
    lost_workers: Callable[[], str]  # the decode-capable workers lost now and why ("" if none)
    stats: RouterStats = field(default_factory=RouterStats)
    lifecycle: LifecycleLog = field(default_factory=lambda: LifecycleLog(log))
    max_migrations: int = 3  # new attempts per request after a worker was lost
    # Every running attempt by the id the workers know it by: where their outputs go.
    attempts: dict[str, RequestStream] = field(default_factory=dict)
    # Aborts sent to workers that may be gone, never awaited by a stream; held here
    # so that they are not garbage collected while running.
    background: set[asyncio.Task] = field(default_factory=set)


@dataclass
class _Merged:
    """Queued outputs of one stream, merged into what goes out as one chunk."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None
    last: RequestOutput | None = None  # the output that ended the request
    stopped: bool = False  # a stop string ended it
    failure: RouterError | WorkerLost | None = None  # raised after the chunk


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
        self.attempt = 0  # 1 for the first attempt, counted by _start_attempt
        self.worker_req_id = req_id  # the current attempt's id on the workers
        # Outputs (RequestOutput) of the current attempt, a RouterError, or WorkerLost.
        self.queue: asyncio.Queue[RequestOutput | RouterError | WorkerLost] = asyncio.Queue()
        # Set when this attempt's worker is lost (WorkerLost) or its decode worker dropped it (RouterError).
        self._interrupted: asyncio.Future[WorkerLost | RouterError] | None = None
        self.decode_worker_id: str | None = None
        self.prefill_worker_id: str | None = None
        self.kv_landed = False  # the decode worker sent an output (not an error) for this attempt
        self._handle: KVHandle | None = None  # the decode worker's reservation (remote prefill)
        self.output_token_ids: list[int] = []  # every token streamed so far, all attempts
        self.kv_wait_ms = 0.0
        self.processor = OutputProcessor(deps.tokenizer)
        self.processor.add(req_id, prompt_token_ids, params)
        self.arrival = time.perf_counter()
        self.routed = self.arrival
        self.first_token_at: float | None = None
        self.prefill_ms = 0.0
        self.kv_bytes = 0  # the packed KV the prefill worker ships to the decode worker
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finished = False

    # -- from the worker monitor -------------------------------------------------------
    def deliver(self, output: RequestOutput, kv_wait_ms: float) -> None:
        self.kv_wait_ms += kv_wait_ms
        if output.error is None:
            if not self.kv_landed:  # its prompt blocks are now there to share (the router's books)
                self.kv_landed = True
                self.deps.tracker.on_kv_landed(self.worker_req_id)
            self.queue.put_nowait(output)
            return
        # The decode worker dropped the attempt (e.g. its KV transfer outlived transfer.timeout_s):
        # no KV landed, and the prefill call may be waiting on a worker that never answers.
        if self._interrupted is not None and self._interrupted.done():
            return  # already ended (its prefill worker lost: it is being retried)
        self.deps.lifecycle.record(logging.WARNING, "request %s failed: %s", self.req_id, output.error)
        self._interrupt(RouterError("ABORTED", f"request {self.req_id} failed: {output.error}"))

    def on_worker_lost(self, worker_id: str, reason: str) -> None:
        """A worker is gone: start over elsewhere if this attempt depended on it. A request
        whose KV already landed on its decode worker no longer needs its prefill worker."""
        needed = worker_id == self.decode_worker_id or (
            worker_id == self.prefill_worker_id and not self.kv_landed
        )
        if needed:
            self._interrupt(WorkerLost(worker_id, reason))

    def on_pair_broken(self, prefill_worker_id: str, decode_worker_id: str, reason: str) -> None:
        """The KV transfer between these two workers broke (nccl): start over elsewhere if this
        attempt's KV was still to cross it (as if its prefill worker were lost)."""
        if (prefill_worker_id, decode_worker_id) == (self.prefill_worker_id, self.decode_worker_id):
            if not self.kv_landed:
                self._interrupt(PairBroken(prefill_worker_id, decode_worker_id, reason))

    def _interrupt(self, failure: WorkerLost | RouterError) -> None:
        """End the current attempt with `failure`, whatever it is waiting on (the first one wins)."""
        if self._interrupted is None or self._interrupted.done():
            return
        self._interrupted.set_result(failure)
        self.queue.put_nowait(failure)

    # -- the stream ----------------------------------------------------------------------
    async def events(self) -> AsyncIterator[Chunk | Completion]:
        """Chunks, then one Completion (or a RouterError). Leaving early aborts the request."""
        failed = False
        try:
            while True:
                try:
                    async for event in self._attempt():
                        yield event
                    return
                except WorkerLost as lost:
                    self._before_next_attempt(lost)
        except RouterError:
            failed = True
            raise
        finally:
            self._end_attempt()
            self.deps.admission.notify_capacity()
            if failed:  # a worker of the attempt may be stalled: the error goes out now
                self._abort_in_background()
            elif not self.finished:
                await self.abort_everywhere()

    async def _attempt(self) -> AsyncIterator[Chunk | Completion]:
        """Route and run the request (the rest of it, after a migration) once."""
        self._start_attempt()
        decision = await self._admit_with_reservation()
        decode = self.deps.clients[decision.decode_worker_id]
        if decision.prefill_worker_id is None:
            await self._guarded(decode.add_local(self.worker_req_id, self._prompt(), self._params()))
        else:
            async for event in self._prefill_remotely(decode, decision.prefill_worker_id):
                yield event
            if self.finished:
                return
        async for event in self._stream_outputs():
            yield event

    async def _admit_with_reservation(self) -> RouteDecision:
        """Admit, and for a remote prefill reserve the blocks on the decode worker. The
        router's books count a prompt block as shared only once its KV landed, as the worker
        does, but they see the worker through polls (a cached block it evicted, memory the
        router did not cause): when it refuses a reservation the books allowed, the request
        is routed again (after a short wait for blocks to free) rather than failed, for up to
        the admission's max_wait_s. A safety net, not the rule."""
        deadline = time.monotonic() + self.deps.admission.max_wait_s
        delay = 0.01
        while True:
            decision = await self._admit()
            if decision.prefill_worker_id is None:
                return decision
            decode = self.deps.clients[decision.decode_worker_id]
            self._handle = await self._guarded(
                decode.reserve(self.worker_req_id, self._prompt(), self._params())
            )
            if self._handle is not None:
                return decision
            self.deps.tracker.release(self.worker_req_id)  # undo the routing; try again
            if time.monotonic() + delay > deadline:
                raise RouterError(
                    "RESOURCE_EXHAUSTED",
                    f"decode worker {decision.decode_worker_id} had no free KV blocks for "
                    f"{self.deps.admission.max_wait_s:g} s (router.max_wait_s)",
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _start_attempt(self) -> None:
        self.attempt += 1
        if self.attempt > 1:
            self.worker_req_id = f"{self.req_id}#{self.attempt}"
            while self.worker_req_id in self.deps.attempts:  # a client chose that id
                self.worker_req_id += "#"
        self.queue = asyncio.Queue()
        self._interrupted = asyncio.get_running_loop().create_future()
        self.decode_worker_id = self.prefill_worker_id = None
        self.kv_landed = False
        self.deps.attempts[self.worker_req_id] = self

    def _end_attempt(self) -> None:
        self.deps.attempts.pop(self.worker_req_id, None)
        self.deps.tracker.release(self.worker_req_id)

    def _before_next_attempt(self, lost: WorkerLost) -> None:
        """The attempt's worker is gone: drop the attempt everywhere (without waiting on a
        worker that may never answer), or give up past the migration limit."""
        stats = self.deps.stats
        decode_lost = lost.worker_id == self.decode_worker_id
        self._abort_in_background()
        self._end_attempt()
        self.decode_worker_id = self.prefill_worker_id = None  # nothing left to abort there
        if self.attempt > self.deps.max_migrations:
            stats.num_requests_failed_over_limit += 1
            self.deps.lifecycle.record(
                logging.ERROR,
                "request %s not moved again: %d attempts; last: %s",
                self.req_id,
                self.attempt,
                lost,
            )
            raise RouterError(
                "UNAVAILABLE",
                f"request {self.req_id} ended after {self.attempt} attempts "
                f"(router.max_migrations={self.deps.max_migrations}); last: {lost}",
            )
        if decode_lost:
            stats.num_migrations += 1
            what = "migrated"
        else:
            stats.num_prefill_retries += 1
            what = "retried"
        self.deps.lifecycle.record(
            logging.WARNING, "request %s %s (attempt %d, %d tokens streamed): %s",
            self.req_id, what, self.attempt + 1, len(self.output_token_ids), lost,
        )  # fmt: skip

    async def _guarded(self, call: Any) -> Any:
        """Await a worker call, unless the attempt is interrupted first (its worker lost: a
        hung worker never answers; or dropped by its decode worker): then raise why."""
        task = asyncio.ensure_future(call)
        try:
            await asyncio.wait({task, self._interrupted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise self._interrupted.result()
        try:
            return task.result()
        except WorkerLost as lost:  # the call saw it first: out of routing now, not at the next poll
            self.deps.report_lost(lost.worker_id, lost.reason)
            raise

    def _prompt(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def _params(self) -> SamplingParams:
        if not self.output_token_ids:
            return self.params
        return self.params.resumed_after(len(self.output_token_ids))

    async def _admit(self) -> RouteDecision:
        prompt = self._prompt()
        route = RouteRequest(
            self.worker_req_id,
            len(prompt),
            hash_prompt_blocks(prompt, self.deps.block_size),
            # Reserve what the engine can generate: it stops at max_model_len.
            min(self.params.max_tokens - len(self.output_token_ids), self.deps.max_model_len - len(prompt)),
        )
        try:
            decision = await self.deps.admission.admit(route)
        except AdmissionRejected as exc:
            raise self._rejected(exc) from exc
        if self.attempt == 1:
            self.routed = time.perf_counter()
        self.decode_worker_id = decision.decode_worker_id
        self.prefill_worker_id = decision.prefill_worker_id
        return decision

    def _rejected(self, exc: AdmissionRejected) -> RouterError:
        """No worker took the request in time: UNAVAILABLE when workers are lost (naming
        them) or the request was moving, RESOURCE_EXHAUSTED when they are only full."""
        lost = self.deps.lost_workers()
        why = f"{exc}; lost: {lost}" if lost else str(exc)
        if self.attempt > 1:
            self.deps.stats.num_requests_failed_over_limit += 1
            self.deps.lifecycle.record(logging.ERROR, "request %s could not be moved: %s", self.req_id, why)
            return RouterError("UNAVAILABLE", f"request {self.req_id} lost its worker and {why}")
        self.deps.lifecycle.record(logging.WARNING, "request %s rejected: %s", self.req_id, why)
        return RouterError("UNAVAILABLE" if lost else "RESOURCE_EXHAUSTED", why)

    async def _prefill_remotely(
        self, decode: WorkerClient, prefill_worker_id: str
    ) -> AsyncIterator[Chunk | Completion]:
        """Prefill with the decode worker's reservation (`self._handle`), stream the first token."""
        prompt, params, req_id, handle = self._prompt(), self._params(), self.worker_req_id, self._handle
        cached_on_decode = len(prompt) - handle.num_tokens
        prefill = self.deps.clients[prefill_worker_id]
        result: PrefillResult = await self._guarded(prefill.prefill(req_id, prompt, params, handle))
        if not result.finished:  # the prefill worker ships the blocks the decode worker lacks
            self.kv_bytes += handle.layout.buffer_bytes(len(handle.block_ids))
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            self.prefill_ms = (self.first_token_at - self.routed) * 1e3
            self.cached_tokens = max(cached_on_decode, result.num_cached_tokens)
        self.completion_tokens += 1
        self.output_token_ids.append(result.first_token_id)
        delta = self.processor.process(self.req_id, [result.first_token_id], result.finished)
        first_logprobs = None if result.first_logprobs is None else [result.first_logprobs]
        yield Chunk(delta.token_ids, delta.text, first_logprobs, result.prompt_logprobs)
        if result.finished or delta.stopped:
            # The decode worker started the request meanwhile, or waits for the prefill
            # worker's report that nothing will come: abort either way (it is idempotent),
            # so its reservation never depends on that report.
            self.finished = True
            await self._abort_on(decode)
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
                self.finished = True
                if merged.stopped and not last.finished:
                    await self._abort_on(self.deps.clients[self.decode_worker_id])
                yield self._completion("stop" if merged.stopped else last.finish_reason, self.kv_wait_ms)
                return

    def _merge(self, items: list[RequestOutput | RouterError | WorkerLost]) -> _Merged:
        """Queued outputs as one chunk, up to the output that ended the request or a failure."""
        merged = _Merged()
        text_parts: list[str] = []
        for item in items:
            if isinstance(item, (RouterError, WorkerLost)):
                merged.failure = item
                break
            if self.first_token_at is None and item.new_token_ids:
                self.first_token_at = time.perf_counter()
                self.prefill_ms = (self.first_token_at - self.routed) * 1e3
                self.cached_tokens = item.num_cached_tokens
            self.completion_tokens += len(item.new_token_ids)
            self.output_token_ids += item.new_token_ids
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

    async def _abort_on(self, worker: WorkerClient) -> None:
        """Abort the finished request's leftovers on a worker; a worker gone meanwhile
        holds nothing of it any more."""
        try:
            await worker.abort(self.worker_req_id)
        except WorkerLost as lost:
            log.info("request %s: %s", self.req_id, lost)

    def _abort_calls(self) -> list[Any]:
        return [
            self.deps.clients[worker_id].abort(self.worker_req_id)
            for worker_id in (self.prefill_worker_id, self.decode_worker_id)
            if worker_id is not None
        ]

    def _abort_in_background(self) -> None:
        """Abort the current attempt on its workers without waiting: one of them is gone,
        or hung, or restarting (a call then waits for the new instance)."""
        for call in self._abort_calls():
            task = asyncio.ensure_future(call)
            self.deps.background.add(task)
            task.add_done_callback(_finish_background_abort(self.deps.background, self.worker_req_id))

    async def abort_everywhere(self) -> None:
        # Shielded: the caller is usually being cancelled, but the abort must happen.
        results = await asyncio.shield(asyncio.gather(*self._abort_calls(), return_exceptions=True))
        for r in results:
            if isinstance(r, Exception):
                log.warning("abort of %s failed: %s", self.worker_req_id, r)


def _finish_background_abort(tasks: set[asyncio.Task], req_id: str) -> Any:
    def done(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("abort of %s on a lost worker: %s", req_id, task.exception())

    return done
