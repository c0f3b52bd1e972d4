"""What the router's request path yields and raises (plain data, shared by its modules)."""

from __future__ import annotations

from dataclasses import dataclass

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
