"""The decode worker: the engine in its decode role, plus the KV receiver side.

A disaggregated request arrives in three parts, in any order after the first:
1. `reserve()` (router): blocks for the prompt, reusing cached prefix blocks;
   the answer is a KVHandle naming only the blocks to fill.
2. the KV lands (`receive_kv`, called by the transfer backend's receiver): it is
   scattered into the reserved blocks.
3. `start()` (router): the first token, sampled by the prefill worker.
When both 2 and 3 are in, the request joins the running batch. `add_local()`
prefills a request here instead (conditional disaggregation, co-located mode).

Aborts never free blocks that a transfer may be writing: the scatter happens
under the worker's lock and checks the request's state first.

Plain class: the Ray actor in `decode_worker.actor` only forwards calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from engine.core.outputs import RequestOutput
from engine.core.sampling_params import SamplingParams
from engine.engine_loop import LoopWorker, StepBatch
from engine.llm_engine import EngineConfig, LLMEngine
from transfer.contract import KVHandle
from transfer.layout import KVLayout
from transfer.packing import unpack_blocks

log = logging.getLogger(__name__)


@dataclass
class _Incoming:
    req_id: str
    reserved_at: float
    kv_landed_at: float | None = None
    first_token_id: int | None = None
    first_token_at: float | None = None
    aborted: bool = False


class DecodeWorker(LoopWorker):
    def __init__(self, worker_id: str, engine_config: EngineConfig, role: str = "decode") -> None:
        engine_config.role = role
        super().__init__(worker_id, LLMEngine(engine_config))
        self.layout = KVLayout.from_cache(self.engine.kv_cache, self.engine.model_config.name)
        self._incoming: dict[str, _Incoming] = {}
        self._dropped: OrderedDict[str, None] = OrderedDict()  # aborted before their KV came
        self._lock = threading.Lock()
        self.kv_wait_ms: dict[str, float] = {}  # req_id -> transfer time not hidden by the prefill
        self.nccl_rank: int | None = None
        self.grpc_address: str | None = None
        self.loop.start()

    # -- router calls -------------------------------------------------------------
    def reserve(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> KVHandle | None:
        """Reserve blocks for a prompt coming from a prefill worker; None if full now."""
        reservation = self.loop.call_sync(lambda e: e.reserve_remote(req_id, prompt_token_ids, params))
        if reservation is None:
            return None
        with self._lock:
            self._incoming[req_id] = _Incoming(req_id, time.perf_counter())
        return KVHandle(
            req_id=req_id,
            decode_worker_id=self.worker_id,
            block_ids=reservation.block_ids,
            num_tokens=len(prompt_token_ids) - reservation.num_cached_tokens,
            layout=self.layout,
            nccl_rank=self.nccl_rank,
            grpc_address=self.grpc_address,
        )

    def start(self, req_id: str, first_token_id: int) -> bool:
        """The prefill's first token; decoding starts once the KV is in too."""
        with self._lock:
            inc = self._incoming.get(req_id)
            if inc is None or inc.aborted:
                return False
            inc.first_token_id = first_token_id
            inc.first_token_at = time.perf_counter()
            ready = inc.kv_landed_at is not None
            if ready:
                del self._incoming[req_id]
        if ready:
            self._begin(inc)
        return True

    def add_local(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Prefill and decode here (short prompts, co-located serving)."""
        self.loop.call_sync(lambda e: e.add_request(req_id, prompt_token_ids, params))

    def abort(self, req_id: str) -> bool:
        with self._lock:
            inc = self._incoming.pop(req_id, None)
            if inc is not None:
                self._dropped[req_id] = None
                while len(self._dropped) > 10_000:
                    self._dropped.popitem(last=False)
            # Under the lock: no scatter into this request's blocks is running now, and
            # none will start (receive_kv checks _incoming), so freeing is safe.
            found = self.loop.call_sync(lambda e: e.abort_request(req_id))
        return found or inc is not None

    def poll(self, timeout: float = 0.5) -> StepBatch:
        batch = super().poll(timeout)
        with self._lock:
            for out in batch.outputs:
                wait = self.kv_wait_ms.pop(out.req_id, None)
                if wait is not None:
                    batch.kv_wait_ms[out.req_id] = wait
        return batch

    # -- transfer backend calls --------------------------------------------------------
    def receive_kv(self, req_id: str, block_ids: list[int], buffer: torch.Tensor) -> None:
        """Receiver callback: scatter one request's packed blocks into the cache.

        buffer: [num_layers, 2, len(block_ids), block_size, Hkv, D], any device.
        Raises if the request is unknown, so the sender learns the KV was not taken.
        """
        self.receive_kv_chunk(req_id, block_ids, slice(0, buffer.shape[0]), buffer)

    def receive_kv_chunk(self, req_id: str, block_ids: list[int], layers: slice, chunk: torch.Tensor) -> None:
        """Receiver callback for a pipelined transfer: layers [layers.start, layers.stop) of the
        request's blocks, in layer order; the request is ready after the last layer lands.

        chunk: [layers.stop - layers.start, 2, len(block_ids), block_size, Hkv, D].
        """
        kv_cache = self.engine.kv_cache
        with self._lock:
            inc = self._incoming.get(req_id)
            if inc is None:
                if req_id in self._dropped:
                    return  # aborted while in flight: drop the bytes, nothing to free
                raise KeyError(f"decode worker {self.worker_id} has no reservation for {req_id}")
            unpack_blocks(kv_cache, chunk.to(kv_cache.device), block_ids, layers=layers)
            if layers.stop < kv_cache.shape[0]:
                return
            if kv_cache.is_cuda:
                torch.cuda.current_stream().synchronize()
            inc.kv_landed_at = time.perf_counter()
            ready = inc.first_token_id is not None
            if ready:
                del self._incoming[req_id]
        if ready:
            self._begin(inc)

    def kv_failed(self, req_id: str, reason: str) -> None:
        """The prefill side could not ship this request's KV: end it with an abort."""
        log.warning("KV for %s failed: %s", req_id, reason)
        if self.abort(req_id):
            self.loop.publish([RequestOutput(req_id, finished=True, finish_reason="abort", error=reason)])

    # -- internals ---------------------------------------------------------------------
    def _begin(self, inc: _Incoming) -> None:
        # Transfer time the prefill did not hide: from first token to KV landed (>= 0).
        with self._lock:
            self.kv_wait_ms[inc.req_id] = max(0.0, (inc.kv_landed_at - inc.first_token_at) * 1e3)

        def begin(engine: LLMEngine) -> None:
            request = engine.finish_remote(inc.req_id, inc.first_token_id)
            if request.is_finished:
                self.loop.publish(
                    [
                        RequestOutput(
                            inc.req_id,
                            finished=True,
                            finish_reason=request.finish_reason.value,
                            num_prompt_tokens=request.num_prompt_tokens,
                            num_cached_tokens=request.num_cached_tokens,
                            num_output_tokens=request.num_output_tokens,
                        )
                    ]
                )

        self.loop.call(begin)
