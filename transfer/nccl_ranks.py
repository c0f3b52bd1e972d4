"""The rank-side work of a rank-to-rank KV transfer (nccl backend, tensor-parallel workers).

Every rank of every worker is a member of the transfer group, at global rank
`worker's first rank + its rank`. A request's KV moves from each prefill rank straight to each
decode rank that needs heads it holds (`engine.kv_heads.head_pairs`): a `SendHeads` on the
sending rank packs the route's heads of the blocks from its own cache, layer chunk by layer
chunk, and isends them; a `RecvHeads` on the receiving rank posts the matching irecvs and
writes each chunk into its own cache (or drops it: `write=False`, a refused request drained so
the pair stays in step). These are `engine.rank_tasks.RankTask`s: rank 0 runs its own on its
transfer thread, a child rank on a thread of the child beside its steps
(`TensorParallelRanks.submit`), and each reports a `RankOutcome`; the worker's rank 0 keeps the
control plane (transfer/nccl_direct.py).

A wait that fails keeps its pending operations and buffers alive in this process (a dropped
gloo operation is cancelled, an NCCL one would free its buffer under the kernel), and the
outcome says whether it ran out its timeout (then gloo has closed every pair of this rank:
"Failure" in transfer/nccl_backend.py). On CUDA a process receives one transfer at a time (NCCL
communicators are not safe to drive from several threads), as `NcclKVReceiver` does.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pdserve.engine.kv_heads import pack_heads, unpack_heads
from pdserve.engine.rank_tasks import RankContext
from pdserve.transfer.nccl_group import SideStream, init_transfer_group, wait_for_work
from pdserve.transfer.packing import dtype_from_name, layer_chunks

_abandoned: list[list] = []  # this process's failed transfers' pending work and buffers, kept alive
_cuda_receive_turn = threading.Lock()


@dataclass(frozen=True)
class HeadRoute:
    """One rank's share of a transfer with one peer rank: heads [head_offset, head_offset + count)
    of this rank's cache (local indices), to or from global rank `peer`."""

    peer: int
    head_offset: int
    count: int


@dataclass(frozen=True)
class RankOutcome:
    """How one rank's part of a transfer went: bytes moved, or why not (`ran_out`: a wait used up
    its whole timeout, so every pair of that rank is gone; `in_step`: every byte was drained,
    only writing them failed, so the pairs are still in step and only the request fails)."""

    nbytes: int = 0
    failure: str | None = None
    ran_out: bool = False
    in_step: bool = False


@dataclass(frozen=True)
class JoinTransferGroup:
    """A rank joins the transfer group at global rank `rank` (every member joins at once)."""

    rank: int
    world_size: int
    init_method: str

    def run(self, context: RankContext) -> int:
        init_transfer_group(self.rank, self.world_size, self.init_method, context.device)
        return self.rank


@dataclass(frozen=True)
class SendHeads:
    """Send each route's heads of `block_ids` (this rank's cache), in layer chunks of
    `chunk_layers` (0: one), waiting at most `timeout_s` in all."""

    req_id: str
    block_ids: tuple[int, ...]
    routes: tuple[HeadRoute, ...]
    chunk_layers: int
    timeout_s: float

    def run(self, context: RankContext) -> RankOutcome:
        cache = context.kv_cache
        stream = SideStream(context.device)
        posted, nbytes = [], 0
        with stream.active():
            try:
                for route in self.routes:
                    for layers in layer_chunks(cache.shape[0], self.chunk_layers):
                        buffer = pack_heads(cache, self.block_ids, layers, route.head_offset, route.count)
                        posted.append((route, layers, buffer, dist.isend(buffer, dst=route.peer)))
                        nbytes += buffer.numel() * buffer.element_size()
            except Exception as exc:  # noqa: BLE001 - what was posted stays alive; the pair breaks
                _abandoned.append(posted)
                why = f"{type(exc).__name__}: {exc}"
                return RankOutcome(
                    failure=f"request {self.req_id}: rank {context.rank} failed to send its heads: {why}"
                )
            failure = _wait_all(self.req_id, "send to", posted, self.timeout_s, None)
        return failure or RankOutcome(nbytes)


@dataclass(frozen=True)
class RecvHeads:
    """Receive each route's heads of `num_blocks` blocks, chunk by chunk as `SendHeads` sends
    them (buffers of the sender's `dtype`, `block_size` and `head_dim`), and write them into
    `block_ids` of this rank's cache (`write`; else drop them), waiting at most `timeout_s`."""

    req_id: str
    block_ids: tuple[int, ...]
    routes: tuple[HeadRoute, ...]
    chunk_layers: int
    timeout_s: float
    num_layers: int
    block_size: int
    head_dim: int
    dtype: str
    write: bool

    def run(self, context: RankContext) -> RankOutcome:
        cache = context.kv_cache
        dtype = dtype_from_name(self.dtype)
        stream = SideStream(context.device)
        turn = _cuda_receive_turn if context.device.type == "cuda" else contextlib.nullcontext()
        with turn, stream.active():
            posted = []
            for route in self.routes:
                for layers in layer_chunks(self.num_layers, self.chunk_layers):
                    shape = (layers.stop - layers.start, 2, len(self.block_ids), self.block_size, route.count)
                    buffer = torch.empty((*shape, self.head_dim), dtype=dtype, device=cache.device)
                    posted.append((route, layers, buffer, dist.irecv(buffer, src=route.peer)))
            write = self._write if self.write else None
            failure = _wait_all(self.req_id, "receive from", posted, self.timeout_s, write, cache)
            stream.synchronize()  # the heads are in place before this rank reports
        nbytes = sum(buffer.numel() * buffer.element_size() for _, _, buffer, _ in posted)
        return failure or RankOutcome(nbytes)

    def _write(self, cache: torch.Tensor, route: HeadRoute, layers: slice, buffer: torch.Tensor) -> None:
        unpack_heads(cache, buffer, self.block_ids, layers, route.head_offset)


def _wait_all(
    req_id: str, what: str, posted: list, timeout_s: float, write, cache=None
) -> RankOutcome | None:
    """Wait for each posted operation in order (at most `timeout_s` in all), handing each landed
    chunk to `write` when given; a failed wait keeps every operation alive and is returned; a
    failed write stops the writes, not the waits (the pairs stay in step)."""
    deadline = time.monotonic() + timeout_s
    write_failure = None
    for route, layers, buffer, work in posted:
        why, ran_out = wait_for_work(work, max(0.01, deadline - time.monotonic()))
        where = f"layers {layers.start}..{layers.stop - 1}"
        if why is not None:
            _abandoned.append(posted)
            failure = f"request {req_id}: {what} rank {route.peer} ({where}): {why}"
            return RankOutcome(failure=failure, ran_out=ran_out)
        if write is not None and write_failure is None:
            try:
                write(cache, route, layers, buffer)
            except Exception as exc:  # noqa: BLE001 - reported in the outcome
                write_failure = f"request {req_id}: writing rank {route.peer}'s heads ({where}): {exc!r}"
    return None if write_failure is None else RankOutcome(failure=write_failure, in_step=True)
