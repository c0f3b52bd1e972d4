"""Runs an LLMEngine on its own thread: the serving workers' event loop.

Other threads (Ray method calls, the KV receiver) never touch the engine
directly: they submit a function with `call`, which runs on the loop thread
between two steps, and get a Future. Step outputs accumulate in one outbox that
the router drains with `poll` — one message per poll for every request of the
worker, however many tokens it holds, never one RPC per token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from pdserve.engine.core.outputs import KVSnapshot, LoadReport, RequestOutput, StepBatch
from pdserve.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, engine: LLMEngine, worker_id: str, publish_outputs: bool = True) -> None:
        # publish_outputs=False: outputs go only to listeners (the prefill role answers
        # each request through its own Future), polls carry just events and load.
        self.publish_outputs = publish_outputs
        self.engine = engine
        self.worker_id = worker_id
        self.instance_id = uuid.uuid4().hex[:12]
        self._calls: queue.SimpleQueue[tuple[Callable[[LLMEngine], Any], Future]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._outbox: list[RequestOutput] = []
        self._events: list = []
        self._outbox_cv = threading.Condition()
        self._event_seq = 0
        self._stopped = False
        self._listeners: list[Callable[[list[RequestOutput]], None]] = []
        self._thread = threading.Thread(target=self._run, name=f"engine-{worker_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():  # a step still running keeps its ranks
            self.engine.shutdown()  # the tensor-parallel ranks, if any

    def add_listener(self, fn: Callable[[list[RequestOutput]], None]) -> None:
        """Called on the loop thread with each step's outputs (before they reach the outbox)."""
        self._listeners.append(fn)

    def call(self, fn: Callable[[LLMEngine], Any]) -> Future:
        """Run `fn(engine)` on the loop thread before the next step."""
        fut: Future = Future()
        if self._stopped:
            fut.set_exception(RuntimeError(f"worker {self.worker_id} is stopped"))
            return fut
        self._calls.put((fn, fut))
        self._wakeup.set()
        return fut

    def call_sync(self, fn: Callable[[LLMEngine], Any], timeout: float | None = 60.0) -> Any:
        return self.call(fn).result(timeout)

    def publish(self, outputs: list[RequestOutput]) -> None:
        """Add outputs made outside a step (e.g. a request finished on KV arrival)."""
        with self._outbox_cv:
            self._outbox.extend(outputs)
            self._outbox_cv.notify_all()

    def poll(self, timeout: float) -> StepBatch:
        """Wait up to `timeout` s for outputs; return them with KV events and load."""
        deadline = time.monotonic() + timeout
        with self._outbox_cv:
            while not self._outbox and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._outbox_cv.wait(left)
            outputs, self._outbox = self._outbox, []
            events, self._events = self._events, []
            seq = self._event_seq
            if events:
                self._event_seq += 1
        load = self.load() if not self._stopped else None
        return StepBatch(self.worker_id, self.instance_id, outputs, events, seq, load)

    def load(self) -> LoadReport:
        """The engine's load now, stamped with this worker's identity and the time."""
        counts = self.call_sync(lambda e: e.load_stats())
        return LoadReport(self.worker_id, self.instance_id, self.engine.role, timestamp=time.time(), **counts)

    def kv_snapshot(self) -> KVSnapshot:
        """Every block hash cached now, for a router that lost events: `seq` is the last
        event batch the snapshot already reflects."""

        def take(engine: LLMEngine) -> KVSnapshot:
            engine.take_kv_events()  # reflected in the snapshot
            with self._outbox_cv:
                self._events.clear()  # likewise, not yet polled
                seq = self._event_seq - 1
            kv = engine.kv_manager
            host = list(kv.host.cached) if kv.host is not None else []
            return KVSnapshot(self.worker_id, self.instance_id, seq, list(kv.pool.cached), host)

        return self.call_sync(take)

    def _drain_calls(self) -> None:
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(self.engine))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

    def _run(self) -> None:
        while not self._stopped:
            self._drain_calls()
            if not self.engine.has_unfinished():
                self._collect_events()
                self._wakeup.wait(0.05)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception:
                log.exception("engine step failed on %s", self.worker_id)
                raise
            for fn in self._listeners:
                fn(outputs)
            self._collect_events(outputs)
        self._drain_calls()

    def _collect_events(self, outputs: list[RequestOutput] | None = None) -> None:
        events = self.engine.take_kv_events()
        if not events and not outputs:
            return
        with self._outbox_cv:
            self._events.extend(events)
            if outputs and self.publish_outputs:
                self._outbox.extend(outputs)
            self._outbox_cv.notify_all()


class LoopWorker:
    """What every serving worker has: an engine on its loop thread, polled by the router."""

    def __init__(self, worker_id: str, engine: LLMEngine, publish_outputs: bool = True) -> None:
        self.worker_id = worker_id
        self.engine = engine
        self.loop = EngineLoop(engine, worker_id, publish_outputs=publish_outputs)

    def ready(self) -> str:
        """The worker id, once the engine is built (a Ray caller waits on this)."""
        return self.worker_id

    def poll(self, timeout_s: float = 0.5) -> StepBatch:
        return self.loop.poll(timeout_s)

    def load(self) -> LoadReport:
        return self.loop.load()

    def kv_snapshot(self) -> KVSnapshot:
        return self.loop.kv_snapshot()

    def shutdown(self) -> None:
        self.loop.stop()
