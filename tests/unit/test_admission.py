"""AdmissionController: immediate admit, ordered wait, bounded bypassing, bounds, timeout, cancel."""

import asyncio

import pytest

from pdserve.router.admission import AdmissionController, AdmissionRejected


class Capacity:
    """A real slot counter standing in for the router's headroom."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.routed: list[str] = []

    def try_route(self, req_id: str) -> str | None:
        if self.slots <= 0:
            return None
        self.slots -= 1
        self.routed.append(req_id)
        return f"decision-{req_id}"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=5))


def test_admits_immediately_with_headroom() -> None:
    async def main() -> None:
        controller = AdmissionController(Capacity(1).try_route, max_queue_len=2, max_wait_s=1)
        assert await controller.admit("a") == "decision-a"

    run(main())


def test_waiters_are_admitted_in_fifo_order() -> None:
    async def main() -> None:
        capacity = Capacity(0)
        controller = AdmissionController(capacity.try_route, max_queue_len=4, max_wait_s=5)
        tasks = [asyncio.create_task(controller.admit(r)) for r in ("a", "b", "c")]
        await asyncio.sleep(0.01)
        assert controller.num_waiting == 3
        capacity.slots = 2
        controller.notify_capacity()
        assert await tasks[0] == "decision-a" and await tasks[1] == "decision-b"
        assert not tasks[2].done()
        capacity.slots = 1
        controller.notify_capacity()
        assert await tasks[2] == "decision-c"
        assert capacity.routed == ["a", "b", "c"]

    run(main())


def test_full_queue_rejects_at_once() -> None:
    async def main() -> None:
        controller = AdmissionController(Capacity(0).try_route, max_queue_len=1, max_wait_s=5)
        waiting = asyncio.create_task(controller.admit("a"))
        await asyncio.sleep(0.01)
        with pytest.raises(AdmissionRejected, match="max_queue_len=1"):
            await controller.admit("b")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert controller.num_waiting == 0

    run(main())


def test_zero_queue_rejects_when_no_headroom() -> None:
    async def main() -> None:
        controller = AdmissionController(Capacity(0).try_route, max_queue_len=0, max_wait_s=5)
        with pytest.raises(AdmissionRejected):
            await controller.admit("a")

    run(main())


def test_wait_times_out_and_next_waiter_moves_up() -> None:
    async def main() -> None:
        capacity = Capacity(0)
        controller = AdmissionController(capacity.try_route, max_queue_len=4, max_wait_s=0.05)
        with pytest.raises(AdmissionRejected, match="max_wait_s"):
            await controller.admit("a")
        assert controller.num_waiting == 0 and controller.num_rejected == 1
        later = asyncio.create_task(controller.admit("b"))
        await asyncio.sleep(0.01)
        capacity.slots = 1
        controller.notify_capacity()
        assert await later == "decision-b"

    run(main())


def test_cancelled_waiter_leaves_queue_and_returns_a_late_decision() -> None:
    async def main() -> None:
        capacity = Capacity(0)
        abandoned: list[tuple[str, str]] = []
        controller = AdmissionController(
            capacity.try_route,
            max_queue_len=4,
            max_wait_s=5,
            on_abandoned=lambda r, d: abandoned.append((r, d)),
        )
        first = asyncio.create_task(controller.admit("a"))
        second = asyncio.create_task(controller.admit("b"))
        await asyncio.sleep(0.01)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert controller.num_waiting == 1
        capacity.slots = 1
        controller.notify_capacity()  # routes "b" and sets its result ...
        second.cancel()  # ... but its caller gives up before resuming
        with pytest.raises(asyncio.CancelledError):
            await second
        assert abandoned == [("b", "decision-b")]
        assert controller.num_waiting == 0

    run(main())


class BlockPool:
    """A real pool of blocks: a request ("name", blocks) fits while enough are free."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.tries: list[str] = []

    def try_route(self, request: tuple[str, int]) -> str | None:
        name, blocks = request
        self.tries.append(name)
        if blocks > self.free:
            return None
        self.free -= blocks
        return name


def test_a_waiter_that_does_not_fit_yet_never_holds_back_later_ones_that_do() -> None:
    async def main() -> None:
        pool = BlockPool(free=4)
        controller = AdmissionController(pool.try_route, max_queue_len=8, max_wait_s=5, max_bypasses=4)
        big = asyncio.create_task(controller.admit(("big", 10)))
        await asyncio.sleep(0.01)
        assert controller.num_waiting == 1
        # Arrivals that fit go straight past it ...
        assert await controller.admit(("s1", 1)) == "s1"
        # ... and so do waiters queued behind it once room appears for them.
        pool.free = 0
        small = asyncio.create_task(controller.admit(("s2", 1)))
        await asyncio.sleep(0.01)
        pool.free = 1
        controller.notify_capacity()
        assert await small == "s2" and not big.done()
        pool.free = 10
        controller.notify_capacity()
        assert await big == "big"

    run(main())


def test_after_max_bypasses_the_passed_waiter_is_next() -> None:
    async def main() -> None:
        pool = BlockPool(free=3)
        controller = AdmissionController(pool.try_route, max_queue_len=8, max_wait_s=5, max_bypasses=2)
        big = asyncio.create_task(controller.admit(("big", 5)))
        await asyncio.sleep(0.01)
        assert await controller.admit(("s1", 1)) == "s1"  # passes big once
        assert await controller.admit(("s2", 1)) == "s2"  # twice: the bound
        blocked = asyncio.create_task(controller.admit(("s3", 1)))  # fits, but must not pass again
        await asyncio.sleep(0.01)
        assert not blocked.done() and controller.num_waiting == 2 and pool.free == 1
        pool.free = 5  # the two small ones finished: room for big, and it goes first
        controller.notify_capacity()
        assert await big == "big"
        assert not blocked.done()
        pool.free = 1
        controller.notify_capacity()
        assert await blocked == "s3"

    run(main())


def test_zero_bypasses_is_strict_fifo() -> None:
    async def main() -> None:
        pool = BlockPool(free=1)
        controller = AdmissionController(pool.try_route, max_queue_len=8, max_wait_s=5, max_bypasses=0)
        big = asyncio.create_task(controller.admit(("big", 3)))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(controller.admit(("small", 1)))
        await asyncio.sleep(0.01)
        controller.notify_capacity()
        assert not small.done() and pool.tries == ["big", "big"]
        pool.free = 3
        controller.notify_capacity()
        assert await big == "big"
        pool.free = 1
        controller.notify_capacity()
        assert await small == "small"

    run(main())


def test_a_big_waiter_leaving_lets_the_ones_it_held_back_in() -> None:
    async def main() -> None:
        pool = BlockPool(free=0)
        controller = AdmissionController(pool.try_route, max_queue_len=8, max_wait_s=5, max_bypasses=0)
        big = asyncio.create_task(controller.admit(("big", 5)))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(controller.admit(("small", 1)))
        await asyncio.sleep(0.01)
        pool.free = 1
        controller.notify_capacity()
        assert not small.done()  # FIFO: big is next
        big.cancel()
        with pytest.raises(asyncio.CancelledError):
            await big
        assert await small == "small"
        assert controller.num_waiting == 0

    run(main())


def test_a_pass_skips_waiters_no_smaller_than_one_that_did_not_fit() -> None:
    async def main() -> None:
        pool = BlockPool(free=0)
        controller = AdmissionController(
            pool.try_route, max_queue_len=8, max_wait_s=5, size_of=lambda r: r[1]
        )
        tasks = [asyncio.create_task(controller.admit((f"r{i}", 4))) for i in range(5)]
        tasks.append(asyncio.create_task(controller.admit(("tiny", 1))))
        await asyncio.sleep(0.01)
        pool.tries.clear()
        pool.free = 1
        controller.notify_capacity()
        # One try for the five equal requests, one for the smaller one, which fits.
        assert pool.tries == ["r0", "tiny"]
        assert await tasks[-1] == "tiny"
        for task in tasks[:-1]:
            task.cancel()
        await asyncio.gather(*tasks[:-1], return_exceptions=True)
        assert controller.num_waiting == 0

    run(main())


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="max_bypasses"):
        AdmissionController(Capacity(0).try_route, max_bypasses=-1)
