"""Turns a SchedulerOutput into one forward pass and sampled tokens.

The runner owns the model and the KV cache tensor
`[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]` (DESIGN.md), so a
request's blocks for every layer are one `index_select` on dim 2.
"""

from __future__ import annotations

import torch

from pdserve.engine.attention import AttentionMetadata, get_backend
from pdserve.engine.config import DTYPES, ModelConfig
from pdserve.engine.core.host_tier import BlockCopies
from pdserve.engine.core.request import Request
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.engine.core.scheduler import ScheduledRequest, SchedulerOutput
from pdserve.engine.host_kv import HostKVPool
from pdserve.engine.host_tensors import host_to_device, padded_table, to_device
from pdserve.engine.model.gemv import linear
from pdserve.engine.model.loader import load_model
from pdserve.engine.model.sharding import ShardLayout
from pdserve.engine.model.tp_group import TPGroup
from pdserve.engine.sampled_tokens import SampledTokens, StepLogprobs
from pdserve.engine.sampler import (
    PromptLogprobRows,
    SamplingRow,
    gather_logprobs,
    gather_prompt_logprobs,
    sample_tokens,
)
from pdserve.engine.step_plan import StepPlan

_DTYPES = {name: getattr(torch, name) for name in DTYPES}  # config names → torch dtypes
CPU_KV_CACHE_BYTES = 128 * 2**20  # default KV cache size on CPU when num_gpu_blocks is None
GPU_MEMORY_UTILIZATION = 0.9


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


FINE_WARM_UP_ROWS = 8192  # past it, warm-up row counts step by COARSE_WARM_UP_STRIDE
COARSE_WARM_UP_STRIDE = 512


def gemm_warm_up_rows(max_num_seqs: int, max_num_tokens: int) -> list[int]:
    """Row counts that reach every cuBLAS kernel choice a step can make: each count up to
    max_num_seqs (the logits of any batch, small prefills), then every multiple of 16 up to
    8,192 rows (cuBLAS switches kernels at tile-sized steps of the row count; measured:
    1000 and 1001 rows share one), then every multiple of 512 up to max_num_tokens. A step of
    over 8,192 rows runs for tens of milliseconds, so a first-call stall there costs little,
    and warming every 16 rows would grow with the square of the budget (about 20 s of start-up
    for a Llama-3-8B prefill pool at 32,768 tokens)."""
    small = list(range(1, min(max_num_seqs, max_num_tokens) + 1))
    fine_end = min(max_num_tokens, FINE_WARM_UP_ROWS)
    large = list(range(-(-(small[-1] + 1) // 16) * 16, fine_end + 1, 16))
    last = (large or small)[-1]
    coarse = range(FINE_WARM_UP_ROWS + COARSE_WARM_UP_STRIDE, max_num_tokens + 1, COARSE_WARM_UP_STRIDE)
    large += [rows for rows in coarse if rows > last]
    if (large or small)[-1] != max_num_tokens:
        large.append(max_num_tokens)
    return small + large


def kv_block_bytes(
    config: ModelConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None
) -> int:
    """Bytes of one KV block over all layers (`num_kv_heads`: one tensor-parallel rank's)."""
    elem = torch.empty((), dtype=dtype).element_size()
    heads = config.num_key_value_heads if num_kv_heads is None else num_kv_heads
    return config.num_hidden_layers * 2 * block_size * heads * config.head_dim * elem


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
        tp: TPGroup | None = None,
    ) -> None:
        """`tp`: this runner is one tensor-parallel rank (its shard of the weights and KV heads);
        every rank's runner must run the same steps (`run_step`) in the same order."""
        self.config = config
        self.tp = tp
        self.shard = (
            ShardLayout.for_rank(config) if tp is None else ShardLayout.for_rank(config, tp.rank, tp.size)
        )
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = block_size
        self.backend = get_backend(attention_backend, device)
        self.max_num_tokens = max_num_tokens  # per step
        self.max_num_seqs = max_num_seqs
        self.model = load_model(config, self.backend, device, dtype, load_format, self.shard, tp)
        if num_blocks is None:
            num_blocks = self._blocks_from_memory(max_num_tokens)
        self.num_blocks = num_blocks
        self.host_kv: HostKVPool | None = None  # the prefix cache's host tier (enable_host_tier)
        self.kv_cache = torch.zeros(
            (
                config.num_hidden_layers,
                2,
                num_blocks,
                block_size,
                self.shard.num_kv_heads,
                config.head_dim,
            ),
            dtype=dtype,
            device=self.device,
        )
        self._last_sampled: SampledTokens | None = None  # the latest step's tokens (maybe in flight)
        # Decode steps replay CUDA graphs when the attention backend allows capture (and, under
        # tensor parallelism, the group's collectives: NCCL's, not gloo's; EngineConfig refuses
        # the shared-device mode without enforce_eager).
        self.decode_graphs = None
        if (
            self.device.type == "cuda"
            and not enforce_eager
            and self.backend.name == "triton"
            and (tp is None or tp.graph_capturable)
        ):
            from pdserve.engine.cuda_graphs import DecodeGraphs

            self.decode_graphs = DecodeGraphs(
                self.model, self.kv_cache, max_num_seqs, max_model_len, block_size, collectives=tp is not None
            )
        # (a tensor-parallel rank's needs the others: TensorParallelRanks.warm_up runs it on all)
        if self.device.type == "cuda" and tp is None:
            self.prepare_device()

    # (sequences, new tokens each, cached prefix tokens each, decode rows): a large mixed step
    # (the paged prefill kernel's 128-row tiles) and a small one (its 64-row tiles). Mixed steps
    # with the backend's `warm_up_decode_rows` follow: one per decode-kernel variant.
    WARM_UP_STEPS = ((9, 256, 16, 4), (2, 8, 16, 2))

    def peak_step_rows(self) -> list[tuple[int, int]]:
        """(cached tokens, new tokens) per sequence of the largest step the scheduler can emit:
        max_num_tokens new tokens over as many sequences as max_num_seqs allows, each sampled."""
        num_seqs = min(self.max_num_seqs, self.max_num_tokens)
        per_seq, extra = divmod(self.max_num_tokens, num_seqs)
        return [(0, per_seq + 1)] * extra + [(0, per_seq)] * (num_seqs - extra)

    def prepare_device(self, decode_rows: tuple[int, ...] | None = None) -> None:
        """Capture the decode CUDA graphs (if any), then `warm_up`. Under tensor parallelism every
        rank runs this at once (TensorParallelRanks.warm_up): both run the model's collectives."""
        if self.decode_graphs is not None:
            self.decode_graphs.capture()
        self.warm_up(decode_rows)

    def decode_warm_up_rows(self) -> tuple[int, ...]:
        """The decode-row counts that compile every decode-kernel variant, for this rank's KV heads
        (the kernel's grid is sequences x KV heads: a rank's shard, not the model's count)."""
        return tuple(self.backend.warm_up_decode_rows(self.shard.num_kv_heads, self.device))

    @torch.inference_mode()
    def warm_up(self, decode_rows: tuple[int, ...] | None = None) -> None:
        """Run the eager path's step shapes once on scratch blocks.

        First the largest step (`peak_step_rows`, sampled with top-k/top-p, the sampler's
        largest buffers): the caching allocator then holds memory for every later step. Without
        it, each step of a ramp (more sequences than ever before) allocates new device memory,
        which waits for the GPU to drain: on an H200 the host stalled in every step of an
        offline run's ramp, and the GPU idled after each one (bench.profile_steps' timeline).
        Then the shapes the Triton kernels specialize on, so they are compiled now and not
        inside the first mixed batches a server sees (a compile takes seconds). Decode shapes
        are compiled by the CUDA-graph capture. `decode_rows`: default `decode_warm_up_rows()`
        (tensor-parallel ranks take rank 0's, so they all run the same steps)."""
        largest_sampler = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
        steps = [(self.peak_step_rows(), largest_sampler)]
        if decode_rows is None:
            decode_rows = self.decode_warm_up_rows()
        greedy = SamplingParams(temperature=0.0)
        for num_seqs, q_len, prefix, num_decode in self.WARM_UP_STEPS + tuple(
            (1, 8, 16, rows) for rows in decode_rows
        ):
            steps.append(([(prefix, q_len)] * num_seqs + [(prefix + q_len, 1)] * num_decode, greedy))
        for rows, params in steps:
            self._run_scratch_step(rows, params)
        self._last_sampled = None
        self._warm_up_gemms()

    @torch.inference_mode()
    def _warm_up_gemms(self) -> None:
        """Run every linear layer's shape at `gemm_warm_up_rows` rows.

        The first GEMM that makes cuBLAS pick a kernel it has not run before blocks the host
        until the GPU has drained (measured on an H200: 55 ms behind a full queue, then
        0.02 ms for the same kernel). Eager steps and the sampler's logits see a new row
        count almost every step; without this, the first steps of each new size stalled the
        async loop (the lm_head of every step of an offline run's ramp)."""
        lm_head = self.model.lm_head  # sees at most max_num_seqs rows (the sampled ones)
        layers = {}
        for module in self.model.modules():
            if isinstance(module, torch.nn.Linear) and module is not lm_head:
                layers.setdefault((module.in_features, module.out_features, module.bias is None), module)
        row_counts = gemm_warm_up_rows(self.max_num_seqs, self.max_num_tokens)
        logits_rows = row_counts[: min(self.max_num_seqs, self.max_num_tokens)]  # 1 .. max_num_seqs
        for module, counts in [(lm_head, logits_rows), *((m, row_counts) for m in layers.values())]:
            x = torch.zeros(counts[-1], module.in_features, dtype=self.dtype, device=self.device)
            for rows in counts:
                linear(x[:rows], module)

    def _run_scratch_step(self, rows: list[tuple[int, int]], params: SamplingParams) -> None:
        """One step over scratch requests with `rows` of (cached tokens, new tokens), on blocks
        from 0 up (the cache holds nothing yet); skipped if the cache is too small for it."""
        bs = self.block_size
        if sum(-(-(computed + n) // bs) for computed, n in rows) > self.num_blocks:
            return  # a cache this small serves nothing large enough to need it
        requests: dict[str, Request] = {}
        out = SchedulerOutput()
        next_block = 0
        for i, (computed, n) in enumerate(rows):
            num_blocks = -(-(computed + n) // bs)
            table = list(range(next_block, next_block + num_blocks))
            next_block += num_blocks
            req_id = f"warm-up-{i}"
            request = Request(req_id, [1] * (computed + n), params)
            request.num_pending_tokens = 1
            requests[req_id] = request
            out.scheduled.append(ScheduledRequest(req_id, computed, n, table, sample=True))
        self.execute(out, requests).wait()

    def _blocks_from_memory(self, max_num_tokens: int) -> int:
        per_block = kv_block_bytes(self.config, self.block_size, self.dtype, self.shard.num_kv_heads)
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            # leave room for activations of the largest step (hidden + MLP intermediates)
            activation = max_num_tokens * (self.config.intermediate_size * 4 + self.config.vocab_size) * 4
            if self.tp is not None and self.tp.shared_device:  # the other ranks share this GPU
                free = (free - (self.tp.size - 1) * _weight_bytes(self.model)) // self.tp.size
            budget = int(free * GPU_MEMORY_UTILIZATION) - activation
        else:
            budget = CPU_KV_CACHE_BYTES
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError("not enough memory for a single KV block; set num_gpu_blocks explicitly")
        return int(num_blocks)

    def enable_host_tier(self, num_host_blocks: int | None, host_cache_gb: float) -> int:
        """Allocate the host tier's slots (num_host_blocks, else host_cache_gb's worth);
        returns the slot count (0: no tier)."""
        bytes_per_block = self.kv_cache[:, :, 0].numel() * self.kv_cache.element_size()
        num = (
            num_host_blocks if num_host_blocks is not None else int(host_cache_gb * 2**30) // bytes_per_block
        )
        # each layer's attention waits only for its own layer's copies (host_kv.HostKVPool)
        attention = [layer.self_attn for layer in self.model.model.layers]
        self.host_kv = HostKVPool(self.kv_cache, num, attention) if num else None
        return num

    @torch.inference_mode()
    def run_block_copies(self, copies: BlockCopies, wait: bool = False) -> None:
        """Queue host-tier copies on the tier's copy streams (each layer of the next forward
        waits for its own); `wait`: block until they are done."""
        if not copies:
            return
        self.host_kv.run(copies)
        if wait:
            self.host_kv.synchronize()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, requests: dict[str, Request]) -> SampledTokens:
        """Launch one forward pass over every scheduled token and the sampling of its tokens.

        Returns at once on CUDA (nothing here waits for the GPU); `SampledTokens.wait()`
        gives the tokens. A decode row whose input token is still in flight (sampled by the
        previous step, not yet appended: async scheduling) takes it from that step's
        device tensor.
        """
        self.run_block_copies(out.block_copies)  # before the forward writes or reads those blocks
        return self.run_step(self.plan_step(out, requests))

    def plan_step(self, out: SchedulerOutput, requests: dict[str, Request]) -> StepPlan:
        """The step's inputs as plain data: what every tensor-parallel rank runs (`run_step`)."""
        plan = StepPlan()
        input_ids, positions, slot_mapping = plan.input_ids, plan.positions, plan.slot_mapping
        query_start_loc, query_lens, seq_lens, tables = (
            plan.query_start_loc,
            plan.query_lens,
            plan.seq_lens,
            plan.tables,
        )
        bs = self.block_size
        # Decode rows first: the fast attention backend runs a mixed step's leading one-token
        # rows through its decode kernel (AttentionMetadata.num_decodes). Sampled tokens are
        # keyed by req_id, so the row order is the runner's own business.
        scheduled = out.scheduled
        if any(entry.num_new_tokens != 1 for entry in scheduled):
            scheduled = sorted(scheduled, key=lambda entry: entry.num_new_tokens != 1)
        for entry in scheduled:
            request = requests[entry.req_id]
            start, n = entry.num_computed_tokens, entry.num_new_tokens
            end = start + n
            known = request.all_token_ids
            if end <= len(known):
                input_ids.extend(known[start:end])
            else:  # the last input token is the one the in-flight step samples
                assert end == len(known) + 1, "at most one token can be in flight"
                input_ids.extend(known[start : end - 1])
                plan.fill_rows.append(len(input_ids))
                plan.fill_src.append(self._in_flight_row(entry.req_id))
                input_ids.append(0)
            table = entry.block_ids
            if n > 1 and (segment := _prompt_logprob_rows(request, start, end, query_start_loc[-1])):
                plan.prompt_segments.append(segment)
            if n == 1:  # decode row: skip the range machinery
                positions.append(start)
                slot_mapping.append(table[start // bs] * bs + start % bs)
            else:
                positions.extend(range(start, end))
                slot_mapping.extend(_slots(table, start, end, bs))
            query_start_loc.append(query_start_loc[-1] + n)
            query_lens.append(n)
            seq_lens.append(end)
            tables.append(table)
            if entry.sample:
                # the seeded stream's step: tokens before this one, in flight ones included
                num_before = request.num_output_tokens + request.num_pending_tokens - 1
                plan.sample_rows.append(_sampling_row(request, num_before))
                plan.sample_req_ids.append(entry.req_id)
                plan.logits_index.append(query_start_loc[-1] - 1)
        return plan

    @torch.inference_mode()
    def run_step(self, plan: StepPlan) -> SampledTokens:
        """The forward pass and sampling of a planned step, launched."""
        dev = self.device
        fill = None
        if plan.fill_rows:
            rows_src = host_to_device([plan.fill_rows, plan.fill_src], torch.int64, dev)  # [2, k]
            fill = (rows_src[0], self._last_sampled.tokens.index_select(0, rows_src[1]))
        tables, query_lens, seq_lens = plan.tables, plan.query_lens, plan.seq_lens
        if (
            self.decode_graphs is not None
            and max(query_lens) == 1
            and self.decode_graphs.can_run(len(tables))
        ):
            if self.host_kv is not None:
                self.host_kv.wait_for_copies()  # a replay runs no per-layer hooks
            hidden = self.decode_graphs.run(
                plan.input_ids, plan.positions, plan.slot_mapping, seq_lens, tables, fill
            )
            return self._sample(hidden, plan.logits_index, plan.sample_rows, plan.sample_req_ids, [])
        # Width rounded up to 16: one Triton specialization of the row stride (a new one would
        # compile mid-serving) and aligned rows.
        width = -(-max(len(t) for t in tables) // 16) * 16
        meta = AttentionMetadata(
            slot_mapping=host_to_device(plan.slot_mapping, torch.int64, dev),
            query_start_loc=host_to_device(plan.query_start_loc, torch.int32, dev),
            seq_lens=host_to_device(seq_lens, torch.int32, dev),
            block_tables=to_device(padded_table(tables, width), dev),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )
        input_ids_dev = host_to_device(plan.input_ids, torch.int64, dev)
        if fill is not None:
            input_ids_dev.index_copy_(0, *fill)
        hidden = self.model(
            input_ids_dev, host_to_device(plan.positions, torch.int64, dev), self.kv_cache, meta
        )
        if self.host_kv is not None:
            self.host_kv.wait_for_copies()  # its layers waited already; later work sees every copy
        return self._sample(
            hidden, plan.logits_index, plan.sample_rows, plan.sample_req_ids, plan.prompt_segments
        )

    def _in_flight_row(self, req_id: str) -> int:
        last = self._last_sampled
        if last is None or req_id not in last.row_of:
            raise RuntimeError(f"{req_id}: input token in flight, but the last step did not sample it")
        return last.row_of[req_id]

    def _sample(
        self,
        hidden: torch.Tensor,
        logits_index: list[int],
        rows: list[SamplingRow],
        req_ids: list[str],
        prompt_segments: list[PromptLogprobRows],
    ) -> SampledTokens:
        """hidden [T, H] of every scheduled token -> the sampled rows' tokens (and the
        logprobs requests asked for), launched."""
        logprobs = StepLogprobs()
        if prompt_segments:
            logprobs.prompt = (
                prompt_segments,
                gather_prompt_logprobs(hidden, self.model.compute_logits, prompt_segments),
            )
        if not rows:
            tokens = torch.empty(0, dtype=torch.int64, device=self.device)
        else:
            if len(logits_index) != hidden.shape[0]:  # not every row samples (indices ascend)
                hidden = hidden.index_select(0, host_to_device(logits_index, torch.int64, self.device))
            logits = self.model.compute_logits(hidden)
            if self.tp is None or self.tp.rank == 0:
                tokens = sample_tokens(logits, rows)
                logprobs.sampled = gather_logprobs(logits, tokens, rows)
            else:  # the other ranks take rank 0's tokens (below): the next step's inputs
                tokens = torch.empty(len(rows), dtype=torch.int64, device=self.device)
            if self.tp is not None:
                self.tp.broadcast_from_first(tokens)
        has_logprobs = logprobs.sampled is not None or logprobs.prompt is not None
        self._last_sampled = SampledTokens.launch(req_ids, tokens, rows, logprobs if has_logprobs else None)
        return self._last_sampled


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _slots(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of token positions [start, end) of a sequence with these blocks: block by
    block (a 32,768-token chunk builds its list in 0.7 ms rather than 2.4 token by token)."""
    assert (end - 1) // block_size < len(block_ids), "the block table must cover [start, end)"
    slots: list[int] = []
    for block in block_ids[start // block_size : (end - 1) // block_size + 1]:
        slots.extend(range(block * block_size, (block + 1) * block_size))
    skip = start % block_size
    return slots[skip : skip + end - start]


def _prompt_logprob_rows(request: Request, start: int, end: int, base: int) -> PromptLogprobRows | None:
    """The rows of a prefill chunk [start, end) that predict a prompt token, for a request
    that asked for prompt logprobs and has not had them yet; `base` = the chunk's first row."""
    num_top = request.sampling_params.prompt_logprobs
    last = min(end, request.num_prompt_tokens - 1)  # position last - 1 predicts token `last`
    if num_top is None or request.num_output_tokens or start >= last:
        return None
    tokens = request.prompt_token_ids[start + 1 : last + 1]
    return PromptLogprobRows(request.req_id, range(base, base + last - start), tokens, start + 1, num_top)


def _sampling_row(request: Request, num_before: int) -> SamplingRow:
    """The sampler's view of a request; penalties need its tokens so far, which the engine
    guarantees are all on the host (it does not run ahead of a penalized request)."""
    params = request.sampling_params
    if not params.has_penalties:
        return SamplingRow(params, num_before)
    if request.num_pending_tokens > 1:
        raise RuntimeError(f"{request.req_id}: penalties need every earlier token, one is still in flight")
    prompt, outputs = request.prompt_token_ids, request.output_token_ids
    if params.num_prior_output_tokens:  # a resumed request: its prompt ends with its earlier outputs
        split = len(prompt) - params.num_prior_output_tokens
        prompt, outputs = prompt[:split], prompt[split:] + outputs
    return SamplingRow(params, num_before, prompt, outputs)
