"""KV transfer over torch.distributed point-to-point: NCCL between GPUs, gloo on CPU.
One buffer per request between two workers of one rank; when either has tensor parallelism
the KV moves rank to rank instead (`transfer.nccl_direct`, with these locks and broken pairs).

One process group spans every worker (`init_transfer_group`); the backend is
chosen by the cache's device, and the send/recv code is the same for both.

Ordering. NCCL (and gloo, which we treat the same) matches sends and receives
between a pair of ranks in issue order; tags are not a safe way to tell requests
apart. So a pair must never have two transfers in flight:

    prefill (NcclKVSender.send)                 decode (NcclKVReceiver.recv)
    ---------------------------                 ----------------------------
    lock[dst]
      pack layer chunk 0 -> buffer[c0]
      notify(NcclTransferNotice) ------------>  (wiring: DecodeLink.notify_kv -> receive_notice)
                                                arrival = KVArrival(req_id, block_ids, first_token_id, now)
      isend(buffer[c0], dst)                    irecv(buffer[c0]), irecv(buffer[c1]), ... (all, in order)
      pack chunk 1; isend(buffer[c1], dst)      wait c0; sink.on_kv_chunk(arrival, c0, buffer[c0])
      ...                                       wait c1; sink.on_kv_chunk(arrival, c1, buffer[c1]) ...
      waitable.result(timeout) <--------------  completes (or raises)
    unlock[dst]

Pipelining. The buffer `[L, 2, n, block_size, Hkv, D]` is sent as consecutive layer
chunks `c_k = slice(k*chunk_layers, ...)` (`transfer.packing.layer_chunks`; the notice
carries `chunk_layers`, 0 = one chunk), so packing chunk k+1 overlaps sending chunk k,
and the sink's unpacking of chunk k overlaps receiving chunk k+1. On CUDA nothing blocks
the host on the sender: each isend is ordered after its pack on the side stream. A source
of pieces made on demand (`transfer.source.LayerPieces`: a tensor-parallel worker's gathered
pieces) is sent the same way, each chunk its own tensor, at most its `max_chunk_layers` per
chunk; the sender waits for chunk k-2's send before it makes chunk k and drops it, so it
holds two chunks at most. Such a source failing after chunk 0 fails the send part-way (the
pair is broken, see "Failure"); chunk 0 is made before the notice, as with a cache. The
pair still has one transfer in flight, its chunks matched in issue order, and one
confirmation per request.

`notify` is provided by the wiring layer (`transfer.nccl_connector` calls the decode
worker's `DecodeLink.notify_kv`): it takes the notice, which carries the prefill's first
sampled token, and returns a `Waitable`, anything with `.result(timeout)` (a
`concurrent.futures.Future`; the wiring wraps a Ray ObjectRef in one). The receiver
validates the notice, but it *always* posts the matching receive when it can (into a
scratch buffer if the request is refused) so the pair stays in step, then raises; the
sender turns that into `KVTransferError` / `KVLayoutMismatch` and the next request is
fine.

Failure: every wait is bounded (`timeout_s`; also the process group timeout). If
the receiver never confirms, the sender raises `KVTransferError` and marks that
destination broken: a send may still be pending on the pair, so further sends to
it are refused (`KVTransferError`) instead of risking mismatched bytes. A receive
that fails part-way marks its source broken the same way (gloo also closes a pair whose
operation timed out: "Application timeout caused pair closure"). Both sides list their
broken peers (`broken_peers()`); the workers report them and the router stops using
those pairs. A wait of our own that runs out its timeout breaks every pair of this rank
(`EVERY_PEER`): gloo then closes all the pairs of its context ("Application timeout
caused pair closure"; the peers' next sends fail with "Connection closed by peer"), and
NCCL aborts the communicator (by TORCH_NCCL_ASYNC_ERROR_HANDLING's default, the process
too: the router then sees that worker lost). A peer that died breaks only its own pair.
Only a new group mends a pair, i.e. restarting the deployment (README, "When a worker
dies").

Receives from different senders run in parallel on gloo (one lock per source), so a
stalled sender delays no other; on CUDA they take turns (NCCL communicators are not safe
to drive from several threads), so the others' confirmations may time out behind it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pdserve.engine.core.outputs import EVERY_PEER
from pdserve.transfer.connector import Waitable
from pdserve.transfer.contract import (
    MAX_TOKEN_ID,
    KVArrival,
    KVHandle,
    KVSink,
    KVTransferError,
    TransferStats,
    check_send_args,
)
from pdserve.transfer.credentials import KVGate, Reservation, auth_tag, secret_bytes
from pdserve.transfer.layout import KVLayout, KVLayoutMismatch
from pdserve.transfer.nccl_group import DEFAULT_TIMEOUT_S, SideStream, wait_for_work
from pdserve.transfer.packing import (
    CHUNK_LAYERS_ENV,  # noqa: F401 - where tests and benchmarks found it
    MIN_CHUNK_BYTES,  # noqa: F401
    configured_chunk_layers,
    default_chunk_layers,
    dtype_from_name,
    layer_chunks,
)
from pdserve.transfer.peers import NcclPeer, check_peer
from pdserve.transfer.source import KVSource, chunk_plan, source_layout


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
    first_token_id: int  # the prefill's first sampled token, for the decode worker to start with
    chunk_layers: int = 0  # layers per sent chunk (layer_chunks(shape[0], chunk_layers)); 0 = one chunk
    # The handle's one-time credential and its tag under the deployment secret (`transfer.credentials`)
    credential: bytes = field(default=b"", repr=False)
    auth_tag: str = field(default="", repr=False)


# notify(notice) -> waitable whose result() returns once the receiver has the data in place.
NotifyFn = Callable[[NcclTransferNotice], Waitable]


class _Pieces:
    """One send's layer chunks of `source`. A source that can pack any range (a cache) packs
    each into its view of one buffer [L, 2, n, bs, Hkv, D], as the receiver lays them out; a
    bounded one (`max_chunk_layers`: a tensor-parallel worker's gathered pieces) hands out a
    fresh tensor per chunk, and chunk k-2 is dropped when chunk k is made: the sender waits for
    its send first, so at most two are held."""

    def __init__(self, source: KVSource, chunks: list[slice]) -> None:
        self.source = source
        self.chunks = chunks
        self.bounded = bool(source.max_chunk_layers)
        self.buffer = (
            None if self.bounded else torch.empty(source.shape, dtype=source.dtype, device=source.device)
        )
        self.held: list[torch.Tensor | None] = []
        self.pack_s = 0.0

    def pack(self, k: int) -> None:
        tick = time.perf_counter()
        layers = self.chunks[k]
        if self.buffer is not None:
            self.held.append(self.source.layers(layers, out=self.buffer[layers]))
        else:
            if k >= 2:
                self.held[k - 2] = None  # sent: the caller waited for it
            self.held.append(self.source.layers(layers))
        self.pack_s += time.perf_counter() - tick

    def chunk(self, k: int) -> torch.Tensor:
        return self.held[k]


class NcclKVSender:
    """Prefill side. Thread-safe: sends to different destinations run in parallel."""

    def __init__(
        self,
        rank: int,
        model_name: str,
        secret: str | bytes,
        notify: NotifyFn | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        group: dist.ProcessGroup | None = None,
        chunk_layers: int | None = None,
        tp_size: int = 1,
    ) -> None:
        """chunk_layers: layers per pipelined chunk; 0 = never split; None = $PDSERVE_KV_CHUNK_LAYERS
        if set, else `default_chunk_layers` (chunks of >= MIN_CHUNK_BYTES). tp_size: the sending
        worker's tensor-parallel size, for its layout (its `kv_cache` arguments carry every KV
        head: a tensor-parallel worker gathers them first)."""
        self.rank = rank
        self.tp_size = tp_size
        self._secret = secret_bytes(secret)  # signs each notice's credential (never logged)
        if chunk_layers is None:
            chunk_layers = configured_chunk_layers()
        if chunk_layers is not None and chunk_layers < 0:
            raise ValueError(f"chunk_layers must be >= 0 (0 = one chunk), got {chunk_layers}")
        self.chunk_layers = chunk_layers
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
        self._abandoned: dict[int, list[tuple[list[dist.Work | None], _Pieces]]] = {}
        self._streams: dict[torch.device, SideStream] = {}

    def broken_peers(self) -> dict[int, str]:
        """The destination ranks this sender refuses now, each with why (`EVERY_PEER`: all)."""
        return dict(self._broken)

    def refusal(self, dst: int) -> str | None:
        """Why sends to `dst` are refused (an earlier failure broke the pair), or None."""
        why = self._broken.get(EVERY_PEER) or self._broken.get(dst)
        return None if why is None else f"rank {dst} is unusable after an earlier failure: {why}"

    def break_pair(self, dst: int, why: str) -> None:
        """Refuse further sends to `dst` (`EVERY_PEER`: to every rank), keeping the first reason."""
        self._broken.setdefault(dst, why)

    def lock_for(self, dst: int) -> threading.Lock:
        """Held around one transfer to `dst`: a pair has one transfer in flight at a time."""
        with self._locks_guard:
            return self._locks.setdefault(dst, threading.Lock())

    def _stream_for(self, device: torch.device) -> SideStream:
        with self._locks_guard:
            if device not in self._streams:
                self._streams[device] = SideStream(device)
            return self._streams[device]

    def send(
        self, handle: KVHandle, source: KVSource, first_token_id: int, notify: NotifyFn | None = None
    ) -> TransferStats:
        """Send `source`'s KV (e.g. `CacheBlocks(kv_cache, src_block_ids)`) to `handle.peer`, an
        NcclPeer, in layer chunks."""
        notify = notify or self.notify
        if notify is None:
            raise ValueError("NcclKVSender.send needs a notify callable (constructor or argument)")
        dst = check_peer(handle, NcclPeer).rank
        if not handle.credential:
            raise ValueError(f"request {handle.req_id}: the handle carries no transfer credential")
        if dst == self.rank:
            raise ValueError(f"request {handle.req_id}: cannot send to own rank {dst}")
        layout = source_layout(source, self.model_name, self.tp_size)
        check_send_args(handle, range(source.shape[2]), layout, first_token_id)

        with self.lock_for(dst), self._stream_for(source.device).active():
            if (refusal := self.refusal(dst)) is not None:
                raise KVTransferError(refusal)
            start = time.perf_counter()
            nbytes = math.prod(source.shape) * source.dtype.itemsize
            chunk_layers = self.chunk_layers
            if chunk_layers is None:
                chunk_layers = default_chunk_layers(source.shape[0], nbytes // source.shape[0])
            chunks = chunk_plan(source, chunk_layers)
            pieces = _Pieces(source, chunks)
            # Chunk 0 is packed before the notice: bad block ids raise here, with nothing sent.
            pieces.pack(0)
            notice = self._notice(handle, layout, nbytes, first_token_id, chunks)
            try:
                waitable = notify(notice)
            except Exception as exc:  # nothing was sent: the pair is still in step
                raise KVTransferError(f"request {handle.req_id}: notifying rank {dst} failed: {exc}") from exc
            works: list[dist.Work | None] = []
            try:
                confirmed = self._post_chunks(handle.req_id, dst, pieces, works)
                self._wait_for_receiver(handle.req_id, dst, waitable, works[confirmed:])
            except Exception as exc:
                if len(works) < len(chunks):  # failed mid-way: the receiver waits for bytes never sent
                    self._broken[dst] = f"request {handle.req_id}: sending chunk {len(works)} failed: {exc}"
                if dst in self._broken:
                    self._abandoned.setdefault(dst, []).append((works, pieces))
                if isinstance(exc, KVTransferError | KVLayoutMismatch):
                    raise
                raise KVTransferError(f"request {handle.req_id}: send to rank {dst} failed: {exc}") from exc
            done = time.perf_counter()
        return TransferStats(
            nbytes=nbytes,
            pack_ms=pieces.pack_s * 1e3,
            send_ms=(done - start - pieces.pack_s) * 1e3,
            extra={"chunks": float(len(chunks))},
        )

    def _post_chunks(self, req_id: str, dst: int, pieces: _Pieces, works: list[dist.Work | None]) -> int:
        """isend every chunk (appending to `works`), packing each while the one before is on the
        wire; with a bounded source chunk k-2's send must complete before chunk k is made (two
        held at most). Returns how many of `works` were waited for already (gloo hands each
        completion to one wait only: a second wait on it would run out its timeout)."""
        confirmed = 0
        for k in range(len(pieces.chunks)):
            if k >= 2 and pieces.bounded:
                if not self._wait_works(req_id, [works[k - 2]]):
                    raise KVTransferError(f"request {req_id}: the send of chunk {k - 2} did not complete")
                works[k - 2] = None  # completed; a Work keeps its tensor alive: drop both
                confirmed = k - 1
            if k:  # overlaps the send of chunk k-1 (on CUDA: queued behind it on the side stream)
                pieces.pack(k)
            works.append(dist.isend(pieces.chunk(k), dst=dst, group=self.group))
        return confirmed

    def _notice(
        self, handle: KVHandle, layout: KVLayout, nbytes: int, first_token_id: int, chunks: list[slice]
    ) -> NcclTransferNotice:
        """What the receiver needs to post its receives: buffer [L, 2, n, bs, Hkv, D] in `chunks`."""
        return NcclTransferNotice(
            req_id=handle.req_id,
            src_rank=self.rank,
            block_ids=tuple(handle.block_ids),
            shape=layout.buffer_shape(len(handle.block_ids)),
            dtype=layout.dtype,
            layout=layout,
            nbytes=nbytes,
            first_token_id=int(first_token_id),
            chunk_layers=chunks[0].stop if len(chunks) > 1 else 0,
            credential=handle.credential,
            auth_tag=auth_tag(self._secret, handle.req_id, handle.credential),
        )

    def _wait_for_receiver(self, req_id: str, dst: int, waitable: Waitable, works: list[dist.Work]) -> None:
        try:
            waitable.result(timeout=self.timeout_s)
        except KVLayoutMismatch:
            # The receiver drained the bytes before refusing, so this completes.
            if not self._wait_works(req_id, works):
                self._broken[dst] = f"request {req_id}: send did not complete after a refusal"
            raise
        except TimeoutError as exc:
            self._broken[dst] = (
                f"request {req_id} got no confirmation within {self.timeout_s:g} s: KV transfer timed out "
                "(transfer.timeout_s)"
            )
            raise KVTransferError(f"request {req_id}: {self._broken[dst]} from rank {dst}") from exc
        except Exception as exc:
            # The receiver refused after draining (its recv matched our send), or died; find out which.
            if not self._wait_works(req_id, works):
                self._broken[dst] = f"request {req_id}: receiver failed without draining ({exc})"
            raise KVTransferError(f"request {req_id}: rank {dst} failed to receive: {exc}") from exc
        if not self._wait_works(req_id, works):
            self._broken[dst] = f"request {req_id}: send did not complete"
            raise KVTransferError(f"request {req_id}: send to rank {dst} did not complete")

    def _wait_works(self, req_id: str, works: list[dist.Work]) -> bool:
        """Whether every send completed; one whose wait ran out its timeout breaks every pair."""
        for work in works:
            why, ran_out = wait_for_work(work, self.timeout_s)
            if why is not None:
                if ran_out:
                    self._broken.setdefault(EVERY_PEER, f"request {req_id}: waiting for a send: {why}")
                return False
        return True

    def close(self) -> None:
        """Nothing to release: the process group belongs to the wiring layer."""


class NcclKVReceiver:
    """Decode side. `recv(notice)` runs on a receive thread (e.g. a Ray actor's concurrency group)
    and hands each layer chunk to `sink.on_kv_chunk` as it lands, in layer order."""

    def __init__(
        self,
        sink: KVSink,
        expected_layout: KVLayout,
        device: str | torch.device,
        gate: KVGate,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        group: dist.ProcessGroup | None = None,
        max_nbytes: int = 8 << 30,
    ) -> None:
        self.sink = sink
        self.expected_layout = expected_layout
        self.gate = gate  # the decode worker's open reservations: a notice must present one
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.group = group
        self.max_nbytes = max_nbytes  # refuse to allocate absurd buffers from a corrupt notice
        # One receive at a time per source (the pair's transfers are matched in order). On CUDA
        # one at a time in all: NCCL communicators are not safe to drive from several threads.
        self._one_lock = threading.Lock() if self.device.type == "cuda" else None
        self._source_locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._stream = SideStream(self.device)
        # Sources whose receive timed out: that irecv may still match their next send, so any
        # further request is refused (see "Failure"). Keep the pending Work and buffer alive.
        self._broken_sources: dict[int, tuple[list[dist.Work], torch.Tensor]] = {}
        self._broken_reasons: dict[int, str] = {}  # source rank -> its failed receive

    def broken_peers(self) -> dict[int, str]:
        """The source ranks this receiver refuses now, each with why (`EVERY_PEER`: all)."""
        return dict(self._broken_reasons)

    def lock_for(self, src: int) -> threading.Lock:
        """Held around one transfer from `src` (on CUDA: around every transfer)."""
        if self._one_lock is not None:
            return self._one_lock
        with self._locks_guard:
            return self._source_locks.setdefault(src, threading.Lock())

    def recv(self, notice: NcclTransferNotice) -> None:
        """Receive one request's buffer from `notice.src_rank` (in layer chunks when the notice says
        so), handing each chunk to the sink with a `KVArrival` (first token from the notice, the
        reserved block ids, `started_at` = when this transfer's turn came, after any earlier one).

        The notice must present its reservation's credential (`KVGate.claim`) and match it exactly
        (block ids, bytes). Returns once the data is in place (CUDA work synchronized). Raises
        `KVLayoutMismatch`, `KVAuthError` or `KVTransferError` (or what the sink raised); in every
        case the bytes were drained when the notice allowed it (the pair stays in step).
        """
        with self.lock_for(notice.src_rank), self._stream.active():
            started_at = time.perf_counter()  # kv_transfer_ms measures this transfer, not the queue
            self.check_usable(notice.req_id, notice.src_rank)
            reservation, problem = self.admit(notice)
            problem = problem or self._validate(notice, reservation)
            if problem is not None and not self._drainable(notice):
                raise KVTransferError(f"request {notice.req_id}: {problem}; could not drain the send")
            dtype = dtype_from_name(notice.dtype)
            buffer = torch.empty(notice.shape, dtype=dtype, device=self.device)  # [L, 2, n, bs, Hkv, D]
            arrival = None
            if problem is None:
                arrival = KVArrival(notice.req_id, reservation.block_ids, notice.first_token_id, started_at)
            failure = self._receive_chunks(notice, buffer, arrival)
            if problem is not None:
                raise problem
            if failure is not None:
                raise failure
            self._stream.synchronize()  # the data is in place before we report completion

    def check_usable(self, req_id: str, src: int) -> None:
        """KVTransferError when an earlier failure broke the pair with `src` (or every pair)."""
        why = self._broken_reasons.get(EVERY_PEER) or self._broken_reasons.get(src)
        if why is not None:
            raise KVTransferError(f"request {req_id}: rank {src} is unusable after an earlier failure: {why}")

    def break_source(self, src: int, why: str, ran_out: bool = False) -> None:
        """Refuse further transfers from `src` (and from every rank when a wait ran out its timeout)."""
        self._broken_reasons.setdefault(src, why)
        if ran_out:
            self._broken_reasons.setdefault(EVERY_PEER, why)

    def admit(self, notice) -> tuple[Reservation | None, Exception | None]:
        """(the reservation the notice's credential opens, consumed; or None and why not)."""
        try:
            return self.gate.claim(notice.req_id, bytes(notice.credential), notice.auth_tag), None
        except (KVTransferError, TypeError) as exc:
            return None, exc

    def _receive_chunks(
        self, notice: NcclTransferNotice, buffer: torch.Tensor, arrival: KVArrival | None
    ) -> Exception | None:
        """Receive every chunk into `buffer` [L, 2, n, bs, Hkv, D], handing each to the sink unless
        `arrival` is None (refused: drain only) or the sink already failed; returns its failure."""
        chunks = layer_chunks(notice.shape[0], notice.chunk_layers)
        # Post every chunk's receive up front, in the sender's order, into views of one buffer.
        works = [dist.irecv(buffer[layers], src=notice.src_rank, group=self.group) for layers in chunks]
        failure: Exception | None = None
        for layers, work in zip(chunks, works, strict=True):
            reason, ran_out = wait_for_work(work, self.timeout_s)
            if reason is not None:
                self._broken_sources[notice.src_rank] = (works, buffer)
                failure_text = (
                    f"request {notice.req_id}: recv from rank {notice.src_rank} "
                    f"(layers {layers.start}..{layers.stop - 1}): {reason}"
                )
                self._broken_reasons.setdefault(notice.src_rank, failure_text)
                if ran_out:  # every pair of this rank is gone (see "Failure")
                    self._broken_reasons.setdefault(EVERY_PEER, failure_text)
                raise KVTransferError(failure_text)
            if arrival is not None and failure is None:
                try:  # the sink unpacks this chunk while the next one is in flight
                    self.sink.on_kv_chunk(arrival, layers, buffer[layers])
                except Exception as exc:
                    failure = exc  # keep draining the remaining chunks so the pair stays in step
        return failure

    def _validate(self, notice: NcclTransferNotice, reservation: Reservation | None) -> Exception | None:
        if reservation is None:
            return None  # refused already
        try:
            notice.layout.check_compatible(self.expected_layout, "prefill", "decode")
        except KVLayoutMismatch as exc:
            return exc
        if not isinstance(notice.chunk_layers, int) or notice.chunk_layers < 0:
            return KVTransferError(f"request {notice.req_id}: bad chunk_layers {notice.chunk_layers!r}")
        token = notice.first_token_id
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token <= MAX_TOKEN_ID:
            return KVTransferError(f"request {notice.req_id}: bad first_token_id {token!r}")
        expected_shape = self.expected_layout.buffer_shape(len(notice.block_ids))
        if tuple(notice.shape) != expected_shape:
            return KVTransferError(
                f"request {notice.req_id}: buffer shape {tuple(notice.shape)} != expected {expected_shape}"
            )
        if tuple(notice.block_ids) != reservation.block_ids or notice.nbytes != reservation.nbytes:
            return KVTransferError(
                f"request {notice.req_id}: the notice names {len(notice.block_ids)} blocks / "
                f"{notice.nbytes} bytes, not the {len(reservation.block_ids)} blocks / "
                f"{reservation.nbytes} bytes reserved"
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
        if not isinstance(notice.chunk_layers, int) or notice.chunk_layers < 0 or len(notice.shape) < 1:
            return False
        return 0 < numel * dtype.itemsize == notice.nbytes <= self.max_nbytes
