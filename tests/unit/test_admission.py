"""AdmissionController: immediate admit, FIFO wait, bounds, timeout, cancel."""

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
