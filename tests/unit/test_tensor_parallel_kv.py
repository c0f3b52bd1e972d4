"""KV transfer between workers of different tensor-parallel sizes (no Ray).

The head math: a whole-heads buffer sliced for the ranks of one TP size and reassembled
gives the buffer back, for every size that splits (or replicates) the heads. The layout
carries the TP size in its fingerprint; a pair whose sizes cannot split the heads is
refused naming both sizes. In one process over the grpc backend, prefill TP=2 -> decode
TP=1 and prefill TP=1 -> decode TP=2 give the offline engine's tokens, every rank's
reserved blocks hold exactly its heads, and every block is free afterwards.
"""

from __future__ import annotations

import os
import random
import time

import pytest
import torch

from pdserve.deploy.config import ConfigError, parse_config
from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_heads import assemble_heads, rank_heads
from pdserve.engine.model.sharding import kv_head_range, kv_head_sources
from pdserve.transfer.layout import KVLayout, KVLayoutMismatch, check_tp_pair

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4, 8])
@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_heads_split_and_reassemble(num_kv_heads, size):
    whole = torch.randn(2, 2, 3, 4, num_kv_heads, 5)  # [L, 2, n, block_size, Hkv, D]
    parts = [rank_heads(whole, rank, size).clone() for rank in range(size)]
    for rank, part in enumerate(parts):
        start, count = kv_head_range(num_kv_heads, rank, size)
        assert count == max(1, num_kv_heads // size)
        assert torch.equal(part, whole[:, :, :, :, start : start + count])
    assert torch.equal(assemble_heads(parts, num_kv_heads), whole)
    sources = kv_head_sources(num_kv_heads, size)
    assert len(sources) == min(num_kv_heads, size)  # each head taken once, from its first holder
    # what a decode rank of another TP size takes from a buffer assembled at this one
    for other in (1, 2, 4):
        for rank in range(other):
            start, count = kv_head_range(num_kv_heads, rank, other)
            got = rank_heads(assemble_heads(parts, num_kv_heads), rank, other)
            assert torch.equal(got, whole.narrow(4, start, count))


def _layout(tp_size: int, heads: int = 8, **overrides) -> KVLayout:
    fields = dict(
        model_name="m", dtype="float32", num_layers=2, num_kv_heads=heads, head_dim=16, block_size=16
    )
    return KVLayout(**{**fields, **overrides}, tp_size=tp_size)


def test_layout_fingerprint_carries_tp_size_and_head_range():
    assert _layout(1).fingerprint() != _layout(2).fingerprint()
    assert _layout(2).fingerprint() != _layout(2, kv_head_start=4).fingerprint()
    _layout(2).check_compatible(_layout(1))  # whole heads on the wire: the sizes may differ
    _layout(4).check_compatible(_layout(8))
    with pytest.raises(KVLayoutMismatch, match="kv_head_start: prefill 4 != decode 0"):
        _layout(2, kv_head_start=4).check_compatible(_layout(2))
    with pytest.raises(KVLayoutMismatch, match=r"prefill 3 / decode 2: the model's 8 KV heads .* prefill 3"):
        _layout(3).check_compatible(_layout(2))
    with pytest.raises(ValueError, match=r"prefill 2 / decode 6: .* 4 KV heads .* decode 6"):
        check_tp_pair(4, 2, 6)


def test_deploy_refuses_a_pair_that_cannot_split_the_heads():
    """tiny has 4 query heads and 2 KV heads: decode TP=3 fits neither; refused naming both sizes."""
    pools = {
        "prefill": {"count": 1, "tensor_parallel_size": 2},
        "decode": {"count": 1, "tensor_parallel_size": 3},
    }
    with pytest.raises(ConfigError, match=r"decode.tensor_parallel_size: prefill 2 / decode 3"):
        parse_config({"model": "tiny", **pools})
    cfg = parse_config({"model": "tiny", **dict(pools, decode={"count": 1})})
    assert cfg.prefill.tensor_parallel_size == 2 and cfg.decode.tensor_parallel_size is None


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2)])
def test_inprocess_grpc_between_tp_sizes(prefill_tp, decode_tp):
    from pdserve.router.client import GenerateChunk, PdserveClient
    from tests.inprocess import InProcessDeployment

    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(20, 70))] for _ in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = [o.token_ids for o in LLM("tiny", num_gpu_blocks=256).generate(prompts, params)]
    engine = EngineConfig(model="tiny", num_gpu_blocks=128, tensor_parallel_size=decode_tp)
    prefill = EngineConfig(model="tiny", num_gpu_blocks=128, tensor_parallel_size=prefill_tp)
    dep = InProcessDeployment(1, 1, engine=engine, prefill_engine=prefill, http=False)
    try:
        with PdserveClient(dep.url) as client:
            for prompt, want in zip(prompts, expected, strict=True):
                events = client.generate(prompt, temperature=0.0, max_tokens=6, ignore_eos=True)
                assert [t for e in events if isinstance(e, GenerateChunk) for t in e.token_ids] == want
        assert dep.all_blocks_free()
    finally:
        dep.close()


def test_gpu_tp_configs_validate():
    """The shipped GPU configs for TP: each pool's size, and its actor's GPUs (one per rank)."""
    from pdserve.deploy.config import load_config
    from pdserve.deploy.wiring import plan_workers
    from tests.unit.test_deploy_config import ROOT

    four = load_config(os.path.join(ROOT, "deploy", "gpu-tp-4.yaml"))
    specs = {s.worker_id: s for s in plan_workers(four)}
    assert [(w, s.engine.tensor_parallel_size, s.resources["num_gpus"]) for w, s in specs.items()] == [
        ("prefill-0", 2, 2),
        ("decode-0", 1, 1),
        ("decode-1", 1, 1),
    ]
    big = load_config(os.path.join(ROOT, "deploy", "gpu-70b-tp.yaml"))
    assert big.prefill.resources["num_gpus"] == big.decode.resources["num_gpus"] == 4
    assert [s.engine.tensor_parallel_size for s in plan_workers(big)] == [4, 4]
    h200 = load_config(
        os.path.join(ROOT, "deploy", "gpu-70b-tp.yaml"), {"decode.count": 2, "decode.tensor_parallel_size": 2}
    )
    assert h200.decode.resources["num_gpus"] == 2
    with pytest.raises(
        ConfigError, match=r"prefill.resources.num_gpus: 1 is fewer than prefill.tensor_parallel_size 2"
    ):
        load_config(os.path.join(ROOT, "deploy", "gpu-tp-4.yaml"), {"prefill.resources.num_gpus": 1})
    with pytest.raises(
        ConfigError, match=r"decode.tensor_parallel_size: prefill 4 / decode 3: .* 8 KV heads"
    ):
        load_config(os.path.join(ROOT, "deploy", "gpu-70b-tp.yaml"), {"decode.tensor_parallel_size": 3})


def _step_until(engine, req_id: str, done) -> list:
    outs = []
    for _ in range(200):
        outs += [o for o in engine.step() if o.req_id == req_id]
        if done(outs):
            return outs
    raise AssertionError(f"{req_id} did not finish")


def test_gather_and_scatter_with_a_replicated_kv_head(tmp_path):
    """One KV head, two ranks (each keeps a copy): a TP=2 prefill engine's gathered KV equals a
    TP=1 engine's blocks, and a TP=2 decode engine fed the TP=1 KV generates transformers'
    greedy tokens (each rank got its copy of the head into its reserved blocks)."""
    from pdserve.engine.kv_heads import pack_local
    from pdserve.engine.llm_engine import LLMEngine
    from tests.hf_models import hf_greedy, make_checkpoint

    hf = make_checkpoint("llama", str(tmp_path), num_key_value_heads=1)
    prompt = [random.Random(9).randrange(hf.config.vocab_size) for _ in range(37)]
    want = hf_greedy(hf, prompt, 6)
    first = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)  # held after its first token
    engines = []
    try:
        whole = {}
        for tp in (1, 2):
            engine = LLMEngine(
                EngineConfig(model=str(tmp_path), num_gpu_blocks=16, tensor_parallel_size=tp), "prefill"
            )
            engines.append(engine)
            engine.add_request("r", prompt, first)
            assert _step_until(engine, "r", bool)[0].new_token_ids == want[:1]
            blocks = engine.get_block_ids("r")[:3]  # the prompt's 3 blocks of 16
            whole[tp] = engine.gather_kv(blocks) if tp > 1 else pack_local(engine.kv_cache, blocks)
            engine.release_request("r")
        assert whole[2].shape == whole[1].shape and whole[1].shape[4] == 1
        torch.testing.assert_close(whole[2], whole[1], rtol=1e-4, atol=1e-5)
        decode = LLMEngine(
            EngineConfig(model=str(tmp_path), num_gpu_blocks=16, tensor_parallel_size=2), "decode"
        )
        engines.append(decode)
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        reservation = decode.reserve_remote("r", prompt, params)
        layers = slice(0, whole[1].shape[0])
        with pytest.raises(ValueError, match="KV chunk of shape"):  # refused before any rank moves
            decode.scatter_kv(whole[1][:, :, :2], reservation.block_ids, layers)
        with pytest.raises(ValueError, match="out of range"):
            decode.scatter_kv(whole[1], [0, 1, 99], layers)
        decode.scatter_kv(whole[1], reservation.block_ids, layers)
        decode.finish_remote("r", want[0])
        outs = _step_until(decode, "r", lambda outs: outs and outs[-1].finished)
        assert want[:1] + [t for o in outs for t in o.new_token_ids] == want
        assert decode.kv_manager.num_free_blocks == decode.kv_manager.num_blocks
    finally:
        for engine in engines:
            engine.shutdown()


def test_tp2_prefill_ships_its_kv_in_bounded_layer_pieces(tmp_path, monkeypatch):
    check_tp2_prefill_ships_kv_in_pieces(tmp_path, monkeypatch)


def check_tp2_prefill_ships_kv_in_pieces(tmp_path, monkeypatch, **engine_options) -> None:
    """A TP=2 prefill worker feeding a TP=1 decode worker over gRPC (the deployment's wiring, in
    one process), 4 layers, PDSERVE_KV_CHUNK_LAYERS=1: the KV leaves as 4 one-layer pieces, each
    gathered on rank 0 when the sender asks for it, every earlier piece dropped by then (never
    the whole request at once). The decode worker's blocks equal the whole-request gather bit
    for bit, and the TP=1 engine's KV to float tolerance (TP=2 sums its all-reduce in another
    order); it generates the TP=1 engine's tokens, and every block is free afterwards."""
    from pdserve.deploy.wiring import LocalWorkerControl, WorkerSpec, build_worker, connect_workers
    from pdserve.engine.kv_heads import pack_local
    from pdserve.transfer.config import TransferConfig
    from pdserve.transfer.packing import CHUNK_LAYERS_ENV
    from tests.hf_models import make_checkpoint

    make_checkpoint("llama", str(tmp_path), num_hidden_layers=4)
    monkeypatch.setenv(CHUNK_LAYERS_ENV, "1")
    prompt = [random.Random(3).randrange(320) for _ in range(48)]  # 3 full blocks of 16
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    def config(tp: int) -> EngineConfig:
        return EngineConfig(model=str(tmp_path), num_gpu_blocks=16, tensor_parallel_size=tp, **engine_options)

    reference, want = _tp1_kv_and_tokens(config(1), prompt, params)
    transfer = TransferConfig(backend="grpc", host="127.0.0.1").with_secret()
    specs = [
        WorkerSpec("prefill-0", "prefill", config(2), transfer),
        WorkerSpec("decode-0", "decode", config(1), transfer, 0),
    ]
    workers = {spec.worker_id: build_worker(spec) for spec in specs}
    controls = {worker_id: LocalWorkerControl(worker) for worker_id, worker in workers.items()}
    prefill, decode = workers["prefill-0"], workers["decode-0"]
    try:
        connect_workers(specs, controls, transfer)
        gathers, gather_kv = _record_gathers(monkeypatch, prefill.engine)
        handle = decode.reserve("r", prompt, params)
        assert handle is not None and len(handle.block_ids) == 3
        assert prefill.prefill("r", prompt, params, handle).result(60).first_token_id == want[0]
        got = [want[0]]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(got) < len(want):
            got += [t for o in decode.poll(0.5).outputs if o.req_id == "r" for t in o.new_token_ids]
        assert got == want
        whole_nbytes = reference.nbytes
        assert [layers for _, layers, _, _ in gathers] == [slice(i, i + 1) for i in range(4)]
        assert all(nbytes == whole_nbytes // 4 for _, _, nbytes, _ in gathers)
        assert max(held for _, _, _, held in gathers) == 0  # each piece gone before the next
        src_ids = gathers[0][0]
        whole = prefill.loop.call_sync(lambda engine: gather_kv(src_ids))  # the blocks are cached still
        landed = decode.loop.call_sync(lambda engine: pack_local(engine.kv_cache, handle.block_ids))
        assert torch.equal(landed.cpu().view(torch.uint8), whole.cpu().view(torch.uint8))
        torch.testing.assert_close(landed.cpu(), reference.cpu(), rtol=1e-4, atol=1e-5)
        _check_all_blocks_free(workers.values())
    finally:
        for worker_id, worker in workers.items():
            controls[worker_id].close()
            worker.shutdown()


def _tp1_kv_and_tokens(config: EngineConfig, prompt: list[int], params: SamplingParams):
    """The TP=1 engine's KV of the prompt's 3 blocks (after its prefill step) and its tokens."""
    from pdserve.engine.kv_heads import pack_local
    from pdserve.engine.llm_engine import LLMEngine

    single = LLMEngine(config, "both")
    try:
        single.add_request("r", prompt, params)
        outs = _step_until(single, "r", bool)  # the prefill step: the prompt's KV is complete
        reference = pack_local(single.kv_cache, single.get_block_ids("r")[:3])
        outs += _step_until(single, "r", lambda outs: outs and outs[-1].finished)
        return reference, [t for o in outs for t in o.new_token_ids]
    finally:
        single.shutdown()


def _record_gathers(monkeypatch, engine):
    """Wrap `engine.gather_kv`: each call recorded as (block ids, layers, bytes, earlier pieces
    still alive); returns the record and the unwrapped gather."""
    import weakref

    gathers: list[tuple[list[int], slice | None, int, int]] = []  # ids, layers, bytes, alive before
    alive: weakref.WeakSet = weakref.WeakSet()
    gather_kv = engine.gather_kv

    def recording_gather(
        block_ids: list[int], layers: slice | None = None, ready: list | None = None
    ) -> torch.Tensor:
        held = len(alive)
        piece = gather_kv(block_ids, layers, ready)
        gathers.append((list(block_ids), layers, piece.nbytes, held))
        alive.add(piece)
        return piece

    monkeypatch.setattr(engine, "gather_kv", recording_gather)
    return gathers, gather_kv


def _check_all_blocks_free(workers) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(
        (load := w.load()).num_free_blocks == load.num_total_blocks for w in workers
    ):
        time.sleep(0.05)
    assert all((load := w.load()).num_free_blocks == load.num_total_blocks for w in workers)
