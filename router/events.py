"""What the router's request path yields and raises (plain data, shared by its modules)."""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass
class ModelSummary:
    name: str
    vocab_size: int
    max_model_len: int
    block_size: int
    eos_token_id: int | None


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
