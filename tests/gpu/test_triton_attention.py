"""TritonAttention against ReferenceAttention on fresh random paged batches every run.

bf16: relative error (norm of difference / norm of reference) <= 1e-2; float32 <= 1e-4.
Runs on CUDA, or on CPU with TRITON_INTERPRET=1 (small shapes only; see conftest). Prefills of a
few sequences without a cached prefix go through torch SDPA (`sdpa_prefill`); the `paths` fixture
records which path each call took.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

pytest.importorskip("triton")  # the kernels need it; CI machines have none

from pdserve.bench.attention_kernels import build_paged_batch
from pdserve.engine.attention import sdpa_prefill, triton_backend, triton_decode
from pdserve.engine.attention.reference import ReferenceAttention
from pdserve.engine.attention.triton_backend import TritonAttention
from pdserve.engine.attention.triton_common import num_sms

HALF_AND_FULL = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def check_against_reference(
    query_lens: list[int],
    prefix_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    uses_tl_dot: bool = True,
) -> None:
    # uses_tl_dot=False: the step goes through SDPA, so bf16 can run in the interpreter too.
    if dtype == torch.bfloat16 and device == "cpu" and uses_tl_dot:
        pytest.skip("Triton 3.6's interpreter multiplies bf16 bit patterns in tl.dot; float16 covers CPU")
    query, key, value, cache, meta = build_paged_batch(
        query_lens, prefix_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device
    )
    # The oracle computes in float32 so that the bf16 bound measures the kernel, not the oracle.
    ref_cache = cache.float()
    expected = ReferenceAttention().forward(
        query.float(), key.float(), value.float(), ref_cache, meta, head_dim**-0.5
    )
    actual = TritonAttention().forward(query, key, value, cache, meta, head_dim**-0.5)
    assert actual.shape == query.shape and actual.dtype == query.dtype
    assert torch.isfinite(actual.float()).all()
    error = relative_error(actual, expected)
    assert error <= TOLERANCE[dtype], f"relative error {error:.2e} for {query_lens=} {prefix_lens=}"
    assert torch.equal(cache.float(), ref_cache.to(dtype).float()), "cache contents differ from write_kv"


@pytest.mark.parametrize("dtype", HALF_AND_FULL)
@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (6, 2)])
def test_decode_batch(dtype: torch.dtype, heads: tuple[int, int], device: str) -> None:
    contexts = [1, 17, 40, 100, 33]
    check_against_reference([1] * len(contexts), [c - 1 for c in contexts], *heads, 64, 16, dtype, device)


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts the attention paths TritonAttention.forward takes: sdpa, triton_prefill, decode."""
    calls: Counter = Counter()

    def spy(name: str, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(triton_backend, "sdpa_prefill", spy("sdpa", triton_backend.sdpa_prefill))
    monkeypatch.setattr(
        TritonAttention, "prefill", staticmethod(spy("triton_prefill", TritonAttention.prefill))
    )
    monkeypatch.setattr(TritonAttention, "decode", staticmethod(spy("decode", TritonAttention.decode)))
    return calls


@pytest.mark.parametrize("dtype", HALF_AND_FULL)
@pytest.mark.parametrize("sdpa", [True, False])
def test_prefill_no_prefix(
    dtype: torch.dtype, sdpa: bool, device: str, paths: Counter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sdpa=False: the Triton prefill kernel on the same batch (as with PDSERVE_DISABLE_SDPA_PREFILL=1).
    monkeypatch.setattr(sdpa_prefill, "ENABLED", sdpa)
    check_against_reference([37, 5, 70], [0, 0, 0], 8, 2, 64, 16, dtype, device, uses_tl_dot=not sdpa)
    assert paths == (Counter(sdpa=1) if sdpa else Counter(triton_prefill=1))


@pytest.mark.parametrize("dtype", HALF_AND_FULL)
@pytest.mark.parametrize("query_lens", [[45], [37, 5, 70, 1]])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
def test_sdpa_prefill(
    dtype: torch.dtype, query_lens: list[int], heads: tuple[int, int], device: str, paths: Counter
) -> None:
    """One and several sequences without a prefix, GQA group 4 and 1: SDPA, K/V still cached."""
    prefixes = [0] * len(query_lens)
    check_against_reference(query_lens, prefixes, *heads, 64, 16, dtype, device, uses_tl_dot=False)
    assert paths == Counter(sdpa=1)


def test_sdpa_prefill_sequence_limit(device: str, paths: Counter) -> None:
    assert sdpa_prefill.MAX_SEQS == 8
    lens = [3, 17, 1, 9, 30, 2, 12, 5, 8]
    check_against_reference(lens[:8], [0] * 8, 8, 2, 64, 16, torch.float32, device)
    assert paths == Counter(sdpa=1)
    check_against_reference(lens, [0] * 9, 8, 2, 64, 16, torch.float32, device)  # one sequence too many
    assert paths == Counter(sdpa=1, triton_prefill=1)


@pytest.mark.parametrize("dtype", HALF_AND_FULL)
def test_cached_prefix_keeps_triton_kernel(dtype: torch.dtype, device: str, paths: Counter) -> None:
    """One sequence with a prefix sends the step's prefills to the paged kernel; leading decode
    rows take the decode kernel, and the prefills after them SDPA when none has a prefix."""
    check_against_reference([20, 9], [0, 13], 8, 2, 64, 16, dtype, device)
    assert paths == Counter(triton_prefill=1)
    check_against_reference([1, 24], [30, 0], 8, 2, 64, 16, dtype, device)
    assert paths == Counter(triton_prefill=1, decode=1, sdpa=1)
    check_against_reference([1, 1, 24, 7], [30, 5, 0, 9], 8, 2, 64, 16, dtype, device)
    assert paths == Counter(triton_prefill=2, decode=2, sdpa=1)


def test_sdpa_prefill_noncontiguous_views(device: str, paths: Counter) -> None:
    """q/k/v as views of one fused qkv projection output, on the SDPA path."""
    query, key, value, cache, meta = build_paged_batch([6, 11], [0, 0], 8, 2, 64, 16, torch.float32, device)
    fused = torch.cat([query, key, value], dim=1)  # [T, Hq + 2 Hkv, D]
    expected = ReferenceAttention().forward(query, key, value, cache.clone(), meta, 0.125)
    actual = TritonAttention().forward(fused[:, :8], fused[:, 8:10], fused[:, 10:], cache, meta, 0.125)
    assert relative_error(actual, expected) <= 1e-4
    assert paths == Counter(sdpa=1)


def test_sdpa_prefill_env_switch() -> None:
    code = "from engine.attention import sdpa_prefill; print(sdpa_prefill.ENABLED)"
    env = {**os.environ, "PDSERVE_DISABLE_SDPA_PREFILL": "1"}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=repo, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("dtype", HALF_AND_FULL)
@pytest.mark.parametrize(
    ("query_lens", "prefix_lens"), [([1100], [3001]), ([1024, 1500], [0, 777]), ([1, 1030], [50, 2063])]
)
def test_long_chunks_over_a_prefix_take_the_fused_path(
    dtype: torch.dtype, query_lens: list[int], prefix_lens: list[int], device: str, paths: Counter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Chunks of at least MIN_QUERY_WITH_PREFIX tokens over a cached prefix: cuDNN attention over
    the gathered prefix (in pieces here, so every merge runs) and the chunk's own keys, merged by
    log-sum-exp. cuDNN's fused attention has no float32 kernel: float32 stays on the paged kernel."""
    if device == "cpu":
        pytest.skip("the fused path is CUDA's (its CPU twin is tests/unit/test_prefix_attention.py)")
    monkeypatch.setattr(sdpa_prefill, "PREFIX_PIECE", 1024)
    check_against_reference(query_lens, prefix_lens, 8, 2, 128, 16, dtype, device)
    decodes = Counter(decode=1) if query_lens[0] == 1 else Counter()
    fused = dtype != torch.float32
    assert paths == decodes + (Counter(sdpa=1) if fused else Counter(triton_prefill=1))


def test_fused_prefix_path_at_a_real_chunk_shape(device: str, paths: Counter) -> None:
    """An 8,192-token chunk over a 66,536-token prefix (two prefix pieces, the second ending
    mid-block), Llama-3-8B heads, bf16: the fused path against the paged Triton kernel (the float32
    reference would need 70 GB of scores at this size), fresh random inputs."""
    if device == "cpu":
        pytest.skip("CUDA only")
    query, key, value, cache, meta = build_paged_batch(
        [8192], [66536], 32, 8, 128, 16, torch.bfloat16, device
    )
    attn = TritonAttention()
    fused = attn.forward(query, key, value, cache, meta, 128**-0.5)
    assert paths == Counter(sdpa=1)
    paged = torch.empty_like(query)
    TritonAttention.prefill(query, cache, meta, 128**-0.5, paged)
    assert relative_error(fused, paged) <= 1e-2


def test_fused_prefix_failure_falls_back_to_the_paged_kernel(
    device: str, paths: Counter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The private cuDNN op failing at a shape its one-time check did not cover: one warning, the
    prefix path off for the process, this step and later ones exact through the paged kernel."""
    if device == "cpu":
        pytest.skip("CUDA only")

    def broken(*args, **kwargs):
        raise RuntimeError("cuDNN Frontend error: no valid execution plan")

    monkeypatch.setattr(sdpa_prefill, "PREFIX_ENABLED", True)
    monkeypatch.setattr(sdpa_prefill, "attention_with_lse", broken)
    check_against_reference([1100], [3001], 8, 2, 128, 16, torch.bfloat16, device)
    assert paths == Counter(sdpa=1, triton_prefill=1) and sdpa_prefill.PREFIX_ENABLED is False
    check_against_reference([1100], [3001], 8, 2, 128, 16, torch.bfloat16, device)
    assert paths == Counter(sdpa=1, triton_prefill=2)  # no second try


def test_lse_attention_reads_fused_qkv_views_in_place(device: str) -> None:
    """cuDNN's attention with its log-sum-exp, on the engine's layouts as they come (no copies):
    q/k/v as strided views of one fused qkv tensor (a chunk's own keys, causal), then the same q
    over a contiguous gathered prefix. Each layout is checked once, on its own strides, and
    found usable; bf16 within 1e-2 of the float32 math on fresh random inputs."""
    if device == "cpu":
        pytest.skip("the cuDNN op is CUDA's (the math path is tests/unit/test_prefix_attention.py)")
    from pdserve.engine.attention import lse_attention

    tokens, prefix, heads, kv_heads, dim = 1100, 3001, 32, 8, 128
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device=device, dtype=torch.bfloat16)
    q, k, v = (x.view(tokens, -1, dim) for x in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], 1))
    prefix_k, prefix_v = torch.randn(2, prefix, kv_heads, dim, device=device, dtype=torch.bfloat16)
    assert not q.is_contiguous() and prefix_k.is_contiguous()
    for keys, values, causal in ((k, v, True), (prefix_k, prefix_v, False)):
        out, lse = lse_attention.attention_with_lse(q, keys, values, dim**-0.5, causal)
        ref_out, ref_lse = lse_attention._math_attention_with_lse(q, keys, values, dim**-0.5, causal)
        assert relative_error(out, ref_out) <= 1e-2
        torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)
        layout = (q.device.index, q.dtype, dim, True, q.stride(), keys.stride(), values.stride())
        assert lse_attention._CUDNN_MODE[layout] is not None  # usable (grouped heads or expanded)


@pytest.mark.parametrize("num_tokens", [1, 77, 8192])
def test_triton_merge_equals_the_torch_merge(num_tokens: int, device: str) -> None:
    """The one-pass Triton merge of two partial results (bf16, in cuDNN's head-major layout)
    against the plain-torch merge in float32: into a new float32 accumulator, in place into that
    accumulator, and into a bf16 destination; fresh random inputs, -inf-free log-sum-exps."""
    if device == "cpu":
        pytest.skip("the Triton merge is CUDA's (torch's merge is tested in tests/unit)")
    from pdserve.engine.attention import lse_attention, triton_merge
    from pdserve.engine.attention.lse_attention import merge_partials

    def partial() -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.randn(1, 32, num_tokens, 128, device=device, dtype=torch.bfloat16)[0].transpose(0, 1)
        return out, torch.randn(32, num_tokens, device=device) * 4

    (out_a, lse_a), (out_b, lse_b), (out_c, lse_c) = partial(), partial(), partial()

    def torch_merge(a, la, b, lb):  # lse_attention's CPU formula, on these tensors
        lse = torch.logaddexp(la, lb)
        weights = (torch.exp(la - lse).t().unsqueeze(-1), torch.exp(lb - lse).t().unsqueeze(-1))
        return a.float() * weights[0] + b.float() * weights[1], lse

    expected, expected_lse = torch_merge(*torch_merge(out_a, lse_a, out_b, lse_b), out_c, lse_c)
    assert triton_merge.merge_supported(out_a) and lse_attention._triton_merge_works(out_a)  # its own check
    acc, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert acc.dtype == torch.float32
    acc_again, lse_again = merge_partials(acc, lse, out_c, lse_c, out=acc)  # in place
    assert acc_again.data_ptr() == acc.data_ptr()
    torch.testing.assert_close(acc, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_again, expected_lse, atol=1e-5, rtol=1e-5)
    acc, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    final = torch.empty(num_tokens, 32, 128, device=device, dtype=torch.bfloat16)
    merge_partials(acc, lse, out_c, lse_c, out=final)
    torch.testing.assert_close(final, expected.to(torch.bfloat16), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", HALF_AND_FULL)
def test_prefill_over_cached_prefix(dtype: torch.dtype, device: str) -> None:
    # Prefixes not multiples of block_size; a chunk that starts mid-block.
    check_against_reference([20, 9, 33], [13, 50, 3], 8, 2, 64, 16, dtype, device)


@pytest.mark.parametrize("dtype", HALF_AND_FULL)
def test_mixed_decode_and_prefill_batch(dtype: torch.dtype, device: str, paths: Counter) -> None:
    check_against_reference([1, 24, 1, 1, 9], [30, 0, 77, 0, 41], 8, 2, 64, 16, dtype, device)
    assert paths == Counter(decode=1, triton_prefill=1)  # one leading decode row, then the rest
    # the runner's order: decode rows first (long contexts: split-K inside a mixed step)
    check_against_reference([1, 1, 1, 24, 9], [300, 77, 0, 0, 41], 8, 2, 64, 16, dtype, device)
    assert paths == Counter(decode=2, triton_prefill=2)


@pytest.mark.parametrize("head_dim", [32, 128, 256])
@pytest.mark.parametrize("block_size", [8, 32])
def test_head_dims_and_block_sizes(head_dim: int, block_size: int, device: str) -> None:
    if device == "cpu" and head_dim == 256 and block_size == 32:
        pytest.skip("slow under the interpreter; covered on GPU")
    check_against_reference([1, 1], [20, 70], 4, 2, head_dim, block_size, torch.float32, device)
    check_against_reference([19, 1], [5, 12], 4, 2, head_dim, block_size, torch.float32, device)


@pytest.mark.parametrize("partition_size", [32, 64, 128])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (6, 2)])
def test_decode_split_k_reduce(partition_size: int, heads: tuple[int, int], device: str) -> None:
    """Force several partitions (the flash-decoding merge) on contexts of uneven length; with 32-token
    partitions the longest context has 10, more than one merge chunk (MERGE_CHUNK = 8)."""
    contexts = [1, 64, 65, 200, 300]
    query, key, value, cache, meta = build_paged_batch(
        [1] * len(contexts), [c - 1 for c in contexts], *heads, 64, 16, torch.float32, device
    )
    expected = ReferenceAttention().forward(query, key, value, cache, meta, 0.125)  # also writes K/V
    out = torch.empty_like(query)
    TritonAttention.decode(
        query,
        cache,
        meta.block_tables,
        meta.seq_lens,
        meta.max_seq_len,
        0.125,
        out,
        block_n=32,
        partition_size=partition_size,
    )
    assert relative_error(out, expected) <= 1e-4


def test_decode_with_upper_bound_and_padding_rows(device: str) -> None:
    """CUDA-graph style call: max_seq_len is a loose upper bound; a padding row has seq_len 0, slot -1."""
    query, key, value, cache, meta = build_paged_batch(
        [1, 1, 1], [9, 40, 0], 4, 2, 64, 16, torch.float32, device
    )
    expected = ReferenceAttention().forward(
        query[:2], key[:2], value[:2], cache.clone(), _first_rows(meta, 2), 0.125
    )
    meta.seq_lens[2] = 0
    meta.slot_mapping[2] = -1
    meta.max_seq_len = 1024  # upper bound fixed at capture
    before = cache.clone()
    out = TritonAttention().forward(query, key, value, cache, meta, 0.125)
    assert relative_error(out[:2], expected) <= 1e-4
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    changed = (cache != before).any(dim=(-1, -2)).nonzero().tolist()
    assert len(changed) == 4, "only the 2 real tokens' K and V rows should change"


def test_decode_splits_each_context_under_a_loose_bound(device: str) -> None:
    """The split-K partitions come from the batch size and each sequence's own length, not from
    the bound: under an 8,192-token bound (as captured) short and long contexts still split,
    past one merge chunk for the longest (1,000 tokens in 64-token tiles: 16 partitions)."""
    from pdserve.engine.attention.triton_decode import decode_num_partitions

    contexts = [1, 63, 64, 65, 300, 1000]
    query, key, value, cache, meta = build_paged_batch(
        [1] * len(contexts), [c - 1 for c in contexts], 8, 2, 64, 16, torch.float32, device
    )
    assert decode_num_partitions(len(contexts), 2, 8192, query.device, 64) > 8
    expected = ReferenceAttention().forward(query, key, value, cache.clone(), meta, 0.125)
    meta.max_seq_len = 8192
    out = TritonAttention().forward(query, key, value, cache, meta, 0.125)
    assert relative_error(out, expected) <= 1e-4


def test_noncontiguous_query_and_kv(device: str) -> None:
    """q/k/v as views of one fused qkv projection output, as a model produces them."""
    query, key, value, cache, meta = build_paged_batch([5, 1], [3, 20], 8, 2, 64, 16, torch.float32, device)
    fused = torch.cat([query, key, value], dim=1)  # [T, Hq + 2 Hkv, D]
    q_view, k_view, v_view = fused[:, :8], fused[:, 8:10], fused[:, 10:]
    expected = ReferenceAttention().forward(query, key, value, cache.clone(), meta, 0.125)
    actual = TritonAttention().forward(q_view, k_view, v_view, cache, meta, 0.125)
    assert relative_error(actual, expected) <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_cuda_graph_replay_with_new_tables() -> None:
    """Capture decode once with an upper-bound max_seq_len; replay with new block tables/seq lens."""
    batch, bound = 4, 512
    query, key, value, cache, meta = build_paged_batch(
        [1] * batch, [bound - 1] * batch, 32, 8, 128, 16, torch.bfloat16, "cuda"
    )
    meta.max_seq_len = bound
    attn = TritonAttention()
    static_out = attn.forward(query, key, value, cache, meta, 128**-0.5)  # warm up / compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = attn.forward(query, key, value, cache, meta, 128**-0.5)
    for prefixes in ([10, 200, 3, 499], [0, 0, 0, 0], [257, 16, 128, 63]):
        new_q, new_k, new_v, new_cache, new_meta = build_paged_batch(
            [1] * batch, prefixes, 32, 8, 128, 16, torch.bfloat16, "cuda"
        )
        assert new_cache.shape[1] <= cache.shape[1]
        assert new_meta.block_tables.shape[1] <= meta.block_tables.shape[1]
        cache.zero_()
        cache[:, : new_cache.shape[1]] = new_cache
        meta.block_tables.zero_()
        meta.block_tables[:, : new_meta.block_tables.shape[1]] = new_meta.block_tables
        for static, new in (
            (query, new_q),
            (key, new_k),
            (value, new_v),
            (meta.seq_lens, new_meta.seq_lens),
            (meta.slot_mapping, new_meta.slot_mapping),
        ):
            static.copy_(new)
        graph.replay()
        expected = ReferenceAttention().forward(
            new_q.float(), new_k.float(), new_v.float(), new_cache.float(), new_meta, 128**-0.5
        )
        assert relative_error(static_out, expected) <= 1e-2


def _first_rows(meta, count: int):
    from pdserve.engine.attention.metadata import AttentionMetadata

    return AttentionMetadata(
        slot_mapping=meta.slot_mapping[:count],
        query_start_loc=meta.query_start_loc[: count + 1],
        seq_lens=meta.seq_lens[:count],
        block_tables=meta.block_tables[:count],
        query_lens_cpu=meta.query_lens_cpu[:count],
        seq_lens_cpu=meta.seq_lens_cpu[:count],
        max_query_len=max(meta.query_lens_cpu[:count]),
        max_seq_len=max(meta.seq_lens_cpu[:count]),
    )


@pytest.mark.parametrize("trial", range(4))
def test_random_mixed_batches(trial: int, device: str) -> None:
    """Fresh random shapes each run: decode rows, prefills, chunks over prefixes, in one call."""
    rng = torch.Generator().manual_seed(torch.seed() % (2**31))
    num_seqs = int(torch.randint(1, 6, (1,), generator=rng))
    query_lens = [int(x) for x in torch.randint(1, 40, (num_seqs,), generator=rng)]
    query_lens[0] = 1  # always at least one decode row
    prefix_lens = [int(x) for x in torch.randint(0, 90, (num_seqs,), generator=rng)]
    block_size = [8, 16, 32][trial % 3]
    dtype = [torch.float32, torch.bfloat16 if device == "cuda" else torch.float16][trial % 2]
    check_against_reference(query_lens, prefix_lens, 8, 2, 64, block_size, dtype, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts compiled kernels (none interpreted)")
def test_mixed_steps_compile_once_for_any_number_of_decode_rows() -> None:
    """A serving engine sees every count of decode rows in its mixed steps. The split-K partition
    count and the prefill slice's pointer alignment change with that count; neither may make
    Triton compile another variant (a compile stalls every request for about a second)."""
    device = torch.cuda.current_device()

    def num_compiled() -> int:
        kernels = (triton_decode._decode_kernel, triton_backend._prefill_kernel)
        return sum(len(kernel.device_caches[device][0]) for kernel in kernels)

    def mixed(num_decodes: int) -> None:
        lens, prefixes = [1] * num_decodes + [40, 24], [50] * num_decodes + [0, 30]
        check_against_reference(lens, prefixes, 32, 8, 64, 16, torch.float16, "cuda")

    # 8 KV heads: a few rows split K; from two programs per SM on, one partition; from 4 per SM
    # on, also 2 pipeline stages (132 SMs: 4, 33, 66 rows)
    sms = num_sms(torch.device("cuda"))
    one_partition, two_stages = -(-2 * sms // 8), -(-4 * sms // 8)
    for num_decodes in (4, one_partition, two_stages):
        mixed(num_decodes)
    baseline = num_compiled()
    for num_decodes in (1, 2, 3, 5, 6, 7, 9, 13, one_partition + 1, 21, 33, two_stages + 1, 100):
        mixed(num_decodes)
    assert num_compiled() == baseline


@pytest.mark.parametrize("num_kv_heads", [1, 2, 8])
def test_warm_up_batch_sizes_reach_every_decode_variant(num_kv_heads: int, device: str) -> None:
    """The runner's warm-up runs mixed steps with these decode-row counts; each must land on the
    other side of a variant threshold (partitions, pipeline stages) than the count before it."""
    from pdserve.engine.attention.triton_decode import (
        decode_num_partitions,
        decode_num_stages,
        decode_variant_batch_sizes,
    )

    dev = torch.device(device)
    _, one_partition, two_stages = decode_variant_batch_sizes(num_kv_heads, dev)

    def variant(rows: int, context: int = 8192) -> tuple[bool, int]:
        parts = decode_num_partitions(rows, num_kv_heads, context, dev, 64)
        return parts > 1, decode_num_stages(rows * num_kv_heads * parts, dev)

    assert variant(one_partition - 1) == (True, 3) and variant(one_partition) == (False, 3)
    assert variant(two_stages - 1) == (False, 3) and variant(two_stages) == (False, 2)
    assert variant(1, context=300) == (True, 3)  # the first warm-up step's decode rows split K
