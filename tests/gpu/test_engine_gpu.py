"""The engine on a GPU: the fast (Triton) backend and CUDA-graph decode against the
oracles. float32: greedy tokens equal transformers' and the reference backend's
exactly; bf16: logits of the fast backend within 1e-2 relative error of the reference.
"""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from tests.hf_models import hf_greedy, make_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MAX_NEW = 24


def prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(3)
    shared = [rng.randrange(vocab) for _ in range(70)]
    lens = [1, 9, 17, 64, 130, 250]
    return [
        shared + [rng.randrange(vocab) for _ in range(n)]
        if n > 60
        else [rng.randrange(vocab) for _ in range(n)]
        for n in lens
    ]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def checkpoint(request, tmp_path_factory):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    path = str(tmp_path_factory.mktemp(request.param))
    model = make_checkpoint(request.param, path)
    ps = prompts(model.config.vocab_size)
    expected = [hf_greedy(model.cuda(), p, MAX_NEW) for p in ps]  # transformers on the same GPU
    return path, ps, expected


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_triton_float32_greedy_matches_transformers(checkpoint, enforce_eager):
    path, ps, expected = checkpoint
    llm = LLM(
        path,
        device="cuda",
        dtype="float32",
        attention_backend="triton",
        num_gpu_blocks=256,
        max_num_batched_tokens=128,
        enforce_eager=enforce_eager,
        max_num_seqs=8,
    )
    assert (llm.engine.runner.decode_graphs is not None) == (not enforce_eager)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    again = llm.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
    assert [o.token_ids for o in again] == expected  # with prefix-cache hits
    assert sum(o.num_cached_tokens for o in again) > 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_triton_bf16_logits_match_reference(arch, tmp_path):
    """Same model and cache contents, both backends, a prefill then a decode step.
    Realistic weight scales (transformers' default init), fresh random inputs every run."""
    from pdserve.engine.attention import AttentionMetadata, get_backend

    path = str(tmp_path)
    make_checkpoint(arch, path, seed=random.randrange(1 << 30), initializer_range=0.02)
    ps = prompts(320)
    llm = LLM(
        path,
        device="cuda",
        dtype="bfloat16",
        attention_backend="triton",
        num_gpu_blocks=64,
        enforce_eager=True,
    )
    model, kv = llm.engine.runner.model, llm.engine.runner.kv_cache
    prompt = torch.tensor(ps[-1], device="cuda")
    n, bs = len(ps[-1]), kv.shape[3]
    blocks = torch.randperm(kv.shape[2], device="cuda")[: -(-(n + 1) // bs)].int()
    slots = blocks.long()[torch.arange(n, device="cuda") // bs] * bs + torch.arange(n, device="cuda") % bs

    def run(backend_name: str) -> torch.Tensor:
        backend = get_backend(backend_name, "cuda")
        for layer in model.model.layers:
            layer.self_attn.backend = backend
        kv.zero_()
        meta = AttentionMetadata(
            slots,
            torch.tensor([0, n], dtype=torch.int32, device="cuda"),
            torch.tensor([n], dtype=torch.int32, device="cuda"),
            blocks[None],
            [n],
            [n],
            n,
            n,
        )
        with torch.inference_mode():
            hidden = model(prompt, torch.arange(n, device="cuda"), kv, meta)
            prefill_logits = model.compute_logits(hidden[-1:])
            tok = prefill_logits.argmax(-1)
            slot = blocks.long()[n // bs] * bs + n % bs
            meta = AttentionMetadata(
                slot[None],
                torch.tensor([0, 1], dtype=torch.int32, device="cuda"),
                torch.tensor([n + 1], dtype=torch.int32, device="cuda"),
                blocks[None],
                [1],
                [n + 1],
                1,
                n + 1,
            )
            hidden = model(tok, torch.tensor([n], device="cuda"), kv, meta)
            return torch.cat([prefill_logits, model.compute_logits(hidden)])

    fast, ref = run("triton"), run("reference")
    rel = (fast - ref).norm() / ref.norm()
    assert rel.item() <= 1e-2, rel.item()


def test_warm_up_holds_device_memory_for_the_largest_step(tmp_path) -> None:
    """A run that ramps up to max_num_seqs sequences and full-budget steps (greedy and top-k/
    top-p rows mixed) allocates no new large device segment after start-up: a cudaMalloc waits
    for the GPU to drain, so without the warm-up's largest step every step of a ramp stalled."""
    import json

    from pdserve.bench.gpu import TINY

    config = dict(TINY, vocab_size=32_000, hidden_size=512, intermediate_size=2048, head_dim=64)
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(
        str(tmp_path),
        device="cuda",
        dtype="bfloat16",
        load_format="dummy",
        num_gpu_blocks=1024,
        max_num_batched_tokens=1024,
        max_num_seqs=64,
    )
    large_segments = torch.cuda.memory_stats()["segment.large_pool.allocated"]
    rng = random.Random(11)
    prompts = [[rng.randrange(32_000) for _ in range(rng.randrange(16, 200))] for _ in range(96)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        if i % 2
        else SamplingParams(temperature=0.8, top_k=40, top_p=0.9, max_tokens=12, ignore_eos=True)
        for i in range(len(prompts))
    ]
    outputs = llm.generate(prompts, params)
    assert all(len(o.token_ids) == 12 for o in outputs)
    assert torch.cuda.memory_stats()["segment.large_pool.allocated"] == large_segments


def test_bf16_logits_of_a_chunk_over_a_cached_prefix(tmp_path) -> None:
    """A 2,600-token prompt prefilled in two chunks (1,200 then 1,400 tokens over the cached
    1,200): the second chunk takes the fused prefix path (cuDNN attention over the gathered prefix
    and its own keys, merged by log-sum-exp); its logits are within 1e-2 of the reference backend's.
    Fresh random weights and prompt every run."""
    from pdserve.engine.attention import AttentionMetadata, get_backend, sdpa_prefill

    seed = random.randrange(1 << 30)
    make_checkpoint("llama", str(tmp_path), seed=seed, initializer_range=0.02, max_position_embeddings=4096)
    llm = LLM(str(tmp_path), device="cuda", dtype="bfloat16", attention_backend="triton",
              num_gpu_blocks=200, enforce_eager=True)  # fmt: skip
    model, kv = llm.engine.runner.model, llm.engine.runner.kv_cache
    first, total = 1200, 2600
    assert total - first >= sdpa_prefill.MIN_QUERY_WITH_PREFIX
    prompt = torch.randint(0, 320, (total,), device="cuda")
    bs = kv.shape[3]
    blocks = torch.randperm(kv.shape[2], device="cuda")[: -(-total // bs)].int()
    positions = torch.arange(total, device="cuda")
    slots = blocks.long()[positions // bs] * bs + positions % bs

    def chunk_meta(start: int, end: int) -> AttentionMetadata:
        n = end - start
        return AttentionMetadata(slots[start:end], torch.tensor([0, n], dtype=torch.int32, device="cuda"),
                                 torch.tensor([end], dtype=torch.int32, device="cuda"), blocks[None],
                                 [n], [end], n, end)  # fmt: skip

    def run(backend_name: str) -> torch.Tensor:
        backend = get_backend(backend_name, "cuda")
        for layer in model.model.layers:
            layer.self_attn.backend = backend
        kv.zero_()
        with torch.inference_mode():
            model(prompt[:first], positions[:first], kv, chunk_meta(0, first))
            hidden = model(prompt[first:], positions[first:], kv, chunk_meta(first, total))
            return model.compute_logits(hidden)

    fast, ref = run("triton"), run("reference")
    rel = (fast.float() - ref.float()).norm() / ref.float().norm()
    assert rel.item() <= 1e-2, rel.item()
