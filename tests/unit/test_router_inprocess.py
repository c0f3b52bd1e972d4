"""The router's gRPC API over real in-process workers (gRPC KV transfer, no Ray):
exact tokens, validation errors, cancellation, abort, layout mismatch, health."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.router.client import GenerateChunk, GenerateComplete, PdserveClient, PdserveError
from tests.inprocess import InProcessDeployment


def prompts_with_shared_prefixes(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(256) for _ in range(40)] for _ in range(4)]
    return [prefixes[i % 4] + [rng.randrange(256) for _ in range(rng.randrange(1, 30))] for i in range(n)]


def collect(client: PdserveClient, prompt, max_tokens: int):
    tokens, complete = [], None
    for ev in client.generate(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
        if isinstance(ev, GenerateChunk):
            tokens.extend(ev.token_ids)
        else:
            complete = ev
    return tokens, complete


@pytest.fixture(scope="module")
def dep():
    d = InProcessDeployment(num_prefill=2, num_decode=2, policy="cache_aware")
    yield d
    d.close()


def wait_all_free(dep: InProcessDeployment, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dep.all_blocks_free():
            return
        time.sleep(0.05)
    raise AssertionError([w.load() for w in dep.workers()])


def test_concurrent_streams_match_offline_engine(dep):
    prompts = prompts_with_shared_prefixes(16)
    expected = [
        o.token_ids
        for o in LLM("tiny", num_gpu_blocks=512).generate(
            prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        )
    ]
    results = [None] * len(prompts)
    with PdserveClient(dep.url) as client:

        def run(i):
            results[i] = collect(client, prompts[i], 12)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    for i, (tokens, complete) in enumerate(results):
        assert tokens == expected[i], f"request {i}"
        assert complete.finish_reason == "length" and complete.usage.completion_tokens == 12
        assert complete.timings.ttft_ms > 0
    assert sum(c.usage.cached_tokens for _, c in results) > 0  # shared prefixes hit a cache
    wait_all_free(dep)


def test_cancel_and_abort_free_every_block(dep):
    prompt = prompts_with_shared_prefixes(1, seed=5)[0]
    with PdserveClient(dep.url) as client:
        stream = client.generate(prompt, max_tokens=2000, temperature=0.0, ignore_eos=True)
        next(stream), next(stream)
        stream.close()  # client goes away mid-stream
        events = client.generate(
            prompt, max_tokens=2000, temperature=0.0, ignore_eos=True, request_id="to-abort"
        )
        next(events)
        assert client.abort("to-abort")
        last = list(events)[-1]
        assert isinstance(last, GenerateComplete) and last.finish_reason == "abort"
    wait_all_free(dep)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prompt=[]), "input"),
        (dict(prompt=[1, 2, 99999]), "input.token_ids"),
        (dict(prompt=[1] * 5000), "input.token_ids"),
        (dict(prompt="hi", max_tokens=0), "sampling.max_tokens"),
        (dict(prompt="hi", temperature=-1.0), "sampling.temperature"),
        (dict(prompt="hi", top_p=1.5), "sampling.top_p"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(dep, kwargs, field):
    with PdserveClient(dep.url) as client:
        prompt = kwargs.pop("prompt")
        with pytest.raises(PdserveError) as info:
            list(client.generate(prompt, **kwargs))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in str(info.value)


def test_health_and_model_info(dep):
    with grpc.insecure_channel(dep.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Generation"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with PdserveClient(dep.url) as client:
        info = client.model_info()
    assert info.model_name == "tiny" and info.num_prefill_workers == 2 and info.num_decode_workers == 2


def test_layout_mismatch_is_refused_with_a_clear_error():
    dep = InProcessDeployment(
        num_prefill=1,
        num_decode=1,
        engine=EngineConfig(model="tiny", num_gpu_blocks=256, block_size=32),
        prefill_engine=EngineConfig(model="tiny", num_gpu_blocks=256, block_size=16),
    )
    try:
        with PdserveClient(dep.url) as client:
            with pytest.raises(PdserveError, match="block_size"):
                list(client.generate("hello there", max_tokens=4))
        wait_all_free(dep)
    finally:
        dep.close()


def test_request_beyond_every_cache_is_refused_at_once():
    # Issue 16: it used to wait max_wait_s for room that can never exist, then end
    # RESOURCE_EXHAUSTED; now it is INVALID_ARGUMENT at once, naming both numbers.
    dep = InProcessDeployment(engine=EngineConfig(model="tiny", num_gpu_blocks=8), max_wait_s=30)
    try:
        with PdserveClient(dep.url) as client:
            start = time.monotonic()
            with pytest.raises(PdserveError) as info:
                list(client.generate([1] * 100, max_tokens=200))  # needs 19 blocks of 16
            assert time.monotonic() - start < 5
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "300 tokens (100 in the prompt, 200 in the completion)" in str(info.value)
        assert "holds 128 tokens (8 blocks of 16)" in str(info.value)
    finally:
        dep.close()
