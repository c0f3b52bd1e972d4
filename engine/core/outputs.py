"""What one engine step reports per request (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """New tokens of one request from one step, or its final state.

    `text` is the detokenized text of `new_token_ids` (never a split UTF-8
    character); the offline API concatenates these into the full completion.
    """

    req_id: str
    new_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None  # set when the request ended because something failed
