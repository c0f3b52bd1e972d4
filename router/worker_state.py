"""What the router knows about each worker: load, cached blocks, its own promises.

Three sources feed it:
- `LoadReport`s, sent periodically by every worker (free/total KV blocks, queues);
- `KVEventBatch`es of the block pool's `BlockStored`/`BlockRemoved` events, kept
  in order by `seq`; a gap or a restarted worker (new `instance_id`) makes the
  tracker ask for a `KVSnapshot` before it trusts that worker's events again;
- the router's own routing decisions (`on_routed`) and completions (`release`).

From its own decisions the tracker keeps two kinds of promise per worker:
- pending reservations: work routed to a worker after the timestamp of that
  worker's latest load report, so not yet visible in it. They are dropped when a
  report with a later timestamp arrives (or the request is released), so a burst
  of requests between two reports is spread instead of landing on one worker.
- committed blocks (decode workers): blocks that the in-flight requests on a
  worker may grow to (prompt + max_tokens), counting a prompt block shared by
  several in-flight requests once. Admitting only while committed blocks fit the
  worker's total means growth never forces a preemption.

Timestamps: `LoadReport.timestamp` and the `now` given to `on_routed` must share
one clock (the default is `time.time`; the gRPC layer may stamp reports on
receipt if worker clocks are not synchronized).

With KV events off (`use_kv_events=False`), the index is filled from routing
history instead: the prompt blocks of a request routed to a worker are recorded
as held by it, evicting that worker's least recently routed blocks beyond its
reported total blocks.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.core.outputs import WORKER_ROLES, KVSnapshot, LoadReport
from router.kv_index import KVIndex

if TYPE_CHECKING:
    # Types only: importing `engine` at run time would pull in torch through
    # engine/__init__.py, and the router must run without torch.
    from engine.core.block_pool import BlockRemoved, BlockStored
    from router.routing import RouteDecision, RouteRequest


@dataclass(frozen=True)
class KVEventBatch:
    worker_id: str
    instance_id: str  # changes when the worker restarts
    seq: int  # 0, 1, 2, ... per instance
    events: list[BlockStored | BlockRemoved]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class _Routed:
    """One routed, not yet released request, as the tracker remembers it."""

    req_id: str
    decode_worker_id: str
    prefill_worker_id: str  # the worker that runs the prefill (decode worker if local)
    block_hashes: tuple[int, ...]
    num_blocks: int  # prompt + max_tokens, in blocks
    num_new_blocks: int  # num_blocks less prompt blocks other in-flight requests already hold
    num_prefill_tokens: int  # uncached prompt tokens the prefill worker must compute
    routed_at: float
    pending_decode: bool = True
    pending_prefill: bool = True


@dataclass
class _DecodeBook:
    """Committed-block accounting of one decode-capable worker."""

    hash_refs: dict[int, int] = field(default_factory=dict)  # prompt block hash -> in-flight users
    committed_blocks: int = 0
    pending_blocks: int = 0  # blocks of requests newer than the latest load report
    pending: OrderedDict[str, _Routed] = field(default_factory=OrderedDict)


@dataclass
class _PrefillBook:
    pending_tokens: int = 0
    pending: OrderedDict[str, _Routed] = field(default_factory=OrderedDict)


class WorkerStateTracker:
    def __init__(
        self,
        index: KVIndex | None = None,
        use_kv_events: bool = True,
        track_committed_blocks: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.index = index if index is not None else KVIndex()
        self.use_kv_events = use_kv_events
        self.track_committed_blocks = track_committed_blocks
        self.clock = clock
        self.loads: dict[str, LoadReport] = {}
        self._event_stream: dict[str, tuple[str, int]] = {}  # worker -> (instance_id, next seq)
        self._needs_resync: set[str] = set()
        self._decode_books: dict[str, _DecodeBook] = {}
        self._prefill_books: dict[str, _PrefillBook] = {}
        self._routed: dict[str, _Routed] = {}
        self._history: dict[str, OrderedDict[int, None]] = {}  # worker -> LRU of routed hashes
        self._workers_by_role: dict[str, list[str]] | None = None  # cache, rebuilt on change

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
        ts = report.timestamp
        book = self._decode_books.get(report.worker_id)
        if book is not None:
            self._settle_pending(book, ts, self._clear_pending_decode)
        prefill_book = self._prefill_books.get(report.worker_id)
        if prefill_book is not None:
            self._settle_pending(prefill_book, ts, self._clear_pending_prefill)

    @staticmethod
    def _settle_pending(book: _DecodeBook | _PrefillBook, ts: float, clear: Callable[..., None]) -> None:
        """Drop a book's promises routed at or before `ts`: the report already counts them."""
        while book.pending:
            routed = next(iter(book.pending.values()))
            if routed.routed_at > ts:
                break
            book.pending.popitem(last=False)
            clear(book, routed)

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker entirely: load, cache index entries, promises, event stream."""
        self._forget_worker_state(worker_id)
        self.loads.pop(worker_id, None)
        self._workers_by_role = None

    def _forget_worker_state(self, worker_id: str) -> None:
        self.index.remove_worker(worker_id)
        self._event_stream.pop(worker_id, None)
        self._needs_resync.discard(worker_id)
        self._history.pop(worker_id, None)
        self._decode_books.pop(worker_id, None)
        self._prefill_books.pop(worker_id, None)
        for routed in list(self._routed.values()):
            if worker_id in (routed.decode_worker_id, routed.prefill_worker_id):
                self.release(routed.req_id)

    # ---- KV events ----------------------------------------------------------------

    def apply(self, batch: KVEventBatch) -> bool:
        """Apply one event batch. False: it was not applied and the caller must
        fetch a `KVSnapshot` of this worker and pass it to `apply_snapshot`.

        A worker seen for the first time may start at seq 0 (nothing was missed);
        any other first seq, a skipped seq, or a new instance_id needs a resync.
        Until the snapshot arrives the worker's index entries are dropped, so the
        router underestimates (never overestimates) what it holds.
        """
        if not self.use_kv_events:
            return True
        worker_id = batch.worker_id
        stream = self._event_stream.get(worker_id)
        if stream is None and worker_id not in self._needs_resync and batch.seq == 0:
            stream = (batch.instance_id, 0)
        if stream is None or stream != (batch.instance_id, batch.seq):
            if worker_id not in self._needs_resync:
                self._needs_resync.add(worker_id)
                self._event_stream.pop(worker_id, None)
                self.index.remove_worker(worker_id)
            return False
        for event in batch.events:
            if hasattr(event, "parent_hash"):  # BlockStored (BlockRemoved has no parent)
                self.index.store(worker_id, event.block_hashes)
            else:
                self.index.remove(worker_id, event.block_hashes)
        self._event_stream[worker_id] = (batch.instance_id, batch.seq + 1)
        return True

    def apply_snapshot(self, snapshot: KVSnapshot) -> None:
        """Replace everything indexed for the worker with the snapshot's contents."""
        self.index.remove_worker(snapshot.worker_id)
        self.index.store(snapshot.worker_id, snapshot.block_hashes)
        self._needs_resync.discard(snapshot.worker_id)
        self._event_stream[snapshot.worker_id] = (snapshot.instance_id, snapshot.seq + 1)

    def needs_resync(self, worker_id: str) -> bool:
        return worker_id in self._needs_resync

    def workers_needing_resync(self) -> list[str]:
        return sorted(self._needs_resync)

    # ---- the router's own promises ------------------------------------------------

    def on_routed(self, request: RouteRequest, decision: RouteDecision, now: float | None = None) -> None:
        """Record a routing decision: pending work, committed blocks, history."""
        if decision.decode_worker_id not in self.loads:
            raise KeyError(f"decode worker {decision.decode_worker_id!r} has no load report")
        if request.req_id in self._routed:
            raise ValueError(f"request {request.req_id!r} is already routed")
        now = self.clock() if now is None else now
        decode_report = self.loads[decision.decode_worker_id]
        prefill_worker_id = decision.prefill_worker_id or decision.decode_worker_id
        routed = _Routed(
            req_id=request.req_id,
            decode_worker_id=decision.decode_worker_id,
            prefill_worker_id=prefill_worker_id,
            block_hashes=tuple(request.block_hashes),
            num_blocks=cdiv(request.num_prompt_tokens + request.max_tokens, decode_report.block_size),
            num_new_blocks=0,
            num_prefill_tokens=max(0, request.num_prompt_tokens - decision.num_prefix_hit_tokens),
            routed_at=now,
        )
        self._routed[request.req_id] = routed
        book = self._decode_books.setdefault(decision.decode_worker_id, _DecodeBook())
        routed.num_new_blocks = routed.num_blocks - self._shared_in_flight(book, routed.block_hashes)
        book.committed_blocks += routed.num_new_blocks
        for h in routed.block_hashes:
            book.hash_refs[h] = book.hash_refs.get(h, 0) + 1
        book.pending[request.req_id] = routed
        book.pending_blocks += routed.num_new_blocks
        prefill_book = self._prefill_books.setdefault(prefill_worker_id, _PrefillBook())
        prefill_book.pending[request.req_id] = routed
        prefill_book.pending_tokens += routed.num_prefill_tokens
        if not self.use_kv_events:
            self._record_history(prefill_worker_id, routed.block_hashes)
            if prefill_worker_id != decision.decode_worker_id:
                self._record_history(decision.decode_worker_id, routed.block_hashes)
        else:
            num_hit_blocks = decision.num_prefix_hit_tokens // decode_report.block_size
            self.index.touch(routed.block_hashes[:num_hit_blocks])

    def release(self, req_id: str) -> None:
        """The request finished, failed or was aborted: drop every promise for it."""
        routed = self._routed.pop(req_id, None)
        if routed is None:
            return
        book = self._decode_books.get(routed.decode_worker_id)
        if book is not None:
            if book.pending.pop(req_id, None) is not None:
                self._clear_pending_decode(book, routed)
            freed = routed.num_blocks - len(routed.block_hashes)
            for h in routed.block_hashes:
                refs = book.hash_refs[h] - 1
                if refs:
                    book.hash_refs[h] = refs
                else:
                    del book.hash_refs[h]
                    freed += 1
            book.committed_blocks -= freed
        prefill_book = self._prefill_books.get(routed.prefill_worker_id)
        if prefill_book is not None and prefill_book.pending.pop(req_id, None) is not None:
            self._clear_pending_prefill(prefill_book, routed)

    @staticmethod
    def _clear_pending_decode(book: _DecodeBook, routed: _Routed) -> None:
        if routed.pending_decode:
            routed.pending_decode = False
            book.pending_blocks -= routed.num_new_blocks

    @staticmethod
    def _clear_pending_prefill(book: _PrefillBook, routed: _Routed) -> None:
        if routed.pending_prefill:
            routed.pending_prefill = False
            book.pending_tokens -= routed.num_prefill_tokens

    @staticmethod
    def _shared_in_flight(book: _DecodeBook, block_hashes: Sequence[int]) -> int:
        """Leading prompt blocks already committed on this worker by in-flight requests.

        Every in-flight request adds its whole chain of prompt hashes, so the set
        is prefix-closed along any chain: if block k is in it, so are blocks < k.
        Hence a binary search (log2 of the prompt's blocks lookups) finds the count.
        """
        hash_refs = book.hash_refs
        if not hash_refs:
            return 0
        lo, hi = 0, len(block_hashes)  # invariant: first lo blocks shared, blocks >= hi not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if block_hashes[mid - 1] in hash_refs:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _record_history(self, worker_id: str, block_hashes: Sequence[int]) -> None:
        history = self._history.setdefault(worker_id, OrderedDict())
        for h in block_hashes:
            history[h] = None
            history.move_to_end(h)
        self.index.store(worker_id, block_hashes)
        report = self.loads.get(worker_id)
        capacity = report.num_total_blocks if report is not None else len(history)
        evicted = []
        while len(history) > capacity:
            evicted.append(history.popitem(last=False)[0])
        if evicted:
            self.index.remove(worker_id, evicted)

    # ---- what policies read -------------------------------------------------------

    def available_blocks(self, worker_id: str) -> int:
        """Blocks a new request may still take on a decode-capable worker.

        min(reported free - pending reservations, total - committed): the first
        term sees memory the router did not cause; the second sees the future
        growth of in-flight requests, which a free-blocks count cannot.
        """
        report = self.loads[worker_id]
        book = self._decode_books.get(worker_id)
        if book is None:
            return report.num_free_blocks
        available = report.num_free_blocks - book.pending_blocks
        if self.track_committed_blocks:
            available = min(available, report.num_total_blocks - book.committed_blocks)
        return available

    def blocks_needed(self, worker_id: str, request: RouteRequest) -> int:
        """Blocks `request` would add on this worker (shared in-flight prompt blocks are free)."""
        report = self.loads[worker_id]
        total = cdiv(request.num_prompt_tokens + request.max_tokens, report.block_size)
        book = self._decode_books.get(worker_id)
        if book is None or not self.track_committed_blocks:
            return total
        return total - self._shared_in_flight(book, request.block_hashes)

    def spare_blocks(self, worker_id: str, request: RouteRequest) -> int:
        """available_blocks - blocks_needed, in one pass (the policy's hot path)."""
        report = self.loads[worker_id]
        needed = -(-(request.num_prompt_tokens + request.max_tokens) // report.block_size)
        book = self._decode_books.get(worker_id)
        if book is None:
            return report.num_free_blocks - needed
        available = report.num_free_blocks - book.pending_blocks
        if self.track_committed_blocks:
            available = min(available, report.num_total_blocks - book.committed_blocks)
            needed -= self._shared_in_flight(book, request.block_hashes)
        return available - needed

    def queued_prefill_tokens(self, worker_id: str) -> int:
        """Reported queued prefill tokens plus those routed since the report."""
        book = self._prefill_books.get(worker_id)
        queued = self.loads[worker_id].num_queued_prefill_tokens
        return queued + book.pending_tokens if book is not None else queued

    def pending_prefill_tokens(self, worker_id: str) -> int:
        book = self._prefill_books.get(worker_id)
        return book.pending_tokens if book is not None else 0

    def num_pending_requests(self, worker_id: str) -> int:
        book = self._decode_books.get(worker_id)
        return len(book.pending) if book is not None else 0

    def committed_blocks(self, worker_id: str) -> int:
        book = self._decode_books.get(worker_id)
        return book.committed_blocks if book is not None else 0

    def num_in_flight(self) -> int:
        return len(self._routed)
