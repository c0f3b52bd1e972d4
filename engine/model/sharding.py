"""Which part of each weight a tensor-parallel rank holds (Megatron-style).

Column-parallel (output rows split): q/k/v and gate/up projections, so a rank holds whole
attention heads and a contiguous slice of the MLP's intermediate; the embedding and lm_head
split the vocabulary. Row-parallel (input columns split): o_proj and down_proj, whose partial
sums the ranks all-reduce. KV heads split like the query heads; with fewer KV heads than
ranks each rank keeps (replicates) the one KV head its query heads read. Norms are whole on
every rank. Plain arithmetic on the config: the loader and the model both read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.config import ModelConfig

TP_KEY = "engine.tensor_parallel_size"


def check_shardable(config: ModelConfig, size: int) -> None:
    """Raise ValueError, naming the key, if `config` cannot be split over `size` ranks."""
    if size == 1:
        return
    problems = []
    if config.num_attention_heads % size:
        problems.append(f"num_attention_heads {config.num_attention_heads} is not divisible by it")
    kv = config.num_key_value_heads
    if kv % size and size % kv:
        problems.append(f"num_key_value_heads {kv} neither divides nor is divisible by it")
    if config.intermediate_size % size:
        problems.append(f"intermediate_size {config.intermediate_size} is not divisible by it")
    if problems:
        raise ValueError(f"{TP_KEY} = {size} does not fit model {config.name!r}: {'; '.join(problems)}")


def kv_head_range(num_kv_heads: int, rank: int, size: int) -> tuple[int, int]:
    """(first KV head, count) rank `rank` of `size` holds of a model's `num_kv_heads`: an equal
    slice when the heads split, the one head its query heads read when there are fewer heads
    than ranks (then `size // num_kv_heads` consecutive ranks hold the same head)."""
    if num_kv_heads >= size:
        count = num_kv_heads // size
        return rank * count, count
    return rank * num_kv_heads // size, 1


def kv_head_sources(num_kv_heads: int, size: int) -> list[int]:
    """The ranks whose KV heads, concatenated in rank order, are each of the model's heads once:
    every rank when the heads split; the first rank holding each head when they are replicated."""
    sources, covered = [], 0
    for rank in range(size):
        start, count = kv_head_range(num_kv_heads, rank, size)
        if start == covered:
            sources.append(rank)
            covered = start + count
    return sources


@dataclass(frozen=True)
class ShardLayout:
    """Rank `rank` of `size`: its heads, KV heads, intermediate slice and vocabulary rows."""

    rank: int
    size: int
    num_heads: int  # query heads held here
    num_kv_heads: int  # KV heads held here (1 when replicated)
    kv_head_start: int  # the first KV head held here, of the model's
    intermediate_size: int  # MLP columns held here
    vocab_start: int  # vocabulary rows [vocab_start, vocab_end) held here ...
    vocab_end: int
    vocab_rows: int  # ... in a table of vocab_rows rows (equal on every rank; padding at the end)
    head_dim: int

    @classmethod
    def for_rank(cls, config: ModelConfig, rank: int = 0, size: int = 1) -> ShardLayout:
        check_shardable(config, size)
        kv_start, num_kv = kv_head_range(config.num_key_value_heads, rank, size)
        vocab_rows = -(-config.vocab_size // size)
        vocab_start = min(rank * vocab_rows, config.vocab_size)
        return cls(
            rank=rank,
            size=size,
            num_heads=config.num_attention_heads // size,
            num_kv_heads=num_kv,
            kv_head_start=kv_start,
            intermediate_size=config.intermediate_size // size,
            vocab_start=vocab_start,
            vocab_end=min(vocab_start + vocab_rows, config.vocab_size),
            vocab_rows=vocab_rows,
            head_dim=config.head_dim,
        )

    def checkpoint_slice(self, key: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of a checkpoint tensor (Hugging Face name) this rank holds;
        None: the whole tensor."""
        if self.size == 1:
            return None
        hd = self.head_dim
        if ".q_proj." in key:
            start = self.rank * self.num_heads * hd
            return 0, start, start + self.num_heads * hd
        if ".k_proj." in key or ".v_proj." in key:
            return 0, self.kv_head_start * hd, (self.kv_head_start + self.num_kv_heads) * hd
        if ".gate_proj." in key or ".up_proj." in key:
            start = self.rank * self.intermediate_size
            return 0, start, start + self.intermediate_size
        if ".o_proj." in key:
            start = self.rank * self.num_heads * hd
            return 1, start, start + self.num_heads * hd
        if ".down_proj." in key:
            start = self.rank * self.intermediate_size
            return 1, start, start + self.intermediate_size
        if "embed_tokens." in key or key.startswith("lm_head."):
            return 0, self.vocab_start, self.vocab_end
        return None
