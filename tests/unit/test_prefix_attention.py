"""The cached-prefix path of `sdpa_prefill` on CPU: a chunk attends to its own keys causally and
to its prefix in pieces, merged by log-sum-exp; it must equal the reference attention (float32)."""

from __future__ import annotations

import pytest
import torch

from pdserve.bench.attention_kernels import build_paged_batch
from pdserve.engine.attention import ReferenceAttention, sdpa_prefill
from pdserve.engine.attention.lse_attention import attention_with_lse, merge_partials


def _reference(query, key, value, cache, meta, scale):
    return ReferenceAttention().forward(query, key, value, cache.clone(), meta, scale)


@pytest.mark.parametrize(
    ("query_lens", "prefix_lens", "heads"),
    [
        ([40], [57], (8, 2)),  # prefix ends mid-block, GQA group 4
        ([33, 20], [0, 100], (4, 4)),  # one sequence without a prefix, one with
        ([64, 17, 5], [31, 200, 16], (6, 1)),  # one KV head for every query head
    ],
)
def test_prefix_chunks_equal_reference(
    query_lens: list[int], prefix_lens: list[int], heads: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sdpa_prefill, "MIN_QUERY_WITH_PREFIX", 1)
    monkeypatch.setattr(sdpa_prefill, "PREFIX_PIECE", 48)  # several pieces per prefix: every merge runs
    query, key, value, cache, meta = build_paged_batch(
        query_lens, prefix_lens, *heads, 32, 16, torch.float32, "cpu", seed=sum(prefix_lens)
    )
    scale = 32**-0.5
    expected = _reference(query, key, value, cache, meta, scale)
    ReferenceAttention().forward(query, key, value, cache, meta, scale)  # the cache holds the new K/V too
    assert sdpa_prefill.use_sdpa_prefill(query, key, value, cache, meta)
    got = sdpa_prefill.sdpa_prefill(query, key, value, cache, meta, scale)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mixed_step_rows_after_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """first_seq skips leading decode rows: block-table rows and query rows stay aligned."""
    monkeypatch.setattr(sdpa_prefill, "MIN_QUERY_WITH_PREFIX", 1)
    query, key, value, cache, meta = build_paged_batch(
        [1, 1, 24], [9, 40, 70], 4, 2, 32, 16, torch.float32, "cpu"
    )
    scale = 0.2
    expected = _reference(query, key, value, cache, meta, scale)
    ReferenceAttention().forward(query, key, value, cache, meta, scale)
    assert sdpa_prefill.use_sdpa_prefill(query, key, value, cache, meta, first_seq=2)
    got = sdpa_prefill.sdpa_prefill(query[2:], key[2:], value[2:], cache, meta, scale, first_seq=2)
    torch.testing.assert_close(got, expected[2:], atol=1e-5, rtol=1e-5)


def test_short_chunks_over_a_prefix_stay_on_the_paged_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    query, key, value, cache, meta = build_paged_batch([300], [100], 4, 2, 32, 16, torch.float32, "cpu")
    monkeypatch.setattr(sdpa_prefill, "MIN_QUERY_WITH_PREFIX", 512)
    assert not sdpa_prefill.use_sdpa_prefill(query, key, value, cache, meta)
    monkeypatch.setattr(sdpa_prefill, "MIN_QUERY_WITH_PREFIX", 256)
    assert sdpa_prefill.use_sdpa_prefill(query, key, value, cache, meta)
    monkeypatch.setattr(sdpa_prefill, "PREFIX_ENABLED", False)  # PDSERVE_DISABLE_PREFIX_SDPA=1
    assert not sdpa_prefill.use_sdpa_prefill(query, key, value, cache, meta)


def test_merge_of_disjoint_key_ranges_is_exact() -> None:
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(12, 4, 16, generator=generator)
    k = torch.randn(50, 2, 16, generator=generator)
    v = torch.randn(50, 2, 16, generator=generator)
    whole, whole_lse = attention_with_lse(q, k, v, 0.25, causal=False)
    out_a, lse_a = attention_with_lse(q, k[:7], v[:7], 0.25, causal=False)
    out_b, lse_b = attention_with_lse(q, k[7:], v[7:], 0.25, causal=False)
    merged, merged_lse = merge_partials(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(merged, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_lse, whole_lse, atol=1e-5, rtol=1e-5)
