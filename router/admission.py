"""Admission control: a bounded wait for decode headroom, without head-of-line blocking.

`try_route(request)` is the caller's routing step (policy + `tracker.on_routed`):
it returns a decision, or None when no decode worker has room now. Requests that
can never fit are the caller's to refuse before they get here (`RouterCore`
answers them INVALID_ARGUMENT at once): everything that waits here fits once
enough in-flight work ends.

`admit` returns a decision at once when one is available and no waiter has been
passed too often; otherwise the request waits. The queue holds at most
`max_queue_len` requests and each waits at most `max_wait_s`; past either bound
`admit` raises `AdmissionRejected`, which the gRPC layer maps to RESOURCE_EXHAUSTED.

Fairness: waiters are tried in arrival order, but a waiter that does not fit yet
(a large request while the cache is busy) does not hold back later ones that do:
they pass it. Each pass is counted; once a waiter has been passed `max_bypasses`
times nobody passes it any more, so it is next as soon as it fits (a large
request is never starved; `max_bypasses=0` is strict FIFO).

Call `notify_capacity()` whenever headroom may have grown (a load report
arrived, a request finished). Every waiter ends by admission, rejection on
timeout, or cancellation; a waiter cancelled after it was routed hands its
decision to `on_abandoned` so the caller can release it.
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
    times_passed: int = 0  # later requests admitted while this one waited


class AdmissionController(Generic[RequestT, DecisionT]):
    def __init__(
        self,
        try_route: Callable[[RequestT], DecisionT | None],
        max_queue_len: int = 256,
        max_wait_s: float = 30.0,
        on_abandoned: Callable[[RequestT, DecisionT], None] | None = None,
        max_bypasses: int = 16,
        size_of: Callable[[RequestT], int] | None = None,
    ) -> None:
        """`size_of` (optional) orders requests by what they need: within one pass
        of `notify_capacity`, a waiter no smaller than one that just did not fit is
        not tried (it would not fit either, up to prefix sharing), which keeps a pass
        cheap when a long queue finds no room."""
        if max_queue_len < 0:
            raise ValueError(f"max_queue_len must be >= 0, got {max_queue_len}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if max_bypasses < 0:
            raise ValueError(f"max_bypasses must be >= 0, got {max_bypasses}")
        self._try_route = try_route
        self.max_queue_len = max_queue_len
        self.max_wait_s = max_wait_s
        self.max_bypasses = max_bypasses
        self._on_abandoned = on_abandoned
        self._size_of = size_of
        self._waiters: deque[_Waiter[RequestT, DecisionT]] = deque()
        self.num_admitted = 0
        self.num_rejected = 0

    @property
    def num_waiting(self) -> int:
        return len(self._waiters)

    def _may_pass_waiters(self) -> bool:
        """Whether a request may be admitted ahead of everyone still waiting."""
        return all(w.times_passed < self.max_bypasses or w.future.done() for w in self._waiters)

    async def admit(self, request: RequestT) -> DecisionT:
        """Route `request`, waiting (bounded) for headroom; see the module doc for the order."""
        if self._may_pass_waiters():
            decision = self._try_route(request)
            if decision is not None:
                self._count_passed(len(self._waiters))
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
            try:
                self._waiters.remove(waiter)
                self.notify_capacity()  # it may have held back waiters behind it
            except ValueError:
                pass  # already admitted by notify_capacity

    def notify_capacity(self) -> None:
        """Admit every waiter that fits now, in arrival order, within the bypass bound."""
        not_fitting = 0  # waiters passed over in this pass, ahead of the one being tried
        smallest_miss: int | None = None
        index = 0
        while index < len(self._waiters):
            waiter = self._waiters[index]
            if waiter.future.done():
                del self._waiters[index]
                continue
            size = self._size_of(waiter.request) if self._size_of is not None else None
            if smallest_miss is not None and size is not None and size >= smallest_miss:
                decision = None
            else:
                decision = self._try_route(waiter.request)
            if decision is None:
                if waiter.times_passed >= self.max_bypasses:
                    return  # it is next: nobody behind it goes first
                if size is not None:
                    smallest_miss = size if smallest_miss is None else min(smallest_miss, size)
                not_fitting += 1
                index += 1
                continue
            del self._waiters[index]
            self._count_passed(not_fitting)
            self.num_admitted += 1
            waiter.future.set_result(decision)

    def _count_passed(self, num_ahead: int) -> None:
        """A request was admitted ahead of the first `num_ahead` waiters."""
        for i in range(num_ahead):
            self._waiters[i].times_passed += 1

    def _expire(self, waiter: _Waiter[RequestT, DecisionT]) -> None:
        if not waiter.future.done():
            self.num_rejected += 1
            waiter.future.set_exception(
                AdmissionRejected(f"no decode worker had room within max_wait_s={self.max_wait_s}")
            )
