"""What one engine step reports per request (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
