"""The prefill worker: the engine in its prefill role, plus the KV sender.

`prefill()` queues a prompt and returns a Future that resolves with the first
sampled token as soon as the step that computed it ends (that is the TTFT).
The request's blocks stay owned here while a sender thread ships the ones the
decode worker lacks (one packed buffer, one send); they are freed when the send
completes or fails. A failure is reported through `on_send_failed` so the decode
side can drop its reservation.

Plain class: the Ray actor in `prefill_worker.actor` only forwards calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from engine.core.outputs import RequestOutput
from engine.core.sampling_params import SamplingParams
from engine.engine_loop import LoopWorker
from engine.llm_engine import EngineConfig, LLMEngine
from transfer.contract import KVHandle, TransferStats

log = logging.getLogger(__name__)


@dataclass
class PrefillResult:
    req_id: str
    first_token_id: int
    finished: bool  # the first token already ends the request (eos, stop token, max_tokens=1)
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens this prefill worker served from its own cache
    prefill_ms: float  # from arrival at the worker to the first token
    kv_shipped: bool  # False when there was nothing to ship (finished, or no handle)


# send(handle, src_block_ids, kv_cache) -> TransferStats; raises on failure.
SendFn = Callable[[KVHandle, list[int], object], TransferStats]


class PrefillWorker(LoopWorker):
    def __init__(self, worker_id: str, engine_config: EngineConfig, num_send_threads: int = 4) -> None:
        engine_config.role = "prefill"
        super().__init__(worker_id, LLMEngine(engine_config), publish_outputs=False)
        self.loop.add_listener(self._on_outputs)
        self._pending: dict[str, tuple[Future, KVHandle | None, float]] = {}
        self._lock = threading.Lock()
        self._senders = ThreadPoolExecutor(num_send_threads, thread_name_prefix=f"kv-send-{worker_id}")
        self.send_fn: SendFn | None = None
        self.on_send_failed: Callable[[KVHandle, Exception], None] | None = None
        self.loop.start()

    # -- wiring -----------------------------------------------------------------
    def set_sender(self, send_fn: SendFn, on_send_failed: Callable[[KVHandle, Exception], None]) -> None:
        self.send_fn = send_fn
        self.on_send_failed = on_send_failed

    # -- requests ----------------------------------------------------------------
    def prefill(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams, handle: KVHandle | None
    ) -> Future:
        """Queue a prompt; the Future resolves with a PrefillResult at the first token."""
        fut: Future = Future()
        if handle is not None and self.send_fn is None:
            fut.set_exception(RuntimeError(f"prefill worker {self.worker_id} has no KV sender wired"))
            return fut
        with self._lock:
            self._pending[req_id] = (fut, handle, time.perf_counter())

        def add(engine: LLMEngine) -> None:
            engine.add_request(req_id, prompt_token_ids, params)

        added = self.loop.call(add)
        added.add_done_callback(lambda f: self._fail(req_id, f.exception()) if f.exception() else None)
        return fut

    def abort(self, req_id: str) -> bool:
        """Abort a queued or running prefill. A request whose KV is being sent is left to
        the sender, which frees its blocks when the send ends."""
        with self._lock:
            pending = self._pending.pop(req_id, None)
        if pending is None:
            return False
        pending[0].cancel()
        self.loop.call(lambda e: e.abort_request(req_id))
        return True

    def shutdown(self) -> None:
        super().shutdown()
        self._senders.shutdown(wait=False, cancel_futures=True)

    # -- internals (loop thread) ---------------------------------------------------
    def _fail(self, req_id: str, exc: BaseException) -> None:
        with self._lock:
            pending = self._pending.pop(req_id, None)
        if pending is not None and not pending[0].done():
            pending[0].set_exception(exc)

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._lock:
                pending = self._pending.pop(out.req_id, None)
            if pending is None:
                if not out.finished:  # aborted meanwhile: nobody waits for this KV
                    self.engine.release_request(out.req_id)
                continue
            fut, handle, start = pending
            ship = handle is not None and not out.finished
            src_block_ids: list[int] = []
            if ship:
                # The decode side lacks the prompt's last len(handle.block_ids) blocks.
                num_prompt_blocks = -(-out.num_prompt_tokens // self.engine.block_size)
                prompt_blocks = self.engine.get_block_ids(out.req_id)[:num_prompt_blocks]
                src_block_ids = prompt_blocks[num_prompt_blocks - len(handle.block_ids) :]
            result = PrefillResult(
                req_id=out.req_id,
                first_token_id=out.new_token_ids[0],
                finished=out.finished,
                finish_reason=out.finish_reason,
                num_prompt_tokens=out.num_prompt_tokens,
                num_cached_tokens=out.num_cached_tokens,
                prefill_ms=(time.perf_counter() - start) * 1e3,
                kv_shipped=ship,
            )
            if ship:
                self._senders.submit(self._send, handle, src_block_ids)
            elif not out.finished:
                self.engine.release_request(out.req_id)  # co-located callers pass no handle
            if not fut.done():
                fut.set_result(result)

    def _send(self, handle: KVHandle, src_block_ids: list[int]) -> None:
        try:
            stats = self.send_fn(handle, src_block_ids, self.engine.kv_cache)
            log.debug(
                "KV of %s: %d bytes, pack %.2f ms, send %.2f ms",
                handle.req_id,
                stats.nbytes,
                stats.pack_ms,
                stats.send_ms,
            )
        except Exception as exc:  # noqa: BLE001 - reported to the decode side
            log.warning("KV send for %s failed: %s", handle.req_id, exc)
            if self.on_send_failed is not None:
                try:
                    self.on_send_failed(handle, exc)
                except Exception:  # noqa: BLE001
                    log.exception("reporting a failed send for %s", handle.req_id)
        finally:
            self.loop.call(lambda e: e.release_request(handle.req_id))
