"""Continuous batching with chunked prefill, prefix caching and preemption.

One token budget per step covers prefill and decode alike (as in vLLM v1): a
request is scheduled for `num_tokens - num_computed_tokens` new tokens, capped
by what is left of the budget, so a long prompt is prefilled in chunks across
steps while running requests keep decoding. Running requests are served first,
in arrival order; if one cannot get a block, the most recently arrived running
request is preempted (its blocks freed, to be recomputed later). Waiting
requests are admitted strictly first-come-first-served: if the head of the
queue does not fit, nothing behind it jumps ahead, so nothing starves.

`schedule()` advances each request's `num_computed_tokens` at once and counts the
tokens its step will sample as pending, so the next step can be scheduled before
this one's tokens are back (async scheduling, as in vLLM v1): a decode row then
feeds the token still on the device. `update()` appends the sampled tokens. A
request whose in-flight token is its last one (max_tokens, context) is not
scheduled again; one that stops on EOS or a stop token computes at most one
token that is thrown away.

The output names request ids, token counts and block ids, never tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdserve.engine.core.host_tier import BlockCopies
from pdserve.engine.core.kv_cache_manager import KVCacheManager
from pdserve.engine.core.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    req_id: str
    num_computed_tokens: int  # tokens whose KV is already cached, before this step
    num_new_tokens: int  # tokens to compute this step
    block_ids: list[int]  # the request's whole block table (the manager's list: do not mutate)
    sample: bool  # True when this step reaches the end of the known tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_req_ids: list[str] = field(default_factory=list)
    # host-tier copies to run before this step's forward (evicted blocks saved, hits loaded)
    block_copies: BlockCopies = field(default_factory=BlockCopies)

    @property
    def total_num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0  # total over the scheduler's life
        self.num_held = 0  # prefill role: requests in HELD_FOR_TRANSFER

    # -- queue management -------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.req_id in self.requests:
            raise ValueError(f"request_id {request.req_id!r} is already in use")
        self.requests[request.req_id] = request
        self.waiting.append(request)

    def add_remote_request(self, request: Request) -> list[int] | None:
        """Decode role: reserve blocks for a prompt whose KV will arrive from a
        prefill worker. Reuses cached prefix blocks. Returns the block table or
        None if the pool cannot hold it (nothing is then kept)."""
        if request.req_id in self.requests:
            raise ValueError(f"request_id {request.req_id!r} is already in use")
        hits, num_hit_tokens = self.kv.get_computed_blocks(request)
        request.num_computed_tokens = 0
        # Blocks for the whole prompt plus the first sampled token.
        table = self.kv.allocate_slots(request, request.num_tokens + 1 - num_hit_tokens, hits, cache=False)
        if table is None:
            return None
        request.num_cached_tokens = num_hit_tokens
        request.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        self.requests[request.req_id] = request
        return table

    def finish_remote_kv(self, req_id: str, first_token_id: int) -> Request:
        """Decode role: the prompt's KV has landed; start decoding after `first_token_id`."""
        request = self.requests[req_id]
        if request.status != RequestStatus.WAITING_FOR_REMOTE_KVS:
            raise RuntimeError(f"request {req_id!r} is not waiting for KV (status {request.status.value})")
        request.num_computed_tokens = request.num_prompt_tokens
        self.kv.cache_full_blocks(request, request.num_prompt_tokens)
        request.append_output_token(first_token_id)
        if request.check_stop(self.config.max_model_len):
            self._free(request)
        else:
            request.status = RequestStatus.RUNNING
            self.running.append(request)
        return request

    def abort(self, req_id: str) -> Request | None:
        request = self.requests.get(req_id)
        if request is None or request.is_finished:
            return None
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        elif request.status == RequestStatus.HELD_FOR_TRANSFER:
            self.num_held -= 1
        request.status = RequestStatus.FINISHED_ABORTED
        self._free(request)
        return request

    def finish(self, request: Request) -> None:
        """Take a request that `update` marked finished out of the running set (or out
        of the waiting queue, if it was preempted while its last token was in flight)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._free(request)

    def _free(self, request: Request) -> None:
        self.kv.free(request)
        self.requests.pop(request.req_id, None)

    def is_waiting_for_remote_kv(self, req_id: str) -> bool:
        """Decode role: True while `req_id` has blocks reserved and its KV has not landed.
        Safe to read from another thread: only `finish_remote_kv` and `abort` end that state."""
        request = self.requests.get(req_id)
        return request is not None and request.status == RequestStatus.WAITING_FOR_REMOTE_KVS

    def release_held(self, req_id: str) -> None:
        """Prefill role: free blocks held for a finished request's KV transfer."""
        request = self.requests.get(req_id)
        if request is not None:
            if request.status == RequestStatus.HELD_FOR_TRANSFER:
                self.num_held -= 1
            self._free(request)

    def hold(self, request: Request) -> None:
        """Prefill role: stop scheduling a request but keep its blocks for the send."""
        if request in self.running:
            self.running.remove(request)
        request.status = RequestStatus.HELD_FOR_TRANSFER
        self.num_held += 1

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def num_queued_prefill_tokens(self) -> int:
        return sum(r.num_tokens - r.num_computed_tokens for r in self.waiting) + sum(
            r.num_tokens - r.num_computed_tokens - 1
            for r in self.running
            if r.num_computed_tokens < r.num_prompt_tokens
        )

    # -- the step -----------------------------------------------------------
    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted_req_ids.append(request.req_id)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        # 1. Running requests, oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.last_token_pending(self.config.max_model_len):
                i += 1
                continue
            num_new = min(request.num_tokens_with_pending - request.num_computed_tokens, budget)
            while True:
                table = self.kv.allocate_slots(request, num_new)
                if table is not None:
                    break
                victim = self.running[-1]  # the latest arrival
                self._preempt(victim, out)
                if victim is request:
                    break
            if request.status == RequestStatus.PREEMPTED:
                break
            out.scheduled.append(self._entry(request, num_new, table))
            budget -= num_new
            i += 1

        # 2. Waiting requests, strictly FCFS, unless this step had to preempt.
        while self.waiting and budget > 0 and not out.preempted_req_ids:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            if request.num_pending_tokens:
                break  # preempted with a token in flight: admit it once the token is back
            hits, num_hit_tokens = (None, 0)
            # prompt logprobs need every prompt position's logits: no cached prefix (as vLLM)
            if request.num_computed_tokens == 0 and request.sampling_params.prompt_logprobs is None:
                hits, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - request.num_computed_tokens - num_hit_tokens, budget)
            table = self.kv.allocate_slots(request, num_new, hits)
            if table is None:
                break
            self.waiting.popleft()
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_hit_tokens
            request.num_computed_tokens += num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(self._entry(request, num_new, table))
            budget -= num_new
        out.block_copies = self.kv.take_block_copies()
        return out

    def _entry(self, request: Request, num_new: int, table: list[int]) -> ScheduledRequest:
        """The step's entry for `request`; advances its computed and pending counts."""
        entry = ScheduledRequest(
            req_id=request.req_id,
            num_computed_tokens=request.num_computed_tokens,
            num_new_tokens=num_new,
            block_ids=table,  # the live table (read-only for the runner); no per-step copy
            sample=request.num_computed_tokens + num_new == request.num_tokens_with_pending,
        )
        request.num_computed_tokens += num_new
        if entry.sample:
            request.num_pending_tokens += 1
        return entry

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Append the step's sampled tokens and finish requests that stop.

        Returns the requests that got a new token (finished ones included, already
        freed). A request preempted after this step was scheduled still gets its token
        (it was sampled from the full context); its recompute will include it.
        """
        touched: list[Request] = []
        for entry in out.scheduled:
            if not entry.sample:
                continue
            request = self.requests.get(entry.req_id)
            if request is None or request.is_finished:
                continue  # aborted, or stopped on the previous step's token
            request.num_pending_tokens -= 1
            request.append_output_token(sampled[entry.req_id])
            touched.append(request)
            if request.check_stop(self.config.max_model_len):
                self.finish(request)
        return touched
