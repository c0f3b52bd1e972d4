"""`LlamaForCausalLM.forward_two_batches` (two micro-batches whose attention and GEMMs
overlap on a GPU) computes what `forward` does. On CPU it runs in the same order on one
stream, so this checks its bookkeeping: the rows of each half, their residual streams, each
half's metadata, the KV written. tests/gpu checks the two-stream run against transformers."""

from __future__ import annotations

import pytest
import torch

from engine.attention import AttentionMetadata, get_backend
from engine.config import ModelConfig
from engine.model.loader import load_model

BLOCK = 4


def decode_meta(seq_lens: list[int], tables: torch.Tensor) -> AttentionMetadata:
    """One new token per sequence, at position seq_len - 1, into its own blocks."""
    last = torch.tensor(seq_lens) - 1
    slots = tables[torch.arange(len(seq_lens)), last // BLOCK].long() * BLOCK + last % BLOCK
    return AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        query_lens_cpu=[1] * len(seq_lens),
        seq_lens_cpu=seq_lens,
        max_query_len=1,
        max_seq_len=max(seq_lens),
    )


@pytest.mark.parametrize("split", [1, 3, 5])
def test_two_batches_match_one(split: int) -> None:
    torch.manual_seed(0)
    config = ModelConfig.tiny()
    model = load_model(config, get_backend("reference", "cpu"), "cpu", torch.float32)
    seq_lens = [5, 9, 1, 14, 7, 12]
    width = -(-max(seq_lens) // BLOCK)
    tables = torch.randperm(len(seq_lens) * width).view(len(seq_lens), width).to(torch.int32)
    shape = (config.num_hidden_layers, 2, tables.numel(), BLOCK, config.num_key_value_heads, config.head_dim)
    cache = torch.randn(shape)
    input_ids = torch.randint(config.vocab_size, (len(seq_lens),))
    positions = torch.tensor(seq_lens) - 1

    def halves(start: int, end: int) -> AttentionMetadata:
        return decode_meta(seq_lens[start:end], tables[start:end])

    with torch.inference_mode():
        one_cache = cache.clone()
        expected = model(input_ids, positions, one_cache, decode_meta(seq_lens, tables))
        two_cache = cache.clone()
        metas = (halves(0, split), halves(split, len(seq_lens)))
        got = model.forward_two_batches(input_ids, positions, two_cache, metas, split, None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two_cache, one_cache, rtol=1e-5, atol=1e-5)
    assert not torch.equal(one_cache, cache)  # the step wrote its K/V


def test_engine_config_rejects_a_one_row_split() -> None:
    from engine.llm_engine import EngineConfig

    with pytest.raises(ValueError, match="decode_two_batch_min"):
        EngineConfig(decode_two_batch_min=1).validate()
