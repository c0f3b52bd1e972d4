"""The route types policies exchange with their callers: what to route, where it went.

Kept apart from `router.policy` and `router.worker_state` so that both can use
them without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RouteRequest:
    req_id: str
    num_prompt_tokens: int
    block_hashes: Sequence[int]  # chained hashes of the prompt's full blocks
    max_tokens: int


@dataclass(frozen=True)
class RouteDecision:
    prefill_worker_id: str | None  # None: prefill on the decode worker itself
    decode_worker_id: str
    num_prefix_hit_tokens: int  # prompt tokens cached on the worker that prefills
