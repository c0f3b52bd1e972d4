"""Rank-to-rank KV transfers between tensor-parallel workers over the nccl backend.

When either worker of a pair has more than one rank, nothing is staged through rank 0: each
prefill rank sends each decode rank exactly the heads of its range that it is the source of
(`engine.kv_heads.head_pairs`), from its cache straight into the other's (transfer/nccl_ranks.py
runs on each rank). A worker of one rank takes part the same way (its rank 0 is all of it). Both
workers' rank 0 keep the control plane, as in `transfer.nccl_backend`:

    prefill rank 0 (DirectSender.send)            decode rank 0 (DirectReceiver.recv)
    lock[dst]; refusal check                      lock[src]; refusal check
    notify(NcclDirectNotice) ------------------>  claim the credential, validate, begin the write
    SendHeads on every source rank                RecvHeads on every rank (children beside their
      (children beside their steps)                 steps), each writing its heads into the
    wait for each rank's outcome                    reserved blocks; wait for each rank's outcome
    waitable.result(timeout) <------------------  end the write: landed, or failed / dropped

`NcclPeer(rank, tp_size)` names the decode worker's first global rank and its ranks; the notice
names the sender's (`src_rank`, `src_size`): global rank = first rank + rank. The sender's lock
per destination worker and the receiver's per source worker keep one transfer in flight on every
pair of their ranks. A refused request is drained (`RecvHeads(write=False)`) so the pairs stay in
step. A rank's failed or timed-out wait fails the request (`KVTransferError`) and breaks the pair
of workers (their first ranks, which the router knows) as `broken_peers` reports it; a child
rank that does not answer within `timeout_s` plus a grace breaks it too. Every wait is bounded.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.engine.core.outputs import EVERY_PEER
from pdserve.engine.kv_heads import check_block_ids, head_pairs
from pdserve.engine.model.sharding import kv_head_range
from pdserve.engine.rank_tasks import RankTask, RankTasks
from pdserve.transfer.connector import Waitable
from pdserve.transfer.contract import KVArrival, KVHandle, KVTransferError, TransferStats, check_send_args
from pdserve.transfer.credentials import auth_tag
from pdserve.transfer.layout import KVLayout, KVLayoutMismatch, check_tp_pair
from pdserve.transfer.nccl_backend import NcclKVReceiver, NcclKVSender
from pdserve.transfer.nccl_ranks import HeadRoute, RankOutcome, RecvHeads, SendHeads
from pdserve.transfer.packing import default_chunk_layers
from pdserve.transfer.peers import NcclPeer, check_peer

REPLY_GRACE_S = 10.0  # beyond transfer.timeout_s, for a child rank's outcome to reach rank 0


@dataclass(frozen=True)
class NcclDirectNotice:
    """What prefill rank 0 tells decode rank 0 before a rank-to-rank transfer. Plain data."""

    req_id: str
    src_rank: int  # the sending worker's first global rank ...
    src_size: int  # ... and its ranks: global ranks src_rank .. src_rank + src_size - 1
    block_ids: tuple[int, ...]  # decode-side blocks to fill, in order
    layout: KVLayout  # the sender's (whole heads)
    nbytes: int  # the whole heads' bytes, as the reservation counts them
    first_token_id: int
    chunk_layers: int  # layers per sent chunk on every route (layer_chunks); 0 = one chunk
    credential: bytes = field(default=b"", repr=False)
    auth_tag: str = field(default="", repr=False)


class KVDirectSink(Protocol):
    """A decode worker taking KV written straight into its ranks' caches."""

    def begin_kv_write(self, arrival: KVArrival) -> tuple[int, ...] | None:
        """The reserved blocks the ranks may write now (reads of them wait for `end_kv_write`);
        None: drop the bytes (the request went meanwhile). Raises to refuse the KV."""
        ...

    def end_kv_write(self, arrival: KVArrival, landed: bool) -> None:
        """The ranks stopped writing; `landed`: every head of every layer is in place."""
        ...


def routes_for(pairs: list, rank: int, size: int, num_kv_heads: int, sending: bool, peer_first: int) -> tuple:
    """Rank `rank`'s `HeadRoute`s (of a worker of `size` ranks) among `pairs`: the heads it sends
    (`sending`) or receives, at its local head offsets, with the peer's global rank."""
    local_start = kv_head_range(num_kv_heads, rank, size)[0]
    routes = []
    for pair in pairs:
        mine, theirs = (pair.src, pair.dst) if sending else (pair.dst, pair.src)
        if mine == rank:
            routes.append(HeadRoute(peer_first + theirs, pair.head_start - local_start, pair.count))
    return tuple(routes)


def run_on_ranks(
    req_id: str, ranks: RankTasks, tasks: dict[int, RankTask], timeout_s: float
) -> dict[int, RankOutcome]:
    """Each rank's task (children first, on their own threads; rank 0's on this thread), and
    each rank's outcome: a child that raised, exited or did not answer in time fails."""
    futures: dict[int, Future] = {r: ranks.submit(r, task) for r, task in tasks.items() if r}
    outcomes = {}
    if 0 in tasks:
        try:
            outcomes[0] = ranks.run_here(tasks[0])
        except Exception as exc:  # noqa: BLE001 - the children's outcomes are still waited for
            outcomes[0] = RankOutcome(failure=f"request {req_id}: rank 0: {type(exc).__name__}: {exc}")
    deadline = time.monotonic() + timeout_s + REPLY_GRACE_S
    for rank, future in futures.items():
        try:
            outcomes[rank] = future.result(max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            why = f"request {req_id}: tensor-parallel rank {rank} did not answer within {timeout_s:g} s"
            outcomes[rank] = RankOutcome(failure=why, ran_out=True)
        except Exception as exc:  # noqa: BLE001 - the child raised or exited (the error names it)
            outcomes[rank] = RankOutcome(failure=f"request {req_id}: {exc}")
    return outcomes


def add_rank_bytes(totals: dict[int, int], outcomes: dict[int, RankOutcome]) -> None:
    """Count each rank's moved bytes into `totals` (rank -> bytes, a metric)."""
    for rank, outcome in outcomes.items():
        totals[rank] = totals.get(rank, 0) + outcome.nbytes


def first_failure(outcomes: dict[int, RankOutcome]) -> RankOutcome | None:
    return next((o for _, o in sorted(outcomes.items()) if o.failure is not None), None)


class DirectSender:
    """A prefill worker's rank-to-rank sends: `sender` keeps the pairs' locks and broken list."""

    def __init__(self, sender: NcclKVSender, ranks: RankTasks, secret: bytes) -> None:
        self.sender = sender
        self.ranks = ranks
        self._secret = secret
        self.rank_bytes: dict[int, int] = {}  # this worker's rank -> KV bytes it sent rank to rank

    def send(
        self, handle: KVHandle, block_ids: list[int], layout: KVLayout, first_token_id: int, notify
    ) -> TransferStats:
        peer = check_peer(handle, NcclPeer)
        check_send_args(handle, range(len(block_ids)), layout, first_token_id)
        check_block_ids(self.ranks.here.kv_cache.shape[2], block_ids)
        check_tp_pair(layout.num_kv_heads, self.ranks.size, peer.tp_size)
        nbytes = layout.buffer_bytes(len(block_ids))
        chunk_layers = self.sender.chunk_layers
        if chunk_layers is None:
            chunk_layers = default_chunk_layers(layout.num_layers, nbytes // layout.num_layers)
        pairs = head_pairs(layout.num_kv_heads, self.ranks.size, peer.tp_size)
        tasks = {}
        for rank in range(self.ranks.size):
            routes = routes_for(pairs, rank, self.ranks.size, layout.num_kv_heads, True, peer.rank)
            if routes:
                tasks[rank] = SendHeads(
                    handle.req_id, tuple(block_ids), routes, chunk_layers, self.sender.timeout_s
                )
        with self.sender.lock_for(peer.rank):
            if (refusal := self.sender.refusal(peer.rank)) is not None:
                raise KVTransferError(refusal)
            start = time.perf_counter()
            notice = NcclDirectNotice(
                handle.req_id,
                self.sender.rank,
                self.ranks.size,
                tuple(handle.block_ids),
                layout,
                nbytes,
                int(first_token_id),
                chunk_layers,
                handle.credential,
                auth_tag(self._secret, handle.req_id, handle.credential),
            )
            try:
                waitable = notify(notice)
            except Exception as exc:  # nothing was sent: the pairs are still in step
                raise KVTransferError(
                    f"request {handle.req_id}: notifying rank {peer.rank} failed: {exc}"
                ) from exc
            outcomes = run_on_ranks(handle.req_id, self.ranks, tasks, self.sender.timeout_s)
            self._finish(handle.req_id, peer.rank, outcomes, waitable)
        add_rank_bytes(self.rank_bytes, outcomes)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        return TransferStats(
            nbytes=nbytes, pack_ms=0.0, send_ms=elapsed_ms, extra={"ranks": float(len(tasks))}
        )

    def _finish(self, req_id: str, dst: int, outcomes: dict[int, RankOutcome], waitable: Waitable) -> None:
        """The receiver's answer. A rank whose send failed breaks the pair (the receiver may wait
        for bytes never sent) and fails the request at once: the receiver's own wait ends within
        its timeout, and its blocks are freed only then (`KVDirectSink`)."""
        failed = first_failure(outcomes)
        if failed is not None:
            self.sender.break_pair(EVERY_PEER if failed.ran_out else dst, failed.failure)
            raise KVTransferError(failed.failure)
        try:
            waitable.result(timeout=self.sender.timeout_s)
        except KVLayoutMismatch:
            raise
        except TimeoutError as exc:
            self.sender.break_pair(
                dst, f"request {req_id}: no confirmation within {self.sender.timeout_s:g} s"
            )
            raise KVTransferError(
                f"request {req_id}: rank {dst} did not confirm: KV transfer timed out"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - our sends completed: the receiver drained them
            raise KVTransferError(f"request {req_id}: rank {dst} failed to receive: {exc}") from exc


class DirectReceiver:
    """A decode worker's rank-to-rank receives: `receiver` keeps the gate, locks, broken list."""

    def __init__(self, receiver: NcclKVReceiver, ranks: RankTasks, sink: KVDirectSink) -> None:
        self.receiver = receiver
        self.ranks = ranks
        self.sink = sink
        self.rank_bytes: dict[int, int] = {}  # this worker's rank -> KV bytes it received rank to rank

    def recv(self, notice: NcclDirectNotice) -> None:
        """Returns once every rank has its heads in place and the sink landed them, or raises."""
        with self.receiver.lock_for(notice.src_rank):
            started_at = time.perf_counter()
            self.receiver.check_usable(notice.req_id, notice.src_rank)
            reservation, problem = self.receiver.admit(notice)
            problem = problem or self._validate(notice, reservation)
            drain = self._drain_check(notice)
            if drain is not None:  # nothing received: the sender's sends fail, breaking the pairs
                raise KVTransferError(
                    f"request {notice.req_id}: {problem or 'refused'}; cannot drain: {drain}"
                )
            arrival = (
                None
                if problem
                else KVArrival(notice.req_id, reservation.block_ids, notice.first_token_id, started_at)
            )
            write_ids = None
            if arrival is not None:
                try:
                    write_ids = self.sink.begin_kv_write(arrival)
                except Exception as exc:  # noqa: BLE001 - refused: drain, then raise it
                    problem, arrival = exc, None
            landed = False
            try:
                outcomes = run_on_ranks(
                    notice.req_id, self.ranks, self._tasks(notice, write_ids), self.receiver.timeout_s
                )
                failed = first_failure(outcomes)
                landed = failed is None and write_ids is not None
            finally:
                if arrival is not None:
                    self.sink.end_kv_write(arrival, landed)
        add_rank_bytes(self.rank_bytes, outcomes)
        if failed is not None:
            if not failed.in_step:  # a send may still be pending on the pair: refuse it from now on
                self.receiver.break_source(notice.src_rank, failed.failure, failed.ran_out)
            raise KVTransferError(failed.failure)
        if problem is not None:
            raise problem

    def _tasks(self, notice: NcclDirectNotice, write_ids: tuple[int, ...] | None) -> dict[int, RankTask]:
        layout, size = notice.layout, self.ranks.size
        pairs = head_pairs(layout.num_kv_heads, notice.src_size, size)
        tasks = {}
        for rank in range(size):
            routes = routes_for(pairs, rank, size, layout.num_kv_heads, False, notice.src_rank)
            tasks[rank] = RecvHeads(
                notice.req_id,
                tuple(write_ids or notice.block_ids),
                routes,
                notice.chunk_layers,
                self.receiver.timeout_s,
                layout.num_layers,
                layout.block_size,
                layout.head_dim,
                layout.dtype,
                write_ids is not None,
            )
        return tasks

    def _validate(self, notice: NcclDirectNotice, reservation) -> Exception | None:
        if reservation is None:
            return None  # refused already
        try:
            notice.layout.check_compatible(self.receiver.expected_layout, "prefill", "decode")
        except KVLayoutMismatch as exc:
            return exc
        if tuple(notice.block_ids) != reservation.block_ids or notice.nbytes != reservation.nbytes:
            return KVTransferError(
                f"request {notice.req_id}: the notice names {len(notice.block_ids)} blocks / {notice.nbytes} "
                f"bytes, not the {len(reservation.block_ids)} blocks / {reservation.nbytes} bytes reserved"
            )
        token = notice.first_token_id
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            return KVTransferError(f"request {notice.req_id}: bad first_token_id {token!r}")
        return None

    def _drain_check(self, notice: NcclDirectNotice) -> str | None:
        """Why the sender's bytes could not be drained (then the pair cannot stay in step), or None."""
        layout = notice.layout
        try:
            check_tp_pair(layout.num_kv_heads, notice.src_size, self.ranks.size)
        except (ValueError, AttributeError, TypeError) as exc:
            return str(exc)
        if not isinstance(notice.chunk_layers, int) or notice.chunk_layers < 0 or not notice.block_ids:
            return f"bad chunk_layers {notice.chunk_layers!r} or no blocks"
        if layout.buffer_bytes(len(notice.block_ids)) > self.receiver.max_nbytes:
            return f"{layout.buffer_bytes(len(notice.block_ids))} bytes is more than a transfer may carry"
        return None
