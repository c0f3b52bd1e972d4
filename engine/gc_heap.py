"""The garbage collector and a serving process's start-up heap.

A full (oldest-generation) collection walks every container object alive. After start-up
that is hundreds of thousands of them (torch, Triton, Ray, gRPC, the model's modules, the
KV pool's blocks), none of which will become garbage, and CPython starts a full collection
by itself once enough new objects survive. Measured: one such pause took 160 ms in the
middle of an offline run on an H200 (bench.profile_steps' timeline), with the GPU idle
throughout; in the router on the 2-core CPU bench, 75-135 ms with the event loop stopped.
Freezing the start-up heap (as vLLM's engine core and API server do) keeps those objects
out of every later collection; serving's own short-lived objects are still collected.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)


def freeze_startup_heap() -> None:
    """Collect once, then move every object alive into the permanent generation."""
    gc.collect()
    gc.freeze()
    log.debug("froze %d start-up objects out of garbage collection", gc.get_freeze_count())


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """`freeze_startup_heap()` for the block's duration only (a benchmark's measured run)."""
    freeze_startup_heap()
    try:
        yield
    finally:
        gc.unfreeze()
