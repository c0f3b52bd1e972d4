"""Admission control: a bounded FIFO wait for decode headroom.

`try_route(request)` is the caller's routing step (policy + `tracker.on_routed`):
it returns a decision, or None when no decode worker has room. `admit` returns
a decision at once when nobody is waiting and one is available; otherwise the
request waits in FIFO order. The queue holds at most `max_queue_len` requests
and each waits at most `max_wait_s`; past either bound `admit` raises
`AdmissionRejected`, which the gRPC layer maps to RESOURCE_EXHAUSTED.

Call `notify_capacity()` whenever headroom may have grown (a load report
arrived, a request finished): it routes waiters from the head of the queue until
one does not fit. Every waiter ends by admission, rejection on timeout, or
cancellation; a waiter cancelled after it was routed hands its decision to
`on_abandoned` so the caller can release it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

RequestT = TypeVar("RequestT")
DecisionT = TypeVar("DecisionT")


class AdmissionRejected(Exception):
    """No headroom within the queue bounds: map to gRPC RESOURCE_EXHAUSTED."""


@dataclass
class _Waiter(Generic[RequestT, DecisionT]):
    request: RequestT
    future: asyncio.Future[DecisionT]


class AdmissionController(Generic[RequestT, DecisionT]):
    def __init__(
        self,
        try_route: Callable[[RequestT], DecisionT | None],
        max_queue_len: int = 256,
        max_wait_s: float = 30.0,
        on_abandoned: Callable[[RequestT, DecisionT], None] | None = None,
    ) -> None:
        if max_queue_len < 0:
            raise ValueError(f"max_queue_len must be >= 0, got {max_queue_len}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._try_route = try_route
        self.max_queue_len = max_queue_len
        self.max_wait_s = max_wait_s
        self._on_abandoned = on_abandoned
        self._waiters: deque[_Waiter[RequestT, DecisionT]] = deque()
        self.num_admitted = 0
        self.num_rejected = 0

    @property
    def num_waiting(self) -> int:
        return len(self._waiters)

    async def admit(self, request: RequestT) -> DecisionT:
        """Route `request`, waiting FIFO for headroom within the bounds."""
        if not self._waiters:
            decision = self._try_route(request)
            if decision is not None:
                self.num_admitted += 1
                return decision
        if len(self._waiters) >= self.max_queue_len:
            self.num_rejected += 1
            raise AdmissionRejected(
                f"no decode worker has room and {len(self._waiters)} requests already wait "
                f"(max_queue_len={self.max_queue_len})"
            )
        loop = asyncio.get_running_loop()
        waiter: _Waiter[RequestT, DecisionT] = _Waiter(request, loop.create_future())
        self._waiters.append(waiter)
        timer = loop.call_later(self.max_wait_s, self._expire, waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                # Routed just before the caller gave up: hand the decision back.
                if self._on_abandoned is not None:
                    self._on_abandoned(request, future.result())
            raise
        finally:
            timer.cancel()
            was_head = bool(self._waiters) and self._waiters[0] is waiter
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass  # already popped by notify_capacity
            if was_head:
                self.notify_capacity()  # the next waiter may fit where this one did not

    def notify_capacity(self) -> None:
        """Admit waiters from the head of the queue while the router finds room."""
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.future.done():
                self._waiters.popleft()
                continue
            decision = self._try_route(waiter.request)
            if decision is None:
                return
            self._waiters.popleft()
            self.num_admitted += 1
            waiter.future.set_result(decision)

    def _expire(self, waiter: _Waiter[RequestT, DecisionT]) -> None:
        if not waiter.future.done():
            self.num_rejected += 1
            waiter.future.set_exception(
                AdmissionRejected(f"no decode worker had room within max_wait_s={self.max_wait_s}")
            )
