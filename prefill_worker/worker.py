"""The prefill worker: the engine in its prefill role, plus the KV connector's send side.

`prefill()` queues a prompt and returns a Future that resolves with the first
sampled token as soon as the step that computed it ends (that is the TTFT).
The request's blocks stay owned here (the scheduler holds them, HELD_FOR_TRANSFER)
while a sender thread ships the ones the decode worker lacks, with the first token,
in one packed buffer; they are freed when the send completes or fails. The buffer always
carries all the KV heads, whatever the decode worker's TP size: over gRPC a tensor-parallel
worker gathers every rank's heads of those blocks on rank 0 (engine/kv_heads.py) in layer
pieces, each just before the sender ships it (`transfer.source.LayerPieces`), so rank 0 holds
a piece or two of the request's KV, never all of it; over nccl, when either worker has TP > 1,
every rank sends its heads straight to the decode ranks that hold them
(transfer/nccl_direct.py) and nothing is gathered. The decode
worker starts the request itself once that KV has landed. A failed send, or a
request that ended at its first token, is reported to the decode worker through its
`DecodeLink` so it drops the reservation.

Plain class: `deploy.actors.WorkerActor` hosts it in a Ray actor and only forwards calls.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.core.outputs import PrefillResult, RequestOutput, StepBatch
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.engine.engine_loop import LoopWorker
from pdserve.engine.llm_engine import LLMEngine
from pdserve.transfer.connector import DecodeLink, KVConnector
from pdserve.transfer.contract import KVHandle
from pdserve.transfer.packing import configured_chunk_layers, default_chunk_layers
from pdserve.transfer.source import CacheBlocks, KVSource, LayerPieces

log = logging.getLogger(__name__)


class PrefillWorker(LoopWorker):
    def __init__(
        self,
        worker_id: str,
        engine_config: EngineConfig,
        connector: KVConnector | None = None,
        num_send_threads: int = 4,
    ) -> None:
        super().__init__(worker_id, LLMEngine(engine_config, role="prefill"), publish_outputs=False)
        self.loop.add_listener(self._on_outputs)
        self._pending: dict[str, tuple[Future, KVHandle | None, float]] = {}
        self._lock = threading.Lock()
        self._senders = ThreadPoolExecutor(num_send_threads, thread_name_prefix=f"kv-send-{worker_id}")
        # Filled by set_decode_links; the send side holds this very dict.
        self._links: dict[str, DecodeLink] = {}
        model_name = self.engine.model_config.name
        tp_size = engine_config.tensor_parallel_size
        self.send_side = (
            connector.send_side(model_name, self._links, tp_size) if connector is not None else None
        )
        self.loop.start()

    # -- wiring -----------------------------------------------------------------
    def set_decode_links(self, links: dict[str, DecodeLink]) -> None:
        """How to reach each decode worker's control plane (KV notices, failures)."""
        self._links.clear()
        self._links.update(links)

    def join_transfer_group(self, rank: int, world_size: int, init_method: str) -> None:
        """Join the connector's process group (connectors with `uses_process_group`): rank 0 at
        `rank`, rank r of a tensor-parallel worker at `rank + r`."""
        ranks = self.engine.rank_tasks()  # KV moves rank to rank when a pair has tensor parallelism
        self.send_side.join_group(rank, world_size, init_method, self.engine.kv_cache.device, ranks)

    def poll(self, timeout_s: float = 0.5) -> StepBatch:
        batch = super().poll(timeout_s)
        if self.send_side is not None:  # the router stops using a broken pair
            batch.transfer_rank = self.send_side.group_rank()
            batch.broken_transfer_peers = self.send_side.broken_peers()
        return batch

    # -- requests ----------------------------------------------------------------
    def prefill(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams, handle: KVHandle | None
    ) -> Future:
        """Queue a prompt; the Future resolves with a PrefillResult at the first token."""
        fut: Future = Future()
        if handle is not None and (self.send_side is None or handle.decode_worker_id not in self._links):
            fut.set_exception(RuntimeError(f"prefill worker {self.worker_id} has no KV sender wired"))
            return fut
        with self._lock:
            self._pending[req_id] = (fut, handle, time.perf_counter())

        def add(engine: LLMEngine) -> None:
            engine.add_request(req_id, prompt_token_ids, params)

        added = self.loop.call(add)
        added.add_done_callback(lambda f: self._fail(req_id, f.exception()) if f.exception() else None)
        return fut

    def abort(self, req_id: str) -> bool:
        """Abort a queued or running prefill. A request whose KV is being sent is left to
        the sender, which frees its blocks when the send ends."""
        with self._lock:
            pending = self._pending.pop(req_id, None)
        if pending is None:
            return False
        pending[0].cancel()
        self.loop.call(lambda e: e.abort_request(req_id))
        return True

    def shutdown(self) -> None:
        super().shutdown()
        self._senders.shutdown(wait=False, cancel_futures=True)
        if self.send_side is not None:
            self.send_side.close()

    # -- internals (loop thread) ---------------------------------------------------
    def _fail(self, req_id: str, exc: BaseException) -> None:
        with self._lock:
            pending = self._pending.pop(req_id, None)
        if pending is not None and not pending[0].done():
            pending[0].set_exception(exc)

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._lock:
                pending = self._pending.pop(out.req_id, None)
            if pending is None:
                if not out.finished:  # aborted meanwhile: nobody waits for this KV
                    self.engine.release_request(out.req_id)
                continue
            fut, handle, start = pending
            ship = handle is not None and not out.finished
            src_block_ids: list[int] = []
            if ship:
                # The decode side lacks the prompt's last len(handle.block_ids) blocks.
                num_prompt_blocks = -(-out.num_prompt_tokens // self.engine.block_size)
                prompt_blocks = self.engine.get_block_ids(out.req_id)[:num_prompt_blocks]
                src_block_ids = prompt_blocks[num_prompt_blocks - len(handle.block_ids) :]
            result = PrefillResult(
                req_id=out.req_id,
                first_token_id=out.new_token_ids[0],
                finished=out.finished,
                finish_reason=out.finish_reason,
                num_prompt_tokens=out.num_prompt_tokens,
                num_cached_tokens=out.num_cached_tokens,
                prefill_ms=(time.perf_counter() - start) * 1e3,
                first_logprobs=out.new_logprobs[0] if out.new_logprobs else None,
                prompt_logprobs=out.prompt_logprobs,
            )
            if ship:
                self._senders.submit(self._send, handle, src_block_ids, result.first_token_id)
            else:
                if not out.finished:
                    self.engine.release_request(out.req_id)  # co-located callers pass no handle
                if handle is not None:  # nothing will come: the decode side drops its reservation
                    self._senders.submit(self._report, handle, None)
            if not fut.done():
                fut.set_result(result)

    def _send(self, handle: KVHandle, src_block_ids: list[int], first_token_id: int) -> None:
        try:
            stats = self.send_side.send(handle, self._kv_source(src_block_ids), first_token_id)
            log.debug(
                "KV of %s: %d bytes, pack %.2f ms, send %.2f ms",
                handle.req_id,
                stats.nbytes,
                stats.pack_ms,
                stats.send_ms,
            )
        except Exception as exc:  # noqa: BLE001 - reported to the decode side
            log.warning("KV send for %s failed: %s", handle.req_id, exc)
            self._report(handle, f"{type(exc).__name__}: {exc}")
        finally:
            self.loop.call(lambda e: e.release_request(handle.req_id))

    def _kv_source(self, src_block_ids: list[int]) -> KVSource:
        """The blocks' KV with every head: the cache itself with one rank; with more, pieces of
        `default_chunk_layers` layers ($PDSERVE_KV_CHUNK_LAYERS overrides), each gathered from
        the ranks on rank 0 between two steps when the sender asks for it."""
        cache = self.engine.kv_cache
        if self.engine.tp_ranks is None:
            return CacheBlocks(cache, src_block_ids)
        num_layers, _, _, block_size, _, head_dim = cache.shape
        num_kv_heads = self.engine.model_config.num_key_value_heads
        shape = (num_layers, 2, len(src_block_ids), block_size, num_kv_heads, head_dim)
        layer_nbytes = math.prod(shape[1:]) * cache.element_size()
        piece_layers = configured_chunk_layers()
        if piece_layers is None:
            piece_layers = default_chunk_layers(num_layers, layer_nbytes)

        def gather(layers: slice) -> torch.Tensor:
            # the loop thread only queues the gather; this (the sender's) thread waits for it
            ready: list[torch.cuda.Event] = []
            piece = self.loop.call_sync(lambda engine: engine.gather_kv(src_block_ids, layers, ready))
            for event in ready:
                event.synchronize()
            return piece

        return LayerPieces(
            gather, shape, cache.dtype, cache.device, piece_layers or num_layers, src_block_ids
        )

    def _report(self, handle: KVHandle, reason: str | None) -> None:
        """Tell the decode worker its KV will not come (reason None: nothing to send)."""
        try:
            self._links[handle.decode_worker_id].kv_failed(handle.req_id, reason)
        except Exception:  # noqa: BLE001 - the decode worker may be gone
            log.exception("reporting the KV of %s to %s", handle.req_id, handle.decode_worker_id)
