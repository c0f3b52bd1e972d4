"""Sampling parameters of one request, validated at the door.

Pure Python: the scheduler and the router both use this class, and neither may
depend on torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to pick the next token and when to stop.

    temperature == 0 means greedy. top_k <= 0 and top_p == 1 switch those filters
    off. A request with a `seed` draws from its own generator, so its tokens do not
    depend on what else is in the batch.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # Tokens this request generated before it was started again elsewhere (a migrated
    # request's prompt ends with them): seeded draws count positions from here, so the
    # stream goes on exactly as it would have. Set by `resumed_after`, never by clients.
    num_prior_output_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_token_ids = list(self.stop_token_ids)
        self.stop = list(self.stop)
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def resumed_after(self, num_generated: int) -> SamplingParams:
        """These parameters for the rest of a request that already generated `num_generated`
        tokens (now part of its prompt): the same stream, with that many fewer to go."""
        if not 0 <= num_generated < self.max_tokens:
            raise ValueError(f"cannot resume after {num_generated} of {self.max_tokens} tokens")
        return dataclasses.replace(
            self,
            max_tokens=self.max_tokens - num_generated,
            min_tokens=max(0, self.min_tokens - num_generated),
            num_prior_output_tokens=self.num_prior_output_tokens + num_generated,
        )

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if (
            not isinstance(self.temperature, (int, float))
            or self.temperature < 0
            or self.temperature != self.temperature
        ):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 = off), got {self.top_k!r}")
        prior = self.num_prior_output_tokens
        if not isinstance(prior, int) or prior < 0:
            raise ValueError(f"num_prior_output_tokens must be an integer >= 0, got {prior!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for tok in self.stop_token_ids:
            if not isinstance(tok, int) or tok < 0:
                raise ValueError(f"stop_token_ids must hold non-negative integers, got {tok!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
