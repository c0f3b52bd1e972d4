"""engine.tensor_parallel_size 2 over NCCL on two GPUs: float32 greedy tokens equal
transformers' (eager steps, reference attention; the Triton kernels and CUDA graphs per rank:
test_tensor_parallel_triton_gpu.py). Skipped with fewer than two GPUs."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from tests.hf_models import hf_greedy, make_checkpoint

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.mark.parametrize(("arch", "overrides"), [("qwen2", {}), ("llama", {"num_key_value_heads": 1})])
def test_tp2_nccl_greedy_matches_transformers(arch, overrides, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    hf = make_checkpoint(arch, str(tmp_path), **overrides)
    rng = random.Random(5)
    prompts = [[rng.randrange(hf.config.vocab_size) for _ in range(n)] for n in (1, 17, 90)]
    expected = [hf_greedy(hf, p, 16) for p in prompts]  # on the CPU: the float32 oracle
    llm = LLM(
        str(tmp_path),
        device="cuda",
        tensor_parallel_size=2,
        attention_backend="reference",
        enforce_eager=True,
        num_gpu_blocks=64,
    )
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    finally:
        llm.shutdown()
    assert [o.token_ids for o in outs] == expected


def test_tp2_prefill_ships_its_kv_in_layer_pieces_over_nccl_gathers(tmp_path, monkeypatch):
    """The CPU test's TP=2 prefill worker feeding a TP=1 decode worker over gRPC, on GPUs: each
    one-layer piece gathered over NCCL on cuda:0 just before it is staged on the host (pinned)
    and sent, the earlier ones dropped; the decode blocks bit-equal to the whole gather."""
    from tests.unit.test_tensor_parallel_kv import check_tp2_prefill_ships_kv_in_pieces

    torch.backends.cuda.matmul.allow_tf32 = False
    check_tp2_prefill_ships_kv_in_pieces(
        tmp_path, monkeypatch, device="cuda", attention_backend="reference", enforce_eager=True
    )
