"""`pdserve up deploy/local.yaml` driven through its OpenAI-compatible HTTP API (Ray actors on CPU).

The router actor serves HTTP beside gRPC: 16 concurrent streamed completions through the
`openai` SDK give exactly the offline engine's greedy tokens, chat answers through the
template, errors come as the SDK's exception types, and `/metrics` counts every request
with the KV cache back to empty afterwards.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.deploy.launcher import up
from pdserve.engine import LLM, SamplingParams

ray = pytest.importorskip("ray")

NUM_STREAMS = 16
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def dep():
    ray.shutdown()  # a cluster left by another test module
    d = up(
        "deploy/local.yaml",
        overrides={"router.port": 0, "router.http_port": 0, "ray.namespace": "pdserve-http-e2e"},
    )
    yield d
    d.down()


def _metrics(url: str) -> dict[str, dict[tuple, float]]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = tuple(v for _, v in sorted(sample.labels.items()))
            out.setdefault(sample.name.removesuffix("_total"), {})[key] = sample.value
    return out


async def _stream_all(base_url: str, prompts: list[str]) -> list[list[int]]:
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(prompt: str) -> list[int]:
        stream = await client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        tokens, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                tokens += chunk.choices[0].model_extra.get("token_ids", [])
            usage = chunk.usage or usage
        assert usage.completion_tokens == len(tokens) == MAX_TOKENS
        return tokens

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await client.close()


def test_openai_sdk_against_pdserve_up(dep):
    assert dep.http_url and dep.http_url.startswith("http://127.0.0.1:")
    prompts = [f"request {i}: the quick brown fox" for i in range(NUM_STREAMS)]
    got = asyncio.run(_stream_all(dep.http_url, prompts))
    llm = LLM("tiny", num_gpu_blocks=512)
    expected = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert got == [o.token_ids for o in expected]

    client = openai.OpenAI(base_url=dep.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    hello = [{"role": "user", "content": "Hello"}]
    chat = client.chat.completions.create(
        model="tiny", messages=hello, max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert chat.usage.completion_tokens == 5 and chat.choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="llama", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", top_p=2.0)

    m = _metrics(dep.http_url)
    assert sum(m["pdserve:time_to_first_token_seconds_count"].values()) == NUM_STREAMS + 1
    assert sum(m["pdserve:request_success"].values()) == NUM_STREAMS + 1
    assert sum(m["pdserve:generation_tokens"].values()) == NUM_STREAMS * MAX_TOKENS + 5
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and set(m["pdserve:kv_cache_usage_perc"].values()) != {0.0}:
        time.sleep(0.2)
        m = _metrics(dep.http_url)
    assert len(m["pdserve:kv_cache_usage_perc"]) == 2  # one prefill, one decode worker
    assert set(m["pdserve:kv_cache_usage_perc"].values()) == {0.0}
