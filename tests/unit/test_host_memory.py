"""The host tier's memory (engine/host_memory.py), what of it runs without a GPU: the pieces
it is pinned in (whole layers, at most REGISTER_PIECE_BYTES each, covering every byte once),
and the mapping itself: exactly the bytes asked for (no rounding up), zero-filled, resident
at once (the pages are faulted in before any pinning), and gone with its last tensor. The
pinning itself is checked on a GPU: tests/gpu/test_host_tier_gpu.py."""

from __future__ import annotations

import gc
import math
import mmap

import pytest
import torch

from pdserve.engine.host_memory import REGISTER_PIECE_BYTES, HostMemory, register_pieces


def rss_shmem_bytes() -> int:
    """This process's resident shared memory (what an anonymous shared mapping counts as)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["RssShmem"].split()[0]) * 1024


@pytest.mark.parametrize(
    ("nbytes", "granularity", "cap"),
    [
        (24 << 30, (24 << 30) // 32, REGISTER_PIECE_BYTES),  # 32 layers of 0.75 GiB: 5 a piece
        (70 << 30, (70 << 30) // 80, REGISTER_PIECE_BYTES),  # 80 layers of 0.875 GiB: 4 a piece
        (6 << 30, 6 << 30, REGISTER_PIECE_BYTES),  # one layer over the cap: that layer alone
        (1000, 100, 250),
        (1050, 100, 250),  # a partial unit at the end
    ],
)
def test_register_pieces_are_whole_units_under_the_cap(nbytes: int, granularity: int, cap: int) -> None:
    pieces = register_pieces(nbytes, granularity, cap, page_bytes=1)  # units only (pages: below)
    assert pieces[0][0] == 0 and sum(size for _, size in pieces) == nbytes
    for (offset, size), (next_offset, _) in zip(pieces, pieces[1:], strict=False):
        assert offset + size == next_offset  # contiguous, no overlap
    for offset, size in pieces:
        assert offset % granularity == 0  # no copy within a unit spans two registrations
        assert size <= max(cap, granularity)
        assert size % granularity == 0 or offset + size == nbytes
    if granularity <= cap:
        assert all(size == cap // granularity * granularity for _, size in pieces[:-1])


def test_register_pieces_edges() -> None:
    assert register_pieces(0, 10) == []
    assert register_pieces(30, 10, 5, page_bytes=1) == [(0, 10), (10, 10), (20, 10)]
    with pytest.raises(ValueError, match="granularity and page_bytes must be > 0"):
        register_pieces(30, 0)


@pytest.mark.parametrize(
    ("granularity", "num_units", "cap"),
    [
        (3 * 2048, 1500, 1 << 20),  # layers of 6 KiB (an odd number of 2 KiB slots): pages every 2
        (4096 * 7 + 512, 300, 1 << 20),  # pieces of whole runs of 8 layers (57 pages)
        ((24 << 30) // 32, 32, REGISTER_PIECE_BYTES),  # page-multiple layers: as without pages
    ],
)
def test_register_pieces_start_on_pages(granularity: int, num_units: int, cap: int) -> None:
    """The driver pins whole pages: a piece starting inside a page the previous piece pinned
    would overlap it, so every piece starts on a page (and still on a unit)."""
    page = 4096
    nbytes = granularity * num_units
    pieces = register_pieces(nbytes, granularity, cap, page_bytes=page)
    assert pieces[0][0] == 0 and sum(size for _, size in pieces) == nbytes
    for (offset, size), (next_offset, _) in zip(pieces, pieces[1:], strict=False):
        assert offset + size == next_offset
    for offset, _ in pieces:
        assert offset % page == 0 and offset % granularity == 0
    run = math.lcm(granularity, page)
    assert all(size <= max(cap, run) for _, size in pieces)
    if run <= cap:  # as many whole runs as the cap allows
        assert all(size == cap // run * run for _, size in pieces[:-1])


def test_host_memory_maps_exactly_the_bytes_asked_for() -> None:
    nbytes = (96 << 20) + 3 * mmap.PAGESIZE  # not a power of two: the pinned allocator would take 128 MiB
    before = rss_shmem_bytes()
    memory = HostMemory(nbytes, pin=False)
    grown = rss_shmem_bytes() - before
    assert grown == nbytes  # resident at once (faulted in), and not a page more
    tensor = memory.tensor
    assert tensor.dtype == torch.uint8 and tensor.numel() == nbytes
    assert tensor.data_ptr() % mmap.PAGESIZE == 0 and int(tensor.count_nonzero()) == 0
    slots = tensor.view(torch.bfloat16)[: 16 * 2 * 16 * 2 * 128].view(16, 2, 16, 2, 128)
    slots[3].fill_(1.5)  # a layer-major view writes through to the mapping
    assert int(tensor.count_nonzero()) == slots[3].numel() * 2  # 1.5 is 0x3FC0: both bytes set
    assert not memory.pinned
    memory.close()
    memory.close()  # idempotent
    view = tensor[:16]
    del memory, tensor, slots
    gc.collect()
    assert rss_shmem_bytes() - before == nbytes  # a view still holds it, valid
    assert int(view.count_nonzero()) == 0
    del view
    gc.collect()
    assert rss_shmem_bytes() - before == 0  # unmapped with the last tensor over it


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_pinning_without_cuda_fails_loudly() -> None:
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        HostMemory(1 << 20, pin=True)
    with pytest.raises(ValueError, match="nbytes must be > 0"):
        HostMemory(0, pin=False)
