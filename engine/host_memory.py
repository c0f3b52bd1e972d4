"""Large host buffers pinned in place, for the host tier's slots (engine/host_kv.py).

`torch.zeros(..., pin_memory=True)` goes through torch's caching host allocator, which rounds
every allocation up to a power of two: a 24 GiB tier took 32 GiB of pinned memory, a 70 GiB
one asked for 128 GiB and failed. `HostMemory` maps exactly the bytes asked for and pins
them where they are (`cudaHostRegister`), as SGLang's HiCache host pool does:

* an anonymous shared mapping, its pages faulted in at once (MAP_POPULATE, zero-filled by
  the kernel): the driver pins pages that exist instead of faulting them in one by one,
  and, shared, they are never copy-on-write, so a process forked meanwhile (a tensor-parallel
  rank being started) cannot leave the GPU's copies going to pages the parent no longer uses;
* registered in pieces of whole `granularity` units (one layer's slots) of at most
  `REGISTER_PIECE_BYTES`: a copy never spans two registrations (such a copy would not count
  as pinned), and no single registration is huge (SGLang caps theirs too). Each piece also
  starts on a page: the driver pins whole pages, so two registrations sharing a page would
  overlap (the second is refused as already registered) when a unit is not a whole number of
  pages (a small model's layer of an odd number of slots);
* unregistered by `close()`, or when the `HostMemory` is collected; the mapping itself goes
  with the last tensor over it (a view still held then is plain pageable memory, still valid).

Copies between these pages and the GPU are then asynchronous (`non_blocking=True` is a real
cudaMemcpyAsync), exactly as with torch's pinned memory. Time: faulting in and pinning run
at memory speed, once, when the engine starts (tens of GiB: seconds).
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import weakref

import torch

log = logging.getLogger(__name__)

# Most bytes one cudaHostRegister call pins.
REGISTER_PIECE_BYTES = 4 << 30
_CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context of the process


def register_pieces(
    nbytes: int, granularity: int, max_piece_bytes: int | None = None, page_bytes: int = mmap.PAGESIZE
) -> list[tuple[int, int]]:
    """(offset, size) of each registration: whole `granularity` units that also start on a
    `page_bytes` boundary (the last piece may be shorter when `nbytes` is not a multiple), at
    most `max_piece_bytes` (default `REGISTER_PIECE_BYTES`) each unless the smallest such run
    of units is larger (then one such run a piece)."""
    if nbytes <= 0:
        return []
    if max_piece_bytes is None:
        max_piece_bytes = REGISTER_PIECE_BYTES
    if granularity <= 0 or page_bytes <= 0:
        raise ValueError(f"granularity and page_bytes must be > 0, got {granularity}, {page_bytes}")
    unit = math.lcm(granularity, page_bytes)  # the fewest whole units that end on a page
    piece = max(1, max_piece_bytes // unit) * unit
    return [(offset, min(piece, nbytes - offset)) for offset in range(0, nbytes, piece)]


class HostMemory:
    """`nbytes` of zero-filled host memory as `tensor` (uint8 [nbytes]), pinned in place when
    `pin` (CUDA; see the module's docstring), registered in `register_pieces(nbytes, granularity)`;
    `device`: the GPU whose copies use it (synchronized before the pages are unregistered).
    RuntimeError naming the CUDA error if pinning fails (nothing stays registered)."""

    def __init__(
        self, nbytes: int, pin: bool, granularity: int = 1, device: str | torch.device | None = None
    ) -> None:
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes}")
        flags = mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        region = mmap.mmap(-1, nbytes, flags=flags)
        self.nbytes = nbytes
        self.tensor = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` mapped
        self.registered: list[int] = []  # base pointer of each registration
        self.device = device
        if pin:
            self._register(register_pieces(nbytes, granularity))
        self._finalizer = weakref.finalize(self, _unregister, self.registered, device)
        self._finalizer.atexit = False  # at exit the process's end releases the pins

    def _register(self, pieces: list[tuple[int, int]]) -> None:
        cudart = torch.cuda.cudart()
        base = self.tensor.data_ptr()
        for offset, size in pieces:
            # on `device`: a runtime call on a thread whose current device is another (0 by
            # default) would create a CUDA context there, hundreds of MiB of that GPU
            with _on(self.device):
                error = cudart.cudaHostRegister(base + offset, size, _CUDA_HOST_REGISTER_PORTABLE)
            if int(error) != 0:
                _unregister(self.registered, self.device)
                raise RuntimeError(
                    f"pinning {self.nbytes / 2**30:.2f} GiB of host memory failed at bytes "
                    f"{offset}..{offset + size}: cudaHostRegister: {cudart.cudaGetErrorString(error)}"
                )
            self.registered.append(base + offset)

    @property
    def pinned(self) -> bool:
        return bool(self.registered)

    def close(self) -> None:
        """Unregister (idempotent); the memory stays valid, pageable, while a tensor holds it."""
        self._finalizer()


def _unregister(bases: list[int], device: str | torch.device | None = None) -> None:
    if not bases:
        return
    torch.cuda.synchronize(device)  # no copy may still be using the pages
    cudart = torch.cuda.cudart()
    while bases:
        with _on(device):  # not a new context on this thread's device (see _register)
            error = cudart.cudaHostUnregister(bases.pop())
        if int(error) != 0:  # nothing to undo: the pages stay pinned until the process exits
            log.warning("cudaHostUnregister: %s", cudart.cudaGetErrorString(error))


def _on(device: str | torch.device | None) -> contextlib.AbstractContextManager:
    """`device` current for the runtime calls inside (None: leave the current device)."""
    return torch.cuda.device(device) if device is not None else contextlib.nullcontext()
