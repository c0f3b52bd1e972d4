"""Async scheduling gives the same tokens as the synchronous loop, and loses nothing.

Under async scheduling `step()` schedules and launches step N+1 before it reads step
N's tokens; decode rows take their input token from the previous step's device tensor.
On CPU the work runs eagerly, but the bookkeeping (pending tokens, in-flight inputs,
late stops, preemption of a request whose token is in flight) is the same code the
GPU runs, so these tests pin it down.
"""

import itertools
import random

import pytest

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.model_runner import gemm_warm_up_rows


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(256) for _ in range(40)]
    return [
        (shared if i % 2 else []) + [rng.randrange(256) for _ in range(rng.randrange(3, 70))]
        for i in range(n)
    ]


def _params(i: int) -> SamplingParams:
    if i % 4 == 0:  # seeded random sampling: the stream must not shift under async
        return SamplingParams(temperature=0.9, top_p=0.95, seed=i, max_tokens=12 + i % 7, ignore_eos=True)
    if i % 4 == 1:  # stops on EOS whenever the tiny model emits it
        return SamplingParams(temperature=1.2, seed=100 + i, max_tokens=40)
    return SamplingParams(temperature=0.0, max_tokens=5 + i % 9, ignore_eos=True)


@pytest.mark.parametrize("num_blocks", [400, 30])  # 30 blocks: preemption
def test_async_equals_sync(num_blocks: int) -> None:
    prompts = _prompts(24)
    params = [_params(i) for i in range(len(prompts))]
    runs = {}
    for mode in (False, True):
        llm = LLM("tiny", num_gpu_blocks=num_blocks, max_num_batched_tokens=64, async_scheduling=mode)
        runs[mode] = [r.token_ids for r in llm.generate(prompts, params)]
        engine = llm.engine
        assert engine.kv_manager.num_free_blocks == num_blocks, "blocks leaked"
        assert not engine.has_unfinished()
        if num_blocks == 30:
            assert engine.scheduler.num_preemptions > 0, "the small cache should force preemption"
    assert runs[True] == runs[False]
    for tokens, p in zip(runs[True], params, strict=True):
        assert len(tokens) <= p.max_tokens


def test_stop_token_in_flight_is_thrown_away() -> None:
    """A request that stops on a token computes at most one more, which is never reported."""
    llm = LLM("tiny", num_gpu_blocks=64)
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    base = llm.generate([[5, 6, 7]], greedy)[0].token_ids
    stop = base[3]
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop]))
    assert out[0].token_ids == base[: base.index(stop) + 1]
    assert llm.engine.kv_manager.num_free_blocks == 64


def test_outputs_lag_one_step_and_inputs_come_from_the_device() -> None:
    engine = LLMEngine(EngineConfig(num_gpu_blocks=64))
    assert engine.async_scheduling
    engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert engine.step() == []  # prefill launched, nothing read yet
    request = engine.scheduler.requests["a"]
    assert request.num_pending_tokens == 1 and request.num_output_tokens == 0
    first = engine.step()  # launches decode 1 (input still pending), reads the prefill's token
    assert [o.num_output_tokens for o in first] == [1]
    assert request.num_computed_tokens == 4  # scheduled ahead of what is known
    outputs = first
    while engine.has_unfinished():
        outputs += engine.step()
    assert [o.num_output_tokens for o in outputs] == [1, 2, 3]
    assert outputs[-1].finished and engine.num_steps == 3  # no step beyond max_tokens
    assert engine.kv_manager.num_free_blocks == 64


def test_abort_with_a_step_in_flight() -> None:
    engine = LLMEngine(EngineConfig(num_gpu_blocks=64))
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    engine.add_request("a", [1, 2, 3], params)
    engine.add_request("b", [4, 5, 6, 7], params)
    for _ in range(3):
        engine.step()
    assert engine.abort_request("a")
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert {o.req_id for o in outputs} == {"b"}
    assert engine.kv_manager.num_free_blocks == 64


def test_prefill_role_stays_synchronous() -> None:
    engine = LLMEngine(EngineConfig(num_gpu_blocks=64), role="prefill")
    assert not engine.async_scheduling
    engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=8))
    outputs = engine.step()  # the first token comes back from the step that computed it
    assert [o.req_id for o in outputs] == ["a"]
    assert engine.get_block_ids("a")  # held for the sender
    engine.release_request("a")
    assert engine.kv_manager.num_free_blocks == 64


def test_warm_up_runs_the_eager_shapes_and_changes_nothing() -> None:
    """The runner's warm-up (run at start on CUDA to compile kernels) works on any backend and
    leaves no trace: same tokens before and after, every block free, no cached hashes."""
    llm = LLM("tiny", num_gpu_blocks=400)
    prompts, params = _prompts(6), SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    before = [r.token_ids for r in llm.generate(prompts, params)]
    llm.engine.kv_manager.pool.reset_prefix_cache()
    llm.engine.runner.warm_up()
    assert llm.engine.runner._last_sampled is None
    assert llm.engine.kv_manager.num_free_blocks == 400
    assert [r.token_ids for r in llm.generate(prompts, params)] == before


@pytest.mark.parametrize(
    ("max_num_seqs", "max_num_tokens"),
    [(512, 8192), (256, 2048), (4, 10), (8, 8), (300, 1000), (64, 32768), (16, 8200), (256, 9000)],
)
def test_gemm_warm_up_rows_step_through_every_size(max_num_seqs: int, max_num_tokens: int) -> None:
    """Every row count up to max_num_seqs, then no stride over 16 up to 8,192 rows and none
    over 512 past it, increasing, ending at the step budget."""
    rows = gemm_warm_up_rows(max_num_seqs, max_num_tokens)
    assert rows[: min(max_num_seqs, max_num_tokens)] == list(range(1, min(max_num_seqs, max_num_tokens) + 1))
    assert all(0 < b - a <= (16 if b <= 8192 else 512) for a, b in itertools.pairwise(rows))
    assert rows[-1] == max_num_tokens
    if max_num_tokens == 32768:  # the warm-up's GEMM rows, and so its time, stay near 8,192's
        assert sum(rows) < 1.5 * sum(gemm_warm_up_rows(max_num_seqs, 8192))
