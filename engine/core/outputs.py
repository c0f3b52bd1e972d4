"""What a worker reports (pure Python): per request per step, its load, its cache."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprobs:
    """One generated token's log-probability under the model's raw logits."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class RequestOutput:
    """New tokens of one request from one step, or its final state. Token ids only:
    text is made by `engine.output_processor` in the front end (LLM, router)."""

    req_id: str
    new_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None  # set when the request ended because something failed
    # one entry per new token when the request asked for logprobs, else None
    new_logprobs: list[TokenLogprobs] | None = None
    # with the first token, when asked: logprobs of prompt tokens 1.. (token 0 has none)
    prompt_logprobs: list[TokenLogprobs] | None = None


@dataclass
class PrefillResult:
    """A prefill worker's answer to the router: the first token, at once (that is the TTFT).
    The KV goes on to the decode worker with that token; the router never relays it."""

    req_id: str
    first_token_id: int
    finished: bool  # the first token already ends the request (eos, stop token, max_tokens=1)
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens this prefill worker served from its own cache
    prefill_ms: float  # from arrival at the worker to the first token
    first_logprobs: TokenLogprobs | None = None  # when the request asked for logprobs
    prompt_logprobs: list[TokenLogprobs] | None = None  # when it asked for prompt logprobs


WORKER_ROLES = ("prefill", "decode", "both")  # an engine's role: one side of a pair, or co-located


@dataclass(frozen=True)
class LoadReport:
    """A worker's load, sent with every poll to the router (see router/worker_state.py)."""

    worker_id: str
    instance_id: str
    role: str  # "prefill" | "decode" | "both"
    num_free_blocks: int  # BlockPool.num_free_blocks (cached-but-free blocks count as free)
    num_total_blocks: int
    block_size: int  # must equal the block size the router hashes prompts with
    num_running: int
    num_waiting: int
    num_queued_prefill_tokens: int  # uncached prompt tokens waiting or being computed now
    timestamp: float  # when the worker took these numbers (same clock as the router's)
    num_held: int = 0  # prefill role: finished prefills whose blocks wait for their KV send

    def __post_init__(self) -> None:
        if self.role not in WORKER_ROLES:
            raise ValueError(f"LoadReport.role must be one of {WORKER_ROLES}, got {self.role!r}")


@dataclass(frozen=True)
class KVSnapshot:
    """Every block hash a worker's cache holds, for the router to resync its index from."""

    worker_id: str
    instance_id: str
    seq: int  # seq of the last KV event batch already reflected in block_hashes (-1: none)
    block_hashes: list[int]
    host_block_hashes: list[int] = field(default_factory=list)  # held by the host tier


EVERY_PEER = -1  # StepBatch.broken_transfer_peers: this rank can transfer with no peer at all


@dataclass
class StepBatch:
    """What a worker reports to the router in one poll."""

    worker_id: str
    instance_id: str  # new on every worker start, so the router can detect a restart
    outputs: list[RequestOutput] = field(default_factory=list)
    kv_events: list = field(default_factory=list)  # BlockStored / BlockRemoved, in order
    event_seq: int = 0  # sequence number of this batch of kv_events
    load: LoadReport | None = None  # None once the worker is stopping
    kv_wait_ms: dict[str, float] = field(default_factory=dict)  # decode role: per started request
    # The worker's rank in the KV transfer process group (nccl backend; None without one), and
    # the ranks it can no longer transfer with, each with why (a transfer failed part-way);
    # EVERY_PEER: none at all (one of its own waits timed out)
    transfer_rank: int | None = None
    broken_transfer_peers: dict[int, str] = field(default_factory=dict)
