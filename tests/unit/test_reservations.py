"""ReservationBooks on their own: pending and committed promises, settling, the headroom formula."""

import pytest

from pdserve.engine.core.outputs import LoadReport
from pdserve.router.reservations import ReservationBooks, shared_in_flight_blocks
from pdserve.router.routing import RouteDecision, RouteRequest

BLOCK = 4


def report(
    worker_id: str = "d", free: int = 100, total: int = 100, ts: float = 0.0, queued: int = 0
) -> LoadReport:
    role = "prefill" if worker_id.startswith("p") else "decode"
    return LoadReport(worker_id, "i0", role, free, total, BLOCK, 0, 0, queued, ts)


def books_over(*reports: LoadReport, track_committed_blocks: bool = True) -> ReservationBooks:
    return ReservationBooks({r.worker_id: r for r in reports}, track_committed_blocks)


def route(
    books: ReservationBooks, req_id: str, hashes: list[int], prefill_worker_id: str | None = None
) -> None:
    request = RouteRequest(req_id, len(hashes) * BLOCK, hashes, max_tokens=8)
    books.on_routed(request, RouteDecision(prefill_worker_id, "d", 0), now=1.0)


def test_shared_in_flight_blocks_counts_the_leading_run() -> None:
    refs = {1: 1, 2: 2, 3: 1}
    assert shared_in_flight_blocks(refs, [1, 2, 3, 9]) == 3
    assert shared_in_flight_blocks(refs, [1, 8, 9]) == 1
    assert shared_in_flight_blocks(refs, [7]) == 0
    assert shared_in_flight_blocks({}, [1, 2]) == 0


def test_headroom_parts_add_up_and_shared_prompt_blocks_are_free() -> None:
    loads = {"d": report(free=50, total=100)}
    books = ReservationBooks(loads)
    assert books.available_blocks("d") == 50  # no book yet: reported free blocks
    route(books, "a", [1, 2, 3, 4])  # 4 prompt + 2 output blocks
    again = RouteRequest("b", 16, [1, 2, 3, 4], 8)
    assert books.blocks_needed("d", again) == 2
    assert books.available_blocks("d") == 44  # 50 free - 6 pending
    assert books.spare_blocks("d", again) == 42
    loads["d"] = report(free=200, total=100)
    assert books.spare_blocks("d", again) == 100 - 6 - 2  # total - committed binds


def test_without_committed_tracking_only_reported_free_and_pending_count() -> None:
    books = books_over(report(free=200, total=100), track_committed_blocks=False)
    route(books, "a", [1, 2, 3, 4])
    again = RouteRequest("b", 16, [1, 2, 3, 4], 8)
    assert books.blocks_needed("d", again) == 6  # nothing shared
    assert books.spare_blocks("d", again) == 200 - 6 - 6


def test_settle_drops_pending_the_report_counts_but_keeps_commitments() -> None:
    books = books_over(report(), report("p", queued=5))
    route(books, "a", [1, 2], prefill_worker_id="p")  # routed at 1.0
    books.settle(report(ts=0.5))  # older than the route: still pending
    assert books.num_pending_requests("d") == 1 and books.queued_prefill_tokens("p") == 5 + 8
    books.settle(report(ts=2.0))
    books.settle(report("p", ts=2.0))
    assert books.num_pending_requests("d") == 0 and books.pending_prefill_tokens("p") == 0
    assert books.committed_blocks("d") == 4 and books.num_in_flight() == 1


def test_release_and_forget_worker_drop_every_promise() -> None:
    books = books_over(report(), report("p"))
    route(books, "a", [1, 2], prefill_worker_id="p")
    route(books, "b", [1, 3])
    assert books.committed_blocks("d") == 3 + 4  # block 1 counted once
    books.release("b")
    books.release("b")  # idempotent
    assert books.committed_blocks("d") == 4
    books.forget_worker("p")  # the prefill worker of "a" left: "a" is released on d too
    assert books.num_in_flight() == 0 and books.committed_blocks("d") == 0


def test_routing_a_request_twice_is_an_error() -> None:
    books = books_over(report())
    route(books, "a", [1])
    with pytest.raises(ValueError, match="already routed"):
        route(books, "a", [1])
