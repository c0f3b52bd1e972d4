"""The one engine both workers run: `schedule() -> execute() -> update()`.

Roles:
- "both": co-located serving; a request is prefilled and decoded here.
- "prefill": a request stops after its first sampled token; its blocks are held
  (ownership stays here) until the worker has shipped them and calls
  `release_request`.
- "decode": requests arrive with `reserve_remote` (blocks reserved, prefix
  reused) and start decoding at `finish_remote` once their KV has landed; a
  plain `add_request` still works, so a decode worker can prefill short prompts
  itself.

The engine is single-threaded; workers serialise calls into it.

Tensor parallelism (`tensor_parallel_size` N > 1, any role): this engine is rank 0; it keeps
the one scheduler and block pool, and each step's plan runs on its own runner and on ranks
1..N-1 in child processes (engine/tensor_parallel.py). A disaggregated worker's KV leaves and
arrives with all the model's KV heads (`gather_kv`, `scatter_kv`, on the loop thread).

Async scheduling (`async_scheduling`, on by default; off for the prefill role): `step()`
schedules and launches step N+1 before it waits for step N's tokens, so the host's
scheduling, input preparation and output handling overlap the GPU's work instead of
adding to it. The outputs `step()` returns are then those of the previous step. The
prefill role stays synchronous: its KV must be complete and its request held the
moment its first token is reported, so the sender can ship it at once.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from pdserve.engine.config import EngineConfig, ModelConfig
from pdserve.engine.core.kv_cache_manager import KVCacheManager
from pdserve.engine.core.outputs import WORKER_ROLES, RequestOutput
from pdserve.engine.core.request import Request, validate_prompt
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.engine.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from pdserve.engine.gc_heap import freeze_startup_heap
from pdserve.engine.model.sharding import check_shardable
from pdserve.engine.model_runner import ModelRunner, parse_dtype
from pdserve.engine.rank_tasks import RankContext, RankTasks
from pdserve.engine.sampled_tokens import SampledTokens
from pdserve.engine.tensor_parallel import RankSpec, TensorParallelRanks, rank_device


@dataclass
class RemoteReservation:
    """Decode side: where the prefill worker must write a prompt's KV."""

    req_id: str
    block_ids: list[int]  # blocks to fill, covering prompt tokens [num_cached_tokens, prompt_len)
    num_cached_tokens: int  # prompt tokens already cached here (block-aligned)


class LLMEngine:
    def __init__(self, config: EngineConfig, role: str = "both") -> None:
        if role not in WORKER_ROLES:
            raise ValueError(f"role must be one of {', '.join(WORKER_ROLES)}, got {role!r}")
        config.validate()
        self.config = config
        self.model_config = ModelConfig.resolve(config.model)
        max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        if self.model_config.sliding_window:
            max_model_len = min(max_model_len, self.model_config.sliding_window)
        self.max_model_len = max_model_len
        runner_kwargs = dict(
            dtype=parse_dtype(config.dtype),
            block_size=config.block_size,
            num_blocks=config.num_gpu_blocks,
            max_num_tokens=config.max_num_batched_tokens,
            attention_backend=config.attention_backend,
            load_format=config.load_format,
            max_num_seqs=config.max_num_seqs,
            max_model_len=max_model_len,
            enforce_eager=config.enforce_eager,
        )
        self.tp_ranks: TensorParallelRanks | None = None
        if config.tensor_parallel_size == 1:
            self.runner = ModelRunner(self.model_config, device=config.device, **runner_kwargs)
            self._execute = self.runner.execute
        else:
            self.runner = self._start_tensor_parallel(config, role, runner_kwargs)
            self._execute = functools.partial(self.tp_ranks.execute, self.runner)
        num_host_blocks = self.runner.enable_host_tier(config.num_host_blocks, config.host_cache_gb)
        self.kv_manager = KVCacheManager(
            self.runner.num_blocks,
            config.block_size,
            config.enable_prefix_caching,
            config.kv_events,
            num_host_blocks,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, max_model_len),
            self.kv_manager,
        )
        self.role = role
        self._ids = itertools.count()
        self.num_steps = 0
        self.async_scheduling = config.async_scheduling and self.role != "prefill"
        self._in_flight: tuple[SchedulerOutput, SampledTokens] | None = None  # launched, not yet read
        self._penalized: set[str] = set()  # unfinished requests with penalties (no running ahead)
        freeze_startup_heap()  # last: the model, its kernels and the KV pool are all built

    def _start_tensor_parallel(self, config: EngineConfig, role: str, runner_kwargs: dict) -> ModelRunner:
        """Spawn ranks 1..N-1, build rank 0's runner here, then theirs (same block count); on
        CUDA all capture their decode graphs and warm up together."""
        size = config.tensor_parallel_size
        check_shardable(self.model_config, size)
        shared = config.tensor_parallel_shared_device
        self.tp_ranks = TensorParallelRanks(size, config.device, shared_device=shared)
        try:
            runner = ModelRunner(
                self.model_config,
                device=rank_device(config.device, 0, shared),
                tp=self.tp_ranks.group,
                **runner_kwargs,
            )
            spec_kwargs = dict(runner_kwargs, num_blocks=runner.num_blocks)
            self.tp_ranks.start(RankSpec(self.model_config, config.device, spec_kwargs))
            if runner.device.type == "cuda":  # as a one-rank runner does in its constructor
                self.tp_ranks.warm_up(runner)
        except BaseException:
            self.tp_ranks.shutdown()
            raise
        return runner

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks (nothing to do with one rank) and unpin the host
        tier's slots; idempotent."""
        if self.tp_ranks is not None:
            self.tp_ranks.shutdown()
        if self.runner.host_kv is not None:
            self.runner.host_kv.close()

    # -- properties ---------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def kv_cache(self) -> torch.Tensor:
        return self.runner.kv_cache

    @property
    def eos_token_id(self) -> int | None:
        return self.model_config.eos_token_id

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._in_flight is not None

    # -- requests -----------------------------------------------------------
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def _make_request(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        params.validate()
        if params.n != 1:
            raise ValueError(f"n = {params.n}: an engine request is one sample; the router expands n")
        validate_prompt(prompt_token_ids, self.model_config.vocab_size, self.max_model_len)
        needed = -(-(len(prompt_token_ids) + 1) // self.block_size)
        if needed > self.kv_manager.num_blocks:
            raise ValueError(
                f"prompt needs {needed} KV blocks, the cache has only "
                f"{self.kv_manager.num_blocks} (num_gpu_blocks)"
            )
        if params.has_penalties:
            self._penalized.add(req_id)
        return Request(
            req_id, prompt_token_ids, params, self.eos_token_id, eos_token_ids=self.model_config.eos_token_ids
        )

    def add_request(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        request = self._make_request(req_id, prompt_token_ids, params)
        self.scheduler.add_request(request)
        return request

    def abort_request(self, req_id: str) -> bool:
        """Abort a queued, running, held or KV-awaiting request; free its blocks."""
        self._penalized.discard(req_id)
        return self.scheduler.abort(req_id) is not None

    # -- prefill role -------------------------------------------------------
    def get_block_ids(self, req_id: str) -> list[int]:
        return self.kv_manager.get_block_ids(req_id)

    def release_request(self, req_id: str) -> None:
        """Prefill role: the KV of a finished prefill has been sent (or failed): free it."""
        self._penalized.discard(req_id)
        self.scheduler.release_held(req_id)

    def gather_kv(
        self, block_ids: list[int], layers: slice | None = None, ready: list | None = None
    ) -> torch.Tensor:
        """Tensor-parallel prefill: the KV of `block_ids` in `layers` (None: all) with every KV
        head of the model, [L', 2, n, block_size, Hkv, D] on rank 0 (between steps: the ranks
        run it together). `ready`: see `TensorParallelRanks.gather_kv` (the reader waits)."""
        return self.tp_ranks.gather_kv(self.runner, block_ids, layers, ready)

    def rank_tasks(self) -> RankTasks:
        """This worker's ranks as a KV transfer drives them rank to rank (engine/rank_tasks.py):
        rank 0 here, ranks 1..N-1 through their pipes."""
        if self.tp_ranks is None:
            cache = self.runner.kv_cache
            return RankTasks(RankContext(0, 1, cache, cache.device), None)
        return RankTasks(self.tp_ranks.context(self.runner), self.tp_ranks.submit)

    # -- decode role ----------------------------------------------------------
    def scatter_kv(self, chunk: torch.Tensor, block_ids: list[int], layers: slice) -> None:
        """Tensor-parallel decode: write a whole-heads chunk of `layers` into `block_ids` on
        every rank, each its heads (between steps: the ranks run it together)."""
        self.tp_ranks.scatter_kv(self.runner, chunk, block_ids, layers)

    def reserve_remote(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> RemoteReservation | None:
        """Reserve blocks for a prompt whose KV comes from a prefill worker.

        Blocks already cached here for the prompt's prefix are reused; only the
        rest are returned for the sender to fill. None if the pool is full now.
        """
        request = self._make_request(req_id, prompt_token_ids, params)
        table = self.scheduler.add_remote_request(request)
        # The transfer writes the reserved blocks from another thread: blocks this evicted
        # are saved, and host-tier hits loaded, before the handle leaves.
        self.runner.run_block_copies(self.kv_manager.take_block_copies(), wait=True)
        if table is None:
            self._penalized.discard(req_id)
            return None
        first = request.num_cached_tokens // self.block_size
        last = -(-request.num_prompt_tokens // self.block_size)
        return RemoteReservation(req_id, table[first:last], request.num_cached_tokens)

    def finish_remote(self, req_id: str, first_token_id: int) -> Request:
        """The prompt's KV is in place: decode from the prefill's first token."""
        return self.scheduler.finish_remote_kv(req_id, first_token_id)

    # -- the step -------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step; returns an output for every request that got a token (under
        async scheduling: in the step launched by the previous call)."""
        outputs: list[RequestOutput] = []
        if self._in_flight is not None and self._penalized:
            # A penalized request's next token depends on the one in flight: take it first.
            outputs = self._finish_step(*self._in_flight)
            self._in_flight = None
        sched_out = self.scheduler.schedule()
        launched = None
        if not sched_out.is_empty:
            launched = (sched_out, self._execute(sched_out, self.scheduler.requests))
            self.num_steps += 1
        if self.async_scheduling:
            done, self._in_flight = self._in_flight, launched
        else:
            done = launched
        if done is not None:
            outputs += self._finish_step(*done)
        return outputs

    def _finish_step(self, done_out: SchedulerOutput, sampled: SampledTokens) -> list[RequestOutput]:
        tokens = sampled.wait()
        for segment, prompt_lps in sampled.prompt_logprobs():  # before update drops finished ones
            request = self.scheduler.requests.get(segment.req_id)
            if request is not None and request.prompt_logprobs is not None:
                at = segment.first_position - 1  # prompt_logprobs[i] is prompt token i + 1's
                request.prompt_logprobs[at : at + len(prompt_lps)] = prompt_lps
        touched = self.scheduler.update(done_out, tokens)
        logprobs = sampled.logprobs_by_req()
        outputs = []
        for request in touched:
            finished = request.is_finished
            if self.role == "prefill" and not finished:
                # Stop here; keep the blocks until the worker has shipped them.
                self.scheduler.hold(request)
            if finished:
                self._penalized.discard(request.req_id)
            token_logprobs = logprobs.get(request.req_id)
            outputs.append(
                RequestOutput(
                    req_id=request.req_id,
                    new_token_ids=[request.output_token_ids[-1]],
                    finished=finished,
                    finish_reason=request.finish_reason.value if finished else None,
                    num_prompt_tokens=request.num_prompt_tokens,
                    num_cached_tokens=request.num_cached_tokens,
                    num_output_tokens=request.num_output_tokens,
                    new_logprobs=None if token_logprobs is None else [token_logprobs],
                    prompt_logprobs=request.prompt_logprobs if request.num_output_tokens == 1 else None,
                )
            )
        return outputs

    # -- state for the router ---------------------------------------------------
    def take_kv_events(self) -> list:
        return self.kv_manager.take_events()

    def is_waiting_for_remote_kv(self, req_id: str) -> bool:
        """Decode role: blocks reserved for `req_id`, its KV not landed yet (any thread)."""
        return self.scheduler.is_waiting_for_remote_kv(req_id)

    def load_stats(self) -> dict[str, int]:
        return {
            "num_free_blocks": self.kv_manager.num_free_blocks,
            "num_total_blocks": self.kv_manager.num_blocks,
            "block_size": self.block_size,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_queued_prefill_tokens": self.scheduler.num_queued_prefill_tokens,
            "num_held": self.scheduler.num_held,
        }
