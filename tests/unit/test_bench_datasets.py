"""Synthetic workloads: lengths, prefix sharing, excluded ids, reproducibility."""

from __future__ import annotations

import pytest

from pdserve.bench.datasets import (
    BenchRequest,
    Conversation,
    check_conversations_fit_model,
    check_fits_model,
    sample_multi_turn,
    sample_prefix_repetition,
    sample_random,
    sample_sharegpt_synthetic,
)


def test_random_lengths_fixed_when_range_ratio_is_zero() -> None:
    requests = sample_random(20, input_len=37, output_len=9, range_ratio=0.0, vocab_size=100, seed=1)
    assert len(requests) == 20
    assert all(r.prompt_len == 37 and r.output_len == 9 for r in requests)
    assert all(0 <= t < 100 for r in requests for t in r.prompt_token_ids)


def test_random_lengths_stay_in_range_and_vary() -> None:
    requests = sample_random(200, input_len=100, output_len=20, range_ratio=0.5, vocab_size=1000, seed=2)
    assert all(50 <= r.prompt_len <= 150 and 10 <= r.output_len <= 30 for r in requests)
    assert len({r.prompt_len for r in requests}) > 10


def test_excluded_token_ids_never_appear() -> None:
    requests = sample_random(50, 64, 4, 0.0, vocab_size=5, seed=3, excluded_token_ids=[0, 2])
    tokens = {t for r in requests for t in r.prompt_token_ids}
    assert tokens == {1, 3, 4}


def test_same_seed_same_workload_other_seed_differs() -> None:
    def make(seed: int) -> list[BenchRequest]:
        return sample_prefix_repetition(12, 16, 8, 3, 5, vocab_size=500, seed=seed)

    assert make(7) == make(7)
    assert make(7) != make(8)
    assert sample_sharegpt_synthetic(30, 500, seed=4) == sample_sharegpt_synthetic(30, 500, seed=4)


def test_prefix_repetition_shares_exact_prefixes() -> None:
    requests = sample_prefix_repetition(
        30, prefix_len=16, suffix_len=8, num_prefixes=3, output_len=5, vocab_size=10_000, seed=5
    )
    assert all(r.prompt_len == 24 and r.output_len == 5 for r in requests)
    prefixes = [tuple(r.prompt_token_ids[:16]) for r in requests]
    assert len(set(prefixes)) == 3
    assert all(prefixes.count(p) == 10 for p in set(prefixes))
    # Suffixes are fresh per request (a 10k vocabulary makes a repeat astronomically unlikely).
    assert len({tuple(r.prompt_token_ids[16:]) for r in requests}) == 30
    # Shuffled: not simply prefix 0,1,2,0,1,2,...
    assert prefixes[:3] != prefixes[3:6] or prefixes[:6] != prefixes[6:12]


def test_sharegpt_synthetic_respects_vllm_filters_and_looks_like_sharegpt() -> None:
    requests = sample_sharegpt_synthetic(2000, vocab_size=32_000, seed=6)
    assert all(4 <= r.prompt_len <= 1024 for r in requests)
    assert all(r.output_len >= 4 and r.prompt_len + r.output_len <= 2048 for r in requests)
    mean_prompt = sum(r.prompt_len for r in requests) / len(requests)
    mean_output = sum(r.output_len for r in requests) / len(requests)
    assert 150 < mean_prompt < 400 and 150 < mean_output < 350


def test_sharegpt_synthetic_fits_a_short_context() -> None:
    requests = sample_sharegpt_synthetic(300, vocab_size=100, seed=7, max_prompt_len=60, max_total_len=64)
    assert all(r.prompt_len + r.output_len <= 64 and r.prompt_len <= 60 for r in requests)


def test_bad_arguments_are_refused_with_the_flag_name() -> None:
    with pytest.raises(ValueError, match="range-ratio"):
        sample_random(1, 10, 10, 1.5, vocab_size=10)
    with pytest.raises(ValueError, match="excluded"):
        sample_random(1, 10, 10, 0.0, vocab_size=2, excluded_token_ids=[0, 1])
    with pytest.raises(ValueError, match="max_model_len 20"):
        check_fits_model([BenchRequest([1] * 15, 6)], max_model_len=20)
    check_fits_model([BenchRequest([1] * 15, 5)], max_model_len=20)


def test_multi_turn_prompts_extend_the_previous_prompt_and_reply_exactly() -> None:
    conversations = sample_multi_turn(3, 4, system_len=10, user_len=5, output_len=3, vocab_size=50, seed=4)
    assert len(conversations) == 3 and all(c.num_turns == 4 for c in conversations)
    # One system prompt shared by every conversation, different user messages.
    assert all(c.system_prompt == conversations[0].system_prompt for c in conversations)
    assert conversations[0].user_messages != conversations[1].user_messages
    conversation = conversations[1]
    prompt, output = conversation.turn_prompt(0, [], []), []
    assert prompt == conversation.system_prompt + conversation.user_messages[0]
    for turn in range(1, conversation.num_turns):
        output = [40 + turn, 41, 42]  # what the server returned for the previous turn
        previous = prompt
        prompt = conversation.turn_prompt(turn, previous, output)
        assert prompt[: len(previous)] == previous
        assert prompt[len(previous) : len(previous) + 3] == output
        assert prompt[len(previous) + 3 :] == conversation.user_messages[turn]
    # The last turn's prompt and reply: what max_total_len bounds.
    assert len(prompt) + conversation.output_len == conversation.max_total_len() == 10 + 4 * 5 + 4 * 3


def test_multi_turn_is_deterministic_and_checked() -> None:
    def make(seed: int) -> list[Conversation]:
        return sample_multi_turn(2, 3, 8, 4, 2, vocab_size=30, seed=seed, excluded_token_ids=[0])

    assert make(5) == make(5)
    assert make(5) != make(6)
    assert all(t != 0 for c in make(5) for m in [c.system_prompt, *c.user_messages] for t in m)
    with pytest.raises(ValueError, match="turns >= 1"):
        sample_multi_turn(2, 0, 8, 4, 2, vocab_size=30)
    check_conversations_fit_model(make(5), max_model_len=8 + 3 * 4 + 3 * 2)
    with pytest.raises(ValueError, match="conversation 0 grows to 26 tokens"):
        check_conversations_fit_model(make(5), max_model_len=25)
