"""Watches the workers: one poll loop per worker feeds load, KV events and outputs.

Each poll returns one `StepBatch` per worker (every request's outputs, the block pool's
events, a `LoadReport`): one message per worker per poll, never one per token. The
monitor applies load and events to the `WorkerStateTracker` (a gap or a restarted worker
triggers a `kv_snapshot` resync), hands outputs to `on_outputs`, and sets `ready` once
every worker has reported.

A worker is lost when a poll fails (its actor died: at once) or brings no answer within
`answer_timeout_s` past the poll's own wait (a hung worker). A lost worker leaves the
tracker (so no request is routed to it) and is reported to `on_worker_lost` once; the
monitor keeps polling it, and when it answers again (a restarted actor, with a new
instance id; or a worker that was only slow) it rejoins routing and is reported to
`on_worker_back`. A new instance id without a failed poll in between (a restart between
two polls) is a loss and a return at once: the old instance's requests are gone.

A worker in a KV transfer process group (nccl backend) reports its rank and the ranks it
can no longer transfer with (`StepBatch.transfer_rank`, `broken_transfer_peers`) in every
poll; they go to `on_transfer_report` before the poll's outputs. The router `keep_out`s a
prefill worker none of whose pairs work any more: lost, and never back in routing however
it answers (only a new deployment forms a new group).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.engine.core.outputs import RequestOutput, StepBatch
from pdserve.router.events import LifecycleLog
from pdserve.router.kv_sync import KVEventBatch
from pdserve.router.worker_client import WorkerClient, WorkerLost
from pdserve.router.worker_state import WorkerStateTracker

log = logging.getLogger(__name__)

RETRY_AFTER_FAILURE_S = 0.25  # how often a lost worker is polled again


@dataclass
class WorkerHealth:
    """What the monitor knows of one worker's liveness (router status reads it)."""

    alive: bool = False  # answering now
    instance_id: str | None = None  # of the latest answer
    lost_reason: str | None = None  # why it was last lost
    num_lost: int = 0
    num_restarts: int = 0  # came back with a new instance id


class WorkerMonitor:
    def __init__(
        self,
        clients: dict[str, WorkerClient],
        tracker: WorkerStateTracker,
        on_outputs: Callable[[str, list[RequestOutput], dict[str, float]], None],
        on_worker_lost: Callable[[str, str], None],
        on_worker_back: Callable[[str, bool], None],
        on_state_change: Callable[[], None],
        on_transfer_report: Callable[[str, int, dict[int, str]], None] | None = None,
        poll_timeout_s: float = 0.2,
        answer_timeout_s: float = 5.0,
        lifecycle: LifecycleLog | None = None,
    ) -> None:
        self.clients = clients
        self.tracker = tracker
        self.on_outputs = on_outputs  # (worker_id, outputs, kv_wait_ms by req_id)
        self.on_worker_lost = on_worker_lost  # (worker_id, reason)
        self.on_worker_back = on_worker_back  # (worker_id, restarted: new instance id)
        self.on_state_change = on_state_change
        self.on_transfer_report = on_transfer_report  # (worker_id, its rank, broken peer rank -> why)
        self.kept_out: dict[str, str] = {}  # worker id -> why it never rejoins routing
        self.poll_timeout_s = poll_timeout_s
        self.answer_timeout_s = answer_timeout_s
        self.lifecycle = lifecycle if lifecycle is not None else LifecycleLog(log)
        self.health = {worker_id: WorkerHealth() for worker_id in clients}
        self.ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._resyncing: set[str] = set()

    def is_alive(self, worker_id: str) -> bool:
        return self.health[worker_id].alive

    async def start(self) -> None:
        for worker_id in self.clients:
            self._tasks.append(asyncio.create_task(self._poll_loop(worker_id)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _poll_loop(self, worker_id: str) -> None:
        client = self.clients[worker_id]
        health = self.health[worker_id]
        poll: asyncio.Future | None = None
        try:
            while True:
                # A poll is never abandoned: one that outlasts the bound marks the worker
                # lost and is still awaited, so a batch it brings later (outputs, KV events)
                # is never dropped, and polls never pile up on a hung or restarting worker.
                if poll is None:
                    poll = asyncio.ensure_future(client.poll(self.poll_timeout_s))
                done, _ = await asyncio.wait({poll}, timeout=self.poll_timeout_s + self.answer_timeout_s)
                if not done:
                    self.mark_lost(worker_id, f"no answer within {self.answer_timeout_s:g} s")
                    continue
                finished, poll = poll, None
                try:
                    batch = finished.result()
                except Exception as exc:  # noqa: BLE001 - a dead worker
                    reason = exc.reason if isinstance(exc, WorkerLost) else f"{type(exc).__name__}: {exc}"
                    self.mark_lost(worker_id, reason)
                    await asyncio.sleep(RETRY_AFTER_FAILURE_S)
                    continue
                if batch.transfer_rank is not None and self.on_transfer_report is not None:
                    self.on_transfer_report(worker_id, batch.transfer_rank, batch.broken_transfer_peers)
                if worker_id in self.kept_out:  # answers, but stays out of routing
                    health.lost_reason = self.kept_out[worker_id]  # not "no answer" any more
                    if batch.outputs:
                        self.on_outputs(worker_id, batch.outputs, batch.kv_wait_ms)
                    continue
                if health.alive and batch.instance_id != health.instance_id:
                    self.mark_lost(
                        worker_id, f"restarted (instance {health.instance_id} -> {batch.instance_id})"
                    )
                if not health.alive and batch.load is not None:
                    self._rejoin(worker_id, batch.instance_id)
                self._apply_state(batch)
                if batch.outputs:
                    self.on_outputs(worker_id, batch.outputs, batch.kv_wait_ms)
        finally:
            if poll is not None:
                poll.cancel()

    def mark_lost(self, worker_id: str, reason: str) -> None:
        """Take a worker out of routing and report it, once per loss (also called by a
        request that found it gone first)."""
        health = self.health[worker_id]
        if not health.alive and health.lost_reason is not None:
            return  # reported once, when it was lost
        health.alive = False
        health.lost_reason = reason
        health.num_lost += 1
        self.tracker.remove_worker(worker_id)  # out of routing at once
        self.lifecycle.record(logging.ERROR, "worker %s lost: %s", worker_id, reason)
        self.on_worker_lost(worker_id, reason)
        self.on_state_change()

    def keep_out(self, worker_id: str, reason: str) -> None:
        """Take a worker out of routing for good (lost, reported once). One lost already keeps
        its reason until it answers again (then `reason` is why it stays out)."""
        self.kept_out[worker_id] = reason
        if self.health[worker_id].alive:
            self.mark_lost(worker_id, reason)

    def _rejoin(self, worker_id: str, instance_id: str) -> None:
        health = self.health[worker_id]
        restarted = health.instance_id is not None and instance_id != health.instance_id
        first = health.instance_id is None
        health.alive = True
        health.instance_id = instance_id
        if first:
            return
        health.num_restarts += restarted
        self.lifecycle.record(
            logging.WARNING,
            "worker %s %s (instance %s), back in routing",
            worker_id,
            "restarted" if restarted else "answers again",
            instance_id,
        )
        self.on_worker_back(worker_id, restarted)

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
