"""Run a function on several threads at once and collect what they raised (for concurrency tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_in_threads(fn: Callable[[int], object], num_threads: int, timeout_s: float) -> list[BaseException]:
    """fn(0) .. fn(num_threads - 1) concurrently; returns the exceptions raised (empty when none)."""
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            fn(i)
        except BaseException as exc:  # handed back to the test, which asserts on it
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    return errors
