"""Tensor parallelism inside a worker (engine.tensor_parallel_size) on CPU with gloo.

Greedy tokens with TP=2 equal transformers in float32 on the test checkpoints (Llama, Qwen2
with qkv bias, Qwen3 with q/k norm, and a GQA model with one KV head, so both ranks keep it),
over prefix caching, chunked prefill and async scheduling; what TP does not support yet is
refused at validation, naming the key; the ranks' joint warm-up (graphs and warm-up steps on CUDA)
runs on CPU too. (KV transfer between TP sizes: test_tensor_parallel_kv.py.)
"""

from __future__ import annotations

import random
import time

import pytest

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import EngineConfig, ModelConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.model.sharding import ShardLayout, check_shardable
from pdserve.engine.tensor_parallel import rank_device
from tests.hf_models import hf_greedy, make_checkpoint

pytestmark = pytest.mark.timeout(300)

MAX_NEW = 12
CHECKPOINTS = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),  # qkv bias, tied embeddings
    "qwen3": ("qwen3", {}),  # q/k norm, explicit head_dim
    "gqa_one_kv_head": ("llama", {"num_key_value_heads": 1}),  # fewer KV heads than ranks
}


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(3)
    shared = [rng.randrange(vocab) for _ in range(40)]
    return [
        [rng.randrange(vocab) for _ in range(5)],
        shared + [rng.randrange(vocab) for _ in range(30)],  # longer than the step budget: chunked
        shared + [1, 2, 3],  # a prefix-cache hit on the shared blocks
        [rng.randrange(vocab)],
    ]


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_tp2_greedy_matches_transformers(name, tmp_path):
    arch, overrides = CHECKPOINTS[name]
    hf = make_checkpoint(arch, str(tmp_path), **overrides)
    prompts = _prompts(hf.config.vocab_size)
    expected = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    llm = LLM(str(tmp_path), tensor_parallel_size=2, num_gpu_blocks=64, max_num_batched_tokens=48)
    try:
        child = llm.engine.tp_ranks._procs[0]
        runner = llm.engine.runner
        kv_heads = overrides.get("num_key_value_heads", 2)
        assert runner.kv_cache.shape[4] == 1  # this rank's KV heads only (2 split, or 1 kept)
        assert runner.shard.num_heads == 2 and runner.shard.kv_head_start == 0
        assert runner.model.lm_head.weight.shape[0] == hf.config.vocab_size // 2
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
        outs = llm.generate(prompts, params)
        assert [o.token_ids for o in outs] == expected, f"{name} (KV heads {kv_heads})"
        assert outs[2].num_cached_tokens > 0  # the shared prefix came from the cache
        kv = llm.engine.kv_manager
        assert kv.num_free_blocks == kv.num_blocks and not llm.engine.scheduler.requests
    finally:
        llm.shutdown()
    assert child.poll() is not None  # the child rank is gone, not leaked


def test_tp2_tiny_matches_tp1_with_logprobs():
    """The built-in preset's random weights are the same whole at TP=1 and split at TP=2;
    requests asking for logprobs and prompt logprobs get the same values (sampled on rank 0)."""
    prompts = [list(b"hello tensor parallel"), list(b"x")]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    single = LLM("tiny", num_gpu_blocks=32)
    assert single.engine.tp_ranks is None  # TP=1: the one-process path, no rank started
    want = single.generate(prompts, params)
    llm = LLM("tiny", num_gpu_blocks=32, tensor_parallel_size=2)
    try:
        got = llm.generate(prompts, params)
    finally:
        llm.shutdown()
    for w, g in zip(want, got, strict=True):
        assert g.token_ids == w.token_ids
        assert [lp.logprob for lp in g.logprobs] == pytest.approx([lp.logprob for lp in w.logprobs], abs=1e-4)
        assert len(g.prompt_logprobs) == len(w.prompt_logprobs)
        assert [lp.logprob for lp in g.prompt_logprobs] == pytest.approx(
            [lp.logprob for lp in w.prompt_logprobs], abs=1e-4
        )


def test_dead_rank_fails_the_step_without_hanging():
    llm = LLM("tiny", num_gpu_blocks=32, tensor_parallel_size=2)
    try:
        child = llm.engine.tp_ranks._procs[0]
        child.kill()
        child.wait()
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"tensor-parallel rank 1 exited \(code -9\) during a step"):
            llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=4))
        assert time.monotonic() - start < 30
    finally:
        llm.shutdown()


def test_shard_layout_replicates_kv_heads_when_fewer_than_ranks():
    cfg = ModelConfig.tiny()  # 4 query heads, 2 KV heads, vocab 258
    cfg.num_key_value_heads = 1
    shards = [ShardLayout.for_rank(cfg, r, 4) for r in range(4)]
    assert [s.num_heads for s in shards] == [1] * 4
    assert [(s.num_kv_heads, s.kv_head_start) for s in shards] == [(1, 0)] * 4
    cfg.num_key_value_heads = 2
    assert [ShardLayout.for_rank(cfg, r, 4).kv_head_start for r in range(4)] == [0, 0, 1, 1]
    assert ShardLayout.for_rank(cfg, 1, 4).checkpoint_slice("model.layers.0.self_attn.k_proj.weight") == (
        0,
        0,
        16,
    )
    # vocabulary rows: ceil(258 / 4) = 65 each, the last rank's end in padding
    last = ShardLayout.for_rank(cfg, 3, 4)
    assert (last.vocab_start, last.vocab_end, last.vocab_rows) == (195, 258, 65)
    assert last.checkpoint_slice("model.layers.1.mlp.down_proj.weight") == (1, 96, 128)
    assert last.checkpoint_slice("model.norm.weight") is None


def test_unshardable_model_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"engine.tensor_parallel_size = 3 .*num_attention_heads 4"):
        check_shardable(ModelConfig.tiny(), 3)
    with pytest.raises(ValueError, match=r"engine.tensor_parallel_size = 3"):
        LLMEngine(EngineConfig(model="tiny", tensor_parallel_size=3))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(tensor_parallel_size=0), "tensor_parallel_size must be an integer >= 1"),
        (dict(tensor_parallel_size=2, host_cache_gb=1.0), "host tier"),
        (dict(tensor_parallel_size=2, num_host_blocks=8), "host tier"),
        (
            dict(tensor_parallel_size=2, device="cuda", tensor_parallel_shared_device=True),
            r"tensor_parallel_size = 2 with tensor_parallel_shared_device: CUDA graphs cannot capture "
            r"its gloo collectives; set enforce_eager: true",
        ),
        (
            dict(tensor_parallel_size=2, tensor_parallel_shared_device=True, enforce_eager=True),
            r"tensor_parallel_shared_device puts every rank on one CUDA device .*device is 'cpu'",
        ),
    ],
)
def test_unsupported_combinations_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**overrides).validate()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(device="cuda"),  # auto: the Triton kernels, CUDA graphs
        dict(device="cuda:1", attention_backend="triton", enforce_eager=False),
        dict(device="cuda", attention_backend="reference", enforce_eager=True),
        dict(device="cuda", tensor_parallel_shared_device=True, enforce_eager=True),
    ],
)
def test_cuda_tensor_parallel_with_triton_and_graphs_validates(overrides):
    EngineConfig(tensor_parallel_size=2, **overrides).validate()  # no refusal left for these


def test_rank_devices_and_the_shared_device_refusal():
    assert [rank_device("cuda", r) for r in range(3)] == ["cuda:0", "cuda:1", "cuda:2"]
    assert rank_device("cuda:2", 1) == "cuda:3"
    assert [rank_device("cuda", r, shared=True) for r in range(2)] == ["cuda:0", "cuda:0"]
    assert rank_device("cuda:1", 1, shared=True) == "cuda:1"
    assert rank_device("cpu", 1) == "cpu"
    with pytest.raises(
        ValueError, match=r"CUDA graphs cannot capture its gloo collectives; set enforce_eager"
    ):
        LLM("tiny", device="cuda", tensor_parallel_size=2, tensor_parallel_shared_device=True)


def test_ranks_warm_up_together_then_serve_as_tp1():
    """`TensorParallelRanks.warm_up` (what a CUDA engine runs at start: graphs, then the warm-up
    steps) on CPU: every rank runs rank 0's scratch steps, their collectives meeting (a rank that
    skipped them would leave rank 0's first all-reduce unanswered), and the engine then serves the
    same greedy tokens as TP=1: the scratch steps leave nothing behind."""
    prompts = [list(b"warm the ranks up"), list(b"y")]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    sizes = dict(num_gpu_blocks=256, max_num_seqs=8, max_num_batched_tokens=64)
    want = [o.token_ids for o in LLM("tiny", **sizes).generate(prompts, params)]
    llm = LLM("tiny", tensor_parallel_size=2, **sizes)
    try:
        runner = llm.engine.runner
        assert runner.decode_warm_up_rows() == ()  # the reference backend compiles nothing
        start = time.monotonic()
        llm.engine.tp_ranks.warm_up(runner)
        assert time.monotonic() - start < 60
        assert runner._last_sampled is None
        assert [o.token_ids for o in llm.generate(prompts, params)] == want
        kv = llm.engine.kv_manager
        assert kv.num_free_blocks == kv.num_blocks
    finally:
        llm.shutdown()


def test_shard_sizes_the_decode_warm_up_rows():
    """The decode kernel's grid is sequences x KV heads: a rank sizes its warm-up rows by its
    shard's KV heads (1 of tiny's 2 at TP=2), not the model's. With the real Triton backend
    (its rows on CPU use an H100's SM count, triton_common.num_sms); skipped without Triton."""
    pytest.importorskip("triton")
    from pdserve.engine.attention.triton_backend import TritonAttention
    from pdserve.engine.attention.triton_decode import decode_variant_batch_sizes

    llm = LLM("tiny", tensor_parallel_size=2, num_gpu_blocks=32)
    try:
        runner = llm.engine.runner
        runner.backend = TritonAttention()
        assert runner.shard.num_kv_heads == 1
        rows = runner.decode_warm_up_rows()
        assert rows == decode_variant_batch_sizes(1, runner.device)
        assert rows != decode_variant_batch_sizes(2, runner.device)  # the whole model's count
    finally:
        llm.shutdown()


def test_deploy_config_passes_tensor_parallel_size_through():
    from pdserve.deploy.config import ConfigError, parse_config

    cfg = parse_config({"model": "tiny", "engine": {"tensor_parallel_size": 2}, "colocated": {"count": 1}})
    assert cfg.engine.tensor_parallel_size == 2
    gpu = {
        "device": "cuda",
        "tensor_parallel_size": 2,
        "attention_backend": "reference",
        "enforce_eager": True,
    }
    with pytest.raises(ConfigError, match=r"colocated.resources.num_gpus: 1 is fewer"):
        parse_config(
            {"model": "tiny", "engine": gpu, "colocated": {"count": 1, "resources": {"num_gpus": 1}}}
        )
    graphs = parse_config(
        {"model": "tiny", "engine": dict(gpu, enforce_eager=False), "colocated": {"count": 1}}
    )
    assert graphs.colocated.resources["num_gpus"] == 2  # one GPU per rank
    shared = dict(gpu, tensor_parallel_shared_device=True)
    one_gpu = parse_config(
        {"model": "tiny", "engine": shared, "colocated": {"count": 1, "resources": {"num_gpus": 1}}}
    )
    assert one_gpu.colocated.resources["num_gpus"] == 1  # every rank on the actor's one GPU
    with pytest.raises(
        ConfigError,
        match=r"engine: tensor_parallel_size = 2 with tensor_parallel_shared_device: CUDA graphs",
    ):
        parse_config(
            {"model": "tiny", "engine": dict(shared, enforce_eager=False), "colocated": {"count": 1}}
        )
    with pytest.raises(ConfigError, match=r"NCCL cannot place several ranks of one group on one GPU"):
        parse_config(
            {
                "model": "tiny",
                "engine": shared,
                "transfer": {"backend": "nccl"},
                "prefill": {"count": 1, "resources": {"num_gpus": 1}},
                "decode": {"count": 1, "resources": {"num_gpus": 1}},
            }
        )


def test_host_staged_collectives_match_the_plain_ones():
    """The shared-device mode's collectives (gloo on host copies; on CUDA tensors in use) take
    the host-copy branches here on CPU tensors: two ranks as threads of this process."""
    import datetime
    import threading

    import torch
    import torch.distributed as dist

    from pdserve.engine.model.tp_group import TPGroup

    store = TPGroup.create_store(2, 30)
    results, errors = {}, []

    def rank_main(rank: int) -> None:
        try:
            timeout = datetime.timedelta(seconds=30)
            st = store if rank == 0 else dist.TCPStore("127.0.0.1", store.port, 2, False, timeout)
            group = TPGroup(rank, 2, st, torch.device("cpu"), 30)
            group.shared_device = True  # the branch a CUDA device in shared mode takes
            parts = [torch.full((2,), 10.0), torch.full((2,), 20.0)] if rank == 0 else None
            results[rank] = (
                group.all_reduce(torch.full((2, 3), rank + 1.0)),
                group.all_gather_columns(torch.full((2, 1), float(rank))),
                group.gather_to_first(torch.full((3,), float(rank))),
                group.scatter_from_first(parts, torch.empty(2)),
                group.broadcast_from_first(torch.full((2,), rank + 5.0)),
            )
        except Exception as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(results) == 2
    for rank, (reduced, gathered, on_first, scattered, broadcast) in results.items():
        assert torch.equal(reduced, torch.full((2, 3), 3.0))
        assert torch.equal(gathered, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        assert (on_first is None) == (rank == 1)
        assert torch.equal(scattered, torch.full((2,), 10.0 * (rank + 1)))
        assert torch.equal(broadcast, torch.full((2,), 5.0))
    assert [p.tolist() for p in results[0][2]] == [[0.0] * 3, [1.0] * 3]
