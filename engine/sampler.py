"""Token sampling: penalties, greedy, temperature, min-p, top-k, top-p, per-request seeds,
and the log-probabilities a request asks for.

All rows are sampled on the logits' device. Greedy rows take the argmax. Random
rows draw by the exponential-race trick (argmax of p / E with E ~ Exp(1)), which
equals sampling from p. A seeded request draws its noise from its own generator,
seeded by (seed, number of tokens generated so far), so its tokens do not depend
on the batch it shares or on earlier runs.

Order (vLLM v1's): penalties on the logits (greedy rows too), then temperature, min-p,
top-k and top-p. Logprobs come from the raw logits, before any of that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.core.outputs import TokenLogprobs
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.engine.host_tensors import host_to_device


@dataclass
class SamplingRow:
    params: SamplingParams
    num_output_tokens: int  # tokens generated before this one (for the seeded stream)
    # rows with penalties only: the request's tokens so far (none may be in flight)
    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] | None = None


@dataclass
class LogprobsTensors:
    """Log-probabilities of R chosen tokens under R rows of logits, on one device.

    token_logprobs [R] and ranks [R] of the chosen tokens; top_ids / top_logprobs [R, K],
    K = the most alternatives any row asked for (each row keeps its own first ones).
    """

    token_logprobs: torch.Tensor
    ranks: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor

    @classmethod
    def compute(cls, logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> LogprobsTensors:
        """logits [R, V] (raw), token_ids [R] int64 on the same device."""
        logprobs = logits.float().log_softmax(dim=-1)
        token_lps = logprobs.gather(1, token_ids[:, None]).squeeze(1)
        ranks = (logprobs > token_lps[:, None]).sum(dim=-1) + 1
        top_lps, top_ids = logprobs.topk(num_top, dim=-1)
        return cls(token_lps, ranks, top_ids, top_lps)

    def to_host(self) -> LogprobsTensors:
        """Non-blocking copies (the caller records an event after them)."""
        tensors = [self.token_logprobs, self.ranks, self.top_ids, self.top_logprobs]
        return LogprobsTensors(*[t.to("cpu", non_blocking=True) for t in tensors])

    def to_list(self, token_ids: list[int], num_top: list[int]) -> list[TokenLogprobs]:
        """Host tensors -> one TokenLogprobs per row (call once the copies are done)."""
        token_lps, ranks = self.token_logprobs.tolist(), self.ranks.tolist()
        top_ids, top_lps = self.top_ids.tolist(), self.top_logprobs.tolist()
        return [
            TokenLogprobs(
                token_ids[j], token_lps[j], ranks[j], list(zip(top_ids[j][:k], top_lps[j][:k], strict=True))
            )
            for j, k in enumerate(num_top)
        ]


@dataclass
class PromptLogprobRows:
    """One request's share of a step's prompt logprobs: hidden rows `rows` predict the
    prompt tokens `token_ids`, which start at prompt position `first_position`."""

    req_id: str
    rows: range
    token_ids: list[int]
    first_position: int
    num_top: int


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


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[P, V] float32: how often each token occurs in each list."""
    width = max(1, max(len(t) for t in token_lists))
    # pad with an extra column `vocab`, dropped below
    padded = [t + [vocab] * (width - len(t)) for t in token_lists]
    ids = host_to_device(padded, torch.int64, device)
    counts = torch.zeros((len(token_lists), vocab + 1), dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logits [N, V] -> a copy with each penalized row's presence, frequency and repetition
    penalties applied (rows without penalties unchanged; no copy when no row has any)."""
    penalized = [i for i, r in enumerate(rows) if r.params.has_penalties]
    if not penalized:
        return logits
    device, vocab = logits.device, logits.shape[-1]
    params = [rows[i].params for i in penalized]
    outputs = [rows[i].output_token_ids or [] for i in penalized]
    prompts = [rows[i].prompt_token_ids or [] for i in penalized]
    out_counts = _token_counts(outputs, vocab, device)
    seen = (out_counts + _token_counts(prompts, vocab, device)) > 0
    idx = host_to_device(penalized, torch.int64, device)
    sub = logits.index_select(0, idx)
    rep = host_to_device([p.repetition_penalty for p in params], sub.dtype, device)[:, None]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = host_to_device([p.frequency_penalty for p in params], sub.dtype, device)[:, None]
    pres = host_to_device([p.presence_penalty for p in params], sub.dtype, device)[:, None]
    sub = sub - freq * out_counts - pres * (out_counts > 0).to(sub.dtype)
    return logits.index_copy(0, idx, sub)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask logits of tokens less likely than min_p times the row's most likely one.
    logits [N, V] (temperature applied); min_p [N] (0 = off)."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def gather_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, rows: list[SamplingRow]
) -> tuple[list[int], LogprobsTensors] | None:
    """The raw logprobs of the sampled tokens (and the top ones) of the rows that ask for
    them: (those rows' indices, their logprobs); None when no row asks."""
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not wanted:
        return None
    idx = host_to_device(wanted, torch.int64, logits.device)
    num_top = max(rows[i].params.logprobs for i in wanted)
    return wanted, LogprobsTensors.compute(logits.index_select(0, idx), tokens.index_select(0, idx), num_top)


def gather_prompt_logprobs(
    hidden: torch.Tensor, compute_logits, segments: list[PromptLogprobRows]
) -> LogprobsTensors:
    """Prompt logprobs of every segment's rows, in order. hidden [T, H] (the step's hidden
    states); compute_logits maps [R, H] to [R, V]."""
    rows = [r for seg in segments for r in seg.rows]
    device = hidden.device
    logits = compute_logits(hidden.index_select(0, host_to_device(rows, torch.int64, device)))
    targets = host_to_device([t for seg in segments for t in seg.token_ids], torch.int64, device)
    return LogprobsTensors.compute(logits, targets, max(seg.num_top for seg in segments))


def sample_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logits [N, V] float32 -> [N] int64 token ids on the logits' device (no host sync)."""
    logits = apply_penalties(logits, rows)
    if all(r.params.greedy for r in rows):
        return logits.argmax(dim=-1)
    device = logits.device
    temps = host_to_device([r.params.temperature or 1.0 for r in rows], logits.dtype, device)
    scaled = logits / temps[:, None]
    if any(r.params.min_p > 0 for r in rows):
        scaled = apply_min_p(scaled, host_to_device([r.params.min_p for r in rows], logits.dtype, device))
    if any(r.params.top_k > 0 or r.params.top_p < 1.0 for r in rows):
        top_k = host_to_device([max(r.params.top_k, 0) for r in rows], torch.int64, device)
        top_p = host_to_device([r.params.top_p for r in rows], logits.dtype, device)
        scaled = apply_top_k_top_p(scaled, top_k, top_p)
    probs = scaled.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for i, r in enumerate(rows):
        if r.params.seed is not None:
            noise[i] = _seeded_exponential((probs.shape[1],), r.params.seed, r.num_output_tokens, device)
    tokens = (probs / noise).argmax(dim=-1)
    greedy_rows = [r.params.greedy for r in rows]
    if any(greedy_rows):
        greedy = host_to_device(greedy_rows, torch.bool, device)
        tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    return tokens


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """logits [N, V] float32 -> one token id per row (host list)."""
    return sample_tokens(logits, rows).tolist()
