"""The router's own promises per worker, kept from its routing decisions.

Two kinds of promise:
- pending reservations: work routed to a worker after the timestamp of that
  worker's latest load report, so not yet visible in it. They are settled
  (dropped) when a report with a later timestamp arrives, or the request is
  released, so a burst of requests between two reports is spread instead of
  landing on one worker.
- committed blocks (decode workers): blocks that the in-flight requests on a
  worker may grow to (prompt + max_tokens), counting a prompt block shared by
  several in-flight requests once. Admitting only while committed blocks fit the
  worker's total means growth never forces a preemption.

A prompt block counts as shared only once it is there to share: the worker reuses a
cached block only after the KV that fills it has landed (`on_kv_landed`: the router saw
the request's first output on its decode worker). Two identical prompts routed before
either's KV landed each hold their own copy, on the worker and in the books, so the books
never allow a reservation the worker must refuse. Every in-flight request refers to the
prompt blocks it shares (from routing) and, once its KV landed, to its whole prompt
chain: the shared set stays prefix-closed, and a shared block counts until its last user
leaves. A request whose KV landed while another identical prompt's copy was already
there keeps its duplicate blocks charged as its own (conservative: never under).

Headroom, the blocks a request would leave spare on a decode-capable worker, is
one formula, `spare_blocks`; `available_blocks` and `blocks_needed` derive from it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from pdserve.engine.core.kv_cache_manager import cdiv
from pdserve.engine.core.outputs import LoadReport
from pdserve.router.routing import RouteDecision, RouteRequest

_NO_REQUEST = RouteRequest(req_id="", num_prompt_tokens=0, block_hashes=(), max_tokens=0)  # needs 0 blocks


@dataclass
class _Routed:
    """One routed, not yet released request, as the books remember it."""

    req_id: str
    decode_worker_id: str
    prefill_worker_id: str  # the worker that runs the prefill (decode worker if local)
    block_hashes: tuple[int, ...]
    num_blocks: int  # prompt + max_tokens, in blocks
    num_new_blocks: int  # num_blocks less the landed prompt blocks it shares (at routing)
    num_own_blocks: int  # the blocks charged to it alone (num_new_blocks less those it made shared)
    num_prefill_tokens: int  # uncached prompt tokens the prefill worker must compute
    routed_at: float
    pending_decode: bool = True
    pending_prefill: bool = True
    landed: bool = False
    num_referred: int = 0  # leading prompt hashes it holds a reference to in its book's shared_refs


@dataclass
class _DecodeBook:
    """Committed-block accounting of one decode-capable worker."""

    # Prompt block hash -> in-flight users of its one shareable copy (whose KV has landed).
    shared_refs: dict[int, int] = field(default_factory=dict)
    committed_blocks: int = 0  # sum of the in-flight requests' own blocks, plus len(shared_refs)
    pending_blocks: int = 0  # blocks of requests newer than the latest load report
    pending: OrderedDict[str, _Routed] = field(default_factory=OrderedDict)


@dataclass
class _PrefillBook:
    pending_tokens: int = 0
    pending: OrderedDict[str, _Routed] = field(default_factory=OrderedDict)


def fits_in_cache(report: LoadReport, num_tokens: int) -> bool:
    """Whether a request of `num_tokens` (prompt + max_tokens) fits the worker's whole
    cache: if not, no amount of waiting makes room for it (same formula as `spare_blocks`)."""
    return cdiv(num_tokens, report.block_size) <= report.num_total_blocks


def shared_in_flight_blocks(hash_refs: dict[int, int], block_hashes: Sequence[int]) -> int:
    """Leading blocks of `block_hashes` that in-flight requests already hold (`hash_refs`).

    Every in-flight request refers to a leading run of its chain of prompt hashes, so
    the set is prefix-closed along any chain: if block k is in it, so are blocks < k.
    Hence a binary search (log2 of the prompt's blocks lookups) finds the count.
    """
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


def reusable_blocks(hash_refs: dict[int, int], request: RouteRequest, block_size: int) -> int:
    """Leading prompt blocks of `request` a worker reuses from those `hash_refs` holds: never
    the block of the prompt's last token, which the engine computes again for its logits
    (engine/core/kv_cache_manager.py `get_computed_blocks`)."""
    limit = max(0, (request.num_prompt_tokens - 1) // block_size)
    return min(shared_in_flight_blocks(hash_refs, request.block_hashes), limit)


class ReservationBooks:
    """Routed requests and, per worker, their pending and committed promises.

    `loads` is the latest load report per worker; the books read it (for block
    sizes and headroom) and never write it.
    """

    def __init__(self, loads: Mapping[str, LoadReport], track_committed_blocks: bool = True) -> None:
        self.loads = loads
        self.track_committed_blocks = track_committed_blocks
        self._routed: dict[str, _Routed] = {}
        self._decode_books: dict[str, _DecodeBook] = {}
        self._prefill_books: dict[str, _PrefillBook] = {}

    # ---- recording ----------------------------------------------------------------

    def on_routed(self, request: RouteRequest, decision: RouteDecision, now: float) -> None:
        """Record a routing decision made at `now`."""
        if request.req_id in self._routed:
            raise ValueError(f"request {request.req_id!r} is already routed")
        block_size = self.loads[decision.decode_worker_id].block_size
        routed = _Routed(
            req_id=request.req_id,
            decode_worker_id=decision.decode_worker_id,
            prefill_worker_id=decision.prefill_worker_id or decision.decode_worker_id,
            block_hashes=tuple(request.block_hashes),
            num_blocks=cdiv(request.num_prompt_tokens + request.max_tokens, block_size),
            num_new_blocks=0,
            num_own_blocks=0,
            num_prefill_tokens=max(0, request.num_prompt_tokens - decision.num_prefix_hit_tokens),
            routed_at=now,
        )
        self._routed[request.req_id] = routed
        book = self._decode_books.setdefault(routed.decode_worker_id, _DecodeBook())
        num_shared_blocks = reusable_blocks(book.shared_refs, request, block_size)
        routed.num_new_blocks = routed.num_own_blocks = routed.num_blocks - num_shared_blocks
        book.committed_blocks += routed.num_new_blocks
        _refer(book, routed, num_shared_blocks)
        book.pending[request.req_id] = routed
        book.pending_blocks += routed.num_new_blocks
        prefill_book = self._prefill_books.setdefault(routed.prefill_worker_id, _PrefillBook())
        prefill_book.pending[request.req_id] = routed
        prefill_book.pending_tokens += routed.num_prefill_tokens

    def on_kv_landed(self, req_id: str) -> None:
        """The request's prompt KV is on its decode worker (its first output came from there):
        from now on its prompt blocks are there to share. Those no in-flight request shared
        yet move from its own blocks to the shared ones; the others stay its own (duplicates)."""
        routed = self._routed.get(req_id)
        book = self._decode_books.get(routed.decode_worker_id) if routed is not None else None
        if book is None or routed.landed:
            return
        routed.landed = True
        for h in routed.block_hashes[routed.num_referred :]:
            if h not in book.shared_refs:
                routed.num_own_blocks -= 1  # its block becomes the shared copy: committed unchanged
        _refer(book, routed, len(routed.block_hashes))

    def release(self, req_id: str) -> None:
        """The request finished, failed or was aborted: drop every promise for it."""
        routed = self._routed.pop(req_id, None)
        if routed is None:
            return
        book = self._decode_books.get(routed.decode_worker_id)
        if book is not None:
            if book.pending.pop(req_id, None) is not None:
                _clear_pending_decode(book, routed)
            freed = routed.num_own_blocks
            for h in routed.block_hashes[: routed.num_referred]:
                refs = book.shared_refs[h] - 1
                if refs:
                    book.shared_refs[h] = refs
                else:
                    del book.shared_refs[h]  # its last user left: the shared copy is free
                    freed += 1
            book.committed_blocks -= freed
        prefill_book = self._prefill_books.get(routed.prefill_worker_id)
        if prefill_book is not None and prefill_book.pending.pop(req_id, None) is not None:
            _clear_pending_prefill(prefill_book, routed)

    def settle(self, report: LoadReport) -> None:
        """Drop the worker's pending promises routed at or before the report's
        timestamp: the report already counts them."""
        book = self._decode_books.get(report.worker_id)
        if book is not None:
            _settle_pending(book, report.timestamp, _clear_pending_decode)
        prefill_book = self._prefill_books.get(report.worker_id)
        if prefill_book is not None:
            _settle_pending(prefill_book, report.timestamp, _clear_pending_prefill)

    def forget_worker(self, worker_id: str) -> None:
        """The worker left or restarted: its books go, and every request routed to it is released."""
        self._decode_books.pop(worker_id, None)
        self._prefill_books.pop(worker_id, None)
        for routed in list(self._routed.values()):
            if worker_id in (routed.decode_worker_id, routed.prefill_worker_id):
                self.release(routed.req_id)

    # ---- headroom -----------------------------------------------------------------

    def spare_blocks(self, worker_id: str, request: RouteRequest) -> int:
        """Blocks left on a decode-capable worker after admitting `request`:
        available - needed, the one headroom formula (and the policy's hot path).

        available = min(reported free - pending reservations, total - committed):
        the first term sees memory the router did not cause; the second sees the
        future growth of in-flight requests, which a free-blocks count cannot.
        needed = prompt + max_tokens in blocks, less the leading prompt blocks
        in-flight requests on the worker hold and whose KV has landed there.
        """
        report = self.loads[worker_id]
        needed = -(-(request.num_prompt_tokens + request.max_tokens) // report.block_size)
        book = self._decode_books.get(worker_id)
        if book is None:
            return report.num_free_blocks - needed
        available = report.num_free_blocks - book.pending_blocks
        if self.track_committed_blocks:
            available = min(available, report.num_total_blocks - book.committed_blocks)
            needed -= reusable_blocks(book.shared_refs, request, report.block_size)
        return available - needed

    def available_blocks(self, worker_id: str) -> int:
        """Blocks a new request may still take: all spare for a request that needs none."""
        return self.spare_blocks(worker_id, _NO_REQUEST)

    def blocks_needed(self, worker_id: str, request: RouteRequest) -> int:
        """Blocks `request` would add on this worker (landed shared prompt blocks are free)."""
        return self.available_blocks(worker_id) - self.spare_blocks(worker_id, request)

    # ---- what they hold -----------------------------------------------------------

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


def _refer(book: _DecodeBook, routed: _Routed, num_leading: int) -> None:
    """`routed` now refers to the first `num_leading` hashes of its prompt chain (it referred
    to a shorter leading run before, or none)."""
    for h in routed.block_hashes[routed.num_referred : num_leading]:
        book.shared_refs[h] = book.shared_refs.get(h, 0) + 1
    routed.num_referred = max(routed.num_referred, num_leading)


def _settle_pending(book: _DecodeBook | _PrefillBook, ts: float, clear: Callable[..., None]) -> None:
    while book.pending:
        routed = next(iter(book.pending.values()))
        if routed.routed_at > ts:
            break
        book.pending.popitem(last=False)
        clear(book, routed)


def _clear_pending_decode(book: _DecodeBook, routed: _Routed) -> None:
    if routed.pending_decode:
        routed.pending_decode = False
        book.pending_blocks -= routed.num_new_blocks


def _clear_pending_prefill(book: _PrefillBook, routed: _Routed) -> None:
    if routed.pending_prefill:
        routed.pending_prefill = False
        book.pending_tokens -= routed.num_prefill_tokens
