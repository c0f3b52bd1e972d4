"""The decode worker: the engine in its decode role, plus the KV connector's receive side.

A disaggregated request takes two calls here, in order:
1. `reserve()` (router): blocks for the prompt and first token, reusing cached prefix
   blocks; the request waits in the scheduler (WAITING_FOR_REMOTE_KVS) and the answer is
   a KVHandle naming only the blocks to fill, this worker's peer descriptor and a one-time
   credential the receive side issued for exactly those blocks (`transfer.credentials`).
2. the KV lands, with the prefill's first token (`on_kv_chunk`, called by the receive
   side, in layer chunks, once it admitted the sender's credential): it is scattered into
   the blocks reserved in step 1 (never others), and after the last layer the request
   joins the running batch. Nobody else has to say "start". The KV carries every KV head;
   a tensor-parallel worker's ranks each write their heads (engine/kv_heads.py). Over nccl
   with TP > 1 on either side, the ranks receive their heads rank to rank and write them
   themselves, between `begin_kv_write` and `end_kv_write` (transfer/nccl_direct.py).

The lease: a reservation whose KV has not begun to arrive `transfer.timeout_s` after
`reserve`, or has not landed `transfer.timeout_s` after it began, is dropped by a
watchdog thread: its credential is revoked, its blocks freed, and the request ends with
an error naming the timeout (the router answers ABORTED).
`add_local()` prefills a request here instead (conditional disaggregation, co-located mode).

Aborts never free blocks that a transfer may be writing: the scatter happens under the
worker's lock after checking that the request still waits for its KV, and `abort` takes
the same lock around the engine's abort.

Plain class: `deploy.actors.WorkerActor` hosts it in a Ray actor and only forwards calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.core.outputs import RequestOutput, StepBatch
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.engine.engine_loop import LoopWorker
from pdserve.engine.llm_engine import LLMEngine
from pdserve.transfer.connector import KVConnector, KVReceiveSide
from pdserve.transfer.contract import KVArrival, KVHandle
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.packing import unpack_blocks

log = logging.getLogger(__name__)

MAX_DROPPED = 10_000  # ids of requests aborted while their KV was in flight, remembered


class DecodeWorker(LoopWorker):
    def __init__(
        self,
        worker_id: str,
        engine_config: EngineConfig,
        role: str = "decode",
        connector: KVConnector | None = None,
        decode_index: int = 0,
    ) -> None:
        super().__init__(worker_id, LLMEngine(engine_config, role=role))
        self.role = role
        # What a transfer carries: every KV head (rank 0's cache holds a slice of them under TP).
        model = self.engine.model_config
        tp_size = engine_config.tensor_parallel_size
        self.layout = KVLayout.from_cache(
            self.engine.kv_cache, model.name, tp_size, model.num_key_value_heads
        )
        self._dropped: OrderedDict[str, None] = OrderedDict()  # aborted before their KV came
        self._landed: set[str] = set()  # all layers in, not yet started: refuse more bytes
        # Rank-to-rank writes in progress (begin_kv_write .. end_kv_write), and those of them
        # aborted meanwhile: their blocks are freed when the write ends, never under it.
        self._writing: set[str] = set()
        self._abort_after_write: set[str] = set()
        self._lock = threading.Lock()
        self.kv_wait_ms: dict[str, float] = {}  # req_id -> transfer time, until polled
        # req_id -> (its reserved block ids, time.monotonic() of reserve) until it lands or ends
        self._reserved: dict[str, tuple[tuple[int, ...], float]] = {}
        self.receive_side: KVReceiveSide | None = None
        self._stopping = threading.Event()
        if role == "decode" and connector is not None:
            self.lease_s = connector.config.timeout_s  # the transfer lease (`transfer.timeout_s`)
            self.receive_side = connector.receive_side(
                self, self.layout, self.engine.kv_cache.device, decode_index
            )
            threading.Thread(target=self._watch_leases, name=f"kv-lease-{worker_id}", daemon=True).start()
        self.loop.start()

    # -- wiring ---------------------------------------------------------------------
    def join_transfer_group(self, rank: int, world_size: int, init_method: str) -> None:
        """Join the connector's process group (connectors with `uses_process_group`): rank 0 at
        `rank`, rank r of a tensor-parallel worker at `rank + r`."""
        ranks = self.engine.rank_tasks()  # KV lands rank to rank when a pair has tensor parallelism
        self.receive_side.join_group(rank, world_size, init_method, self.engine.kv_cache.device, ranks)

    def kv_peer(self) -> object:
        """This worker's peer descriptor: what a KVHandle carries to the sender."""
        if self.receive_side is None:
            raise RuntimeError(
                f"decode worker {self.worker_id} has no KV receive side (role {self.role!r}, "
                "or built without a connector): it cannot take KV from a prefill worker"
            )
        return self.receive_side.peer()

    # -- router calls -------------------------------------------------------------
    def reserve(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> KVHandle | None:
        """Reserve blocks for a prompt coming from a prefill worker; None if full now."""
        peer = self.kv_peer()  # first: a worker that cannot receive reserves nothing
        reservation = self.loop.call_sync(lambda e: e.reserve_remote(req_id, prompt_token_ids, params))
        if reservation is None:
            return None
        block_ids = tuple(reservation.block_ids)
        with self._lock:
            self._reserved[req_id] = (block_ids, time.monotonic())
            credential = self.receive_side.expect(req_id, block_ids)
        return KVHandle(
            req_id=req_id,
            decode_worker_id=self.worker_id,
            block_ids=list(block_ids),
            num_tokens=len(prompt_token_ids) - reservation.num_cached_tokens,
            layout=self.layout,
            peer=peer,
            credential=credential,
        )

    def add_local(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Prefill and decode here (short prompts, co-located serving)."""
        self.loop.call_sync(lambda e: e.add_request(req_id, prompt_token_ids, params))

    def abort(self, req_id: str) -> bool:
        with self._lock:
            if req_id in self._writing:  # the ranks are writing its blocks: abort when they stop
                self._abort_after_write.add(req_id)
                self._remember_dropped(req_id)
                self._forget_reservation(req_id)
                return True
            # Under the lock: no scatter into this request's blocks is running now, and
            # none will start (on_kv_chunk checks the request's state), so freeing is safe.
            awaiting = self.engine.is_waiting_for_remote_kv(req_id) and req_id not in self._landed
            if awaiting:
                self._remember_dropped(req_id)
            self._landed.discard(req_id)
            self.kv_wait_ms.pop(req_id, None)
            self._forget_reservation(req_id)
            return self.loop.call_sync(lambda e: e.abort_request(req_id))

    def poll(self, timeout_s: float = 0.5) -> StepBatch:
        batch = super().poll(timeout_s)
        # Read after the outputs were taken: a transfer failure that broke a pair is reported
        # no later than the aborts it caused (the router moves those requests first).
        if self.receive_side is not None:
            batch.transfer_rank = self.receive_side.group_rank()
            batch.broken_transfer_peers = self.receive_side.broken_peers()
        with self._lock:
            for out in batch.outputs:
                wait = self.kv_wait_ms.pop(out.req_id, None)
                if wait is not None:
                    batch.kv_wait_ms[out.req_id] = wait
        return batch

    # -- the receive side's calls ---------------------------------------------------
    def on_kv_chunk(self, arrival: KVArrival, layers: slice, chunk: torch.Tensor) -> None:
        """KVSink: layers [layers.start, layers.stop) of a request's blocks, in layer order;
        the request starts decoding from `arrival.first_token_id` after the last layer.

        chunk: [layers.stop - layers.start, 2, len(block_ids), block_size, Hkv, D], any device.
        Raises if the request is unknown, so the sender learns the KV was not taken.
        """
        req_id = arrival.req_id
        kv_cache = self.engine.kv_cache
        with self._lock:
            reserved = self._reserved.get(req_id)
            if reserved is None or not self.engine.is_waiting_for_remote_kv(req_id) or req_id in self._landed:
                if req_id in self._dropped:
                    return  # aborted while in flight: drop the bytes, nothing to free
                raise KeyError(f"decode worker {self.worker_id} has no reservation for {req_id}")
            block_ids = list(reserved[0])  # ours, whatever the sender named
            if tuple(arrival.block_ids) != reserved[0] or chunk.shape[2] != len(block_ids):
                raise ValueError(f"{req_id}: KV for other blocks than the {len(block_ids)} reserved")
            if not 0 <= arrival.first_token_id < self.engine.model_config.vocab_size:
                raise ValueError(f"{req_id}: first token {arrival.first_token_id} is outside the vocabulary")
            if self.engine.tp_ranks is None:
                unpack_blocks(kv_cache, chunk.to(kv_cache.device), block_ids, layers=layers)
            else:  # every rank writes its heads of the whole chunk, between the engine's steps
                if chunk.is_cuda:  # landed on this thread's stream; the loop thread reads it on its own
                    torch.cuda.current_stream(chunk.device).synchronize()
                self.loop.call_sync(lambda e: e.scatter_kv(chunk, block_ids, layers))
            if layers.stop < kv_cache.shape[0]:
                return
            if kv_cache.is_cuda:
                torch.cuda.current_stream(kv_cache.device).synchronize()
            self._landed.add(req_id)
            self._forget_reservation(req_id)
            self.kv_wait_ms[req_id] = (time.perf_counter() - arrival.started_at) * 1e3
        self.loop.call(lambda engine: self._begin(engine, req_id, arrival.first_token_id))

    def begin_kv_write(self, arrival: KVArrival) -> tuple[int, ...] | None:
        """KVDirectSink (transfer/nccl_direct.py): the reserved blocks every rank is about to write
        its heads into, straight from the prefill ranks; no step reads them before `end_kv_write`
        lands them, and an abort meanwhile waits for it. None: aborted already, drop the bytes."""
        req_id = arrival.req_id
        with self._lock:
            reserved = self._reserved.get(req_id)
            if reserved is None or not self.engine.is_waiting_for_remote_kv(req_id) or req_id in self._landed:
                if req_id in self._dropped:
                    return None
                raise KeyError(f"decode worker {self.worker_id} has no reservation for {req_id}")
            if tuple(arrival.block_ids) != reserved[0]:
                raise ValueError(f"{req_id}: KV for other blocks than the {len(reserved[0])} reserved")
            if not 0 <= arrival.first_token_id < self.engine.model_config.vocab_size:
                raise ValueError(f"{req_id}: first token {arrival.first_token_id} is outside the vocabulary")
            self._writing.add(req_id)
            return reserved[0]

    def end_kv_write(self, arrival: KVArrival, landed: bool) -> None:
        """KVDirectSink: the ranks stopped writing; the request starts decoding if every head
        landed, is aborted now if an abort came meanwhile, else waits for `kv_failed`."""
        req_id = arrival.req_id
        with self._lock:
            self._writing.discard(req_id)
            if req_id in self._abort_after_write:
                self._abort_after_write.discard(req_id)
                self.loop.call_sync(lambda e: e.abort_request(req_id))
                return
            if not landed or req_id not in self._reserved:
                return
            self._landed.add(req_id)
            self._forget_reservation(req_id)
            self.kv_wait_ms[req_id] = (time.perf_counter() - arrival.started_at) * 1e3
        self.loop.call(lambda engine: self._begin(engine, req_id, arrival.first_token_id))

    def receive_kv_notice(self, notice: object) -> None:
        """A sender's notice (connectors that notify through the control plane, e.g. nccl);
        returns once the KV is in place."""
        self.receive_side.receive_notice(notice)

    def kv_failed(self, req_id: str, reason: str | None) -> None:
        """The prefill side will not ship this request's KV: drop the reservation. With a
        reason the request failed and ends with an abort; without one it already ended
        at its first token and nobody waits for it here."""
        if reason is None:
            self.abort(req_id)
            return
        log.warning("KV for %s failed: %s", req_id, reason)
        if self.abort(req_id):
            self.loop.publish([RequestOutput(req_id, finished=True, finish_reason="abort", error=reason)])

    def shutdown(self) -> None:
        self._stopping.set()
        if self.receive_side is not None:
            self.receive_side.close()
        super().shutdown()

    # -- the transfer lease (its own thread) --------------------------------------------
    def _remember_dropped(self, req_id: str) -> None:
        """Under self._lock: bytes still coming for `req_id` are dropped, not refused."""
        self._dropped[req_id] = None
        while len(self._dropped) > MAX_DROPPED:
            self._dropped.popitem(last=False)

    def _forget_reservation(self, req_id: str) -> None:
        """Under self._lock: the request no longer waits for KV (landed, aborted, expired)."""
        if self._reserved.pop(req_id, None) is not None and self.receive_side is not None:
            self.receive_side.forget(req_id)

    def _watch_leases(self) -> None:
        while not self._stopping.wait(min(1.0, self.lease_s / 4)):
            try:
                for req_id, why in self._expired_leases():
                    log.warning("KV for %s: %s", req_id, why)
                    self.kv_failed(req_id, why)
            except Exception:  # noqa: BLE001 - the watchdog must outlive one bad round
                log.exception("decode worker %s: lease watchdog", self.worker_id)

    def _expired_leases(self) -> list[tuple[str, str]]:
        """(req_id, why) of each reservation whose KV did not begin to arrive within the lease
        after `reserve`, or did not land within it after it began."""
        now, expired = time.monotonic(), []
        with self._lock:
            for req_id, (_, reserved_at) in self._reserved.items():
                began_at = self.receive_side.began_at(req_id)
                if now - (began_at or reserved_at) > self.lease_s:
                    what = "did not land" if began_at else "did not begin to arrive"
                    expired.append(
                        (
                            req_id,
                            f"KV transfer timed out: it {what} within {self.lease_s:g} s "
                            "(transfer.timeout_s); the reservation is released",
                        )
                    )
        return expired

    # -- internals (loop thread) ---------------------------------------------------------
    def _begin(self, engine: LLMEngine, req_id: str, first_token_id: int) -> None:
        # No lock here: `abort` holds it while it waits for this thread. An abort drops the id
        # from _landed before it queues the engine's abort, so either this sees it gone, or
        # the abort runs after this and ends the running request.
        if req_id not in self._landed:
            return  # aborted after landing
        self._landed.discard(req_id)
        request = engine.finish_remote(req_id, first_token_id)
        if request.is_finished:
            self.loop.publish(
                [
                    RequestOutput(
                        req_id,
                        finished=True,
                        finish_reason=request.finish_reason.value,
                        num_prompt_tokens=request.num_prompt_tokens,
                        num_cached_tokens=request.num_cached_tokens,
                        num_output_tokens=request.num_output_tokens,
                    )
                ]
            )
