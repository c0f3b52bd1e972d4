"""What the router knows about each worker: load, cached blocks, its own promises.

`WorkerStateTracker` is what policies and the router service read and feed. It
keeps the latest `LoadReport` of every worker and delegates the rest:
- `KVIndexSync` (router/kv_sync.py): the KV index, kept in step by ordered
  `KVEventBatch`es and `KVSnapshot`s, or predicted from routing history when KV
  events are off;
- `ReservationBooks` (router/reservations.py): the router's own decisions
  (`on_routed`) and completions (`release`) as pending reservations and
  committed blocks per worker, and the headroom formula over them.

Timestamps: `LoadReport.timestamp` and the `now` given to `on_routed` must share
one clock (the default is `time.time`; the gRPC layer may stamp reports on
receipt if worker clocks are not synchronized).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pdserve.engine.core.outputs import WORKER_ROLES, KVSnapshot, LoadReport
from pdserve.router.kv_index import KVIndex
from pdserve.router.kv_sync import KVEventBatch, KVIndexSync
from pdserve.router.reservations import ReservationBooks
from pdserve.router.routing import RouteDecision, RouteRequest


class WorkerStateTracker:
    """Latest load report per worker, plus the KV index sync and the reservation books."""

    def __init__(
        self,
        index: KVIndex | None = None,
        use_kv_events: bool = True,
        track_committed_blocks: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.loads: dict[str, LoadReport] = {}  # the books read it too: update, never rebind
        self.kv_sync = KVIndexSync(index, use_kv_events, total_blocks_of=self._total_blocks_of)
        self.books = ReservationBooks(self.loads, track_committed_blocks)
        # (prefill, decode) worker pairs whose KV transfer broke (nccl): never routed again
        self.broken_pairs: set[tuple[str, str]] = set()
        self._workers_by_role: dict[str, list[str]] | None = None  # cache, rebuilt on change
        # What policies read per candidate worker on every route, bound once so that
        # delegating costs no extra call (bench/route_latency.py measures it):
        # available_blocks - blocks_needed; reported queued + pending prefill tokens;
        # requests routed since the worker's latest report.
        self.spare_blocks: Callable[[str, RouteRequest], int] = self.books.spare_blocks
        self.queued_prefill_tokens: Callable[[str], int] = self.books.queued_prefill_tokens
        self.num_pending_requests: Callable[[str], int] = self.books.num_pending_requests

    @property
    def index(self) -> KVIndex:
        return self.kv_sync.index

    def host_hit_blocks(self, worker_id: str, block_hashes: list[int], start: int) -> int:
        """Blocks of `block_hashes` from `start` on that `worker_id`'s host tier holds in a
        row (they continue its GPU hits: copied back, not recomputed)."""
        return self.kv_sync.host_index.run_length(worker_id, block_hashes[start:])

    @property
    def use_kv_events(self) -> bool:
        return self.kv_sync.use_kv_events

    @property
    def track_committed_blocks(self) -> bool:
        return self.books.track_committed_blocks

    def _total_blocks_of(self, worker_id: str) -> int | None:
        report = self.loads.get(worker_id)
        return report.num_total_blocks if report is not None else None

    # ---- workers and load ---------------------------------------------------------

    def workers(self, role: str) -> list[str]:
        """Worker ids with a load report of exactly this role, in a stable order."""
        if self._workers_by_role is None:
            by_role: dict[str, list[str]] = {r: [] for r in WORKER_ROLES}
            for worker_id, report in self.loads.items():
                by_role[report.role].append(worker_id)
            self._workers_by_role = by_role
        return self._workers_by_role[role]

    def update_load(self, report: LoadReport) -> None:
        previous = self.loads.get(report.worker_id)
        if previous is not None and previous.instance_id == report.instance_id:
            if report.timestamp < previous.timestamp:
                return  # stale, arrived out of order
        elif previous is not None:
            # A restarted worker lost its requests and cache.
            self._forget_worker_state(report.worker_id)
        if previous is None or previous.role != report.role:
            self._workers_by_role = None
        self.loads[report.worker_id] = report
        self.books.settle(report)

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker entirely: load, cache index entries, promises, event stream."""
        self._forget_worker_state(worker_id)
        self.loads.pop(worker_id, None)
        self._workers_by_role = None

    def _forget_worker_state(self, worker_id: str) -> None:
        self.kv_sync.forget_worker(worker_id)
        self.books.forget_worker(worker_id)

    # ---- KV events (see KVIndexSync) -----------------------------------------------

    def apply(self, batch: KVEventBatch) -> bool:
        return self.kv_sync.apply(batch)

    def apply_snapshot(self, snapshot: KVSnapshot) -> None:
        self.kv_sync.apply_snapshot(snapshot)

    def needs_resync(self, worker_id: str) -> bool:
        return self.kv_sync.needs_resync(worker_id)

    def workers_needing_resync(self) -> list[str]:
        return self.kv_sync.workers_needing_resync()

    # ---- the router's own promises (see ReservationBooks) ----------------------------

    def on_routed(self, request: RouteRequest, decision: RouteDecision, now: float | None = None) -> None:
        """Record a routing decision: pending work, committed blocks, cache prediction."""
        decode_report = self.loads.get(decision.decode_worker_id)
        if decode_report is None:
            raise KeyError(f"decode worker {decision.decode_worker_id!r} has no load report")
        now = self.clock() if now is None else now
        self.books.on_routed(request, decision, now)
        prefill_worker_id = decision.prefill_worker_id or decision.decode_worker_id
        workers_given_prompt = [prefill_worker_id]
        if prefill_worker_id != decision.decode_worker_id:
            workers_given_prompt.append(decision.decode_worker_id)
        num_hit_blocks = decision.num_prefix_hit_tokens // decode_report.block_size
        self.kv_sync.on_routed(workers_given_prompt, request.block_hashes, num_hit_blocks)

    def on_kv_landed(self, req_id: str) -> None:
        """The request's prompt KV is on its decode worker: its prompt blocks can be shared."""
        self.books.on_kv_landed(req_id)

    def release(self, req_id: str) -> None:
        """The request finished, failed or was aborted: drop every promise for it."""
        self.books.release(req_id)

    # ---- what policies read -------------------------------------------------------

    def available_blocks(self, worker_id: str) -> int:
        """Blocks a new request may still take on a decode-capable worker."""
        return self.books.available_blocks(worker_id)

    def blocks_needed(self, worker_id: str, request: RouteRequest) -> int:
        """Blocks `request` would add on this worker (shared in-flight prompt blocks are free)."""
        return self.books.blocks_needed(worker_id, request)

    def pending_prefill_tokens(self, worker_id: str) -> int:
        return self.books.pending_prefill_tokens(worker_id)

    def committed_blocks(self, worker_id: str) -> int:
        return self.books.committed_blocks(worker_id)

    def num_in_flight(self) -> int:
        return self.books.num_in_flight()
