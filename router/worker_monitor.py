"""Watches the workers: one poll loop per worker feeds load, KV events and outputs.

Each poll returns one `StepBatch` per worker (every request's outputs, the block pool's
events, a `LoadReport`): one message per worker per poll, never one per token. The
monitor applies load and events to the `WorkerStateTracker` (a gap or a restarted worker
triggers a `kv_snapshot` resync), hands outputs to `on_outputs`, reports a worker that
stopped answering to `on_worker_failed`, and sets `ready` once every worker has reported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from pdserve.engine.core.outputs import RequestOutput, StepBatch
from pdserve.router.kv_sync import KVEventBatch
from pdserve.router.worker_client import WorkerClient
from pdserve.router.worker_state import WorkerStateTracker

log = logging.getLogger(__name__)

RETRY_AFTER_FAILURE_S = 1.0


class WorkerMonitor:
    def __init__(
        self,
        clients: dict[str, WorkerClient],
        tracker: WorkerStateTracker,
        on_outputs: Callable[[list[RequestOutput], dict[str, float]], None],
        on_worker_failed: Callable[[str, str], None],
        on_state_change: Callable[[], None],
        poll_timeout_s: float = 0.2,
    ) -> None:
        self.clients = clients
        self.tracker = tracker
        self.on_outputs = on_outputs  # (outputs, kv_wait_ms by req_id)
        self.on_worker_failed = on_worker_failed  # (worker_id, message)
        self.on_state_change = on_state_change
        self.poll_timeout_s = poll_timeout_s
        self.ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._resyncing: set[str] = set()

    async def start(self) -> None:
        for worker_id in self.clients:
            self._tasks.append(asyncio.create_task(self._poll_loop(worker_id)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _poll_loop(self, worker_id: str) -> None:
        client = self.clients[worker_id]
        while True:
            try:
                batch = await client.poll(self.poll_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a dead worker: fail its requests
                log.error("worker %s stopped answering: %s", worker_id, exc)
                self.on_worker_failed(worker_id, f"worker {worker_id} failed: {exc}")
                await asyncio.sleep(RETRY_AFTER_FAILURE_S)
                continue
            self._apply_state(batch)
            if batch.outputs:
                self.on_outputs(batch.outputs, batch.kv_wait_ms)

    def _apply_state(self, batch: StepBatch) -> None:
        worker_id = batch.worker_id
        if batch.load is not None:
            self.tracker.update_load(batch.load)
        if batch.kv_events:
            applied = self.tracker.apply(
                KVEventBatch(worker_id, batch.instance_id, batch.event_seq, batch.kv_events)
            )
            if not applied and worker_id not in self._resyncing:
                self._resyncing.add(worker_id)
                self._tasks.append(asyncio.create_task(self._resync(worker_id)))
        if not self.ready.is_set() and all(w in self.tracker.loads for w in self.clients):
            self.ready.set()
        self.on_state_change()

    async def _resync(self, worker_id: str) -> None:
        """Events were missed (a gap, or a restarted worker): replace its index entries."""
        try:
            self.tracker.apply_snapshot(await self.clients[worker_id].kv_snapshot())
        except Exception as exc:  # noqa: BLE001 - the next gap retries
            log.warning("KV snapshot of %s failed: %s", worker_id, exc)
        finally:
            self._resyncing.discard(worker_id)
