"""What the router's request path yields and raises (plain data, shared by its modules)."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.core.outputs import TokenLogprobs


class RouterError(Exception):
    """A request failed; `code` is a gRPC status code name (e.g. "INVALID_ARGUMENT")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Chunk:
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None = None  # one per token id, when the request asked
    prompt_logprobs: list[TokenLogprobs] | None = None  # first chunk only, when asked
    index: int = 0  # which of the request's n samples


@dataclass
class Completion:
    finish_reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queue_ms: float
    prefill_ms: float
    kv_transfer_ms: float
    decode_ms: float
    ttft_ms: float
    index: int = 0  # which of the request's n samples


@dataclass
class ModelSummary:
    name: str
    vocab_size: int
    max_model_len: int
    block_size: int
    eos_token_id: int | None
    eos_token_ids: list[int] = field(default_factory=list)  # every id that ends a request
    # generation_config.json's sampling defaults (SamplingParams field names), for unset fields
    generation_defaults: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, model_config: Any, max_model_len: int, block_size: int) -> ModelSummary:
        """The summary of an engine's `ModelConfig`."""
        return cls(
            model_config.name,
            model_config.vocab_size,
            max_model_len,
            block_size,
            model_config.eos_token_id,
            list(model_config.eos_token_ids),
            dict(model_config.generation_defaults),
        )


@dataclass
class RouterStats:
    """Counters of worker failures and what the router did about them (monotonic; a
    metrics endpoint reads them off `RouterCore.stats`)."""

    num_worker_failures: int = 0  # a worker was lost (died, hung, or restarted between polls)
    num_worker_restarts: int = 0  # a lost worker came back with a new instance id
    num_worker_recoveries: int = 0  # a lost worker answered again (restarted or not)
    num_migrations: int = 0  # requests moved on after their decode worker was lost
    num_prefill_retries: int = 0  # requests prefilled again after their prefill worker was lost
    num_requests_failed_over_limit: int = 0  # ended UNAVAILABLE: max_migrations, or no worker in time
    num_transfer_pairs_broken: int = 0  # prefill/decode pairs whose KV transfer broke (nccl)


@dataclass(frozen=True)
class LifecycleEvent:
    seq: int  # 1, 2, ... per router
    time: float  # time.time()
    message: str


class LifecycleLog:
    """The router's lifecycle events (worker lost, back, restarted; request migrated,
    retried, rejected, given up): each is logged once, to `logger` (Ray's log files, and
    the terminal with `PDSERVE_WORKER_LOGS=1`), and the latest are kept for
    `pdserve status` and `pdserve up`'s terminal."""

    def __init__(self, logger: logging.Logger, keep: int = 200) -> None:
        self.logger = logger
        self.entries: deque[LifecycleEvent] = deque(maxlen=keep)
        self._seq = 0

    def record(self, level: int, message: str, *args: object) -> None:
        text = message % args if args else message
        self._seq += 1
        self.entries.append(LifecycleEvent(self._seq, time.time(), text))
        self.logger.log(level, text)

    def since(self, seq: int) -> list[LifecycleEvent]:
        """The kept events after `seq`, oldest first."""
        return [e for e in self.entries if e.seq > seq]
