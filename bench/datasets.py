"""Synthetic benchmark workloads, sent as token ids (no tokenizer, no data file).

Three datasets of independent requests, named as in vLLM's `bench serve`:
- `random`: prompt and output lengths uniform in [len*(1-r), len*(1+r)].
- `prefix-repetition`: a few shared prefixes, each followed by a unique suffix,
  to exercise prefix caching and prefix-aware routing.
- `sharegpt-synthetic`: lengths drawn from log-normal fits that approximate the
  ShareGPT conversation set as vLLM's benchmark filters it (prompt 4..1024
  tokens, prompt + output <= 2048), without the file.

and `multi-turn`: conversations whose turn k resends the whole conversation so far
(a system prompt shared by every conversation, earlier user messages and the model's
earlier replies as the server returned them) plus a new user message; bench/multiturn.py
drives them, since each turn's prompt depends on the previous turn's output.

Every token id is drawn from [0, vocab_size) minus `excluded_token_ids` (eos and
other special ids), so a prompt never contains an end marker.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

DATASET_NAMES = ("random", "prefix-repetition", "sharegpt-synthetic", "multi-turn")

# Log-normal (median, sigma) for ShareGPT-like lengths: mean prompt ~ 260 and mean
# output ~ 225 tokens after clipping, close to the Llama-tokenized ShareGPT set.
SHAREGPT_PROMPT_MEDIAN, SHAREGPT_PROMPT_SIGMA = 160.0, 1.0
SHAREGPT_OUTPUT_MEDIAN, SHAREGPT_OUTPUT_SIGMA = 150.0, 0.9
SHAREGPT_MIN_LEN = 4


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: the prompt's token ids and the exact output length."""

    prompt_token_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


class TokenSampler:
    """Draws token ids uniformly from the vocabulary minus excluded (special) ids."""

    def __init__(self, vocab_size: int, excluded_token_ids: Iterable[int] = ()) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        excluded = np.asarray(sorted({t for t in excluded_token_ids if 0 <= t < vocab_size}), dtype=np.int64)
        self.allowed = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), excluded)
        if self.allowed.size == 0:
            raise ValueError("every token id is excluded")

    def sample(self, rng: np.random.Generator, length: int) -> list[int]:
        return self.allowed[rng.integers(0, self.allowed.size, size=length)].tolist()


def _uniform_lengths(rng: np.random.Generator, count: int, mean_len: int, range_ratio: float) -> np.ndarray:
    low = max(1, int(mean_len * (1.0 - range_ratio)))
    high = max(low, int(mean_len * (1.0 + range_ratio)))
    return rng.integers(low, high + 1, size=count)


def sample_random(
    num_requests: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab_size: int,
    seed: int = 0,
    excluded_token_ids: Iterable[int] = (),
) -> list[BenchRequest]:
    """vLLM's `random` dataset: lengths uniform in [len*(1-r), len*(1+r)], random tokens."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"random-range-ratio must be in [0, 1), got {range_ratio}")
    if input_len < 1 or output_len < 1:
        raise ValueError(
            f"random-input-len and random-output-len must be >= 1, got {input_len}, {output_len}"
        )
    rng = np.random.default_rng(seed)
    sampler = TokenSampler(vocab_size, excluded_token_ids)
    input_lens = _uniform_lengths(rng, num_requests, input_len, range_ratio)
    output_lens = _uniform_lengths(rng, num_requests, output_len, range_ratio)
    return [
        BenchRequest(sampler.sample(rng, int(n_in)), int(n_out))
        for n_in, n_out in zip(input_lens, output_lens, strict=False)
    ]


def sample_prefix_repetition(
    num_requests: int,
    prefix_len: int,
    suffix_len: int,
    num_prefixes: int,
    output_len: int,
    vocab_size: int,
    seed: int = 0,
    excluded_token_ids: Iterable[int] = (),
) -> list[BenchRequest]:
    """`num_prefixes` shared prefixes; request i uses prefix i % num_prefixes, then a fresh suffix.

    The order is shuffled so requests sharing a prefix are not sent back to back.
    """
    if num_prefixes < 1 or prefix_len < 0 or suffix_len < 0 or prefix_len + suffix_len < 1 or output_len < 1:
        raise ValueError(
            "prefix repetition needs num_prefixes >= 1, prefix_len + suffix_len >= 1, output_len >= 1"
        )
    rng = np.random.default_rng(seed)
    sampler = TokenSampler(vocab_size, excluded_token_ids)
    prefixes = [sampler.sample(rng, prefix_len) for _ in range(num_prefixes)]
    requests = [
        BenchRequest(prefixes[i % num_prefixes] + sampler.sample(rng, suffix_len), output_len)
        for i in range(num_requests)
    ]
    order = rng.permutation(num_requests)
    return [requests[i] for i in order]


def sample_sharegpt_synthetic(
    num_requests: int,
    vocab_size: int,
    seed: int = 0,
    excluded_token_ids: Iterable[int] = (),
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
) -> list[BenchRequest]:
    """ShareGPT-like lengths from log-normal fits, clipped like vLLM's ShareGPT filter."""
    if max_total_len < 2 * SHAREGPT_MIN_LEN or max_prompt_len < SHAREGPT_MIN_LEN:
        raise ValueError(f"max_total_len must be >= {2 * SHAREGPT_MIN_LEN}, got {max_total_len}")
    rng = np.random.default_rng(seed)
    sampler = TokenSampler(vocab_size, excluded_token_ids)
    prompt_cap = min(max_prompt_len, max_total_len - SHAREGPT_MIN_LEN)
    prompt_lens = rng.lognormal(math.log(SHAREGPT_PROMPT_MEDIAN), SHAREGPT_PROMPT_SIGMA, size=num_requests)
    output_lens = rng.lognormal(math.log(SHAREGPT_OUTPUT_MEDIAN), SHAREGPT_OUTPUT_SIGMA, size=num_requests)
    requests = []
    for raw_prompt, raw_output in zip(prompt_lens, output_lens, strict=False):
        prompt_len = int(np.clip(round(raw_prompt), SHAREGPT_MIN_LEN, prompt_cap))
        output_len = int(np.clip(round(raw_output), SHAREGPT_MIN_LEN, max_total_len - prompt_len))
        requests.append(BenchRequest(sampler.sample(rng, prompt_len), output_len))
    return requests


@dataclass(frozen=True)
class Conversation:
    """One synthetic conversation: a system prompt, then one user message per turn; every
    reply is `output_len` tokens (ignore_eos), generated by the server."""

    system_prompt: list[int]
    user_messages: list[list[int]]
    output_len: int

    @property
    def num_turns(self) -> int:
        return len(self.user_messages)

    def max_total_len(self) -> int:
        """Tokens of the last turn's prompt and reply: the context the model must hold."""
        user = sum(len(message) for message in self.user_messages)
        return len(self.system_prompt) + user + self.num_turns * self.output_len

    def turn_prompt(self, turn: int, previous_prompt: list[int], previous_output: list[int]) -> list[int]:
        """Turn `turn`'s prompt: the previous turn's prompt and reply (exactly as returned,
        so the prefix is what the server cached), then this turn's user message."""
        if turn == 0:
            return self.system_prompt + self.user_messages[0]
        return previous_prompt + previous_output + self.user_messages[turn]


def sample_multi_turn(
    num_conversations: int,
    num_turns: int,
    system_len: int,
    user_len: int,
    output_len: int,
    vocab_size: int,
    seed: int = 0,
    excluded_token_ids: Iterable[int] = (),
) -> list[Conversation]:
    """`num_conversations` conversations of `num_turns` turns sharing one system prompt of
    `system_len` tokens; each user message is `user_len` fresh tokens."""
    if num_conversations < 1 or num_turns < 1 or user_len < 1 or output_len < 1 or system_len < 0:
        raise ValueError(
            "multi-turn needs conversations >= 1, turns >= 1, user-len >= 1, output-len >= 1, "
            f"system-len >= 0; got {num_conversations}, {num_turns}, {user_len}, {output_len}, {system_len}"
        )
    rng = np.random.default_rng(seed)
    sampler = TokenSampler(vocab_size, excluded_token_ids)
    system_prompt = sampler.sample(rng, system_len)
    return [
        Conversation(system_prompt, [sampler.sample(rng, user_len) for _ in range(num_turns)], output_len)
        for _ in range(num_conversations)
    ]


def check_conversations_fit_model(conversations: list[Conversation], max_model_len: int) -> None:
    """Raise ValueError when a conversation's last turn would not fit max_model_len."""
    for index, conversation in enumerate(conversations):
        if conversation.max_total_len() > max_model_len:
            raise ValueError(
                f"conversation {index} grows to {conversation.max_total_len()} tokens by its last turn, "
                f"more than the model's max_model_len {max_model_len}: fewer turns or shorter messages"
            )


def check_fits_model(requests: list[BenchRequest], max_model_len: int) -> None:
    """Raise ValueError naming the first request whose prompt + output exceeds max_model_len."""
    for index, request in enumerate(requests):
        if request.prompt_len + request.output_len > max_model_len:
            raise ValueError(
                f"request {index} needs {request.prompt_len} prompt + {request.output_len} output tokens, "
                f"more than the model's max_model_len {max_model_len}: lower the dataset lengths"
            )
