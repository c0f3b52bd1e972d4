"""The multi-turn driver's pure parts: think times and per-turn hit rates."""

from __future__ import annotations

import pytest

from pdserve.bench.datasets import sample_multi_turn
from pdserve.bench.metrics import RequestResult
from pdserve.bench.multiturn import hit_rate_by_turn, think_times


def test_think_times_none_before_first_turn_and_reproducible() -> None:
    conversations = sample_multi_turn(3, 4, 8, 4, 2, vocab_size=30)
    pauses = think_times(conversations, 0.5, seed=1)
    assert [len(p) for p in pauses] == [4, 4, 4] and all(p[0] == 0.0 for p in pauses)
    assert all(t > 0 for p in pauses for t in p[1:])
    assert pauses == think_times(conversations, 0.5, seed=1) != think_times(conversations, 0.5, seed=2)
    assert think_times(conversations, 0.0, seed=1) == [[0.0] * 4] * 3
    with pytest.raises(ValueError, match="think-time"):
        think_times(conversations, -1.0, seed=1)


def test_hit_rate_by_turn_counts_completed_turns_only() -> None:
    def done(prompt: int, cached: int) -> RequestResult:
        return RequestResult(success=True, prompt_len=prompt, cached_tokens=cached, output_tokens=1)

    failed = RequestResult(success=False, prompt_len=100, cached_tokens=0)
    rates = hit_rate_by_turn([[done(40, 16), done(80, 64)], [done(40, 0), failed], [failed]])
    assert rates == [16 / 80, 64 / 80]
    assert hit_rate_by_turn([[failed]]) == [None]
