"""Turns a SchedulerOutput into one forward pass and sampled tokens.

The runner owns the model and the KV cache tensor
`[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]` (DESIGN.md), so a
request's blocks for every layer are one `index_select` on dim 2.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata, get_backend
from engine.config import ModelConfig
from engine.core.request import Request
from engine.core.scheduler import SchedulerOutput
from engine.model.loader import load_model
from engine.sampler import SamplingRow, sample

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_CACHE_BYTES = 128 * 2**20  # default KV cache size on CPU when num_gpu_blocks is None
GPU_MEMORY_UTILIZATION = 0.9


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * block_size * config.num_key_value_heads * config.head_dim * elem


class ModelRunner:
    def __init__(
        self,
        config: ModelConfig,
        device: str,
        dtype: torch.dtype,
        block_size: int,
        num_blocks: int | None,
        max_num_tokens: int,
        attention_backend: str = "auto",
        load_format: str = "auto",
        max_num_seqs: int = 256,
        max_model_len: int = 2048,
        enforce_eager: bool = False,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = block_size
        self.backend = get_backend(attention_backend, device)
        self.model = load_model(config, self.backend, device, dtype, load_format)
        if num_blocks is None:
            num_blocks = self._blocks_from_memory(max_num_tokens)
        self.num_blocks = num_blocks
        self.kv_cache = torch.zeros(
            (
                config.num_hidden_layers,
                2,
                num_blocks,
                block_size,
                config.num_key_value_heads,
                config.head_dim,
            ),
            dtype=dtype,
            device=self.device,
        )
        # Decode steps replay CUDA graphs when the attention backend allows capture.
        self.decode_graphs = None
        if self.device.type == "cuda" and not enforce_eager and self.backend.name == "triton":
            from engine.cuda_graphs import DecodeGraphs

            self.decode_graphs = DecodeGraphs(
                self.model, self.kv_cache, max_num_seqs, max_model_len, block_size
            )
            self.decode_graphs.capture()

    def _blocks_from_memory(self, max_num_tokens: int) -> int:
        per_block = kv_block_bytes(self.config, self.block_size, self.dtype)
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            # leave room for activations of the largest step (hidden + MLP intermediates)
            activation = max_num_tokens * (self.config.intermediate_size * 4 + self.config.vocab_size) * 4
            budget = int(free * GPU_MEMORY_UTILIZATION) - activation
        else:
            budget = CPU_KV_CACHE_BYTES
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError("not enough memory for a single KV block; set num_gpu_blocks explicitly")
        return int(num_blocks)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, requests: dict[str, Request]) -> dict[str, int]:
        """Run one forward pass over every scheduled token; return sampled tokens by req_id."""
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        query_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[SamplingRow] = []
        sample_req_ids: list[str] = []
        logits_index: list[int] = []
        bs = self.block_size
        for entry in out.scheduled:
            request = requests[entry.req_id]
            start, n = entry.num_computed_tokens, entry.num_new_tokens
            input_ids.extend(request.all_token_ids[start : start + n])
            positions.extend(range(start, start + n))
            table = entry.block_ids
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            query_start_loc.append(query_start_loc[-1] + n)
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(table)
            if entry.sample:
                sample_rows.append(SamplingRow(request.sampling_params, request.num_output_tokens))
                sample_req_ids.append(entry.req_id)
                logits_index.append(query_start_loc[-1] - 1)
        dev = self.device
        if (
            self.decode_graphs is not None
            and max(query_lens) == 1
            and self.decode_graphs.can_run(len(tables))
        ):
            hidden = self.decode_graphs.run(input_ids, positions, slot_mapping, seq_lens, tables)
            return self._sample(hidden, logits_index, sample_rows, sample_req_ids)
        max_blocks = max(len(t) for t in tables)
        block_tables = [t + [0] * (max_blocks - len(t)) for t in tables]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(block_tables, dtype=torch.int32, device=dev),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            self.kv_cache,
            meta,
        )
        return self._sample(hidden, logits_index, sample_rows, sample_req_ids)

    def _sample(
        self, hidden: torch.Tensor, logits_index: list[int], rows: list[SamplingRow], req_ids: list[str]
    ) -> dict[str, int]:
        if not rows:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(logits_index, device=self.device)])
        return dict(zip(req_ids, sample(logits, rows), strict=True))
