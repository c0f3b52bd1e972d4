"""KV transfer over torch.distributed point-to-point: NCCL between GPUs, gloo on CPU.

One process group spans every worker (`init_transfer_group`); the backend is
chosen by the cache's device, and the send/recv code is the same for both.

Ordering. NCCL (and gloo, which we treat the same) matches sends and receives
between a pair of ranks in issue order; tags are not a safe way to tell requests
apart. So a pair must never have two transfers in flight:

    prefill (NcclKVSender.send)                 decode (NcclKVReceiver.recv)
    ---------------------------                 ----------------------------
    lock[dst]
      pack blocks -> buffer
      notify(NcclTransferNotice) ------------>  (wiring: Ray call / queue to a receive thread)
      isend(buffer, dst)                        irecv(buffer, src) ; wait
                                                unpack -> on_kv_received(req_id, block_ids, buffer)
      waitable.result(timeout) <--------------  completes (or raises)
    unlock[dst]

`notify` is provided by the wiring layer: it takes the notice and returns a
waitable, anything with `.result(timeout)` (a `concurrent.futures.Future`; the
lead wraps a Ray ObjectRef in one). The receiver validates the notice, but it
*always* posts the matching receive when it can (into a scratch buffer if the
request is refused) so the pair stays in step, then raises; the sender turns
that into `KVTransferError` / `KVLayoutMismatch` and the next request is fine.

Failure: every wait is bounded (`timeout_s`; also the process group timeout). If
the receiver never confirms, the sender raises `KVTransferError` and marks that
destination broken: a send may still be pending on the pair, so further sends to
it are refused (`KVTransferError`) instead of risking mismatched bytes; the fix is
to rebuild the transfer group (restart the worker pair). With NCCL an unmatched
op also trips the NCCL watchdog, which aborts the communicator.
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from transfer.contract import KVHandle, KVReceiverCallback, KVTransferError, TransferStats, check_send_args
from transfer.layout import KVLayout, KVLayoutMismatch, normalize_dtype_name
from transfer.packing import dtype_from_name, pack_blocks

DEFAULT_TIMEOUT_S = 60.0


def backend_for_device(device: str | torch.device) -> str:
    """ "nccl" for CUDA tensors, "gloo" for CPU ones."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        return "nccl"
    if device_type == "cpu":
        return "gloo"
    raise ValueError(f"no torch.distributed transfer backend for device type {device_type!r}")


def init_transfer_group(
    rank: int,
    world_size: int,
    init_method: str,
    device: str | torch.device,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> str:
    """Join the one transfer process group (the default torch.distributed group).

    init_method: "tcp://host:port" of rank 0 (a plain "host:port" is accepted too).
    Every worker (prefill and decode) calls this with its own rank. Returns the backend.
    """
    if "://" not in init_method:
        init_method = f"tcp://{init_method}"
    backend = backend_for_device(device)
    if backend == "nccl":
        # Each rank must talk NCCL from its own GPU; the cache lives there.
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        world_size=world_size,
        rank=rank,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return backend


def destroy_transfer_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class NcclTransferNotice:
    """What the sender tells the receiver before it sends. Plain data, picklable."""

    req_id: str
    src_rank: int
    block_ids: tuple[int, ...]  # decode-side blocks to fill, in order
    shape: tuple[int, ...]  # [num_layers, 2, n, block_size, Hkv, D]
    dtype: str  # e.g. "bfloat16"
    layout: KVLayout  # the sender's layout
    nbytes: int


class Waitable(Protocol):
    def result(self, timeout: float | None = None) -> Any: ...


# notify(notice) -> waitable whose result() returns once the receiver has the data in place.
NotifyFn = Callable[[NcclTransferNotice], Waitable]


class _SideStream:
    """On CUDA, run transfer work on a private stream so it never stalls the engine's stream.

    `work.wait()` on an NCCL op makes the *current* stream wait for the transfer; on the
    engine's stream that would hold up its forward passes until the peer shows up. On CPU
    this is a no-op context.
    """

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make the side stream current in this thread (safe to use from several threads at once)."""
        if self.stream is None:
            yield
            return
        # Order after everything already queued on the caller's stream (e.g. the prefill
        # forward pass that wrote the blocks about to be packed).
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            yield

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


class NcclKVSender:
    """Prefill side. Thread-safe: sends to different destinations run in parallel."""

    def __init__(
        self,
        rank: int,
        model_name: str,
        notify: NotifyFn | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.rank = rank
        self.model_name = model_name
        self.notify = notify
        self.timeout_s = timeout_s
        self.group = group
        self._locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._broken: dict[int, str] = {}  # dst rank -> why it is unusable
        # Sends we gave up waiting on: keep the Work and buffer alive, because dropping a pending
        # gloo send cancels it (and with NCCL frees its buffer under the kernel), and a late
        # receiver must still get well-formed bytes.
        self._abandoned: dict[int, list[tuple[dist.Work, torch.Tensor]]] = {}
        self._streams: dict[torch.device, _SideStream] = {}

    def _lock_for(self, dst: int) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(dst, threading.Lock())

    def _stream_for(self, device: torch.device) -> _SideStream:
        with self._locks_guard:
            if device not in self._streams:
                self._streams[device] = _SideStream(device)
            return self._streams[device]

    def send(
        self,
        handle: KVHandle,
        src_block_ids: Sequence[int],
        kv_cache: torch.Tensor,
        notify: NotifyFn | None = None,
    ) -> TransferStats:
        notify = notify or self.notify
        if notify is None:
            raise ValueError("NcclKVSender.send needs a notify callable (constructor or argument)")
        dst = handle.nccl_rank
        if dst is None:
            raise ValueError(f"request {handle.req_id}: the handle has no nccl_rank for the nccl backend")
        if dst == self.rank:
            raise ValueError(f"request {handle.req_id}: cannot send to own rank {dst}")
        check_send_args(handle, src_block_ids, KVLayout.from_cache(kv_cache, self.model_name))

        with self._lock_for(dst), self._stream_for(kv_cache.device).active():
            if dst in self._broken:
                raise KVTransferError(f"rank {dst} is unusable after an earlier failure: {self._broken[dst]}")
            start = time.perf_counter()
            buffer = pack_blocks(kv_cache, src_block_ids)  # [L, 2, n, block_size, Hkv, D], contiguous
            packed = time.perf_counter()
            notice = NcclTransferNotice(
                req_id=handle.req_id,
                src_rank=self.rank,
                block_ids=tuple(handle.block_ids),
                shape=tuple(buffer.shape),
                dtype=normalize_dtype_name(buffer.dtype),
                layout=KVLayout.from_cache(kv_cache, self.model_name),
                nbytes=buffer.numel() * buffer.element_size(),
            )
            try:
                waitable = notify(notice)
            except Exception as exc:  # nothing was sent: the pair is still in step
                raise KVTransferError(f"request {handle.req_id}: notifying rank {dst} failed: {exc}") from exc
            work = dist.isend(buffer, dst=dst, group=self.group)
            try:
                self._wait_for_receiver(handle.req_id, dst, waitable, work)
            except Exception:
                if dst in self._broken:
                    self._abandoned.setdefault(dst, []).append((work, buffer))
                raise
            done = time.perf_counter()
        return TransferStats(
            nbytes=notice.nbytes, pack_ms=(packed - start) * 1e3, send_ms=(done - packed) * 1e3
        )

    def _wait_for_receiver(self, req_id: str, dst: int, waitable: Waitable, work: dist.Work) -> None:
        try:
            waitable.result(timeout=self.timeout_s)
        except KVLayoutMismatch:
            # The receiver drained the bytes before refusing, so this completes.
            if not self._wait_work(work):
                self._broken[dst] = f"request {req_id}: send did not complete after a refusal"
            raise
        except TimeoutError as exc:
            self._broken[dst] = f"request {req_id} got no confirmation within {self.timeout_s} s"
            raise KVTransferError(f"request {req_id}: {self._broken[dst]} from rank {dst}") from exc
        except Exception as exc:
            # The receiver refused after draining (its recv matched our send), or died; find out which.
            if not self._wait_work(work):
                self._broken[dst] = f"request {req_id}: receiver failed without draining ({exc})"
            raise KVTransferError(f"request {req_id}: rank {dst} failed to receive: {exc}") from exc
        if not self._wait_work(work):
            self._broken[dst] = f"request {req_id}: send did not complete"
            raise KVTransferError(f"request {req_id}: send to rank {dst} did not complete")

    def _wait_work(self, work: dist.Work) -> bool:
        try:
            return bool(work.wait(timeout=datetime.timedelta(seconds=self.timeout_s)))
        except Exception:
            return False

    def close(self) -> None:
        """Nothing to release: the process group belongs to the wiring layer."""


class NcclKVReceiver:
    """Decode side. `recv(notice)` runs on a receive thread (e.g. a Ray actor's concurrency group)."""

    def __init__(
        self,
        on_kv_received: KVReceiverCallback,
        expected_layout: KVLayout,
        device: str | torch.device,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        group: dist.ProcessGroup | None = None,
        max_nbytes: int = 8 << 30,
    ) -> None:
        self.on_kv_received = on_kv_received
        self.expected_layout = expected_layout
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.group = group
        self.max_nbytes = max_nbytes  # refuse to allocate absurd buffers from a corrupt notice
        # One receive at a time: NCCL communicators are not safe to drive from several threads,
        # and the link is shared anyway.
        self._recv_lock = threading.Lock()
        self._stream = _SideStream(self.device)
        # Sources whose receive timed out: that irecv may still match their next send, so any
        # further request from them is refused. Keep the pending Work and buffer alive.
        self._broken_sources: dict[int, tuple[dist.Work, torch.Tensor]] = {}

    def recv(self, notice: NcclTransferNotice) -> None:
        """Receive one request's buffer from `notice.src_rank`, then hand it to `on_kv_received`.

        Returns once the data is in place (CUDA work synchronized). Raises `KVLayoutMismatch`
        or `KVTransferError`; in both cases the bytes were drained when the notice allowed it.
        """
        with self._recv_lock, self._stream.active():
            if notice.src_rank in self._broken_sources:
                raise KVTransferError(
                    f"request {notice.req_id}: rank {notice.src_rank} is unusable after an earlier recv "
                    "timed out"
                )
            problem = self._validate(notice)
            drainable = self._drainable(notice)
            if problem is not None and not drainable:
                raise KVTransferError(f"request {notice.req_id}: {problem}; could not drain the send")
            dtype = dtype_from_name(notice.dtype)
            buffer = torch.empty(notice.shape, dtype=dtype, device=self.device)
            work = dist.irecv(buffer, src=notice.src_rank, group=self.group)
            try:
                completed = bool(work.wait(timeout=datetime.timedelta(seconds=self.timeout_s)))
                failure = "" if completed else "timed out"
            except Exception as exc:
                completed, failure = False, str(exc)
            if not completed:
                self._broken_sources[notice.src_rank] = (work, buffer)
                raise KVTransferError(f"request {notice.req_id}: recv from rank {notice.src_rank}: {failure}")
            if problem is not None:
                raise problem
            self.on_kv_received(notice.req_id, list(notice.block_ids), buffer)
            self._stream.synchronize()  # the data is in place before we report completion

    def _validate(self, notice: NcclTransferNotice) -> Exception | None:
        try:
            notice.layout.check_compatible(self.expected_layout, "prefill", "decode")
        except KVLayoutMismatch as exc:
            return exc
        expected_shape = self.expected_layout.buffer_shape(len(notice.block_ids))
        if tuple(notice.shape) != expected_shape:
            return KVTransferError(
                f"request {notice.req_id}: buffer shape {tuple(notice.shape)} != expected {expected_shape}"
            )
        return None

    def _drainable(self, notice: NcclTransferNotice) -> bool:
        try:
            dtype = dtype_from_name(notice.dtype)
        except ValueError:
            return False
        numel = 1
        for size in notice.shape:
            numel *= int(size)
        return 0 < numel * dtype.itemsize == notice.nbytes <= self.max_nbytes
