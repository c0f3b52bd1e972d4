"""End to end through the router's gRPC API with Ray actors on CPU.

1P1D on one Ray node and 2P2D on a two-node Ray cluster (prefill pool on one
node, decode pool on the other), over both transfer backends (`grpc`, and
`nccl`, which runs on gloo for CPU tensors): 64 concurrent streams, many sharing
prefixes, give exactly the offline engine's tokens; repeated prefixes report
cached tokens; every KV block is free afterwards, also after 20% of the streams
are cancelled mid-stream.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from pdserve.deploy.launcher import up
from pdserve.engine import LLM, SamplingParams
from pdserve.router.client import AsyncPdserveClient, GenerateChunk, GenerateComplete
from tests.e2e.conftest import one_node_cluster, tiny_config, two_node_cluster

ray = pytest.importorskip("ray")

NUM_REQUESTS = 64
MAX_TOKENS = 16


def make_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[256] + [rng.randrange(256) for _ in range(47)] for _ in range(6)]
    return [
        prefixes[i % 6] + [rng.randrange(256) for _ in range(rng.randrange(1, 40))]
        for i in range(NUM_REQUESTS)
    ]


@pytest.fixture(scope="module")
def expected():
    llm = LLM("tiny", num_gpu_blocks=2048)
    prompts = make_prompts()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return prompts, [o.token_ids for o in outs]


async def run_streams(url: str, prompts, cancel_every: int = 0):
    """All prompts at once; every `cancel_every`-th stream is dropped after 2 chunks."""
    async with AsyncPdserveClient(url) as client:

        async def one(i: int):
            tokens, complete = [], None
            async for ev in client.generate(
                prompts[i], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True
            ):
                if isinstance(ev, GenerateChunk):
                    tokens.extend(ev.token_ids)
                    if cancel_every and i % cancel_every == 0 and len(tokens) >= 2:
                        return tokens, None  # leaving the loop cancels the call
                elif isinstance(ev, GenerateComplete):
                    complete = ev
            return tokens, complete

        return await asyncio.gather(*(one(i) for i in range(len(prompts))))


def wait_all_free(dep, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    status = {}
    while time.monotonic() < deadline:
        status = dep.status()
        workers = status["workers"].values()
        if all(w["num_free_blocks"] == w["num_total_blocks"] for w in workers) and not status["num_streams"]:
            return status
        time.sleep(0.2)
    raise AssertionError(f"KV blocks still in use: {status}")


def check_deployment(dep, expected) -> None:
    prompts, want = expected
    results = asyncio.run(run_streams(dep.url, prompts))
    for i, (tokens, complete) in enumerate(results):
        assert tokens == want[i], f"request {i} differs"
        assert complete is not None and complete.finish_reason == "length"
        assert complete.usage.prompt_tokens == len(prompts[i])
        assert complete.usage.completion_tokens == MAX_TOKENS
    assert sum(c.usage.cached_tokens > 0 for _, c in results) >= NUM_REQUESTS // 2
    wait_all_free(dep)
    # 20% of the streams go away mid-stream: nothing leaks
    results = asyncio.run(run_streams(dep.url, make_prompts(seed=1), cancel_every=5))
    assert sum(c is None for _, c in results) == len(range(0, NUM_REQUESTS, 5))
    wait_all_free(dep)


@pytest.fixture(scope="module")
def one_node():
    with one_node_cluster("pdserve-test-1"):
        yield


@pytest.mark.parametrize("backend", ["grpc", "nccl"])
def test_1p1d(one_node, expected, backend):
    dep = up(tiny_config(1, 1, backend))
    try:
        check_deployment(dep, expected)
    finally:
        dep.down()


@pytest.fixture(scope="module")
def two_nodes():
    with two_node_cluster("pdserve-test-2") as cluster:
        yield cluster


@pytest.mark.parametrize("backend", ["grpc", "nccl"])
def test_2p2d_two_nodes(two_nodes, expected, backend):
    dep = up(tiny_config(2, 2, backend, two_nodes=True))
    try:
        # the pools really are on different nodes
        node_of = {wid: ray.get(h.node_id.remote()) for wid, h in dep.workers.items()}
        prefill_nodes = {n for w, n in node_of.items() if w.startswith("prefill")}
        decode_nodes = {n for w, n in node_of.items() if w.startswith("decode")}
        assert len(prefill_nodes) == len(decode_nodes) == 1 and prefill_nodes != decode_nodes
        check_deployment(dep, expected)
    finally:
        dep.down()
