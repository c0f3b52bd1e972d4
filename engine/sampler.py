"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds.

All rows are sampled on the logits' device. Greedy rows take the argmax. Random
rows draw by the exponential-race trick (argmax of p / E with E ~ Exp(1)), which
equals sampling from p. A seeded request draws its noise from its own generator,
seeded by (seed, number of tokens generated so far, counting those generated before
a migration: `SamplingParams.num_prior_output_tokens`), so its tokens do not depend
on the batch it shares, on earlier runs, or on the worker that resumed it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.engine.host_tensors import host_to_device


@dataclass
class SamplingRow:
    params: SamplingParams
    num_output_tokens: int  # tokens generated before this one (for the seeded stream)


def _seeded_exponential(shape: tuple[int, ...], seed: int, step: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.empty(shape, device=device).exponential_(generator=gen)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p sets. logits [N, V]; top_k [N] (0 = all); top_p [N]."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    mask = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
    # keep the smallest set whose mass reaches top_p (always at least the top token)
    cum_before = probs.cumsum(dim=-1) - probs
    mask |= cum_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def sample_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logits [N, V] float32 -> [N] int64 token ids on the logits' device (no host sync)."""
    if all(r.params.greedy for r in rows):
        return logits.argmax(dim=-1)
    device = logits.device
    temps = host_to_device([r.params.temperature or 1.0 for r in rows], logits.dtype, device)
    scaled = logits / temps[:, None]
    if any(r.params.top_k > 0 or r.params.top_p < 1.0 for r in rows):
        top_k = host_to_device([max(r.params.top_k, 0) for r in rows], torch.int64, device)
        top_p = host_to_device([r.params.top_p for r in rows], logits.dtype, device)
        scaled = apply_top_k_top_p(scaled, top_k, top_p)
    probs = scaled.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for i, r in enumerate(rows):
        if r.params.seed is not None:
            step = r.params.num_prior_output_tokens + r.num_output_tokens
            noise[i] = _seeded_exponential((probs.shape[1],), r.params.seed, step, device)
    tokens = (probs / noise).argmax(dim=-1)
    greedy_rows = [r.params.greedy for r in rows]
    if any(greedy_rows):
        greedy = host_to_device(greedy_rows, torch.bool, device)
        tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    return tokens


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """logits [N, V] float32 -> one token id per row (host list)."""
    return sample_tokens(logits, rows).tolist()
