"""ReservationBooks on their own: pending and committed promises, settling, the headroom formula,
and shared prompt blocks counted once their KV landed (as the decode worker shares them)."""

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


def test_headroom_parts_add_up_and_landed_shared_prompt_blocks_are_free() -> None:
    loads = {"d": report(free=50, total=100)}
    books = ReservationBooks(loads)
    assert books.available_blocks("d") == 50  # no book yet: reported free blocks
    route(books, "a", [1, 2, 3, 4])  # 4 prompt + 2 output blocks
    again = RouteRequest("b", 16, [1, 2, 3, 4], 8)
    assert books.blocks_needed("d", again) == 6  # a's KV has not landed: nothing to share yet
    books.on_kv_landed("a")
    # 3 of a's 4 prompt blocks are shared: the last token's block is computed again.
    assert books.blocks_needed("d", again) == 3
    assert books.available_blocks("d") == 44  # 50 free - 6 pending
    assert books.spare_blocks("d", again) == 41
    loads["d"] = report(free=200, total=100)
    assert books.spare_blocks("d", again) == 100 - 6 - 3  # total - committed binds


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
    books.on_kv_landed("a")
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


def test_identical_long_prompts_in_flight_each_hold_their_copy_until_one_landed() -> None:
    """40 decode blocks, 17 per request (16 full prompt blocks, the prompt's last token and
    the output in the 17th): two fit before any KV landed, a third does not (the worker
    would refuse it); once the first landed, the third shares its 16 full prompt blocks."""
    books = books_over(report(free=40, total=40))
    prompt = list(range(100, 116))  # the hashes of 16 full blocks
    identical = RouteRequest("c", 16 * BLOCK + 1, prompt, max_tokens=3)
    for req_id in ("a", "b"):
        books.on_routed(RouteRequest(req_id, 16 * BLOCK + 1, prompt, 3), RouteDecision("p", "d", 0), now=1.0)
    books.settle(report(free=40 - 34, total=40, ts=2.0))  # the worker reports both reservations
    assert books.committed_blocks("d") == 34
    assert books.blocks_needed("d", identical) == 17 and books.spare_blocks("d", identical) == -11
    books.on_kv_landed("a")
    books.on_kv_landed("a")  # idempotent
    assert books.committed_blocks("d") == 34  # the same blocks, now shareable
    assert books.blocks_needed("d", identical) == 1 and books.spare_blocks("d", identical) == 5
    books.on_routed(identical, RouteDecision("p", "d", 0), now=3.0)
    assert books.committed_blocks("d") == 35
    books.on_kv_landed("b")  # a duplicate: b's copy stays its own
    assert books.committed_blocks("d") == 35
    books.release("a")  # c still uses the shared copy a landed
    assert books.committed_blocks("d") == 17 + 1 + 16
    books.release("c")
    assert books.committed_blocks("d") == 17 + 16  # b refers to the shared copy too (conservative)
    books.release("b")
    assert books.committed_blocks("d") == 0


def test_a_longer_prompt_shares_only_the_landed_prefix() -> None:
    books = books_over(report(free=100, total=100))
    route(books, "short", [1, 2])  # 2 prompt + 2 output blocks
    longer = RouteRequest("long", 4 * BLOCK, [1, 2, 3, 4], 8)
    assert books.blocks_needed("d", longer) == 6
    books.on_kv_landed("short")
    assert books.blocks_needed("d", longer) == 4
    books.on_routed(longer, RouteDecision(None, "d", 0), now=1.0)
    books.on_kv_landed("long")  # its blocks 3 and 4 become shareable; 1 and 2 were already
    assert books.committed_blocks("d") == 4 + 4
    # A prompt of exactly 4 blocks shares 3: the engine computes its last token again.
    assert books.blocks_needed("d", RouteRequest("x", 4 * BLOCK, [1, 2, 3, 4], 8)) == 3
    assert books.blocks_needed("d", RouteRequest("y", 4 * BLOCK + 1, [1, 2, 3, 4], 7)) == 2
    books.release("short")
    assert books.committed_blocks("d") == 6  # long's 2 output blocks + 4 shared prompt blocks
    books.release("long")
    assert books.committed_blocks("d") == 0


def test_landing_after_release_or_for_an_unknown_request_changes_nothing() -> None:
    books = books_over(report())
    route(books, "a", [1, 2])
    books.release("a")
    books.on_kv_landed("a")
    books.on_kv_landed("never-routed")
    assert books.committed_blocks("d") == 0 and books.num_in_flight() == 0
