"""CUDA graphs for decode steps: one captured forward per batch-size bucket.

A decode step of a large model is hundreds of small kernel launches; replaying a
captured graph issues them all at once, so the step costs what the GPU needs
(reading weights and KV from HBM), not what Python needs to launch it.

Static buffers hold the inputs; a step copies its batch into the first `b` rows
of the smallest bucket B >= b and pads the rest (slot -1: no KV write; seq_len 0:
a zero output row). The attention kernels take the grid from the bucket size and
`max_seq_len` = the model's max length, fixed at capture.

Under tensor parallelism (`collectives`) each rank captures its own graphs, over its shard, with
the group's NCCL all-reduces inside (engine/model/tp_group.py says why they capture). Every rank
captures the same buckets in the same order (its warm-up forward before each capture runs the
collectives eagerly, so the ranks must agree), and a step's plan, the same on every rank, picks
the bucket. The capture runs in thread-local mode: torch's NCCL watchdog thread queries events
of collectives issued before the capture, which global mode would turn into a capture error.
"""

from __future__ import annotations

import logging

import torch

from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.host_tensors import copy_into, padded_table

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,  # [L, 2, num_blocks, block_size, Hkv, D]
        max_batch_size: int,
        max_model_len: int,
        block_size: int,
        collectives: bool = False,  # the forward holds tensor-parallel collectives
    ) -> None:
        self.model = model
        self.capture_error_mode = "thread_local" if collectives else "global"
        self.kv_cache = kv_cache
        self.max_model_len = max_model_len
        self.buckets = [b for b in DEFAULT_BUCKETS if b < max_batch_size] + [max_batch_size]
        device = kv_cache.device
        max_bs = self.buckets[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _meta(self, bucket: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket],
            query_start_loc=self.query_start_loc[: bucket + 1],
            seq_lens=self.seq_lens[:bucket],
            block_tables=self.block_tables[:bucket],
            query_lens_cpu=[1] * bucket,
            seq_lens_cpu=[self.max_model_len] * bucket,
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )

    def _forward(self, bucket: int) -> torch.Tensor:
        return self.model(self.input_ids[:bucket], self.positions[:bucket], self.kv_cache, self._meta(bucket))

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bucket in reversed(self.buckets):  # largest first, so smaller ones reuse its pool
                self._forward(bucket)  # warm-up: compiles the Triton kernels for this shape
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(
                    graph, pool=pool, stream=stream, capture_error_mode=self.capture_error_mode
                ):
                    hidden = self._forward(bucket)
                pool = graph.pool() if pool is None else pool
                self.graphs[bucket] = (graph, hidden)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def can_run(self, batch_size: int) -> bool:
        return bool(self.graphs) and batch_size <= self.buckets[-1]

    @torch.inference_mode()
    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slot_mapping: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        fill: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [b, hidden]
        """Copy the batch into the static inputs and replay; `fill` = (rows, token ids) on the
        device overwrites input ids that the previous step sampled (async scheduling)."""
        b = len(input_ids)
        bucket = next(x for x in self.buckets if x >= b)
        width = max(len(t) for t in block_tables)
        # Pinned host staging, copied without blocking the host (host_tensors.copy_into).
        copy_into(self.input_ids[:b], input_ids)
        copy_into(self.positions[:b], positions)
        copy_into(self.slot_mapping[:b], slot_mapping)
        if fill is not None:
            self.input_ids.index_copy_(0, *fill)
        copy_into(self.seq_lens[:b], seq_lens)
        # One host tensor from padded rows (one copy, not one small tensor per sequence).
        copy_into(self.block_tables[:b, :width], padded_table(block_tables, width))
        if bucket > b:
            self.slot_mapping[b:bucket].fill_(-1)
            self.seq_lens[b:bucket].fill_(0)
        graph, hidden = self.graphs[bucket]
        graph.replay()
        return hidden[:b]
