"""Host buffers for KV bytes between a GPU and a socket (the gRPC backend's staging).

* `host_buffer`: a fresh receive buffer, pinned or a private anonymous mapping.
* `StagingPool`: reused host buffers for packed KV on its way off the device, copied in
  one DMA or piece by piece (so a send can start on the first pieces while later ones cross).
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable

import torch


def host_buffer(nbytes: int, pin_memory: bool) -> torch.Tensor:
    """A fresh, uninitialised uint8 [nbytes] host tensor to receive into (nothing zero-filled).

    Pinned memory comes from torch's caching host allocator, which recycles it once the tensor is
    dropped, and makes a copy to the GPU one fast DMA. Pageable memory is a private anonymous
    mapping of its own rather than torch's allocator: freeing a few hundred MB (munmap) takes
    ~15 ms, and the mapping's dealloc does it without holding the GIL.
    """
    if pin_memory:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive


class StagingPool:
    """Reused host buffers for packed KV on its way off the device: one per send in flight.

    Pinned (`pin_memory=True`), the device-to-host copy is one DMA at full link speed and can be
    non-blocking; reused, because pinning a few hundred MB (cudaHostAlloc) costs more than copying
    them, and a fresh pageable buffer pays a page fault per 4 KiB on first touch. Thread-safe: a
    buffer belongs to one caller between `acquire` and `release`. Keeps at most `max_free` idle
    buffers; capacities are rounded up so requests of nearby sizes share them.
    """

    def __init__(self, pin_memory: bool, max_free: int = 2) -> None:
        self.pin_memory = pin_memory
        self.max_free = max_free
        self._free: list[torch.Tensor] = []  # each uint8 [capacity]
        self._lock = threading.Lock()

    @staticmethod
    def capacity_for(nbytes: int) -> int:
        """Next power of two up to 64 MiB, then the next multiple of 64 MiB."""
        step = 64 << 20
        if nbytes <= step:
            return max(1 << 20, 1 << (nbytes - 1).bit_length())
        return -(-nbytes // step) * step

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least `nbytes` that no other caller holds until `release`."""
        with self._lock:
            fitting = [i for i, buffer in enumerate(self._free) if buffer.numel() >= nbytes]
            if fitting:
                best = min(fitting, key=lambda i: self._free[i].numel())
                return self._free.pop(best)
        return torch.empty(self.capacity_for(nbytes), dtype=torch.uint8, pin_memory=self.pin_memory)

    def release(self, buffer: torch.Tensor) -> None:
        """Give `buffer` back; the caller must not touch it (nor have copies into it pending) after."""
        with self._lock:
            self._free.append(buffer)
            if len(self._free) > self.max_free:  # drop the smallest: big requests need the big ones
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))

    def copy_to_host(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy a CUDA tensor into a pooled buffer: (host tensor of its shape, buffer to `release`).

        One DMA with `non_blocking=True` into pinned memory, instead of `.cpu()` into fresh
        pageable memory (staged through a driver bounce buffer, every page faulted in). Returns
        once the copy is complete, so the bytes can go straight onto a socket.
        """
        nbytes = packed.numel() * packed.element_size()
        host, staging, ready = self.copy_to_host_in_pieces(packed, [(0, nbytes)])
        ready(-1)  # this copy only, not other threads' later work on the stream
        return host.view(packed.dtype).view(packed.shape), staging

    def copy_to_host_in_pieces(
        self, packed: torch.Tensor, order: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[int], None]]:
        """Start copying a contiguous CUDA tensor's bytes into a pooled buffer, piece by piece in
        `order` (byte ranges covering it): (host uint8 [nbytes], buffer to `release`, `ready`).
        Returns at once; `ready(start)` waits for the piece starting at byte `start` only, so its
        bytes can go on a socket while later pieces are still crossing (the copy overlaps the send).
        Release the buffer only after every piece is ready (`ready(-1)` waits for all)."""
        nbytes = packed.numel() * packed.element_size()
        staging = self.acquire(nbytes)
        try:
            host, source = staging[:nbytes], packed.view(-1).view(torch.uint8)
            stream = torch.cuda.current_stream(packed.device)
            events: dict[int, torch.cuda.Event] = {}
            for start, end in order:
                host[start:end].copy_(source[start:end], non_blocking=True)
                events[start] = torch.cuda.Event()
                events[start].record(stream)
        except BaseException:
            torch.cuda.current_stream(packed.device).synchronize()  # nothing may still write into it
            self.release(staging)
            raise
        last = events[order[-1][0]] if order else None

        def ready(start: int) -> None:
            event = last if start < 0 else events[start]
            if event is not None:
                event.synchronize()  # this piece's copy only (the stream runs them in order)

        return host, staging, ready

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
