"""engine.tensor_parallel_size 2 on CUDA with the Triton attention kernels: greedy tokens and their
logprobs equal TP=1's with the same backend and dtype.

* One GPU: `tensor_parallel_shared_device` (both ranks on cuda:0, gloo through host copies, eager).
* Two GPUs: NCCL with decode CUDA graphs on every rank (skipped with fewer than two).

Tolerance: float32 with TF32 off and the kernels' IEEE dots, on the peaky test checkpoints
(tests/hf_models.py: initializer_range 0.2, greedy margins far above float noise). What TP changes
is only the order of float32 sums: o_proj/down_proj partial sums all-reduced over the ranks, the
decode kernel's split-K partitions chosen per KV-head count. That moves a logprob by ~1e-6, so
the tokens must be equal and the logprobs within 1e-3 (the bound test_tensor_parallel.py uses
on CPU is 1e-4; the GPU's reductions reorder more).
"""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from tests.hf_models import make_checkpoint

MAX_NEW = 16
LOGPROB_ATOL = 1e-3

one_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def _prompts(vocab: int) -> list[list[int]]:
    """Single tokens, a prefill chunked over two steps (64-token budget), a shared prefix."""
    rng = random.Random(7)
    shared = [rng.randrange(vocab) for _ in range(40)]
    return [
        [rng.randrange(vocab)],
        [rng.randrange(vocab) for _ in range(17)],
        shared + [rng.randrange(vocab) for _ in range(50)],
        shared + [rng.randrange(vocab) for _ in range(3)],
    ]


def _llm(path: str, **kwargs) -> LLM:
    return LLM(
        path,
        device="cuda",
        dtype="float32",
        attention_backend="triton",
        num_gpu_blocks=128,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        **kwargs,
    )


def _generate(llm: LLM, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, params)
    return [(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in outs]


def _assert_same(got, want) -> None:
    for i, ((tokens, logprobs), (want_tokens, want_logprobs)) in enumerate(zip(got, want, strict=True)):
        assert tokens == want_tokens, f"prompt {i}"
        assert logprobs == pytest.approx(want_logprobs, abs=LOGPROB_ATOL), f"prompt {i}"


@pytest.fixture(params=[{}, {"num_key_value_heads": 1}], ids=["kv_heads_split", "kv_head_replicated"])
def checkpoint(request, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    make_checkpoint("llama", str(tmp_path), **request.param)
    return str(tmp_path), request.param.get("num_key_value_heads", 2)


def _check_rank_zero(llm: LLM, kv_heads: int) -> None:
    """Rank 0 runs the Triton kernels over its shard, warmed up for its own KV heads."""
    from pdserve.engine.attention.triton_decode import decode_variant_batch_sizes

    runner = llm.engine.runner
    assert runner.backend.name == "triton"
    assert runner.shard.num_kv_heads == runner.kv_cache.shape[4] == max(1, kv_heads // 2)
    assert runner.decode_warm_up_rows() == decode_variant_batch_sizes(
        runner.shard.num_kv_heads, runner.device
    )


@one_gpu
def test_tp2_shared_device_triton_matches_tp1(checkpoint):
    path, kv_heads = checkpoint
    prompts = _prompts(320)
    single = _llm(path, enforce_eager=True)
    want = _generate(single, prompts)
    del single
    torch.cuda.empty_cache()
    llm = _llm(path, enforce_eager=True, tensor_parallel_size=2, tensor_parallel_shared_device=True)
    try:
        child = llm.engine.tp_ranks._procs[0]
        assert llm.engine.runner.device == torch.device("cuda:0")
        assert llm.engine.tp_ranks.group.shared_device and not llm.engine.tp_ranks.group.graph_capturable
        _check_rank_zero(llm, kv_heads)
        _assert_same(_generate(llm, prompts), want)
        again = _generate(llm, prompts)  # prefix-cache hits this time
        _assert_same(again, want)
    finally:
        llm.shutdown()
    assert child.poll() is not None


@two_gpus
def test_tp2_cuda_graphs_match_tp1(checkpoint):
    """TP=2 over NCCL on cuda:0 and cuda:1, decode steps replaying each rank's graphs (the
    all-reduces captured inside), against TP=1 with graphs on cuda:0."""
    path, kv_heads = checkpoint
    prompts = _prompts(320)
    single = _llm(path)
    assert single.engine.runner.decode_graphs is not None
    want = _generate(single, prompts)
    del single
    torch.cuda.empty_cache()
    llm = _llm(path, tensor_parallel_size=2)
    try:
        runner = llm.engine.runner
        graphs = runner.decode_graphs
        assert graphs is not None and sorted(graphs.graphs) == graphs.buckets == [1, 2, 4, 8]
        _check_rank_zero(llm, kv_heads)
        replays = []
        replay = graphs.run

        def counted_run(*args, **kwargs):  # rank 0's real replay, counted
            replays.append(len(args[0]))
            return replay(*args, **kwargs)

        graphs.run = counted_run
        _assert_same(_generate(llm, prompts), want)
        assert len(replays) >= MAX_NEW // 2 and set(replays) <= {1, 2, 3, 4}  # the decode-only steps
        _assert_same(_generate(llm, prompts), want)  # prefix-cache hits this time
    finally:
        llm.shutdown()
